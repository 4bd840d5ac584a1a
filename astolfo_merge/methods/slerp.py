"""SLERP of two models: per key, spherical interpolation of the directions, lerp of the norms.

With â = A/‖A‖, b̂ = B/‖B‖, cos ω = clamp(⟨â, b̂⟩, −1, 1):
    slerp(A, B, α) = (sin((1 − α)ω)·â + sin(αω)·b̂) / sin ω · lerp(‖A‖, ‖B‖, α)
— sd-mecha 1.1.8 `slerp`, operation for operation in the direct form. Falls back to lerp(A, B, α):
* where sd-mecha does: the slerp is NaN (exactly parallel directions, sin ω = 0; a zero tensor);
* deliberately also where the directions are antiparallel, cos ω < −DOT_THRESHOLD (mergekit's
  threshold 0.9995): the great circle through â and −â is not defined, and sd-mecha divides rounding
  noise by sin ω ≈ 1e-16 there. Near-parallel directions keep the slerp, as in sd-mecha (mergekit
  lerps beyond |cos ω| > 0.9995 on that side too).

The whole key enters only through ‖A‖², ‖B‖² and ⟨A, B⟩, the 2×2 Gram matrix, so the method is
Gram-shaped: shapes.py runs the direct form when the key fits one chunk, else accumulates the Gram
matrix over row chunks and writes c_A·A + c_B·B in a second pass (equal to the direct form to rounding).
"""
from __future__ import annotations

import math

import torch

from .registry import Method, Param, register
from .shapes import GramMath, gram, gram_key

DOT_THRESHOLD = 0.9995


def _antiparallel(cos: float) -> bool:
    return cos < -DOT_THRESHOLD


def slerp_direct(a: torch.Tensor, b: torch.Tensor, alpha: float):
    """sd-mecha's slerp on the whole tensors (and its lerp fallback), plus the antiparallel fallback."""
    a_normalized, b_normalized = a / a.norm(), b / b.norm()
    ab_dot = (a_normalized * b_normalized).sum().clamp(-1, 1)
    if _antiparallel(float(ab_dot)):
        return torch.lerp(a, b, alpha), "antiparallel: lerp"
    omega = torch.arccos(ab_dot)
    res = (a_normalized * torch.sin((1 - alpha) * omega) + b_normalized * torch.sin(alpha * omega)) / torch.sin(omega)
    res *= torch.lerp(a.norm(), b.norm(), alpha)
    if res.isnan().any():
        return torch.lerp(a, b, alpha), "parallel or zero: lerp"
    return res, f"angle {float(omega):.4g} rad"


def slerp_coefficients(g: torch.Tensor, alpha: float):
    """(c_A, c_B) with slerp(A, B, α) = c_A·A + c_B·B, from the Gram matrix of A and B."""
    norm_a, norm_b = math.sqrt(max(float(g[0, 0]), 0.0)), math.sqrt(max(float(g[1, 1]), 0.0))
    lerp = (1 - alpha, alpha)
    if norm_a == 0.0 or norm_b == 0.0:
        return torch.tensor(lerp, dtype=torch.float64), "parallel or zero: lerp"
    cos = min(1.0, max(-1.0, float(g[0, 1]) / (norm_a * norm_b)))
    if _antiparallel(cos):
        return torch.tensor(lerp, dtype=torch.float64), "antiparallel: lerp"
    omega = math.acos(cos)
    if math.sin(omega) == 0.0:
        return torch.tensor(lerp, dtype=torch.float64), "parallel or zero: lerp"
    scale = (norm_a + alpha * (norm_b - norm_a)) / math.sin(omega)
    coeffs = (math.sin((1 - alpha) * omega) * scale / norm_a, math.sin(alpha * omega) * scale / norm_b)
    return torch.tensor(coeffs, dtype=torch.float64), f"angle {omega:.4g} rad"


# Gram form: the 2 models' rows of a chunk, their product and the output; the direct form also
# holds the unit vectors and the two weighted terms of the whole key.
SHAPE = gram(lambda n: n + 3, direct=lambda n: 3 * n + 1)


def _slerp(inputs, params):
    alpha = params["alpha"]
    math_ = GramMath("slerp", lambda points: slerp_direct(points[0], points[1], alpha),
                     lambda g: slerp_coefficients(g, alpha))
    yield from gram_key(inputs, SHAPE, math_)


register(Method(
    "slerp", "SLERP (spherical interpolation)",
    "Per key, interpolate A and B along the great circle between their directions and lerp their norms "
    "(sd-mecha 'slerp'); falls back to the weighted sum where the directions are parallel or opposite. "
    "Block weights override alpha per block.",
    _slerp, shape=SHAPE,
    params=(Param("alpha", "float", 0.5, 0.0, 1.0, step=0.01,
                  help="the interpolation t: 0 gives A, 1 gives B (up to rounding), 0.5 the midpoint on the sphere"),),
    min_models=2, max_models=2, block_param="alpha"))
