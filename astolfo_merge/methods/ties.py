"""The TIES family as ONE method: drop → trim → elect → combine → scale (ALGORITHMS.md §5–§8, §10–§12).

Per key, on the deltas τ_t = θ_t − θ_0 of the N pool models:
1. drop     keep mask m_t ~ Bernoulli(q): q = 1 − p (DARE/DROP, §7) or, with `eps` ≠ 0, a keep probability
            that moves with the magnitude rank of each element over the whole tensor (DELLA, sd-mecha, §11.1);
2. trim     keep |τ̂_t| ≥ the j-th smallest |τ̂_t|, j = max(⌊(1 − k)·numel⌋, 1) (sd-mecha's kthvalue rule, §5);
3. elect    γ = sign Σ_t τ̂_t ("sum", paper TIES) or sign Σ_t sign τ̂_t ("count", TIES-SOUP, §6);
4. combine  disjoint mean of the deltas whose sign equals γ, or the geometric median of the filtered
            deltas F_t = τ̂_t ⊙ [sign τ̂_t = γ] (zeros stay points: TGMD §10.2, DGMLA §11.2);
5. spectrum optionally Iso-Z on the merged delta (DGMIZ, §12.3);
6. θ = θ_0 + λ · τ_m / (1 − p if rescale)   (sd-mecha's order: rescale once, after the merge, §7.2).

The named methods (ties, ties_soup, dare, drop, tsd, tgmd, della, dgmla, dgmiz) are presets of
`ties_general`: the same run function and the same Param objects with some values fixed, so they
cannot drift apart.

Memory: the row chunks hold the N deltas of the chunk and their signs (resident 2N + 6). Whole-tensor
statistics come first, one model at a time: the trim thresholds (one full tensor of one model) and the
DELLA ranks (a stable sort of one model's |τ|; its masks are then kept bit-packed, N·numel/8 bytes,
spilled to a temporary file beyond 1/8 of the budget). Everything after is elementwise across models,
except the geometric median (N×N Gram over the chunks when the key does not fit one chunk) and Iso-Z
(one full tensor: the merged delta). When the whole key fits one chunk, the thresholds are taken from
it directly and the median uses the direct form.

Randomness (`rng`):
* counter — Philox keyed by (per-key seed, model index), counter = flat element index / 4: any element's
  draw can be produced on its own, so chunking, thread count and key order never change the masks;
* torch — sd-mecha 1.x bit compatibility (§7.4): a CPU torch.Generator seeded with the RECIPE seed
  (the same for every key), one torch.bernoulli draw per element over each full tensor, models in pool
  order, with sd-mecha's float32 `probability`. Draws are serial per element, so a model's mask can be
  produced chunk by chunk from a saved generator state; the states are found by one extra draw pass.
"""
from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch

from .iso import isotropic_rows, transforms
from .median import GM_PARAMS, median_math
from .registry import Method, Param, register
from .shapes import (
    ELEMENTWISE,
    ITERATIVE,
    TWO_PASS,
    combine,
    spans as row_spans,
    spill_limit,
    two_pass,
    whole_copies_fit,
)

BLOCK = 1 << 20          # elements per RNG / ranking block (a multiple of 8 for the bit packing)
GENERAL = "ties_general"


# --- parameters -------------------------------------------------------------------------------

def _gm(name, new_name):
    param = next(p for p in GM_PARAMS if p.name == name)
    return replace(param, name=new_name, help="geometric median: " + param.help)


PARAMS = {p.name: p for p in (
    Param("k", "float", 1.0, 0.0, 1.0, step=0.01,
          help="trim: fraction of each delta KEPT by magnitude (1 keeps all). Threshold = the j-th smallest |delta| "
               "with j = max(floor((1 − k)·numel), 1); elements tied with it are kept (sd-mecha's rule)"),
    Param("sign", "choice", "sum", choices=("sum", "count"),
          help="sign election: 'sum' = sign of the summed deltas (paper TIES); 'count' = majority of the signs, "
               "one model one vote (TIES-SOUP). A tie elects 0, and that element keeps the base's value"),
    Param("lambda", "float", 1.0, -1.0, 3.0, step=0.01, help="scale λ of the merged delta: base + λ·delta"),
    Param("p", "float", 0.0, 0.0, 0.99, step=0.01,
          help="drop probability of every delta element (DARE); 0 drops nothing"),
    Param("rescale", "bool", False,
          help="divide the merged delta by (1 − p) (DARE). Off = the author's DROP: inside the disjoint mean the "
               "survivors' mean is already unbiased"),
    Param("eps", "float", 0.0, -1.0, 1.0, step=0.01,
          help="DELLA window: keep probability q = clamp(1 − p + eps·(r/n − (n + 1)/(2n)), 0, 1), r = magnitude "
               "rank 1..n over the whole tensor. eps > 0 keeps large deltas more often (paper), eps < 0 drops "
               "them more often (the author's −0.1); 0 = plain DARE"),
    Param("combine", "choice", "mean", choices=("mean", "median"),
          help="'mean' = disjoint mean of the deltas that agree with the elected sign (TIES); 'median' = "
               "geometric median of the sign-filtered deltas, dropped/disagreeing entries kept as zeros (TGMD, DGMLA)"),
    _gm("eps", "gm_eps"), _gm("maxiter", "maxiter"), _gm("ftol", "ftol"),
    Param("spectrum", "choice", "keep", choices=("keep", "iso_z"),
          help="'iso_z' reshapes the singular values of the merged delta: σ' = μ + z·(σ − μ) (the author's "
               "DGMIZ = DGMLA + Iso-Z, §12.3); 'keep' leaves it"),
    Param("z", "float", 0.8, -2.0, 4.0, step=0.05,
          help="Iso-Z blend: 0 = flat spectrum (Iso-C-like), 1 = unchanged; the author used 0.8 and 2.0"),
    Param("geometric_mean", "bool", False, help="Iso-Z: μ = geometric mean of σ (the fork's apply_exp)"),
    Param("high_dim", "bool", True, help="Iso-Z: also transform convs, viewed as [out, in·kh·kw] (apply_high_dim)"),
    Param("clamp", "bool", False, help="Iso-Z: clamp σ' at 0 (z > 1 can make it negative; the author does not clamp)"),
    Param("rng", "choice", "counter", choices=("counter", "torch"),
          help="'counter': Philox stream per key and model, the same bytes whatever the chunking or threads; "
               "'torch': sd-mecha 1.x compatible masks (CPU torch.Generator seeded with the recipe seed, "
               "torch.bernoulli over each full tensor in pool order)"),
)}


ATTRIBUTE = {"lambda": "lam"}    # parameter names that are Python keywords


class Config(SimpleNamespace):
    """One key's parameters as attributes, one per PARAMS entry (`lam` for 'lambda'), and the values
    derived from them. Built from PARAMS: a new parameter needs no edit here."""

    @classmethod
    def of(cls, params: dict) -> "Config":
        return cls(**{ATTRIBUTE.get(name, name): params[name] for name in PARAMS})

    @property
    def drops(self) -> bool:
        return self.p > 0.0 or self.eps != 0.0

    @property
    def keep(self) -> float:
        """Base keep probability; in torch mode from sd-mecha's float32 `probability` tensor."""
        return 1.0 - (float(np.float32(self.p)) if self.rng == "torch" else self.p)

    @property
    def divisor(self) -> float:
        if not self.rescale or self.p == 0.0:
            return 1.0
        return float(np.float32(1.0) - np.float32(self.p)) if self.rng == "torch" else 1.0 - self.p


# --- drop masks -------------------------------------------------------------------------------

def model_key(seed: int, model: int) -> int:
    """128-bit Philox key of one model's stream for one key (`seed` is already per key)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{model}".encode()).digest()[:16], "little")


def uniforms(key: int, start: int, count: int) -> np.ndarray:
    """Uniform [0, 1) doubles for flat elements start..start+count of one stream; element e is always
    the (e mod 4)-th output of Philox block e div 4, however the range is cut."""
    gen = np.random.Generator(np.random.Philox(key=key, counter=start // 4))
    if start % 4:
        gen.random(start % 4)
    return gen.random(count)


class CounterMasks:
    """Stateless masks: keep where u(element) < q."""

    def __init__(self, seed, n, keep, row_elems):
        self.keys = [model_key(seed, t) for t in range(n)]
        self.keep, self.row_elems = keep, row_elems

    def begin_pass(self):
        pass

    def chunk(self, t, a, b, shape):
        start, count = a * self.row_elems, (b - a) * self.row_elems
        return torch.from_numpy(uniforms(self.keys[t], start, count) < self.keep).reshape(shape)


class TorchMasks:
    """sd-mecha's masks for constant q, produced chunk by chunk: model t's draws start where model
    t − 1's full tensor ended, so each model gets a generator restored to that state."""

    def __init__(self, seed, n, keep, numel, row_elems):
        self.seed, self.n, self.keep, self.numel, self.row_elems = seed, n, keep, numel, row_elems
        self.states, self.gens, self.cursor = None, [], []

    def _find_states(self):
        gen = torch.Generator()
        gen.manual_seed(self.seed)
        probs = torch.full((min(BLOCK, self.numel),), self.keep, dtype=torch.float64)
        scratch = torch.empty(probs.shape, dtype=torch.bool)
        states = []
        for t in range(self.n):
            states.append(gen.get_state())
            if t + 1 < self.n:
                for s in range(0, self.numel, BLOCK):
                    m = min(BLOCK, self.numel - s)
                    scratch[:m].bernoulli_(probs[:m], generator=gen)
        self.states = states

    def begin_pass(self):
        if self.states is None:
            self._find_states()
        self.gens = []
        for state in self.states:
            gen = torch.Generator()
            gen.set_state(state)
            self.gens.append(gen)
        self.cursor = [0] * self.n

    def chunk(self, t, a, b, shape):
        start, count = a * self.row_elems, (b - a) * self.row_elems
        if start != self.cursor[t]:
            raise RuntimeError(f"torch masks must be drawn in row order (model {t}: at {self.cursor[t]}, asked {start})")
        self.cursor[t] = start + count
        probs = torch.full((count,), self.keep, dtype=torch.float64)
        return torch.empty(count, dtype=torch.bool).bernoulli_(probs, generator=self.gens[t]).reshape(shape)


class BitStore:
    """N bit-packed masks over the flat index; in memory, or in a temporary file beyond `limit` bytes."""

    def __init__(self, n, numel, limit):
        width = (numel + 7) // 8
        self.on_disk = limit is not None and n * width > limit
        if self.on_disk:
            self._file = tempfile.TemporaryFile(prefix="astolfo-masks-")
            self.bits = np.memmap(self._file, dtype=np.uint8, mode="w+", shape=(n, width))
        else:
            self.bits = np.zeros((n, width), dtype=np.uint8)

    def put(self, t, start, keep: np.ndarray):
        packed = np.packbits(keep)
        self.bits[t, start // 8:start // 8 + len(packed)] = packed

    def get(self, t, start, count) -> np.ndarray:
        raw = self.bits[t, start // 8:(start + count + 7) // 8]
        return np.unpackbits(raw)[start % 8:start % 8 + count].astype(bool)


class StoredMasks:
    """DELLA masks: computed up front (they need each model's full ranking), read back per chunk."""

    def __init__(self, store, row_elems):
        self.store, self.row_elems = store, row_elems

    def begin_pass(self):
        pass

    def chunk(self, t, a, b, shape):
        start, count = a * self.row_elems, (b - a) * self.row_elems
        return torch.from_numpy(self.store.get(t, start, count)).reshape(shape)


def _ordinal_ranks(absd: np.ndarray, ranks: np.ndarray):
    """scipy.stats.rankdata(method='ordinal'): ranks 1..n, ties broken by flat position."""
    order = np.argsort(absd, kind="stable")
    for s in range(0, len(order), BLOCK):
        part = order[s:s + BLOCK]
        ranks[part] = np.arange(s + 1, s + 1 + len(part), dtype=ranks.dtype)


def della_masks(inputs, cfg: Config, geometry) -> StoredMasks:
    """Rank each model's |τ| over the whole tensor, turn ranks into keep probabilities, draw, pack."""
    numel, row_elems = geometry
    n = inputs.n
    store = BitStore(n, numel, spill_limit(inputs))
    spans = row_spans(inputs, FAMILY, "statistic")
    absd = np.empty(numel, dtype=np.float64 if inputs.dtype == torch.float64 else np.float32)
    ranks = np.empty(numel, dtype=np.int32 if numel < 2 ** 31 else np.int64)
    if cfg.rng == "torch":
        gen = torch.Generator()
        gen.manual_seed(_torch_seed(inputs))
        probability = torch.tensor(cfg.p, dtype=torch.float32)
    for t in range(n):
        for a, b in spans:
            d = inputs.read_rows(t, a, b).sub_(inputs.read_base_rows(a, b))
            absd[a * row_elems:b * row_elems] = d.abs().reshape(-1).cpu().numpy()
        _ordinal_ranks(absd, ranks)
        key = model_key(inputs.seed, t)
        for s in range(0, numel, BLOCK):
            r = ranks[s:s + BLOCK]
            if cfg.rng == "torch":   # sd-mecha find_della_dropout, expression for expression
                delta_i = (torch.from_numpy(r) / numel - (numel + 1) / (numel * 2)) * cfg.eps
                delta_i = delta_i.nan_to_num(nan=0, posinf=0, neginf=0)
                probs = ((torch.ones(len(r), dtype=torch.float64) - probability) + delta_i).clamp(min=0, max=1)
                keep = torch.empty(len(r), dtype=torch.bool).bernoulli_(probs, generator=gen).numpy()
            else:
                probs = np.clip(cfg.keep + cfg.eps * (r / numel - (numel + 1) / (2 * numel)), 0.0, 1.0)
                keep = uniforms(key, s, len(r)) < probs
            store.put(t, s, keep)
    if store.on_disk:
        inputs.log(f"DELLA masks ({n} × {numel} bits) kept in a temporary file: they exceed 1/8 of the budget")
    return StoredMasks(store, row_elems)


def _torch_seed(inputs) -> int:
    seed = getattr(inputs, "recipe_seed", None)
    return inputs.seed if seed is None else seed


def make_masks(inputs, cfg: Config, geometry):
    if not cfg.drops:
        return None
    numel, row_elems = geometry
    if cfg.eps != 0.0:
        return della_masks(inputs, cfg, geometry)
    if cfg.rng == "torch":
        return TorchMasks(_torch_seed(inputs), inputs.n, cfg.keep, numel, row_elems)
    return CounterMasks(inputs.seed, inputs.n, cfg.keep, row_elems)


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


def workspace(shape, n, params) -> int:
    """Bytes held outside the row chunks: a full tensor for the trim thresholds, the DELLA ranking."""
    numel = math.prod(shape) if shape else 1
    need = 8 * numel + numel // 2 if params.get("k", 1.0) < 1.0 else 0   # + kth_value's gathered values
    if params.get("eps", 0.0) != 0.0:
        need = max(need, 28 * numel)     # |τ| (8) + argsort indices (8) + its merge buffer (~4) + ranks (4..8)
    if params.get("spectrum") == "iso_z" and len(shape) >= 2:
        need = max(need, 16 * numel)     # the merged delta + its transform (the SVD form only when 4 copies fit)
    return need


# --- declarations -----------------------------------------------------------------------------

# The row chunks hold the N deltas of the chunk and their signs; the statistic passes (trim
# thresholds, DELLA ranks) one model at a time; the workspace is the whole-tensor statistic.
FAMILY = two_pass(lambda n: 2 * n + 6, workspace=workspace)


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
