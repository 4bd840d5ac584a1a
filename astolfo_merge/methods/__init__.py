"""Merge methods: the math, one module per family. Importing this package registers every built-in method.

Adding a method is one function and its declaration (methods/slerp.py is the example): the function
holds the math of one key; the declaration names its parameters (the CLI, the recipe validation, the
tab's forms and the README's table follow) and its shape (shapes.py: elementwise, two-pass, Gram or
iterative), from which core chooses the row chunks, the workspace and the direct or Gram form.
"""
from .registry import METHODS, KeyInputs, Method, Param, TensorInputs, apply, get_method, register  # noqa: F401

# isort: off
# The import order is the registration order, which is the order of `methods`, the README table and the
# tab's method list: average, slerp, iso, median, the TIES family (ties.py; its drops in dare.py), karcher,
# stock, rebasin.
from . import average  # noqa: F401
from . import slerp  # noqa: F401
from . import iso, median, ties, karcher, stock  # noqa: F401
from .rebasin import method as _rebasin  # noqa: F401
# isort: on
