"""Merge methods. Importing this package registers every built-in method.

Adding a method is one function and its declaration (methods/slerp.py is the example): the function
holds the math of one key; the declaration names its parameters (the CLI, the recipe validation, the
tab's forms and the README's table follow) and its shape (shapes.py: elementwise, two-pass, Gram or
iterative), from which core chooses the row chunks, the workspace and the direct or Gram form.
"""
from . import (  # noqa: F401  (registers the TIES family, geometric median, model stock, Karcher, isotropic)
    average as basic,  # noqa: F401  (registers)
    iso as isotropic,
    karcher,
    median,
    slerp,  # noqa: F401  (registers)
    stock as model_stock,
    ties as droptrim,
)
from .rebasin import method as _rebasin  # noqa: F401,E402  (registers rebasin, basin_sum)
from .registry import METHODS, KeyInputs, Method, Param, TensorInputs, apply, get_method, register  # noqa: F401
