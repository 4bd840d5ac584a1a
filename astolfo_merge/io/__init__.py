"""Files and what they hold: the safetensors reader and streaming writer, legacy files, hashes, strict
JSON, architecture identification from headers, the folders the tab may use. Imports nothing above it."""
