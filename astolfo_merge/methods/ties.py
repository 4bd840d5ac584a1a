"""The TIES family as ONE method: drop → trim → elect → combine → scale (ALGORITHMS.md §5–§8, §10–§12).

Per key, on the deltas τ_t = θ_t − θ_0 of the N pool models:
1. drop     keep mask m_t ~ Bernoulli(q): q = 1 − p (DARE/DROP, §7) or, with `eps` ≠ 0, a keep probability
            that moves with the magnitude rank of each element over the whole tensor (DELLA, sd-mecha, §11.1;
            the masks and their randomness are in dare.py);
2. trim     keep |τ̂_t| ≥ the j-th smallest |τ̂_t|, j = max(⌊(1 − k)·numel⌋, 1) (sd-mecha's kthvalue rule, §5);
3. elect    γ = sign Σ_t τ̂_t ("sum", paper TIES) or sign Σ_t sign τ̂_t ("count", TIES-SOUP, §6);
4. combine  disjoint mean of the deltas whose sign equals γ, or the geometric median of the filtered
            deltas F_t = τ̂_t ⊙ [sign τ̂_t = γ] (zeros stay points: TGMD §10.2, DGMLA §11.2);
5. spectrum optionally Iso-Z on the merged delta (DGMIZ, §12.3);
6. θ = θ_0 + λ · τ_m / (1 − p if rescale)   (sd-mecha's order: rescale once, after the merge, §7.2).

The named methods (ties, ties_soup, dare, drop, tsd, tgmd, della, dgmla, dgmiz) are presets of
`ties_general`: the same run function and the same Param objects (ties_family.py) with some values
fixed, so they cannot drift apart.

Memory: the row chunks hold the N deltas of the chunk and their signs (resident 2N + 6). Whole-tensor
statistics come first, one model at a time: the trim thresholds (one full tensor of one model) and the
DELLA ranks (dare.py). Everything after is elementwise across models, except the geometric median (N×N
Gram over the chunks when the key does not fit one chunk) and Iso-Z (one full tensor: the merged delta).
When the whole key fits one chunk, the thresholds are taken from it directly and the median uses the
direct form.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from .dare import make_masks
from .iso import isotropic_rows, transforms
from .median import median_math
from .registry import Method, register
from .shapes import ELEMENTWISE, ITERATIVE, TWO_PASS, combine, spans as row_spans, whole_copies_fit
from .ties_family import FAMILY, GENERAL, PARAMS, Config

# --- trim thresholds --------------------------------------------------------------------------

SELECT_DIRECT = 1 << 17   # up to this many values, the whole array is partitioned
SELECT_SAMPLE = 1 << 15   # sample size of the bracketing selection beyond it
SELECT_BLOCK = 1 << 16    # values per block of its counting pass (the temporaries stay in cache)


def kth_value(values: np.ndarray, j: int) -> float:
    """The j-th smallest (1-based) of a 1-D array, exact; `values` is scratch (it may be reordered).

    np.partition of the whole array costs ~10 ns per value; instead the j-th smallest is bracketed
    by two order statistics of a seeded random sample (about 6 standard deviations of the sample
    rank on either side), one blockwise pass counts the values below the bracket and gathers those
    inside it (a few per cent), and a partition of that small set selects. The value is exact
    whatever the sample: should the bracket miss it (an unlucky sample; NaN, which sorts last), the
    whole array is partitioned as before (also when more than 1/16 of the values fall inside the
    bracket, e.g. a tensor of mostly tied zeros: the gathered values stay small)."""
    n = len(values)
    if n <= SELECT_DIRECT:
        values.partition(j - 1)
        return float(values[j - 1])
    s = SELECT_SAMPLE
    sample = values[np.random.default_rng(n).integers(0, n, s)]
    q = (j - 0.5) / n
    margin = 6.0 * math.sqrt(s * q * (1.0 - q)) + 16.0
    lo_i, hi_i = int(q * s - margin), int(q * s + margin)
    ranks = [i for i in (lo_i, hi_i) if 0 < i < s - 1]
    if ranks:                            # the two order statistics only: a partition, not a sort
        sample.partition(ranks)
    lo = sample[lo_i] if lo_i > 0 else -np.inf
    hi = sample[hi_i] if hi_i < s - 1 else np.inf
    below, inside, gathered, cap = 0, [], 0, n // 16     # the gathered values stay within numel/2 bytes
    under, upto = np.empty(SELECT_BLOCK, dtype=bool), np.empty(SELECT_BLOCK, dtype=bool)
    for start in range(0, n, SELECT_BLOCK):
        block = values[start:start + SELECT_BLOCK]
        lt, le = under[:len(block)], upto[:len(block)]
        np.less(block, lo, out=lt)
        below += int(np.count_nonzero(lt))
        np.less_equal(block, hi, out=le)
        np.logical_xor(lt, le, out=le)       # lo <= v <= hi (NaN is in neither)
        if lo == hi:                         # one value, tied many times (zeros): count, don't gather
            gathered += int(np.count_nonzero(le))
            continue
        inside.append(block[le])
        gathered += len(inside[-1])
        if gathered > cap:                   # many ties inside the bracket: select in the whole array
            break
    if lo == hi:
        if below < j <= below + gathered:
            return float(lo)
        values.partition(j - 1)
        return float(values[j - 1])
    inside = np.concatenate(inside)
    if gathered <= cap and below < j <= below + len(inside):
        inside.partition(j - 1 - below)
        return float(inside[j - 1 - below])
    values.partition(j - 1)
    return float(values[j - 1])


def kth_smallest(rows: torch.Tensor, j: int) -> torch.Tensor:
    """The j-th smallest (1-based) of each row of a 2-D tensor: an O(n) selection, exact."""
    if rows.device.type == "cpu":
        return torch.tensor([kth_value(row.copy(), j) for row in rows.numpy()], dtype=rows.dtype)
    return torch.kthvalue(rows, j, dim=1).values


def trim_rank(cfg: Config, numel: int) -> int:
    """sd-mecha's j: max(⌊(1 − k)·numel⌋, 1); keep |τ̂| ≥ the j-th smallest."""
    return max(int((1 - cfg.k) * numel), 1)


def trim_thresholds(inputs, cfg: Config, masks, geometry) -> list:
    """Per model, the j-th smallest |τ̂| over the whole (dropped) tensor: one full tensor at a time,
    each chunk's |τ̂| computed in place in its slice of that tensor."""
    numel, row_elems = geometry
    j = trim_rank(cfg, numel)
    spans = row_spans(inputs, FAMILY, "statistic")
    buf = torch.empty(numel, dtype=inputs.dtype)
    in_place = inputs.device.type == "cpu"
    if masks is not None:
        masks.begin_pass()
    out = []
    for t in range(inputs.n):
        for a, b in spans:
            part = buf[a * row_elems:b * row_elems]
            d = inputs.read_rows(t, a, b, out=part) if in_place else inputs.read_rows(t, a, b)
            d.sub_(inputs.read_base_rows(a, b))
            if masks is not None:
                d.mul_(masks.chunk(t, a, b, d.shape).to(d.device))
            if in_place:
                part.abs_()
            else:
                part.copy_(d.abs().reshape(-1))
        out.append(kth_value(buf.numpy(), j))
    return out


# --- elect and combine ------------------------------------------------------------------------

def ordered_sum(stack: torch.Tensor) -> torch.Tensor:
    """Σ over the models in pool order, element by element. torch.sum(dim=0) groups rows differently
    for columns in its vector tail (N ≥ 5), which would make the bytes depend on the chunk width;
    for N ≤ 4 both agree bit for bit (and so with sd-mecha)."""
    total = stack[0].clone()
    for t in range(1, stack.shape[0]):
        total += stack[t]
    return total


def filtered_deltas(inputs, a, b, cfg: Config, masks, thresholds):
    """(base rows, F [N, rows, ...], agree count): the deltas that survived drop and trim, zeroed where
    their sign differs from the elected one. `thresholds` None with k < 1 means this chunk is the
    whole tensor and the thresholds are taken from it directly.

    Every step works on the stack viewed as [N, elements] (a conv's [N, rows, in, 3, 3] would make
    each elementwise op and reduction loop over an innermost axis of 3) with the same elementwise
    operations in the same order as the shaped form, so the values are the same bits."""
    n = inputs.n
    base = inputs.read_base_rows(a, b)
    stack = inputs.read_stack(a, b)
    flat = stack.view(n, -1)
    flat -= base.reshape(1, -1)
    if masks is not None:
        for t in range(n):
            flat[t].mul_(masks.chunk(t, a, b, stack[t].shape).reshape(-1).to(stack.device))
    scratch = torch.abs(flat) if cfg.k < 1.0 else torch.empty_like(flat)
    if cfg.k < 1.0:
        if thresholds is None:
            thr = kth_smallest(scratch, trim_rank(cfg, scratch.shape[1]))
        else:
            thr = torch.tensor(thresholds, dtype=stack.dtype)
        flat.mul_(scratch.ge_(thr.to(stack.device).reshape(n, 1)))      # × 1.0 / 0.0: as × the bool mask
    agree = torch.sign(flat, out=scratch)
    elected = torch.sign(ordered_sum(flat) if cfg.sign == "sum" else agree.sum(dim=0))
    agree.eq_(elected)                       # 1.0 where sign(τ̂) = γ, else 0.0: the bool mask, in the values' dtype
    flat.mul_(agree)
    return base, stack, agree.sum(dim=0)     # counts ≤ N: exact in any order


def merged_deltas(inputs, cfg: Config, spans, masks, thresholds):
    """(start, stop, τ_m rows, base rows or None) for each span: the disjoint mean or the geometric median."""
    def passes():
        if masks is not None:
            masks.begin_pass()
        for a, b in spans:
            yield filtered_deltas(inputs, a, b, cfg, masks, thresholds)

    if cfg.combine == "mean":
        for (a, b), (base, stack, count) in zip(spans, passes()):
            total = ordered_sum(stack.view(stack.shape[0], -1))
            yield a, b, torch.where(count > 0, total.div_(count), 0.0), base
        return
    medians = combine(lambda: (stack for _, stack, _ in passes()), spans,
                      median_math(cfg.gm_eps, cfg.maxiter, cfg.ftol), inputs.log)
    for (a, b), delta in zip(spans, medians):
        yield a, b, delta, None


def _run(inputs, params):
    cfg = Config.of(params)
    numel = math.prod(inputs.shape) if inputs.shape else 1
    geometry = (numel, numel // max(1, inputs.rows))
    masks = make_masks(inputs, cfg, geometry)
    spans = row_spans(inputs, FAMILY)
    whole = len(spans) == 1            # thresholds straight from the one chunk, no extra pass
    thresholds = trim_thresholds(inputs, cfg, masks, geometry) if cfg.k < 1.0 and not whole else None
    parts = merged_deltas(inputs, cfg, spans, masks, thresholds)
    if cfg.spectrum == "iso_z" and transforms(inputs.shape, cfg.high_dim):
        matrix = torch.empty((inputs.rows, numel // inputs.rows), dtype=inputs.dtype, device=inputs.device)
        for a, b, delta, _ in parts:
            matrix[a:b] = delta.reshape(b - a, -1)
        rows = isotropic_rows(matrix, cfg.z, cfg.geometric_mean, cfg.clamp, whole_copies_fit(inputs, matrix),
                              inputs.log)
        parts = ((a, b, rows(a, b), None) for a, b in spans)
    for a, b, delta, base in parts:
        if base is None:
            base = inputs.read_base_rows(a, b)
        if cfg.divisor != 1.0:
            delta = delta / cfg.divisor
        yield base.add_(delta.reshape(base.shape), alpha=cfg.lam)


# --- declarations -----------------------------------------------------------------------------

def family_method(name, title, help, shown: dict, fixed: dict, kind, random=None) -> Method:
    """A preset of ties_general: `shown` maps the visible params to their default (None keeps the
    general one); `fixed` pins every other param. Together they must cover all of PARAMS."""
    if set(shown) | set(fixed) != set(PARAMS) or set(shown) & set(fixed):
        raise ValueError(f"{name}: shown and fixed params must partition {sorted(PARAMS)}")
    params = tuple(PARAMS[p] if v is None else replace(PARAMS[p], default=v) for p, v in shown.items())
    fixed = {p: PARAMS[p].validate(v, f"{name}.fixed") for p, v in fixed.items()}
    if random is None:
        random = "p" in shown or "eps" in shown or fixed.get("p", 0) > 0 or fixed.get("eps", 0) != 0
    return Method(name, title, help, _run, shape=replace(FAMILY, kind=kind), params=params, needs_base=True,
                  min_models=1, random=random, preset_of=None if name == GENERAL else GENERAL, fixed=fixed)


GM_DEFAULTS = {"gm_eps": None, "maxiter": None, "ftol": None}
GM_FIXED = {"gm_eps": 1e-6, "maxiter": 100, "ftol": 1e-20}
NO_DROP = {"p": 0.0, "rescale": False, "eps": 0.0, "rng": "counter"}
ISO_OFF = {"spectrum": "keep", "z": 0.8, "geometric_mean": False, "high_dim": True, "clamp": False}

register(family_method(
    GENERAL, "TIES family: drop → trim → elect → combine",
    "Every stage of the TIES / DARE / DELLA / TGMD family in one method: drop (p, eps), trim (k), sign "
    "election (sign), disjoint mean or geometric median (combine), scale (lambda, rescale).",
    {p: None for p in PARAMS}, {}, TWO_PASS))

register(family_method(
    "ties", "TIES", "Paper TIES-Merging: trim each delta to its top-k magnitudes, elect a sign per element, "
    "average the agreeing deltas, scale by lambda.",
    {"k": 0.2, "sign": "sum", "lambda": None}, {"combine": "mean", **NO_DROP, **GM_FIXED, **ISO_OFF}, TWO_PASS, random=False))

register(family_method(
    "ties_soup", "TIES-SOUP", "The author's TIES variant (AstolfoMix-XL x72a): no trim, one-model-one-vote sign "
    "majority, mean of the agreeing deltas. Behaves like an average that drops minority-direction outliers.",
    {"lambda": None}, {"k": 1.0, "sign": "count", "combine": "mean", **NO_DROP, **GM_FIXED, **ISO_OFF}, ELEMENTWISE, random=False))

register(family_method(
    "dare", "DARE (TIES)", "Drop each delta element with probability p, rescale by 1/(1 − p), then TIES "
    "(sd-mecha add_ties_with_dare).",
    {"p": 0.9, "rescale": True, "sign": "sum", "k": None, "lambda": None, "rng": None},
    {"eps": 0.0, "combine": "mean", **GM_FIXED, **ISO_OFF}, ELEMENTWISE))

register(family_method(
    "drop", "DROP (DARE without rescale)", "DARE without the 1/(1 − p) rescale (the author's DROP): inside "
    "the disjoint mean dropping only removes members, so the mean stays unbiased.",
    {"p": 0.1, "sign": "sum", "k": None, "lambda": None, "rng": None},
    {"rescale": False, "eps": 0.0, "combine": "mean", **GM_FIXED, **ISO_OFF}, ELEMENTWISE))

register(family_method(
    "tsd", "TSD (TIES-SOUP with DROP)", "AstolfoMix-XL x101a: DROP (p = 0.1, no rescale) + TIES-SOUP "
    "(sign majority, mean of the agreeing deltas).",
    {"p": 0.1, "lambda": None, "rng": None},
    {"k": 1.0, "sign": "count", "rescale": False, "eps": 0.0, "combine": "mean", **GM_FIXED, **ISO_OFF}, ELEMENTWISE))

register(family_method(
    "tgmd", "TGMD (TIES-GeometricMedian with DROP)", "AstolfoMix-XL x116a/x191a: DROP (p = 0.1), sign "
    "majority, then the geometric median of the sign-filtered deltas (no division by the agreeing count).",
    {"p": 0.1, "lambda": None, "rng": None, **GM_DEFAULTS},
    {"k": 1.0, "sign": "count", "rescale": False, "eps": 0.0, "combine": "median", **ISO_OFF}, ITERATIVE))

register(family_method(
    "della", "DELLA (sd-mecha flavour)", "Magnitude-ranked drop (keep probability moves with the rank of |delta| "
    "over the whole tensor by ±eps/2 around 1 − p), sign election, disjoint mean.",
    {"p": 0.1, "eps": 0.1, "rescale": True, "sign": "sum", "k": None, "lambda": None, "rng": None},
    {"combine": "mean", **GM_FIXED, **ISO_OFF}, TWO_PASS))

register(family_method(
    "dgmla", "DGMLA (DELLA drop + geometric median)", "AstolfoMix-XL x215a/x255a and AstolfoKarMix: DELLA "
    "drop with p = 0.1, eps = −0.1 (large deltas dropped more often), no rescale, sign election ('count' as in "
    "the 2024 code, 'sum' as the 2025 code actually ran), geometric median of the filtered deltas.",
    {"p": 0.1, "eps": -0.1, "sign": "count", "lambda": None, "rng": None, **GM_DEFAULTS},
    {"k": 1.0, "rescale": False, "combine": "median", **ISO_OFF}, ITERATIVE))

register(family_method(
    "dgmiz", "DGMIZ (DGMLA + Iso-Z)", "The author's 2025 merges (x256a, x10a, x11a, x3a, AstolfoKarMix x6a): DGMLA, "
    "then the spectrum of the merged delta blended toward its mean (Iso-Z, z = 0.8, convs included). Sign "
    "election defaults to 'sum', what the 2025 code ran.",
    {"p": 0.1, "eps": -0.1, "sign": "sum", "z": 0.8, "geometric_mean": None, "high_dim": None, "clamp": None,
     "lambda": None, "rng": None, **GM_DEFAULTS},
    {"k": 1.0, "rescale": False, "combine": "median", "spectrum": "iso_z"}, ITERATIVE))
