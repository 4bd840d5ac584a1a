"""Isotropic merging: Iso-C (2502.04959, official code) and the author's Iso-Z (ALGORITHMS.md §12).

Per key, with M = Σ_t τ_t (the SUM of the deltas, as the official code) and its thin SVD U diag(σ) Vᵀ:
* iso_c  Δ = μ·U Vᵀ, μ = mean(σ): every singular value replaced by their mean — for 2-D keys whose
         name lacks `text_projection`; every other key gets the plain mean of the deltas.
* iso_z  σ'_i = μ + z·(σ_i − μ), Δ = U diag(σ') Vᵀ — z = 0 is Iso-C's flat spectrum, z = 1 leaves
         M unchanged (the author's z-score form divides and re-multiplies by the variance of σ, which
         cancels). All 2-D keys are transformed (text_projection and embeddings included, as the author's
         fork), convs too with `high_dim` (viewed as [out, in·kh·kw]); μ may be the geometric mean.
         Keys not transformed get the mean of the deltas, as in Iso-C, so z = 0 reproduces Iso-C.
θ = θ_0 + α·Δ.

Guards (the author's code has none): a degenerate spectrum — an all-zero delta (every pool member
equals the base in that key, e.g. SDXL's unused CLIP-L last layer), fewer than 2 singular values,
zero or non-finite variance — leaves M unchanged (so an all-zero delta keeps the base) and is logged.

Memory: M is one full tensor (accumulated over row chunks). The SVD form needs ≈ 4 copies of it; when
that exceeds the budget the spectrum comes from the small Gram matrix MᵀM (or MMᵀ for wide keys) and
Δ = M·V diag(σ'/σ) Vᵀ (or U diag(σ'/σ) Uᵀ·M) is produced row chunk by row chunk. Declared resident:
2 full tensors (M and one transformed copy); the SVD's extra copies only ever use the chunk budget.
"""
from __future__ import annotations

import math

import torch

from .registry import Method, Param, register
from .shapes import spans, stream, two_pass, whole_copies_fit

RANK_FLOOR = 1e-10     # Gram form only where the smallest σ is above this fraction of the largest


def spectrum(sigma: torch.Tensor, z: float, geometric: bool, clamp: bool):
    """σ' for the given σ, or None when the spectrum is degenerate (then M is kept as it is)."""
    if sigma.numel() < 2 or not bool(torch.isfinite(sigma).all()) or float(sigma.max()) == 0.0:   # all-zero delta
        return None
    var = float(sigma.var())
    if not math.isfinite(var) or var == 0.0:
        return None
    mu = torch.exp(torch.log(sigma).mean()) if geometric else sigma.mean()
    new = mu + z * (sigma - mu)
    return new.clamp(min=0.0) if clamp else new


def _svd_form(matrix, z, geometric, clamp):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    new = spectrum(s, z, geometric, clamp)
    return None if new is None else (u * new) @ vh


def _gram_form(matrix, z, geometric, clamp):
    """(right_operator, left_operator, note): Δ = M @ R (tall) or L @ M (wide); None if degenerate; 'svd' to fall back."""
    tall = matrix.shape[0] >= matrix.shape[1]
    gram = matrix.T @ matrix if tall else matrix @ matrix.T
    evals, vecs = torch.linalg.eigh(gram)
    sigma = evals.clamp(min=0).sqrt()
    new = spectrum(sigma, z, geometric, clamp)
    if new is None:
        return None
    if float(sigma.min()) <= RANK_FLOOR * float(sigma.max()):
        return "svd"
    operator = (vecs * (new / sigma)) @ vecs.T
    return ("right", operator) if tall else ("left", operator)


# Chunks: the base, one model and the total; whole: M and one transformed copy (the SVD's other
# copies only ever use the chunk budget: shapes.whole_copies_fit picks the Gram form otherwise).
SHAPE = two_pass(3, statistic=3, whole=2)


def _mean_delta(inputs, alpha):
    def rows(a, b):
        base = inputs.read_base_rows(a, b)
        total = torch.zeros_like(base)
        for i in range(inputs.n):
            total += inputs.read_rows(i, a, b).sub_(base)
        return base.add_(total, alpha=alpha / inputs.n)
    yield from stream(inputs, SHAPE, rows)


def isotropic_rows(matrix: torch.Tensor, z: float, geometric: bool, clamp: bool, fits: bool, log):
    """The transformed delta of a full 2-D `matrix`, as a function rows(a, b) -> its rows [a, b).

    SVD form when `fits` (≈ 4 copies of `matrix` fit the budget: shapes.whole_copies_fit), else the
    Gram form; a degenerate spectrum (all-zero delta, < 2 singular values, no variance) returns
    `matrix` itself, logged."""
    result = None if fits else _gram_form(matrix, z, geometric, clamp)
    delta = _svd_form(matrix, z, geometric, clamp) if fits or result == "svd" else None
    if delta is None and result in (None, "svd"):
        log("isotropic: degenerate spectrum (all-zero delta or no variance): delta kept as it is"
            + (" — all zeros, the base's value" if not bool(matrix.any()) else ""))
        return lambda a, b: matrix[a:b]
    if delta is not None:
        log(f"isotropic: svd form, {min(matrix.shape)} singular values")
        return lambda a, b: delta[a:b]
    log(f"isotropic: gram form, {min(matrix.shape)} singular values")
    side, operator = result
    if side == "right":
        return lambda a, b: matrix[a:b] @ operator
    return lambda a, b: operator[a:b] @ matrix


def transforms(shape, high_dim: bool) -> bool:
    """The author's rule: 2-D keys always, convs (> 2 dims, viewed [out, rest]) with high_dim."""
    return len(shape) == 2 or (len(shape) > 2 and high_dim)


def _transformed(inputs, alpha, z, geometric, clamp):
    statistic = spans(inputs, SHAPE, "statistic")
    matrix = torch.empty((inputs.rows, math.prod(inputs.shape[1:])), dtype=inputs.dtype, device=inputs.device)
    for a, b in statistic:
        base = inputs.read_base_rows(a, b)
        part = matrix[a:b]
        part.zero_()
        for i in range(inputs.n):
            part += inputs.read_rows(i, a, b).sub_(base).reshape(b - a, -1)
    delta = isotropic_rows(matrix, z, geometric, clamp, whole_copies_fit(inputs, matrix), inputs.log)
    for a, b in spans(inputs, SHAPE):
        base = inputs.read_base_rows(a, b)
        yield base.add_(delta(a, b).reshape(base.shape), alpha=alpha)


def _iso(variant):
    def run(inputs, params):
        shape = inputs.shape
        if variant == "c":
            transform = len(shape) == 2 and "text_projection" not in inputs.key
            z, geometric, clamp = 0.0, False, False
        else:
            transform = transforms(shape, params["high_dim"])
            z, geometric, clamp = params["z"], params["geometric_mean"], params["clamp"]
        if transform:
            yield from _transformed(inputs, params["alpha"], z, geometric, clamp)
        else:
            yield from _mean_delta(inputs, params["alpha"])
    return run


ALPHA = Param("alpha", "float", 1.0, -1.0, 3.0, step=0.01, help="scale α of the merged delta: base + α·Δ")

register(Method(
    "iso_c", "Iso-C (isotropic merge)",
    "Official Iso-C: for 2-D keys the SVD of the summed deltas with every singular value replaced by their "
    "mean (a flat spectrum); other keys get the mean delta. base + alpha·Δ.",
    _iso("c"), shape=SHAPE, params=(ALPHA,), needs_base=True, min_models=1))

register(Method(
    "iso_z", "Iso-Z (the author's isotropic variant)",
    "Blend the spectrum of the summed deltas toward its mean: σ' = μ + z·(σ − μ). z = 0 is Iso-C, z = 1 keeps "
    "the delta; the author used z = 0.8 (and 2.0) with high-dim on.",
    _iso("z"),
    params=(
        Param("z", "float", 0.8, -2.0, 4.0, step=0.05, help="spectrum blend: 0 = flat (Iso-C), 1 = unchanged, > 1 sharpens"),
        Param("geometric_mean", "bool", False, help="μ = geometric mean of σ (the fork's apply_exp) instead of the arithmetic mean"),
        Param("high_dim", "bool", True, help="also transform convs, viewed as [out, in·kh·kw] (the fork's apply_high_dim)"),
        Param("clamp", "bool", False, help="clamp σ' at 0 (for z > 1 small singular values go negative; the author does not clamp)"),
        ALPHA,
    ),
    shape=SHAPE, needs_base=True, min_models=1))
