"""Karcher (Riemannian) mean on the hypersphere — "Karmix" (ALGORITHMS.md §13.1; mergekit `karcher`).

Per key, each model's tensor x_i is split into a norm n_i = ‖x_i‖_F and a direction u_i = x_i / n_i.
The directions are averaged on the unit sphere by the Karcher iteration (members with n_i ≤ tol are
left out of it, weights renormalised over the rest); the output is (Σ α_i n_i)·u. Raw weights, no base.

Bounded memory: u always stays in span{x_i}, so the iteration runs on coefficients a (u = Σ a_i x_i)
with every inner product taken from the N×N Gram matrix of the x_i (accumulated over row chunks),
and one more chunked pass forms Σ c_i x_i. When the key's N tensors fit one chunk, the direct form
(mergekit's loop on materialised vectors, in fp64) is used instead; shapes.py decides, from the
declared iterative shape and the budget.
"""
from __future__ import annotations

import math

import torch

from ..errors import RecipeError
from .registry import Method, Param, register
from .shapes import GramMath, gram_key, iterative, iterative_math, stream_model


def _alphas(params, n):
    weights = params.get("weights")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise RecipeError("params.weights", f"has {len(weights)} entries for a pool of {n} models")
    total = sum(weights)
    if total <= 0:
        raise RecipeError("params.weights", "must sum to a positive number")
    return [w / total for w in weights]


def karcher_direct(tensors, alphas, max_iter, tol):
    """mergekit's karcher_merge_tensors, step for step, in the tensors' own (fp64) precision."""
    norms = [float(torch.linalg.vector_norm(x)) for x in tensors]
    valid = [i for i, nrm in enumerate(norms) if nrm > tol]
    if not valid:
        return torch.zeros_like(tensors[0]), 0
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [tensors[i] / norms[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for w, u in zip(weights, units):
        mean += w * u
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    done = 0
    for done in range(1, max_iter + 1):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = float(torch.linalg.vector_norm(mean))
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = sum(a * nrm for a, nrm in zip(alphas, norms))
    return scale * mean, done


def karcher_coefficients(gram: torch.Tensor, alphas, max_iter, tol):
    """The same iteration on coefficients over x_i (u = Σ a_i x_i); returns (c, iterations) with output Σ c_i x_i."""
    n = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros(n, dtype=torch.float64), 0
    total = sum(alphas[i] for i in valid)
    weights = torch.zeros(n, dtype=torch.float64)
    for i in valid:
        weights[i] = alphas[i] / total
    inv = torch.zeros(n, dtype=torch.float64)
    inv[valid] = 1.0 / norms[valid]                    # u_i = inv_i · x_i

    def g_norm(c):
        return float((c @ gram @ c).clamp(min=0).sqrt())

    coeffs = weights * inv
    mean_norm = g_norm(coeffs)
    if mean_norm < tol:
        coeffs = torch.zeros(n, dtype=torch.float64)
        coeffs[valid[0]] = inv[valid[0]]
    else:
        coeffs = coeffs / mean_norm
    done = 0
    for done in range(1, max_iter + 1):
        dots = ((gram @ coeffs) * inv).clamp(-1.0, 1.0)
        theta = torch.arccos(dots)
        active = (weights > 0) & (theta >= tol)
        scale = torch.where(active, weights * theta / torch.sin(theta), torch.zeros_like(theta))
        tangent = scale * inv - (scale * dots).sum() * coeffs
        tangent_norm = g_norm(tangent)
        if tangent_norm < tol:
            break
        coeffs = math.cos(tangent_norm) * coeffs + math.sin(tangent_norm) * tangent / tangent_norm
        unit_norm = g_norm(coeffs)
        if unit_norm > tol:
            coeffs = coeffs / unit_norm
    return sum(a * float(nrm) for a, nrm in zip(alphas, norms)) * coeffs, done


def karcher_math(alphas, max_iter, tol) -> GramMath:
    """Both forms of the Karcher mean; shapes.py picks one per key (raw Gram: norms and angles)."""
    return iterative_math("karcher", karcher_direct, karcher_coefficients, alphas, max_iter, tol)


# Gram form: the N tensors of a chunk and three temporaries; the direct form also holds their unit vectors.
SHAPE = iterative(lambda n: n + 3, direct=lambda n: 2 * n + 3)


def _karcher(inputs, params):
    alphas = _alphas(params, inputs.n)
    if inputs.n == 1:             # one model: itself (its direction times its norm, without the rounding)
        yield from stream_model(inputs)
        return
    yield from gram_key(inputs, SHAPE, karcher_math(alphas, params["max_iter"], params["tol"]))


register(Method(
    "karcher", "Karcher mean (Karmix)",
    "Riemannian mean of the models' directions on the unit sphere, scaled by the weighted mean of their norms "
    "(mergekit 'karcher', chemwolf118/Karcher-merge). Raw weights, no base.",
    _karcher,
    params=(
        Param("max_iter", "int", 10, 0, 1000, help="maximum Karcher iterations", step=1),
        Param("tol", "float", 1e-5, 0.0, 1.0,
              help="convergence threshold on the tangent norm; also the norm below which a model has no direction"),
        Param("weights", "floats", None, 0.0, 100.0,
              help="optional per-model weights in pool order (normalised to sum 1); default uniform"),
    ),
    shape=SHAPE, min_models=1))
