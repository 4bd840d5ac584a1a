"""Merge methods. Importing this package registers every built-in method.

Adding a method is one function and its declaration (methods/slerp.py is the example): the function
holds the math of one key; the declaration names its parameters (the CLI, the recipe validation, the
tab's forms and the README's table follow) and its shape (shapes.py: elementwise, two-pass, Gram or
iterative), from which core chooses the row chunks, the workspace and the direct or Gram form.
"""
from .registry import METHODS, KeyInputs, Method, Param, TensorInputs, apply, get_method, register  # noqa: F401
from . import basic  # noqa: F401  (registers)
from . import slerp  # noqa: F401  (registers)
from . import droptrim, isotropic, karcher, median, model_stock  # noqa: F401  (registers the TIES family, geometric median, model stock, Karcher, isotropic)
from ..rebasin import method as _rebasin  # noqa: F401,E402  (registers rebasin, basin_sum)
