"""Merge methods. Importing this package registers every built-in method."""
from .registry import METHODS, KeyInputs, Method, Param, TensorInputs, apply, get_method, register  # noqa: F401
from . import basic  # noqa: F401  (registers)
