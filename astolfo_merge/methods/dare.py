"""The random drops of the TIES family (DARE, DROP, DELLA and their TSD / TGMD / DGMLA / DGMIZ presets): the keep masks.

Stage 1 of the family's pipeline (ties.py): keep mask m_t ~ Bernoulli(q) on each delta τ_t = θ_t − θ_0,
with q = 1 − p (DARE/DROP, ALGORITHMS.md §7) or, with `eps` ≠ 0, a keep probability that moves with the
magnitude rank of each element over the whole tensor (DELLA, sd-mecha, §11.1). The presets that drop
are declared with the rest of the family in ties.py (one run function for all of them).

Memory: the DELLA ranks need a stable sort of one model's |τ| at a time; its masks are then kept
bit-packed, N·numel/8 bytes, spilled to a temporary file beyond 1/8 of the budget. The other masks are
produced chunk by chunk.

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
import tempfile

import numpy as np
import torch

from .shapes import spans as row_spans, spill_limit
from .ties_family import BLOCK, FAMILY, Config

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
