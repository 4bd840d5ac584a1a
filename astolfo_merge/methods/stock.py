"""Model Stock (ALGORITHMS.md §9): θ = θ_0 + t·mean(τ), t = N·cosθ / (1 + (N − 1)·cosθ).

The paper leaves open how to estimate the common angle θ for N > 2; the estimators:
* consecutive-last-axis (default; sd-mecha 1.1.8 `n_model_stock`, the author's PR): cosines between
  consecutive pool members (t, t+1) along the LAST axis, averaged over the N − 1 pairs — one t per
  last-axis vector (a row of a 2-D key, a kernel row of a conv, the whole of a 1-D key);
* all-pairs-flat (mergekit `model_stock`): mean over all pairs i < j of the cosine of the flattened
  deltas, clamped to [−1, 1], norm product floored at cos_eps — one t per key;
* all-pairs-rowwise (mergekit `filter_wise`): the same per output row (dim 0, the rest flattened; 1-D
  keys are one row). For 2-D keys this is mergekit's filter_wise; for convs mergekit would use kW.

Guard (§9): where |1 + (N − 1)·cosθ| ≤ 1e-12 or t is not finite, t = 0 there (the base's values) and
the key's log says how many places; sd-mecha's nan_to_num would write ±float max instead.

Memory: row-local estimators are one pass over row chunks (a row is never split), reading each model
once; whole-tensor estimates accumulate the N×N Gram matrix of the deltas over chunks, then a second pass.
"""
from __future__ import annotations

import torch

from .registry import Method, Param, register
from .shapes import GramMath, gram_key, spans as row_spans, two_pass

ESTIMATORS = ("consecutive-last-axis", "all-pairs-flat", "all-pairs-rowwise")
GUARD = 1e-12


# Chunk-sized tensors alive at once: the deltas, their unit vectors, the pair products, base and total.
# Two passes where the angle is one per key (the N×N Gram of the deltas first); one where it is per row.
SHAPE = two_pass(lambda n: 3 * n + 3)


def stock_factor(cos: torch.Tensor, n: int, log) -> torch.Tensor:
    """t = N cos / (1 + (N − 1) cos), 0 where the denominator vanishes or t is not finite."""
    denom = 1 + (n - 1) * cos
    t = n * cos / denom
    bad = (denom.abs() <= GUARD) | ~torch.isfinite(t)
    if bool(bad.any()):
        log(f"model stock: t undefined at {int(bad.sum())} place(s) (cos = −1/(N − 1)); the base's values kept there")
        t = torch.where(bad, torch.zeros_like(t), t)
    return t


def _consecutive_rows(inputs, eps, spans):
    """sd-mecha's estimator for keys of ≥ 2 dims: each chunk holds whole last-axis vectors. All N
    deltas of a chunk are handled at once, with torch's own cosine_similarity steps (each vector over
    its norm clamped at eps, then the dot product), so the values are those of N − 1 separate calls."""
    n = inputs.n
    for a, b in spans:
        base = inputs.read_base_rows(a, b)
        deltas = inputs.read_stack(a, b)
        deltas -= base
        total = deltas[0].clone()
        for i in range(1, n):
            total.add_(deltas[i])                                                # pool order
        units = _over_last_axis(deltas, torch.linalg.vector_norm(deltas, dim=-1, keepdim=True).clamp_min_(eps))
        cos = _last_axis_dots(units[:-1], units[1:])                             # [n - 1, rows, ...]
        del units
        cos_sum = cos[0].clone()
        for i in range(1, n - 1):
            cos_sum.add_(cos[i])
        t = stock_factor(cos_sum / (n - 1), n, inputs.log).unsqueeze(-1)
        yield base.add_(t * (total / n))


SHORT_AXIS = 4


def _last_axis_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(x * y).sum(dim=-1), the same bits. For a short last axis (a conv's kernel row of 3) torch's
    reduction loops over 3 elements per output, ~10x slower per element than elementwise ops; its
    order there is ((0 + p_0) + p_1) + p_2 (the + 0 turns a −0 first term into +0), so the products
    are added in that order as whole strided slices instead (tests/methods/test_stock.py)."""
    length = x.shape[-1]
    if length > SHORT_AXIS:
        return (x * y).sum(dim=-1)
    out = torch.zeros(x.shape[:-1], dtype=torch.promote_types(x.dtype, y.dtype), device=x.device)
    for k in range(length):
        out += x[..., k] * y[..., k]
    return out


def _over_last_axis(x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """x / norms (norms: x's shape with a last axis of 1), the same quotients; for a short last axis
    one division per strided slice instead of a broadcast over an innermost axis of 3."""
    if x.shape[-1] > SHORT_AXIS:
        return x / norms
    out = torch.empty_like(x)
    for k in range(x.shape[-1]):
        torch.div(x[..., k], norms[..., 0], out=out[..., k])
    return out


def _rowwise_pairs(inputs, eps, spans):
    """mergekit filter_wise for keys of ≥ 2 dims: all-pairs cosines per output row."""
    n = inputs.n
    pairs = torch.triu_indices(n, n, offset=1)
    for a, b in spans:
        base = inputs.read_base_rows(a, b)
        stack = inputs.read_stack(a, b)
        stack -= base
        rows = stack.reshape(n, b - a, -1).transpose(0, 1)          # [rows, n, L]
        block = max(1, rows.shape[2] * 4 // (n * n))                 # per-row Gram blocks stay ≤ ~¼ chunk
        cos = torch.cat([_pair_cosines(rows[r:r + block], pairs, eps) for r in range(0, b - a, block)])
        t = stock_factor(cos, n, inputs.log)
        yield base.add_(t.reshape((-1,) + (1,) * (base.dim() - 1)) * stack.mean(dim=0))


def _pair_cosines(rows, pairs, eps):
    """Mean over pairs i < j of clamp(⟨o_i, o_j⟩ / max(‖o_i‖‖o_j‖, eps), −1, 1), per row of [rows, n, L]."""
    gram = rows @ rows.transpose(1, 2)                                # [rows, n, n]
    norms = gram.diagonal(dim1=1, dim2=2).sqrt()
    cos = gram[:, pairs[0], pairs[1]] / (norms[:, pairs[0]] * norms[:, pairs[1]]).clamp(min=eps)
    return cos.clamp(-1, 1).mean(dim=1)


def _whole_tensor(inputs, eps, estimator) -> GramMath:
    """One t per key from the Gram matrix of the deltas (any rank; the only form for ≤ 1-D keys); the
    direct form (sd-mecha's own operations) for the consecutive estimator."""
    n = inputs.n

    def direct(deltas):
        base = inputs.read_base_rows(0, inputs.rows)
        cos = torch.stack([torch.nn.functional.cosine_similarity(deltas[i], deltas[i + 1], dim=-1, eps=eps)
                           for i in range(n - 1)]).mean(dim=0)
        return base.add_((stock_factor(cos, n, inputs.log).unsqueeze(-1) * (sum(deltas) / n)).reshape(base.shape)), ""

    def coefficients(gram):
        norms = gram.diagonal().sqrt()
        if estimator == "consecutive-last-axis":
            idx = torch.arange(n - 1)
            cos = (gram[idx, idx + 1] / (norms[:-1].clamp(min=eps) * norms[1:].clamp(min=eps))).mean()
        else:
            i, j = torch.triu_indices(n, n, offset=1)
            cos = (gram[i, j] / (norms[i] * norms[j]).clamp(min=eps)).clamp(-1, 1).mean()
        return float(stock_factor(cos, n, inputs.log)) / n, ""

    def rows(t_over_n, deltas, a, b):      # base + (t/N)·Σ δ_i, the deltas summed first
        return inputs.read_base_rows(a, b).add_(deltas.sum(dim=0), alpha=t_over_n)
    return GramMath(None, direct if estimator == "consecutive-last-axis" else None, coefficients, rows, deltas=True)


def _model_stock(inputs, params):
    eps, estimator = params["cos_eps"], params["estimator"]
    spans = row_spans(inputs, SHAPE)
    if len(inputs.shape) >= 2 and estimator == "consecutive-last-axis":
        yield from _consecutive_rows(inputs, eps, spans)
    elif len(inputs.shape) >= 2 and estimator == "all-pairs-rowwise":
        yield from _rowwise_pairs(inputs, eps, spans)
    else:
        yield from gram_key(inputs, SHAPE, _whole_tensor(inputs, eps, estimator))


register(Method(
    "model_stock", "Model Stock",
    "base + t·mean(deltas) with t = N·cos / (1 + (N − 1)·cos) from the angle between the fine-tunes' deltas "
    "(Model Stock, 2403.19522). With many similar models t → 1 (a plain average).",
    _model_stock,
    params=(
        Param("estimator", "choice", "consecutive-last-axis", choices=ESTIMATORS,
              help="how cosθ is estimated: 'consecutive-last-axis' = sd-mecha (consecutive pool members, one t per "
                   "last-axis vector; depends on pool order); 'all-pairs-flat' = mergekit (all pairs, one t per key); "
                   "'all-pairs-rowwise' = mergekit filter_wise (all pairs, one t per output row)"),
        Param("cos_eps", "float", 1e-6, 0.0, 1.0,
              help="floor of the norms in the cosine (sd-mecha CosineSimilarity eps; mergekit floors the norm product)"),
    ),
    shape=SHAPE, needs_base=True, min_models=2))
