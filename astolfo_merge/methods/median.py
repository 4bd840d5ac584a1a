"""Geometric median of whole tensors by Weiszfeld's algorithm (ALGORITHMS.md §10.1).

Each model's tensor of a key is ONE point in R^numel; the median is a convex combination
`Σ c_i x_i` with one coefficient per model. That makes a bounded-memory form exact in algebra:
the iteration only needs the distances ‖x_i − m‖, which follow from the N×N Gram matrix
G = ⟨x_i, x_j⟩ (accumulated over row chunks), and the output is one more chunked pass Σ c_i x_i.

Two forms, chosen per key by shapes.py (the method declares the iterative shape):
* direct — the N tensors of the key fit one chunk: distances are computed from the tensors
  themselves (what sd-mecha does; the golden form);
* gram — otherwise: Gram of the points centred on their per-element mean (translation does not
  change distances, and centring keeps ‖x_i − m‖² from cancelling against ‖x_i‖²), then a final
  pass. Agrees with the direct form to ~1e-9 relative: the minimum is flat, so any Weiszfeld run
  (this one, sd-mecha's, another summation order) fixes the point only to ~√ulp of the objective.

Karcher (karcher.py) reuses the Gram helpers (shapes.py); the TIES family (ties.py) reuses `median_math`
for TGMD/DGMLA with its filtered deltas.
"""
from __future__ import annotations

import torch

from .registry import Method, Param, register
from .shapes import GramMath, gram_key, iterative, iterative_math

EPS_HELP = "distance floor of the Weiszfeld weights 1/max(d, eps) (sd-mecha / geom_median default 1e-6)"
MAXITER_HELP = "maximum Weiszfeld iterations"
FTOL_HELP = "stop when the objective changes by at most ftol × objective (1e-20: until it no longer changes)"


def weiszfeld_direct(points, eps: float, maxiter: int, ftol: float):
    """The golden form, operation for operation as sd-mecha 1.1.8 `geometric_median` (itself
    krishnap25/geom_median with unit weights): start at the mean, reweight by 1/max(d, eps), stop on
    |Δobjective| ≤ ftol·objective. `points`: the N tensors. Returns (median, iterations run).

    The same elementwise operations in the same order give the same bits, so two of sd-mecha's
    three passes per iteration are skipped: the distances that start an iteration are those the
    previous objective was computed from, and the median returned is the last one computed (same
    weights). The sums run in place in buffers made once (`0 + a` as `a + 0`, which also turns −0
    into +0; `torch.dist` is `norm(x − m)`), so no pass allocates and faults in fresh pages."""
    points = list(points)
    ones = torch.ones(len(points), dtype=points[0].dtype, device=points[0].device)
    weights = ones
    median, scratch = torch.empty_like(points[0]), torch.empty_like(points[0])

    def weighted_sum(coeffs):           # sum(x * coeffs[i] for i, x in enumerate(points)), in place
        torch.mul(points[0], coeffs[0], out=median).add_(0)
        for i in range(1, len(points)):
            median.add_(torch.mul(points[i], coeffs[i], out=scratch))
        return median

    def distances():                    # torch.stack([torch.dist(x, median) for x in points])
        return torch.stack([torch.norm(torch.sub(x, median, out=scratch)) for x in points])

    torch.add(points[0], 0, out=median)
    for x in points[1:]:
        median.add_(x)
    median.div_(len(points))            # sum(points) / len(points)
    dist = distances()
    objective = torch.mean(dist * ones)
    done = 0
    for done in range(1, max(0, maxiter) + 1):
        previous = objective
        weights = ones / torch.clamp(dist, min=eps)
        weighted_sum(weights).div_(sum(weights))
        dist = distances()
        objective = torch.mean(dist * ones)
        if abs(previous - objective) <= ftol * objective:
            break
    if done == 0:      # no iteration: sd-mecha's final weighted sum, with unit weights
        weighted_sum(weights).div_(sum(weights))
    return median, done


def weiszfeld_gram(gram: torch.Tensor, eps: float, maxiter: int, ftol: float):
    """The same iteration on coefficients c (median = Σ c_i x_i, Σ c = 1), with distances from the
    Gram matrix: ‖x_i − m‖² = G_ii − 2(Gc)_i + cᵀGc (clamped at 0). Returns (c, iterations run)."""
    n = gram.shape[0]
    diag = gram.diagonal().clone()

    def distances(coeffs):
        gc = gram @ coeffs
        return (diag - 2.0 * gc + coeffs @ gc).clamp(min=0.0).sqrt()

    ones = torch.ones(n, dtype=torch.float64)
    coeffs = ones / n
    dist = distances(coeffs)
    objective = dist.mean()
    done = 0
    for done in range(1, max(0, maxiter) + 1):
        previous = objective
        weights = ones / dist.clamp(min=eps)
        coeffs = weights / weights.sum()
        dist = distances(coeffs)
        objective = dist.mean()
        if abs(previous - objective) <= ftol * objective:
            break
    return coeffs, done


def median_math(eps: float, maxiter: int, ftol: float) -> GramMath:
    """Both forms of the median; shapes.py picks one per key (centred Gram: distances only)."""
    return iterative_math("geometric median", weiszfeld_direct, weiszfeld_gram, eps, maxiter, ftol, centre=True)


SHAPE = iterative(lambda n: n + 3)    # the N points of a chunk, the product and two temporaries


def _geometric_median(inputs, params):
    yield from gram_key(inputs, SHAPE, median_math(params["eps"], params["maxiter"], params["ftol"]))


GM_PARAMS = (
    Param("eps", "float", 1e-6, 0.0, 1.0, help=EPS_HELP),
    Param("maxiter", "int", 100, 0, 100000, help=MAXITER_HELP, step=1),
    Param("ftol", "float", 1e-20, 0.0, 1.0, help=FTOL_HELP),
)

register(Method(
    "geometric_median", "Geometric median (Fermat point)",
    "Weiszfeld geometric median of the raw weights: each model's key is one point; robust to a minority "
    "of outlier models (breakdown point 1/2). No base. Memory-bounded via the N×N Gram matrix.",
    _geometric_median, shape=SHAPE, params=GM_PARAMS, min_models=1))
