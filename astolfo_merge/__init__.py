"""AstolfoMerge: a bounded-memory, exact N-way Stable Diffusion checkpoint merger.

The package is a library first; the CLI (`python -m astolfo_merge`), the standalone tab and the
WebUI extension (scripts/) are thin clients of it. Nothing here imports the WebUI.
"""
__version__ = "0.1.0"
