"""Not pydantic: first on the path of a local Ray's own processes when the environment has pydantic
v1, which Ray 2.60 refuses at import (see ray_executor.start_local). Ray then runs as without it."""
raise ImportError("pydantic v1 is hidden from Ray's processes (AstolfoMerge)")
