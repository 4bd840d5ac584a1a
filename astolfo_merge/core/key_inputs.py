"""One key's inputs read from files in row chunks (FileKeyInputs), widened to the compute dtype and
scanned for NaN/Inf on the way.

Memory: a method holds at most `resident` chunks of one key; chunk rows are chosen so that
`resident` compute-dtype chunks fit the chunk budget, whatever the number of models. Inputs are
read with positioned reads (page cache, no whole-file mapping).
"""
from __future__ import annotations

import math
import threading

import torch

from ..io.header import FP8_DTYPES
from ..methods import KeyInputs
from ..methods.registry import add_in_order
from ..methods.shapes import CACHE_TILE, Tile, row_spans
from .devices import host_buffer
from .plan_data import KeyPlan, Plan, key_seed
from .stage_run import Bindings
from .workers import ChunkWorkers

RELEASE_BYTES = 16 << 20            # mapped input pages are unmapped behind the reads every 16 MiB per model
HALF_DTYPES = (torch.float16, torch.bfloat16) + FP8_DTYPES   # stored types widened exactly through fp32


def to_compute(t: torch.Tensor, dtype, device, out: torch.Tensor | None = None,
               staging: torch.Tensor | None = None) -> torch.Tensor:
    """`t` in the compute dtype, in `out` when given (else a fresh tensor). Half types reach fp64
    through fp32 (exact, and ~3x faster on CPU than the direct cast), in `staging` when given: a
    reusable fp32 buffer of at least t.numel() elements, so no temporary is allocated per read."""
    if t.dtype in HALF_DTYPES and dtype == torch.float64 and t.device.type == "cpu" and device.type == "cpu":
        wide = staging.reshape(-1)[:t.numel()].reshape(t.shape) if staging is not None else torch.empty(t.shape)
        t = wide.copy_(t)
    if out is None:
        return t.to(device=device, dtype=dtype, copy=True)
    return out.reshape(t.shape).copy_(t)


def all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf check at the cost of one sum (a non-finite element makes the sum non-finite); the
    elementwise check runs only when the sum itself is not finite (overflow of huge finite values)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


class NonFiniteInput(Exception):
    """Internal: input `source` has NaN/Inf in the key being read (handled by the nonfinite policy)."""

    def __init__(self, source):
        super().__init__(source)
        self.source = source


class FileKeyInputs(KeyInputs):
    """The N pool tensors (+ base) of one key, read from files in row chunks."""

    def __init__(self, plan: Plan, kp: KeyPlan, readers, dtype, device, chunk_bytes, log, state=None,
                 workers: ChunkWorkers | None = None, check_inputs: bool = True, bound: Bindings | None = None):
        self.state, self._workers, self._bound = state, workers, bound
        self.key, self.shape, self.n = kp.key, tuple(kp.shape), len(kp.pool)
        self.has_base, self.dtype, self.device = kp.base is not None, dtype, device
        self.seed = kp.seed if kp.seed is not None else key_seed(plan.recipe.seed, kp.key)
        self.recipe_seed, self.budget_bytes = plan.recipe.seed, chunk_bytes
        self._plan, self._kp, self._readers = plan, kp, readers
        self._chunk_bytes, self._log = chunk_bytes, log
        self._local = threading.local()   # one landing buffer per thread (chunk workers read in parallel)
        self._batch_dtype = None
        self._whole_views, self._released_to = None, 0
        self._row_elems = max(1, math.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        # inputs are scanned for NaN/Inf unless the output check covers them (see _check_finite)
        self._check_finite = check_inputs and plan.recipe.nonfinite in ("fail", "skip")

    def _landing(self, nbytes, numel):
        """This thread's reusable buffers: raw bytes, and an fp32 staging area for half → fp64 reads."""
        local = self._local
        if getattr(local, "raw", None) is None or len(local.raw) < nbytes:
            local.raw = host_buffer(nbytes, self.device)    # page-locked when bound for a GPU
        return local.raw, self._buffer("wide", numel, torch.float32)

    def _buffer(self, name, numel, dtype):
        """This thread's reusable 1-D `dtype` buffer `name` of at least `numel` elements."""
        buf = getattr(self._local, name, None)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            setattr(self._local, name, buf)
        return buf

    def _read(self, source, start, stop, out=None):
        src = self._plan.sources[source]
        stored = src.keys[self.key]
        reader = self._readers[source]
        info = reader.info(stored)
        rows = max(1, info.shape[0]) if info.shape else 1
        raw = wide = None
        if info.shape and reader.header.format == "safetensors":
            raw, wide = self._landing(info.nbytes // rows * (stop - start), info.numel // rows * (stop - start))
        t = reader.read_rows(stored, start, stop, raw)
        rows = stop - start if self.shape else None
        t = t.reshape(((rows,) + self.shape[1:]) if self.shape else ())
        if self._check_finite and t.is_floating_point() and t.dtype in HALF_DTYPES and wide is not None:
            staged = wide[:t.numel()].reshape(t.shape).copy_(t)     # check the exact fp32 copy: half the cost
            if not all_finite(staged):
                raise NonFiniteInput(source)
            return to_compute(staged, self.dtype, self.device, out)
        t = to_compute(t, self.dtype, self.device, out, wide)
        if self._check_finite and not all_finite(t):
            raise NonFiniteInput(source)
        return t

    def read_rows(self, i, start, stop, out=None):
        source = self._kp.pool[i]
        t = self._read(source, start, stop, out)
        if self._kp.pre.get(source):                # e.g. a LoRA baked into this pool member first
            for pre in self._bound.pre(self._kp, source):
                t = pre(t, start, stop)
        return t

    def read_base_rows(self, start, stop, out=None):
        return self._read(self._kp.base, start, stop, out)

    def pool_dtypes(self):
        return tuple(self.dtype if self._kp.pre.get(source) else self._info(source).dtype for source in self._kp.pool)

    def _info(self, source):
        return self._readers[source].info(self._plan.sources[source].keys[self.key])

    def _batchable(self):
        """The stored half dtype when the pool's rows can be read as one batch: every model a
        safetensors file storing this key in that dtype, nothing applied to them on the way, CPU."""
        if self._batch_dtype is None:
            kp, dtypes = self._kp, set()
            for source in kp.pool:
                if kp.pre.get(source) or self._readers[source].header.format != "safetensors":
                    dtypes.add(None)
                    break
                dtypes.add(self._info(source).dtype)
            ok = len(dtypes) == 1 and next(iter(dtypes)) in HALF_DTYPES and self.shape and self.device.type == "cpu"
            self._batch_dtype = next(iter(dtypes)) if ok else False
        return self._batch_dtype

    def _views(self, start, stop):
        """Zero-copy, read-only 1-D views of the N pool models' stored rows [start, stop) (see
        `_batchable`), or None."""
        whole = self._whole_views
        if whole is None:
            whole = False
            if self._batchable():
                whole = [self._readers[source].view_rows(self._plan.sources[source].keys[self.key], 0, self.rows)
                         for source in self._kp.pool]
                whole = False if any(v is None for v in whole) else [v.reshape(-1) for v in whole]
            self._whole_views = whole     # two workers may both get here: same result, atomic store
        if not whole:
            return None
        row = self._row_elems
        behind = self._released_to
        if (start - behind) * row * whole[0].element_size() >= RELEASE_BYTES:   # hand back pages already used
            self._released_to = start
            for source in self._kp.pool:
                self._readers[source].release(self._plan.sources[source].keys[self.key], behind, start)
        return [v[start * row:stop * row] for v in whole]

    def _rows_of(self, name, k, count, dtype):
        """This thread's buffer `name` as a [k, count] tensor and the list of its k rows (cached:
        chunks of one key mostly share a size)."""
        cache = getattr(self._local, "rows", None)
        if cache is None:
            cache = self._local.rows = {}
        buf = self._buffer(name, k * count, dtype)
        hit = cache.get((name, k, count))
        if hit is None or hit[0].data_ptr() != buf.data_ptr():
            matrix = buf[:k * count].view(k, count)
            hit = cache[(name, k, count)] = (matrix, list(matrix.unbind(0)))
        return hit

    def _stage(self, views, used, dtype, out=None):
        """Pool models `used` widened from their file pages into one [len(used), count] `dtype`
        tensor (and the list of its rows): `out` when given, else this thread's reusable buffer
        (valid until its next stage). One call converts all of them; the result is scanned for
        NaN/Inf when inputs are checked."""
        k, count = len(used), views[0].numel()
        sources = views if k == len(views) else [views[i] for i in used]
        if dtype == torch.float64:    # through fp32: exact, and ~3x faster than the direct cast on CPU
            wide, rows = self._rows_of("wide", k, count, torch.float32)
        elif out is not None:
            wide, rows = out, list(out.unbind(0))
        else:
            wide, rows = self._rows_of("stage", k, count, dtype)
        torch._foreach_copy_(rows, sources)
        if self._check_finite and not math.isfinite(float(wide.sum())):
            for row, i in enumerate(used):
                if not all_finite(wide[row]):
                    raise NonFiniteInput(self._kp.pool[i])
        if wide.dtype == dtype:
            return wide, rows
        deep, rows = (out, list(out.unbind(0))) if out is not None else self._rows_of("deep", k, count, dtype)
        return deep.copy_(wide), rows

    def read_stack(self, start, stop, minus_base=False):
        """All N models' rows in one stack, widened straight from the file pages in one call (the
        per-op overhead, not the arithmetic, dominates a loop of N small reads and copies)."""
        views = self._views(start, stop)
        if views is None:
            return super().read_stack(start, stop, minus_base)
        stack = torch.empty((self.n, stop - start) + tuple(self.shape[1:]), dtype=self.dtype)
        self._stage(views, range(self.n), self.dtype, out=stack.view(self.n, -1))
        if minus_base:
            stack -= self.read_base_rows(start, stop)
        return stack

    def sum_rows(self, start, stop, weights):
        """Widens the used models straight from the file pages in one call, then adds them in pool
        order (or, where exact, reduces them in one op)."""
        views = self._views(start, stop)
        if views is None or not any(weights):
            return super().sum_rows(start, stop, weights)
        used = [i for i, w in enumerate(weights) if w != 0]
        shape = (stop - start,) + tuple(self.shape[1:])
        if self.exact_unit_sum(weights):
            return torch.sum(self._stage(views, used, torch.float32)[0], dim=0, dtype=torch.float64).reshape(shape)
        rows = self._stage(views, used, self.dtype)[1]     # this thread's buffer: the sum starts from a copy
        return add_in_order(rows[0].clone(), zip(rows[1:], (weights[i] for i in used[1:])),
                            weights[used[0]]).reshape(shape)

    def chunks(self, resident: int, tile: Tile = CACHE_TILE):
        """shapes.row_spans with this key's budget, the cache `tile`, and room for every span in flight."""
        in_flight = self._workers.in_flight if self._workers else 1
        return row_spans(self.shape, self.dtype.itemsize, resident, self._chunk_bytes, in_flight=in_flight,
                         tile=tile)

    def imap(self, fn, spans):
        if self._workers is None:
            return super().imap(fn, spans)
        return self._workers.imap(fn, spans)

    def log(self, message):
        self._log.append(f"{self.key}: {message}")   # list.append: safe from worker threads
