"""Executing a plan: key by key, chunk by chunk, straight into the streaming writer.

Memory: a method holds at most `resident` chunks of one key; chunk rows are chosen so that
`resident` compute-dtype chunks fit the chunk budget, whatever the number of models. Inputs are
read with positioned reads (page cache, no whole-file mapping), the output is written as it is
produced. Cancel and errors abort the writer, so nothing half-written stays behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..errors import (
    AstolfoError,
    Cancelled,
    MemoryBudgetError,
    MergeKeyError,
    OutputExistsError,
    RecipeError,
    check_memory_gb,
    check_throttle,
)
from ..io.hashes import HashCache, legacy_model_hash
from ..io.header import FP8_DTYPES, OUTPUT_DTYPES
from ..io.reader import CheckpointReader, ensure_open_files
from ..io.strict_json import loads as strict_loads
from ..io.writer import SafetensorsWriter, cast_output, fp8_out_of_range
from ..methods import KeyInputs, get_method
from ..methods.registry import add_in_order
from ..methods.shapes import row_spans
from .executors import WORKER_CHUNK_BYTES, Crew, auto_process_count, changed_input, input_stats, run_tasks
from .lineage import TRUNCATED_KEY as LINEAGE_NOTE, bound_lineage
from .plan import GIB, OVERHEAD_BYTES, KeyPlan, Plan, key_seed, refuse_input_as_output
from .ray_executor import ray_session, require_ray, run_on_ray
from .stage_run import Bindings, run_whole_stage
from .stages import OUTPUT, TEMP
from .stream import REWIND, arange_ids, stored_chunks, write_chunks, write_file
from .workers import ChunkWorkers, auto_workers

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
    throttle: float = 0.0            # seconds to pause after each key, in every worker: a merge that leaves a
                                     # shared disk and CPU to others; front ends' --throttle (tests use it to
                                     # watch progress and cancel on tiny models)
    ray: str | None = None           # None: no Ray; "" or "local": a local Ray for the merge; else a cluster address

    def __post_init__(self):   # every front end (CLI, tab, app, scripts) builds these: refuse NaN / inf / <= 0 here
        self.memory_gb = check_memory_gb(self.memory_gb)
        self.throttle = check_throttle(self.throttle)


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
        """shapes.row_spans with this key's budget, cache bound, and room for every span in flight."""
        in_flight = self._workers.in_flight if self._workers else 1
        return row_spans(self.shape, self.dtype.itemsize, resident, self._chunk_bytes, in_flight=in_flight)

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
              cancel: threading.Event | None = None) -> MergeResult:
    """Run `plan`'s pipeline (plan.stages, stages.py): whole-plan stages once, in this process; key
    stages as tasks here or on worker processes (`options.workers`). Returns the result of the stage
    that writes the plan's output, with the log of the whole run."""
    options = options or RunOptions()
    if plan.output is None:
        raise RecipeError("output", "no output file given")
    _check_outputs(plan, options)
    plan.check_budget(options.memory_gb)
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device", "CUDA was asked for but torch sees no CUDA device")
    if options.ray is not None:
        require_ray()                 # before any work: one line saying what to install
    else:
        _process_count(plan, options)     # a bad worker count or budget is refused before any work
    stats = input_stats(plan)
    run = _Pipeline(plan, options, progress, cancel, device)
    try:
        return run.run()
    except (Cancelled, OutputExistsError):
        raise
    except (AstolfoError, RuntimeError, ValueError, OSError) as exc:   # an input changed: name it, not the symptom
        changed = changed_input(stats, f"reading it failed ({exc.__class__.__name__})")
        if changed is not None:
            raise changed from exc
        raise
    finally:
        run.close()


def stage_output(plan: Plan, stage) -> str | None:
    """The file a key stage writes: the plan's output, a side file, or None for a temp file."""
    if stage.output == OUTPUT:
        return plan.output
    return None if stage.output == TEMP else stage.output


def _check_outputs(plan: Plan, options: RunOptions):
    """Every file the pipeline writes, before any work: never an input, never replaced unless asked."""
    for stage in plan.pipeline():
        path = stage_output(plan, stage) if stage.kind == "keys" else None
        if path is None:
            continue
        refuse_input_as_output(plan, path)
        if os.path.exists(path) and not options.overwrite:
            raise OutputExistsError(path)


class _Pipeline:
    """One run of a plan's stages: the inputs' readers, the stage results handed on as data, the log
    and progress, and the temp files to remove whatever happens."""

    def __init__(self, plan: Plan, options: RunOptions, progress, cancel, device):
        self.plan, self.options, self.progress, self.cancel, self.device = plan, options, progress, cancel, device
        self.dtype = plan.compute_dtype
        self.log, self.results, self.temps = list(plan.log), {}, []
        self.bound = Bindings(plan, self.results)
        self.start = time.monotonic()
        self.readers, self.pool = [], None
        self.chunk_bytes = options.chunk_bytes or max(16 * 1024 ** 2, int(options.memory_gb * GIB) // 2)
        first = next((s for s in plan.pipeline() if s.kind == "keys"), None)
        self.crew = self._crew(self._stage_plan(first)) if first is not None else None   # started early: see Crew

    def run(self) -> MergeResult:
        hashes = _input_hashes(self.plan, self.options, self._reporter(""))
        ensure_open_files(len(self.plan.sources))
        self.readers = [CheckpointReader(s.path, s.header) for s in self.plan.sources]
        self.pool = ChunkWorkers(self.options.threads or auto_workers(self.device.type))
        result = None
        for stage in self.plan.pipeline():
            if stage.kind != "keys":
                with one_torch_thread():    # the same arithmetic whichever executor runs the keys
                    found = run_whole_stage(stage, self.plan, self.readers, self.bound, self.log,
                                            self._reporter(stage.label), self.cancel)
                self.results[stage.result or stage.name] = found
                continue
            done = self._keys(stage, hashes)
            if stage.output == OUTPUT:
                result = done
            elif stage.output != TEMP:
                self.log.append(f"{stage.name}: wrote {done.path}")
        result.log, result.seconds = self.log, time.monotonic() - self.start
        return result

    def _stage_plan(self, stage) -> Plan:
        """The plan one key stage runs: its keys, its file, its recipe (a side output's note)."""
        recipe = self.plan.recipe
        if stage.output != OUTPUT:     # intermediate files describe the recipe without the stage that made them
            extra = {k: v for k, v in recipe.extra.items() if k != "fermat"}
            recipe = dataclasses.replace(recipe, extra=dict(extra, note=stage.note) if stage.note else extra)
        output = stage_output(self.plan, stage) or _temp_path(self.plan.output, stage.name)
        return dataclasses.replace(self.plan, keys=self.plan.keys if stage.keys is None else stage.keys,
                                   output=output, recipe=recipe, stages=[])

    def _crew(self, sub: Plan):
        if self.options.ray is not None:
            return None
        count = _process_count(sub, self.options)
        return Crew(count) if count else None

    def _keys(self, stage, hashes) -> MergeResult:
        """One key stage through the streaming writer, here or as tasks on worker processes."""
        sub = self._stage_plan(stage)
        temp = stage.output == TEMP
        if temp:
            self.temps.append(sub.output)
        report = self._reporter(stage.label, sub)
        if stage.label and not temp:
            report(f"writing {sub.output}")
        began = time.monotonic()
        options = dataclasses.replace(self.options, overwrite=True) if temp else self.options
        meta = output_metadata(sub, {} if temp else hashes)
        crew, self.crew = (self.crew or self._crew(sub)), None
        tally = report.tally
        try:
            if options.ray is not None:
                setup = {"plan": sub, "results": self.results, "dtype": self.dtype, "device": options.device,
                         "chunk_bytes": self.chunk_bytes, "throttle": options.throttle}
                sha = _run_on_ray(sub, setup, meta, options, tally, self.cancel, self.log)
            elif crew is not None:
                setup = {"plan": sub, "results": self.results, "dtype": self.dtype, "device": options.device,
                         "chunk_bytes": max(16 << 20, self.chunk_bytes // len(crew.workers)), "throttle": options.throttle}
                sha = _run_in_workers(sub, crew, setup, meta, options, tally, self.cancel, self.log)
            else:
                with one_torch_thread():
                    sha = _run_here(sub, self.readers, self.dtype, self.device, self.chunk_bytes, self.log, self.cancel,
                                    self.bound, self.pool, meta, options, tally)
        finally:
            if crew is not None:
                crew.close()
        if temp:
            self.results[stage.result or stage.name] = sub.output
        elif options.hash_inputs:
            (options.hash_cache or HashCache()).put(sub.output, sha)
        return MergeResult(sub.output, sha, os.path.getsize(sub.output), time.monotonic() - began, len(sub.keys),
                           self.log, dict(self.plan.component_summary))

    def _reporter(self, label: str, sub: Plan | None = None) -> "_Reporter":
        return _Reporter(self.progress, label, sub or self.plan, self.start, counting=sub is not None)

    def close(self):
        if self.crew is not None:
            self.crew.close()
        if self.pool is not None:
            self.pool.close()
        for r in self.readers:
            r.close()
        self.bound.close()
        for path in self.temps:
            if os.path.exists(path):
                os.remove(path)


class _Reporter:
    """Progress of one stage: report(message, key, keys_done, stage); `tally(kp, n)` counts a written
    key. Messages get the stage's label in front ("Fermat 3/3, c: ..."); the ETA counts from the
    stage's first key (hashing and whole-plan stages are not part of the rate, see merge_eta)."""

    def __init__(self, progress, label, plan: Plan, start: float, counting: bool):
        self.progress, self.label, self.start = progress, label, start
        self.keys_total, self.bytes_total, self.done_bytes = len(plan.keys), plan.output_bytes, 0
        self.began = time.monotonic() if counting else None

    def __call__(self, message="", key="", keys_done=0, stage=""):
        if not self.progress:
            return
        now = time.monotonic()
        eta = merge_eta(now - self.began, self.done_bytes, self.bytes_total) if self.began else None
        if message and self.label:
            message = f"{self.label}: {message}"
        self.progress(Progress(keys_done, self.keys_total, self.done_bytes, self.bytes_total, now - self.start, eta,
                               key, message, stage))

    def tally(self, kp, keys_done):
        self.done_bytes += math.prod(kp.shape) * kp.dtype.itemsize
        self(key=kp.key, keys_done=keys_done)


def _temp_path(output: str, name: str) -> str:
    """A hidden temp file next to the output for stage `name` (removed after the merge)."""
    stem = os.path.splitext(os.path.basename(output))[0]
    tag = name.replace(" ", "-")
    return os.path.join(os.path.dirname(output), f".{stem}.{tag}-{secrets.token_hex(4)}.safetensors")


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


def _run_here(plan, readers, dtype, device, chunk_bytes, log, cancel, bound, pool, meta, options, tally) -> str:
    """Every key in this process, in order, through the one streaming loop; returns the sha256.
    `bound`: the run's stage results and the keys' steps bound to them (stage_run.Bindings)."""
    def chunks_of(index):
        return _key_chunks(plan, plan.keys[index], readers, dtype, device, chunk_bytes, log, cancel, bound, pool)

    def after_key(index):
        tally(plan.keys[index], index + 1)
        if options.throttle:
            time.sleep(options.throttle)

    return write_file(plan.output, [(k.key, k.dtype, k.shape) for k in plan.keys], meta, options.overwrite,
                      chunks_of, after_key, cancel)


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


def _write_key(plan, kp, writer, readers, dtype, device, chunk_bytes, log, cancel, bound, pool=None):
    """Write one key into `writer` (a worker process's range writer; this process uses `_run_here`)."""
    write_chunks(writer, kp.key, _key_chunks(plan, kp, readers, dtype, device, chunk_bytes, log, cancel, bound, pool))


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


def _key_chunks(plan, kp, readers, dtype, device, chunk_bytes, log, cancel, bound, pool=None):
    """One key's output chunks; with nonfinite = "skip", an input with NaN/Inf is left out and the
    key starts over (`REWIND`). The key's mapped input pages are released once it is done."""
    first = kp
    try:
        while True:
            try:
                yield from _produce(plan, kp, readers, dtype, device, chunk_bytes, log, cancel, bound, pool)
                return
            except NonFiniteInput as bad:
                name = plan.sources[bad.source].name
                if plan.recipe.nonfinite != "skip" or kp.action != "merge" or bad.source == kp.base:
                    raise MergeKeyError(kp.key, f"{name} has NaN/Inf values here (set 'nonfinite' to 'skip' to leave "
                                        "such inputs out of such keys, or to 'keep')", [name]) from None
                yield REWIND
                kp = _without(kp, bad.source)
                log.append(f"{kp.key}: {name} has NaN/Inf values here; left out ({len(kp.pool) or 1} input(s) remain)")
    finally:
        for source in {*first.pool, first.base, first.source} - {None}:
            if first.key in plan.sources[source].keys:
                readers[source].release(plan.sources[source].keys[first.key])


def _without(kp: KeyPlan, source: int) -> KeyPlan:
    pool = [i for i in kp.pool if i != source]
    method = get_method(kp.method)
    if not pool:
        raise MergeKeyError(kp.key, "every input has NaN/Inf values here")
    if len(pool) < method.min_models or (method.max_models is not None and len(pool) != len(kp.pool)):
        return dataclasses.replace(kp, action="copy", source=pool[0], pool=pool)
    return dataclasses.replace(kp, pool=pool)


def _produce(plan, kp: KeyPlan, readers, dtype, device, chunk_bytes, log, cancel, bound, pool=None):
    posts = bound.post(kp) if kp.post else ()
    for start, stop, chunk in _raw_chunks(plan, kp, readers, dtype, device, chunk_bytes, log, cancel, bound, pool):
        for post in posts:
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
    compute-dtype copies of a chunk are alive at once), so a large copied key stays within the budget;
    in one chunk when a step needs the whole tensor (Fermat's permutations move rows)."""
    reader, stored = readers[kp.source], plan.sources[kp.source].keys[kp.key]
    per_element = reader.info(stored).dtype.itemsize + kp.dtype.itemsize + (dtype.itemsize if kp.post else 0)
    whole = any(s.whole for s in kp.post)     # one chunk: the whole tensor
    budget = chunk_bytes // 4 if not whole else math.prod(kp.shape or (1,)) * per_element
    for start, stop, t in stored_chunks(reader, stored, kp.shape, budget, per_element):
        if t.is_floating_point() and plan.recipe.nonfinite in ("fail", "skip") and not all_finite(t):
            raise NonFiniteInput(kp.source)
        if kp.post and t.is_floating_point():
            t = t.to(device=device, dtype=dtype)
        yield start, stop, t


def _raw_chunks(plan, kp: KeyPlan, readers, dtype, device, chunk_bytes, log, cancel, bound, pool=None):
    """(start_row, stop_row, chunk) in row order; chunks of merges are in the compute dtype."""
    rows = kp.shape[0] if kp.shape else 1
    if kp.action == "position_ids":
        yield 0, rows, arange_ids(kp.shape)
        return
    if kp.action == "copy":
        yield from _copy_chunks(plan, kp, readers, dtype, device, chunk_bytes)
        return
    method = get_method(kp.method)
    inputs = FileKeyInputs(plan, kp, readers, dtype, device, chunk_bytes, log, bound.state(kp.method), pool,
                           check_inputs=not method.propagates_nonfinite, bound=bound)
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
