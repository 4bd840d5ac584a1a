"""The elementwise classics: weighted sum, add difference, N-way average, amplify (ALGORITHMS.md §1–§4).

All stream row chunks; each holds at most three chunk-sized buffers at once, whatever N is.
"""
from __future__ import annotations

import torch

from ..errors import RecipeError
from .registry import Method, Param, register

ALPHA_HELP = "weight of the second model (B): 0 gives A, 1 gives B"


def _weighted_sum(inputs, params):
    alpha = params["alpha"]

    def rows(a, b):
        x = inputs.read_rows(0, a, b)
        if alpha == 0.0:
            return x
        # the WebUI's own formula: A*(1-M) + B*M
        return x.mul_(1.0 - alpha).add_(inputs.read_rows(1, a, b), alpha=alpha)
    yield from inputs.imap(rows, inputs.chunks(resident=3))


def _add_difference(inputs, params):
    alpha = params["alpha"]

    def rows(a, b):
        x, y, c = inputs.read_rows(0, a, b), inputs.read_rows(1, a, b), inputs.read_base_rows(a, b)
        # the WebUI's own formula: A + (B - C)*M
        return x.add_(y.sub_(c), alpha=alpha)
    yield from inputs.imap(rows, inputs.chunks(resident=3))


EXACT_FP16_SUM = 8192   # fp16 values are multiples of 2^-24 below 2^16: up to 2^13 of them sum exactly in fp64


def _n_average(inputs, params):
    weights = params.get("weights")
    if weights is not None and len(weights) != inputs.n:
        raise RecipeError("params.weights", f"has {len(weights)} entries for a pool of {inputs.n} models")
    weights = weights or [1.0] * inputs.n
    total = sum(weights)
    if total == 0:
        raise RecipeError("params.weights", "sum to zero")
    used = [i for i, w in enumerate(weights) if w != 0]
    # Unit weights over fp16 values in fp64: the sum is exact, so one reduction op (any order) gives
    # the same bits as the ordered sum; otherwise add in pool order (chunk-independent rounding).
    exact = (inputs.dtype == torch.float64 and all(weights[i] == 1.0 for i in used) and len(used) <= EXACT_FP16_SUM
             and all(d == torch.float16 for d in inputs.pool_dtypes()))

    def rows(a, b):
        if not used:
            return torch.zeros((b - a,) + inputs.shape[1:], dtype=inputs.dtype)
        if len(used) < inputs.n:      # a zero weight: that model is not even read
            parts = [inputs.read_rows(i, a, b) for i in used]
        else:
            parts = inputs.read_stack(a, b)
        if exact:
            acc = parts.sum(dim=0) if isinstance(parts, torch.Tensor) else torch.stack(parts).sum(dim=0)
        else:
            acc = parts[0].clone()
            if weights[used[0]] != 1.0:
                acc.mul_(weights[used[0]])
            for i, x in zip(used[1:], parts[1:]):
                acc.add_(x, alpha=weights[i])
        return acc.div_(total)
    resident = inputs.n + 2
    yield from inputs.imap(rows, inputs.chunks(resident=resident))


def _amplify(inputs, params):
    alpha = params["alpha"]

    def rows(a, b):
        x, r = inputs.read_rows(0, a, b), inputs.read_base_rows(a, b)
        return r.add_(x.sub_(r), alpha=alpha)
    yield from inputs.imap(rows, inputs.chunks(resident=2))


register(Method(
    "weighted_sum", "Weighted sum", "(1 − alpha)·A + alpha·B — the WebUI's 'Weighted sum'. Block weights override alpha per block.",
    _weighted_sum, params=(Param("alpha", "float", 0.5, -1.0, 2.0, help=ALPHA_HELP, step=0.01),),
    min_models=2, max_models=2, block_param="alpha", resident=lambda n: 3))

register(Method(
    "add_difference", "Add difference", "A + alpha·(B − C), C = base — the WebUI's 'Add difference' (task arithmetic with one task).",
    _add_difference, params=(Param("alpha", "float", 1.0, -2.0, 3.0, help="multiplier of the difference B − C", step=0.01),),
    needs_base=True, min_models=2, max_models=2, block_param="alpha", resident=lambda n: 3))

register(Method(
    "n_average", "N-way average (uniform soup)", "(1/N)·Σ models, or the weighted mean with 'weights'; streams, exact in fp64.",
    _n_average, params=(Param("weights", "floats", None, -10.0, 10.0,
                              help="optional per-model weights, in pool order (normalised by their sum)"),),
    min_models=1, resident=lambda n: n + 2))

register(Method(
    "amplify", "Amplify difference", "R + alpha·(X − R), R = base: extrapolates X away from R (the seeds' amp(X, R, 2)).",
    _amplify, params=(Param("alpha", "float", 2.0, -4.0, 8.0, help="2 makes the midpoint of (R, result) equal X", step=0.05),),
    needs_base=True, min_models=1, max_models=1, block_param="alpha", resident=lambda n: 2))
