"""Executing a plan: key by key, chunk by chunk, straight into the streaming writer.

Memory: a method holds at most `resident` chunks of one key; chunk rows are chosen so that
`resident` compute-dtype chunks fit the chunk budget, whatever the number of models. Inputs are
read with positioned reads (page cache, no whole-file mapping), the output is written as it is
produced. Cancel and errors abort the writer, so nothing half-written stays behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import pickle
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import __version__
from .checkpoint import (FP8_DTYPES, OUTPUT_DTYPES, CheckpointReader, HashCache, SafetensorsWriter, cast_output,
                         ensure_open_files, fp8_out_of_range, legacy_model_hash)
from .errors import (AstolfoError, Cancelled, MemoryBudgetError, MergeKeyError, OutputExistsError, RecipeError,
                     check_memory_gb)
from .executors import WORKER_CHUNK_BYTES, Crew, auto_process_count, changed_input, input_stats, run_tasks
from .lineage import TRUNCATED_KEY as LINEAGE_NOTE, bound_lineage
from .methods import KeyInputs, get_method
from .methods.registry import add_in_order
from .ray_executor import require_ray, ray_session, run_on_ray
from .plan import GIB, OVERHEAD_BYTES, KeyPlan, Plan, refuse_input_as_output
from .strict_json import loads as strict_loads
from .workers import ChunkWorkers, auto_workers

# Chunk size per tensor: what a method holds of one chunk (`resident` tensors) should stay in cache,
# but each op also costs ~5-10 us of dispatch here, so chunks must not get too small either.
CACHE_FRIENDLY_ELEMENTS = 1 << 16   # at most 512 KiB of fp64 per tensor: measured fastest per element
CHUNK_CACHE_BYTES = 2 << 20         # all `resident` tensors of one chunk together
MIN_CHUNK_ELEMENTS = 1 << 14        # below this, per-op overhead dominates
RELEASE_BYTES = 16 << 20            # mapped input pages are unmapped behind the reads every 16 MiB per model
_HALF = (torch.float16, torch.bfloat16) + FP8_DTYPES   # stored types widened exactly through fp32


@dataclass
class RunOptions:
    device: str = "cpu"
    threads: int = 0                 # chunk worker threads; 0 = auto (1: see workers.auto_workers)
    memory_gb: float = 1.5
    overwrite: bool = False
    hash_inputs: bool = True
    hash_cache: HashCache | None = None
    chunk_bytes: int | None = None   # override the per-key chunk budget (tests, benchmarks)
    workers: int = 1                 # 1 = in this process; N > 1 = N worker processes; 0 = auto (executors.py)
    isolate: bool | None = None      # True: worker processes even for one worker, so a dying merge spares the
                                     # host (None: background jobs isolate, direct calls do not)
    ray: str | None = None           # None: no Ray; "" or "local": a local Ray for the merge; else a cluster address

    def __post_init__(self):   # every front end (CLI, tab, app, scripts) builds these: refuse NaN / inf / <= 0 here
        self.memory_gb = check_memory_gb(self.memory_gb)


@dataclass
class Progress:
    keys_done: int
    keys_total: int
    bytes_done: int
    bytes_total: int
    elapsed: float
    eta: float | None
    key: str = ""
    message: str = ""
    stage: str = ""     # what runs before the keys, e.g. "hashing inputs 2/5" ("" while merging keys)

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


@dataclass
class MergeResult:
    path: str
    sha256: str
    size: int
    seconds: float
    keys: int
    log: list = field(default_factory=list)
    components: dict = field(default_factory=dict)

    def summary(self) -> str:
        comps = "; ".join(f"{k}: {v}" for k, v in self.components.items())
        return (f"wrote {self.path}\n  {self.keys} keys, {self.size / 1e6:.1f} MB, {self.seconds:.1f} s\n"
                f"  sha256 {self.sha256}\n  components: {comps}")


def to_compute(t: torch.Tensor, dtype, device, out: torch.Tensor | None = None,
               staging: torch.Tensor | None = None) -> torch.Tensor:
    """`t` in the compute dtype, in `out` when given (else a fresh tensor). Half types reach fp64
    through fp32 (exact, and ~3x faster on CPU than the direct cast), in `staging` when given: a
    reusable fp32 buffer of at least t.numel() elements, so no temporary is allocated per read."""
    if t.dtype in _HALF and dtype == torch.float64 and t.device.type == "cpu" and device.type == "cpu":
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


def key_seed(seed: int, key: str) -> int:
    """Per-key seed: independent of key order and thread count."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class FileKeyInputs(KeyInputs):
    """The N pool tensors (+ base) of one key, read from files in row chunks."""

    def __init__(self, plan: Plan, kp: KeyPlan, readers, dtype, device, chunk_bytes, log, state=None,
                 workers: ChunkWorkers | None = None, check_inputs: bool = True):
        self.state, self._workers = state, workers
        self.key, self.shape, self.n = kp.key, tuple(kp.shape), len(kp.pool)
        self.has_base, self.dtype, self.device = kp.base is not None, dtype, device
        self.seed = key_seed(plan.recipe.seed, kp.key)
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
            local.raw = np.empty(nbytes, dtype=np.uint8)
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
        if self._check_finite and t.is_floating_point() and t.dtype in _HALF and wide is not None:
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
        for pre in self._kp.pre.get(source, ()):    # e.g. a LoRA baked into this pool member first
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
            ok = len(dtypes) == 1 and next(iter(dtypes)) in _HALF and self.shape and self.device.type == "cpu"
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

    def chunks(self, resident: int):
        rows = self.rows
        row_elems = max(1, math.prod(self.shape[1:])) if self.shape else 1
        itemsize = self.dtype.itemsize
        in_flight = self._workers.in_flight if self._workers else 1
        by_budget = self._chunk_bytes // max(1, in_flight * resident * row_elems * itemsize)
        per_tensor = min(CACHE_FRIENDLY_ELEMENTS, max(MIN_CHUNK_ELEMENTS, CHUNK_CACHE_BYTES // (resident * itemsize)))
        by_cache = per_tensor // row_elems
        step = max(1, min(rows, by_budget, max(1, by_cache)))
        return [(a, min(a + step, rows)) for a in range(0, rows, step)] or [(0, 0)]

    def imap(self, fn, spans):
        if self._workers is None:
            return super().imap(fn, spans)
        return self._workers.imap(fn, spans)

    def log(self, message):
        self._log.append(f"{self.key}: {message}")   # list.append: safe from worker threads


def output_metadata(plan: Plan, hashes: dict) -> dict:
    recipe = plan.recipe
    inputs = [{"name": s.name, "sha256": hashes.get(s.path)} for s in plan.sources]
    lineage = {}
    for src in plan.sources:
        for k, v in _json_field(src.header.metadata.get("sd_merge_models")).items():
            lineage.setdefault(k, v)
        sha = hashes.get(src.path)
        if sha:
            lineage[sha] = {"name": src.name, "legacy_hash": _safe_legacy_hash(src.path),
                            "sd_merge_recipe": _json_field(src.header.metadata.get("sd_merge_recipe")) or None}
    lineage, truncated = bound_lineage(lineage, (hashes.get(src.path) for src in plan.sources))
    webui_recipe = {"type": "astolfo_merge", "method": recipe.method, "params": recipe.params,
                    "pool": [hashes.get(plan.sources[[s.name for s in plan.sources].index(n)].path) for n in recipe.pool],
                    "recipe": recipe.to_dict()}
    meta = {
        "format": "pt",
        "astolfo_merge_version": __version__,
        "astolfo_merge_recipe": recipe.to_json(indent=None),
        "astolfo_merge_inputs": json.dumps(inputs),
        "sd_merge_recipe": json.dumps(webui_recipe),
        "sd_merge_models": json.dumps(lineage),
        "modelspec.architecture": {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2",
                                   "sdxl": "stable-diffusion-xl-v1-base"}[plan.arch],
        "modelspec.prediction_type": {"epsilon": "epsilon", "v": "v", "edm-v": "v", "edm": "epsilon"}[plan.prediction],
    }
    if truncated:
        meta[LINEAGE_NOTE] = truncated
    return meta


def _json_field(value) -> dict:
    if isinstance(value, dict):
        return value
    try:
        parsed = strict_loads(value) if isinstance(value, str) else {}
    except ValueError:   # JSONInputError too: hostile lineage (deep, huge) is dropped, not a crash
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _safe_legacy_hash(path):
    try:
        return legacy_model_hash(path)
    except OSError:
        return None


def _input_hashes(plan: Plan, options: RunOptions, report) -> dict:
    if not options.hash_inputs:
        return {}
    cache = options.hash_cache or HashCache()
    out = {}
    for n, src in enumerate(plan.sources):
        if cache.get(src.path) is None:
            report(f"hashing input {n + 1}/{len(plan.sources)}: {src.name}", stage=f"hashing inputs {n + 1}/{len(plan.sources)}")
        out[src.path] = cache.sha256(src.path)
    return out


ETA_AFTER_FRACTION, ETA_AFTER_SECONDS = 0.02, 2.0   # no ETA before this much of the merge (hashing excluded)


def merge_eta(merging_s: float, done_bytes: int, total_bytes: int) -> float | None:
    """Seconds left, from the merge's own rate (hashing not counted), once the rate means something."""
    if done_bytes < ETA_AFTER_FRACTION * total_bytes or merging_s < ETA_AFTER_SECONDS or not done_bytes:
        return None
    return merging_s / done_bytes * (total_bytes - done_bytes)


def run_merge(plan: Plan, options: RunOptions | None = None, progress: Callable[[Progress], None] | None = None,
              cancel: threading.Event | None = None, *, post_process: bool = True) -> MergeResult:
    """Run `plan`. `post_process=False` runs exactly this plan, skipping recipe-level post-processes
    (the Fermat a→b→c stage, ALGORITHMS.md §14.3, runs its own stage plans that way)."""
    options = options or RunOptions()
    if plan.output is None:
        raise RecipeError("output", "no output file given")
    refuse_input_as_output(plan, plan.output)
    if post_process and plan.recipe.extra.get("fermat"):
        from .rebasin.fermat import run_fermat
        return run_fermat(plan, options, progress, cancel)
    plan.check_budget(options.memory_gb)
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device", "CUDA was asked for but torch sees no CUDA device")
    if options.ray is not None:
        require_ray()                # before any work: one line saying what to install
    processes = 0 if options.ray is not None else _process_count(plan, options)
    dtype = torch.float64 if plan.recipe.precision == "fp64" else torch.float32
    start = time.monotonic()
    total_bytes = plan.output_bytes
    done_bytes, log = 0, list(plan.log)

    merge_start = None   # the ETA counts from the end of hashing (see merge_eta)

    def merging():
        nonlocal merge_start
        merge_start = time.monotonic()

    def report(message="", key="", keys_done=0, stage=""):
        if progress:
            now = time.monotonic()
            eta = merge_eta(now - merge_start, done_bytes, total_bytes) if merge_start else None
            progress(Progress(keys_done, len(plan.keys), done_bytes, total_bytes, now - start, eta, key, message, stage))

    def tally(kp, keys_done):
        nonlocal done_bytes
        done_bytes += math.prod(kp.shape) * kp.dtype.itemsize
        report(key=kp.key, keys_done=keys_done)

    stats = input_stats(plan)
    crew = Crew(processes) if processes and _stageless(plan, log) else None
    try:
        return _run(plan, options, report, crew, dtype, device, log, cancel, start, tally, merging)
    except (Cancelled, OutputExistsError):
        raise
    except (AstolfoError, RuntimeError, ValueError, OSError) as exc:   # an input changed: name it, not the symptom
        changed = changed_input(stats, f"reading it failed ({exc.__class__.__name__})")
        if changed is not None:
            raise changed from exc
        raise
    finally:
        if crew is not None:
            crew.close()


def _run(plan, options, report, crew, dtype, device, log, cancel, start, tally, merging) -> MergeResult:
    """Hash inputs, prepare methods, then run the keys on the crew (when it can take the plan) or here."""
    hashes = _input_hashes(plan, options, report)
    ensure_open_files(len(plan.sources))
    merging()
    readers = [CheckpointReader(s.path, s.header) for s in plan.sources]
    chunk_bytes = options.chunk_bytes or max(16 * 1024 ** 2, int(options.memory_gb * GIB) // 2)
    # Test-only: seconds to sleep per key, so tests can observe and interrupt a tiny merge midway.
    test_delay = float(os.environ.get("ASTOLFO_TEST_SLOW_KEYS", "0") or 0)
    pool = ChunkWorkers(options.threads or auto_workers(device.type))
    try:
        states = _prepare_methods(plan, readers, log, report, cancel)
        meta = output_metadata(plan, hashes)
        on_ray = options.ray is not None and _stageless(plan, log) and _shippable(plan, states, log)
        if on_ray:
            setup = {"plan": plan, "states": states, "dtype": dtype, "device": options.device,
                     "chunk_bytes": chunk_bytes, "test_delay": test_delay}
            sha = _run_on_ray(plan, setup, meta, options, tally, cancel, log)
        elif crew is not None and _shippable(plan, states, log):
            setup = {"plan": plan, "states": states, "dtype": dtype, "device": options.device,
                     "chunk_bytes": max(16 << 20, chunk_bytes // len(crew.workers)), "test_delay": test_delay}
            sha = _run_in_workers(plan, crew, setup, meta, options, tally, cancel, log)
        else:
            with one_torch_thread():
                sha = _run_here(plan, readers, dtype, device, chunk_bytes, log, cancel, states, pool, meta, options,
                                tally, test_delay)
    finally:
        pool.close()
        for r in readers:
            r.close()
    if options.hash_inputs:
        (options.hash_cache or HashCache()).put(plan.output, sha)
    return MergeResult(plan.output, sha, os.path.getsize(plan.output), time.monotonic() - start, len(plan.keys),
                       log, dict(plan.component_summary))


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one thread while a merge runs here, restored afterwards (a host such as the WebUI
    keeps its own setting). Why one: parallelism is across chunks (ChunkWorkers) or processes;
    streaming chunks are too small for torch's thread team to pay off, and on a busy machine every
    parallel op waits for a descheduled team member (measured: 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _process_count(plan: Plan, options: RunOptions) -> int:
    """Worker processes to run `plan` on; 0 = in this process (`workers` 1, unless `isolate`)."""
    if isinstance(options.workers, bool) or not isinstance(options.workers, int) or options.workers < 0:
        raise RecipeError("workers", f"must be 0 (auto) or a positive integer, got {options.workers!r}")
    budget, share = int(options.memory_gb * GIB), plan.peak_bytes(WORKER_CHUNK_BYTES)
    count = options.workers or auto_process_count(budget, plan.output_bytes, share)
    if count > 1 and count * share > budget + OVERHEAD_BYTES:
        need = math.ceil(count * share / GIB * 10) / 10
        raise MemoryBudgetError(f"{count} worker processes need about {need} GiB together but the budget is "
                                f"{options.memory_gb:.2f} GiB; raise --memory-gb to {need} or use fewer workers")
    return 0 if count == 1 and not options.isolate else count


def _stageless(plan: Plan, log: list) -> bool:
    """Keys with LoRA / Fermat stages hold open files and closures that worker processes cannot
    receive (yet): such plans run in this process (logged)."""
    if any(kp.pre or kp.post for kp in plan.keys):
        log.append("workers: this plan bakes in LoRAs or Fermat stages; it runs in this process")
        return False
    return True


def _shippable(plan: Plan, states: dict, log: list) -> bool:
    """Whether the plan and the prepared state can be sent to worker processes (else: this process, logged)."""
    try:
        pickle.dumps((plan, states), protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        log.append(f"workers: the plan cannot be sent to worker processes ({exc}); it runs in this process")
        return False
    return True


def _run_here(plan, readers, dtype, device, chunk_bytes, log, cancel, states, pool, meta, options, tally,
              test_delay) -> str:
    """Every key in this process, in order, through the streaming writer; returns the sha256."""
    with SafetensorsWriter(plan.output, [(k.key, k.dtype, k.shape) for k in plan.keys], meta,
                           options.overwrite) as writer:
        for n, kp in enumerate(plan.keys):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            _write_key(plan, kp, writer, readers, dtype, device, chunk_bytes, log, cancel, states, pool)
            tally(kp, n + 1)
            if test_delay:
                time.sleep(test_delay)
        return writer.commit()


def _run_in_workers(plan, crew, setup, meta, options, tally, cancel, log) -> str:
    """The keys as tasks on worker processes writing into the preallocated temp output (executors.py)."""
    done = 0

    def on_key(index):
        nonlocal done
        done += 1
        tally(plan.keys[index], done)

    with SafetensorsWriter(plan.output, [(k.key, k.dtype, k.shape) for k in plan.keys], meta, options.overwrite,
                           positioned=True) as writer:
        sha, key_log = run_tasks(plan, writer, setup, crew, on_key, cancel)
        writer.commit(sha)
    log.extend(key_log)
    return sha


def _run_on_ray(plan, setup, meta, options, tally, cancel, log) -> str:
    """The keys as Ray tasks writing into the preallocated temp output (ray_executor.py)."""
    done = 0

    def on_key(index):
        nonlocal done
        done += 1
        tally(plan.keys[index], done)

    with ray_session(options.ray) as ray, SafetensorsWriter(
            plan.output, [(k.key, k.dtype, k.shape) for k in plan.keys], meta, options.overwrite,
            positioned=True) as writer:
        sha, key_log = run_on_ray(ray, plan, writer, setup, on_key, cancel)
        writer.commit(sha)
    log.extend(key_log)
    return sha


def _prepare_methods(plan: Plan, readers, log, report, cancel=None) -> dict:
    """Run each used method's whole-plan `prepare` stage once (method name -> state). A prepare that
    declares a `cancel` parameter gets the job's cancel event (long stages check it)."""
    states = {}
    for name in dict.fromkeys(k.method for k in plan.keys if k.action == "merge"):
        method = get_method(name)
        if method.prepare is not None:
            report(f"preparing {name}")
            extra = {"cancel": cancel} if "cancel" in inspect.signature(method.prepare).parameters else {}
            with one_torch_thread():    # the same arithmetic whichever executor runs the keys
                states[name] = method.prepare(plan, readers, log, report, **extra)
    return states


def _write_key(plan, kp, writer, readers, dtype, device, chunk_bytes, log, cancel, states, pool=None):
    """Write one key; with nonfinite = "skip", an input with NaN/Inf is left out and the key redone."""
    try:
        _write_key_once(plan, kp, writer, readers, dtype, device, chunk_bytes, log, cancel, states, pool)
    finally:
        for source in {*kp.pool, kp.base, kp.source} - {None}:
            if kp.key in plan.sources[source].keys:
                readers[source].release(plan.sources[source].keys[kp.key])


def _write_key_once(plan, kp, writer, readers, dtype, device, chunk_bytes, log, cancel, states, pool=None):
    while True:
        try:
            for chunk in _produce(plan, kp, readers, dtype, device, chunk_bytes, log, cancel, states, pool):
                writer.write(kp.key, chunk)
            return
        except NonFiniteInput as bad:
            name = plan.sources[bad.source].name
            if plan.recipe.nonfinite != "skip" or kp.action != "merge" or bad.source == kp.base:
                raise MergeKeyError(kp.key, f"{name} has NaN/Inf values here (set 'nonfinite' to 'skip' to leave "
                                    "such inputs out of such keys, or to 'keep')", [name]) from None
            writer.rewind(kp.key)
            kp = _without(kp, bad.source)
            log.append(f"{kp.key}: {name} has NaN/Inf values here; left out ({len(kp.pool) or 1} input(s) remain)")


def _without(kp: KeyPlan, source: int) -> KeyPlan:
    pool = [i for i in kp.pool if i != source]
    method = get_method(kp.method)
    if not pool:
        raise MergeKeyError(kp.key, "every input has NaN/Inf values here")
    if len(pool) < method.min_models or (method.max_models is not None and len(pool) != len(kp.pool)):
        return dataclasses.replace(kp, action="copy", source=pool[0], pool=pool)
    return dataclasses.replace(kp, pool=pool)


def _produce(plan, kp: KeyPlan, readers, dtype, device, chunk_bytes, log, cancel, states=None, pool=None):
    for start, stop, chunk in _raw_chunks(plan, kp, readers, dtype, device, chunk_bytes, log, cancel, states or {},
                                          pool):
        for post in kp.post:
            chunk = post(chunk, start, stop)
        written = _to_output(plan, kp, chunk, log)   # fp8: range policy, rounded once
        if written.is_floating_point() and kp.action in ("merge", "copy"):   # the values as written: after the cast
            written = _check_finite(plan, kp, written, log, lambda: _nonfinite_input(plan, kp, readers, start, stop),
                                    chunk)
        yield written


def _to_output(plan, kp: KeyPlan, chunk, log):
    """The chunk in the key's output dtype. fp8 is rounded once (`cast_output`), and values beyond its
    range count as non-finite outputs: 'fail' / 'skip' stop with an error, 'keep' writes torch's cast
    (e4m3fn saturates to +-448, e5m2 overflows to +-inf), 'zero' writes 0."""
    if kp.dtype not in FP8_DTYPES or not chunk.is_floating_point():
        return chunk.to(device="cpu", dtype=kp.dtype)
    beyond = fp8_out_of_range(chunk, kp.dtype)
    if bool(beyond.any()):
        name = next(n for n, d in OUTPUT_DTYPES.items() if d == kp.dtype)
        count, policy = int(beyond.sum()), plan.recipe.nonfinite
        if policy in ("fail", "skip"):
            files = [plan.sources[i].name for i in (kp.pool or [kp.source])]
            raise MergeKeyError(kp.key, f"{count} value(s) lie beyond the range of {name} (largest "
                                f"{torch.finfo(kp.dtype).max:g}); save this component in a wider dtype, or set "
                                "'nonfinite' to 'keep' (saturate / inf) or 'zero'", files)
        log.append(f"{kp.key}: {count} value(s) beyond the {name} range "
                   f"{'written as torch casts them' if policy == 'keep' else 'replaced by 0'}")
        if policy == "zero":
            chunk = chunk.masked_fill(beyond, 0.0)
    return cast_output(chunk, kp.dtype)


def written_finite(t: torch.Tensor) -> bool:
    """NaN/Inf check of an output chunk in its output dtype. 16-bit: one sum (fast, ~5x cheaper than
    the compute-dtype sum), and only when that sum is not finite (a NaN/Inf, or a large finite sum
    overflowing the 16-bit result) one min/max pass, which propagates NaN and shows Inf. fp8 (no sum on
    CPU) is widened first."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype.itemsize == 1:
        t = t.to(torch.float32)
    if t.dtype in _HALF:
        if math.isfinite(float(t.sum())):
            return True
        low, high = torch.aminmax(t)
        return math.isfinite(float(low)) and math.isfinite(float(high))
    return all_finite(t)


def _zeroed(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.itemsize == 1:      # nan_to_num has no fp8 kernel
        return torch.nan_to_num(t.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0).to(t.dtype)
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def _check_finite(plan, kp, chunk, log, find_culprit, computed=None):
    """`chunk` is what will be written (output dtype); `computed` the same values before the cast."""
    saturated = chunk.dtype == torch.float8_e4m3fn and computed is not None and not all_finite(computed)
    if written_finite(chunk) and not saturated:   # e4m3fn has no Inf: the cast saturates an Inf to 448
        return chunk
    policy = plan.recipe.nonfinite
    files = [plan.sources[i].name for i in (kp.pool if kp.action == "merge" else [kp.source])]
    overflow = computed is not None and computed.dtype != chunk.dtype and all_finite(computed)
    if policy in ("fail", "skip"):
        culprit = find_culprit() if kp.action == "merge" and not overflow else None
        if culprit is not None:      # methods that propagate NaN/Inf leave the input scan to here
            raise NonFiniteInput(culprit)
        if overflow:
            name = {v: k for k, v in OUTPUT_DTYPES.items()}.get(chunk.dtype, str(chunk.dtype).replace("torch.", ""))
            biggest = float(computed.abs().max())
            raise MergeKeyError(kp.key, f"values up to {biggest:.4g} do not fit {name} (largest finite "
                                f"{torch.finfo(chunk.dtype).max:.4g}) and would be written as Inf/NaN: lower the weights "
                                "or strengths, write 'dtype': 'fp32', or set 'nonfinite' to 'zero' or 'keep'", files)
        raise MergeKeyError(kp.key, "the merge produced NaN/Inf values from finite inputs (set 'nonfinite' to "
                            "'keep' to write them, or 'zero' for the seed author's zeroing)", files)
    log.append(f"{kp.key}: non-finite values {'kept' if policy == 'keep' else 'replaced by 0'}")
    return chunk if policy == "keep" else _zeroed(chunk)


def _nonfinite_input(plan, kp: KeyPlan, readers, start, stop):
    """The first input (pool order, then the base) with NaN/Inf in rows [start, stop), or None."""
    for source in list(kp.pool) + ([kp.base] if kp.base is not None else []):
        t = readers[source].read_rows(plan.sources[source].keys[kp.key], start, stop)
        if t.is_floating_point() and not all_finite(t):
            return source
    return None


def _copy_chunks(plan, kp: KeyPlan, readers, dtype, device, chunk_bytes):
    """A copied key in row chunks that fit the chunk budget (stored, output and, with post-processing,
    compute-dtype copies of a chunk are alive at once), so a large copied key stays within the budget."""
    reader, stored = readers[kp.source], plan.sources[kp.source].keys[kp.key]
    info = reader.info(stored)
    rows = kp.shape[0] if kp.shape else 1
    row_elems = math.prod(kp.shape[1:]) if len(kp.shape) > 1 else 1
    same_rows = bool(kp.shape) and bool(info.shape) and info.shape[0] == rows and info.numel == math.prod(kp.shape)
    per_row = max(1, row_elems * (info.dtype.itemsize + kp.dtype.itemsize + (dtype.itemsize if kp.post else 0)))
    step = max(1, min(rows, chunk_bytes // 4 // per_row)) if same_rows else rows
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        t = (reader.read_rows(stored, start, stop) if same_rows and step < rows else reader.read(stored))
        t = t.reshape(((stop - start,) + tuple(kp.shape[1:])) if kp.shape else ())
        if t.is_floating_point() and plan.recipe.nonfinite in ("fail", "skip") and not all_finite(t):
            raise NonFiniteInput(kp.source)
        if kp.post and t.is_floating_point():
            t = t.to(device=device, dtype=dtype)
        yield start, stop, t


def _raw_chunks(plan, kp: KeyPlan, readers, dtype, device, chunk_bytes, log, cancel, states, pool=None):
    """(start_row, stop_row, chunk) in row order; chunks of merges are in the compute dtype."""
    rows = kp.shape[0] if kp.shape else 1
    if kp.action == "position_ids":
        yield 0, rows, torch.arange(kp.shape[-1], dtype=torch.int64).reshape(kp.shape)
        return
    if kp.action == "copy":
        yield from _copy_chunks(plan, kp, readers, dtype, device, chunk_bytes)
        return
    method = get_method(kp.method)
    inputs = FileKeyInputs(plan, kp, readers, dtype, device, chunk_bytes, log, states.get(kp.method), pool,
                           check_inputs=not method.propagates_nonfinite)
    files = [plan.sources[i].name for i in kp.pool]
    start = 0
    try:
        for chunk in method.run(inputs, kp.params):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            n = chunk.shape[0] if kp.shape and chunk.dim() == len(kp.shape) else rows
            yield start, start + n, chunk
            start += n
    except (MergeKeyError, Cancelled, RecipeError, NonFiniteInput):
        raise
    except Exception as exc:  # noqa: BLE001 - any method failure is reported with the key and files
        raise MergeKeyError(kp.key, f"{method.name} failed: {exc.__class__.__name__}: {exc}", files) from exc
