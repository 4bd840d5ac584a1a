"""Merge methods. Importing this package registers every built-in method."""
from .registry import METHODS, KeyInputs, Method, Param, TensorInputs, apply, get_method, register  # noqa: F401
from . import basic  # noqa: F401  (registers)
from . import slerp  # noqa: F401  (registers)
from . import droptrim, isotropic, karcher, median, model_stock  # noqa: F401  (registers the TIES family, geometric median, model stock, Karcher, isotropic)
from ..rebasin import method as _rebasin  # noqa: F401,E402  (registers rebasin, basin_sum)
