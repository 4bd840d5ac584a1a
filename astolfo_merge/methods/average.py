"""The elementwise classics: weighted sum, add difference, N-way average, amplify (ALGORITHMS.md §1–§4).

All elementwise (shapes.py streams their row chunks). The two-model methods hold at most three
chunk-sized buffers at once; the average stages all N models' rows of one chunk, so its chunks shrink
as N grows (memory stays flat). All linear: a NaN/Inf in an input reaches the output.
"""
from __future__ import annotations

from ..errors import RecipeError
from .registry import Method, Param, register
from .shapes import elementwise, stream

TWO_INPUTS = elementwise(3, linear=True)           # two models (or one and the base) and the output
ONE_INPUT = elementwise(2, linear=True)            # one model and the base
N_INPUTS = elementwise(lambda n: n + 2, linear=True)   # every model's rows, staged together, and the sum

ALPHA_HELP = "weight of the second model (B): 0 gives A, 1 gives B"


def _weighted_sum(inputs, params):
    alpha = params["alpha"]

    def rows(a, b):
        x = inputs.read_rows(0, a, b)
        if alpha == 0.0:
            return x
        # the WebUI's own formula: A*(1-M) + B*M
        return x.mul_(1.0 - alpha).add_(inputs.read_rows(1, a, b), alpha=alpha)
    yield from stream(inputs, TWO_INPUTS, rows)


def _add_difference(inputs, params):
    alpha = params["alpha"]

    def rows(a, b):
        x, y, c = inputs.read_rows(0, a, b), inputs.read_rows(1, a, b), inputs.read_base_rows(a, b)
        # the WebUI's own formula: A + (B - C)*M
        return x.add_(y.sub_(c), alpha=alpha)
    yield from stream(inputs, TWO_INPUTS, rows)


def _n_average(inputs, params):
    weights = params.get("weights")
    if weights is not None and len(weights) != inputs.n:
        raise RecipeError("params.weights", f"has {len(weights)} entries for a pool of {inputs.n} models")
    weights = weights or [1.0] * inputs.n
    total = sum(weights)
    if total == 0:
        raise RecipeError("params.weights", "sum to zero")

    def rows(a, b):
        return inputs.sum_rows(a, b, weights).div_(total)
    yield from stream(inputs, N_INPUTS, rows)


def _amplify(inputs, params):
    alpha = params["alpha"]

    def rows(a, b):
        x, r = inputs.read_rows(0, a, b), inputs.read_base_rows(a, b)
        return r.add_(x.sub_(r), alpha=alpha)
    yield from stream(inputs, ONE_INPUT, rows)


register(Method(
    "weighted_sum", "Weighted sum", "(1 − alpha)·A + alpha·B — the WebUI's 'Weighted sum'. Block weights override alpha per block.",
    _weighted_sum, params=(Param("alpha", "float", 0.5, -1.0, 2.0, help=ALPHA_HELP, step=0.01),),
    min_models=2, max_models=2, block_param="alpha", shape=TWO_INPUTS))

register(Method(
    "add_difference", "Add difference", "A + alpha·(B − C), C = base — the WebUI's 'Add difference' (task arithmetic with one task).",
    _add_difference, params=(Param("alpha", "float", 1.0, -2.0, 3.0, help="multiplier of the difference B − C", step=0.01),),
    needs_base=True, min_models=2, max_models=2, block_param="alpha", shape=TWO_INPUTS))

register(Method(
    "n_average", "N-way average (uniform soup)", "(1/N)·Σ models, or the weighted mean with 'weights'; streams, exact in fp64.",
    _n_average, params=(Param("weights", "floats", None, -10.0, 10.0,
                              help="optional per-model weights, in pool order (normalised by their sum)"),),
    min_models=1, shape=N_INPUTS))

register(Method(
    "amplify", "Amplify difference", "R + alpha·(X − R), R = base: extrapolates X away from R (the seeds' amp(X, R, 2)).",
    _amplify, params=(Param("alpha", "float", 2.0, -4.0, 8.0, help="2 makes the midpoint of (R, result) equal X", step=0.05),),
    needs_base=True, min_models=1, max_models=1, block_param="alpha", shape=ONE_INPUT))
