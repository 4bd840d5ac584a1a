"""Live merge: a plan's output streamed key by key into a loaded model's tensors instead of a file.

Why: trying a merge in a WebUI otherwise costs a full checkpoint written, hashed and loaded per
try (2.1 GB for SD1). Here the engine's chunks are copied straight into the loaded model's own
tensors (on their device, in their dtype, under `torch.no_grad`), so no file and no second copy
of the model exist; the memory used beyond the model is the merge's chunk budget.

What the model holds is tracked per key as a *signature* of what produced it (method, parameters,
block weight, input files, seed, output dtype …). Keys absent from `LiveState.merged` hold the
loaded checkpoint's own values. A second merge recomputes only keys whose signature changed and
restores keys it no longer merges; `restore` re-reads only the changed keys from the checkpoint
file (no backup copy in memory), after which the loaded weights equal the file's values again.

The host supplies a `LiveTarget` (the WebUI glue wraps its loaded model; tests use `TensorTarget`).
Nothing here imports gradio or the WebUI; the host's torch settings end as they were
(`merge_torch_settings`). The state, the target interface and the per-key reads and writes shared by
merge, restore and save are in live_state.py; the WebUI's loaded model in live_webui.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from typing import Callable

import torch

from ..core.devices import merge_torch_settings
from ..core.live_workers import ChunkRun, keep_crew, release_crew, sub_plan, take_crew, warm_crew
from ..core.metadata import output_metadata
from ..core.plan_data import GIB, Plan
from ..core.run_options import MergeResult, Progress, RunOptions
from ..core.stage_run import Bindings, run_whole_stage
from ..core.worker_process import WORKER_CHUNK_BYTES, auto_process_count
from ..core.workers import ChunkWorkers
from ..errors import Cancelled, RecipeError
from ..io.hashes import HashCache
from ..io.reader import CheckpointReader
from ..io.writer import SafetensorsWriter
from .live_state import (
    LOCK,
    PARTIAL,
    LiveError,
    LiveResult,
    LiveTarget,
    Reporter,
    checkpoint_keys,
    current_state,
    key_signature,
    recipe_hash,
    restore_keys,
    settle,
    write_key,
)


def _check_shapes(plan: Plan, keys: list, tensors: dict):
    for kp in keys:
        t = tensors[kp.key]
        if t.numel() != math.prod(kp.shape) or (tuple(t.shape) != tuple(kp.shape) and not t.is_contiguous()):
            raise LiveError(f"{kp.key}: the merge gives shape {list(kp.shape)} but the loaded model holds "
                            f"{list(t.shape)}; merge to a file instead")


def _ids_in_order(checkpoint: str, stored: str, shape) -> bool:
    """Whether the checkpoint's position ids are 0..n-1 already (what the plan would write)."""
    with CheckpointReader(checkpoint) as reader:
        ids = reader.read(stored)
    return tuple(ids.shape) == tuple(shape) and torch.equal(ids.reshape(-1).long(), torch.arange(ids.numel()))


def merge_into(target: LiveTarget, plan: Plan, options: RunOptions | None = None,
               progress: Callable[[Progress], None] | None = None, cancel: threading.Event | None = None) -> LiveResult:
    """Make the loaded model hold `plan`'s output: changed keys merged, keys no longer merged restored."""
    options = options or RunOptions()
    plan.check_budget(options.memory_gb)
    with LOCK:
        return _merge_into(target, plan, options, progress, cancel)


def start_workers(target: LiveTarget, plan: Plan, options: RunOptions | None = None) -> int:
    """Before a grid's first cell: start and park the worker processes its live merges of `plan`'s
    kind will use (`options.workers`; 0: as many as cores and the budget allow), so no cell waits
    for interpreters. Returns how many are parked (0: the cells run in this process)."""
    options = options or RunOptions()
    tensors = target.tensors()
    keys = [kp for kp in plan.keys if kp.key in tensors]     # as a first cell writes them (_write_keys)
    processes = _process_count(plan, keys, tensors, options) if keys else 0
    return processes if processes and warm_crew(processes) else 0


def _merge_into(target, plan, options, progress, cancel) -> LiveResult:
    start = time.monotonic()
    state = current_state(target)
    tensors = target.tensors()
    own, _ = checkpoint_keys(state.checkpoint)
    log = list(plan.log)
    wanted, skipped = {}, []
    for kp in plan.keys:
        if kp.key not in tensors or kp.key not in own:
            skipped.append(kp.key)
            continue
        sig = key_signature(plan, kp, state.checkpoint)
        if kp.action == "position_ids" and _ids_in_order(state.checkpoint, own[kp.key], kp.shape):
            sig = None        # the file holds these very ids: nothing to write, nothing to restore
        wanted[kp.key] = (kp, sig)
    if skipped:
        log.append(f"{len(skipped)} key(s) the loaded model or its checkpoint lacks were left out, e.g. {skipped[0]}")
    write = [kp for kp, sig in wanted.values() if sig is not None and state.merged.get(kp.key) != sig]
    _check_shapes(plan, write, tensors)
    restore = [k for k in state.merged if wanted.get(k, (None, None))[1] is None and k in tensors]
    kept = sum(1 for key, (kp, sig) in wanted.items() if state.merged.get(key) == sig or (sig is None and key not in restore))
    total = sum(tensors[k].numel() * tensors[k].element_size() for k in restore) + \
        sum(math.prod(kp.shape) * kp.dtype.itemsize for kp in write)
    report = Reporter(len(write) + len(restore), total, progress)
    target.before_write(restore + [kp.key for kp in write])
    device = torch.device(options.device)
    dtype = torch.float64 if plan.recipe.precision == "fp64" else torch.float32
    chunk_bytes = options.chunk_bytes or max(16 * 1024 ** 2, int(options.memory_gb * GIB) // 2)
    state.recipe, state.recipe_hash, state.plan = plan.recipe, recipe_hash(plan.recipe), plan
    state.complete = False
    try:
        with torch.no_grad(), merge_torch_settings(device):
            restore_keys(state, restore, tensors, report, cancel)
            _write_keys(plan, write, wanted, state, tensors, report, options, device, dtype, chunk_bytes, log, cancel)
        state.complete = True
    finally:
        settle(state, target)
    where = f"loaded model ({os.path.basename(state.checkpoint)} {state.label})".strip()
    return LiveResult(where, state.recipe_hash, report.bytes, time.monotonic() - start,
                      len(write), log, dict(plan.component_summary), restored=len(restore), kept=kept,
                      label=state.label)


def _process_count(plan: Plan, write: list, tensors: dict, options: RunOptions) -> int:
    """Worker processes for the keys to write, as RunOptions.workers says (1: this process; 0: one per
    core the budget allows); 0 also for LoRA/Fermat stages and tensors not laid out flat."""
    if any(kp.pre or kp.post for kp in write) or not all(tensors[kp.key].is_contiguous() for kp in write):
        return 0
    sub = sub_plan(plan, write)
    count = options.workers or auto_process_count(int(options.memory_gb * GIB), sub.output_bytes,
                                                  sub.peak_bytes(WORKER_CHUNK_BYTES))
    return count if count > 1 else 0


def _write_keys(plan, write, wanted, state, tensors, report, options, device, dtype, chunk_bytes, log, cancel):
    if not write:
        return
    processes = _process_count(plan, write, tensors, options)
    crew = take_crew(processes, wait=bool(options.workers)) if processes else None   # live_workers.take_crew
    finished = False
    readers = [CheckpointReader(s.path, s.header) for s in plan.sources]
    pool = ChunkWorkers(options.threads or 1)
    results: dict = {}
    bound = Bindings(plan, results)
    try:
        _run_whole_stages(plan, readers, bound, results, log, report, cancel)
        if crew is not None:
            _write_in_workers(plan, write, wanted, state, tensors, report, options, dtype, chunk_bytes, log, cancel,
                              results, crew)
            finished = True
            return
        for kp in write:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            state.merged[kp.key] = PARTIAL     # until the last row is in
            write_key(plan, kp, tensors[kp.key], readers, dtype, device, chunk_bytes, log, cancel, bound, pool)
            state.merged[kp.key] = wanted[kp.key][1]
            report.tally(kp.key, math.prod(kp.shape) * kp.dtype.itemsize)
    finally:
        if crew is not None:
            if finished:
                keep_crew(crew)
            else:
                crew.close()
        bound.close()
        pool.close()
        for r in readers:
            r.close()


def _run_whole_stages(plan, readers, bound, results, log, report, cancel):
    """The plan's whole-plan stages (methods' prepare, LoRA files), once, their results handed to the
    keys as data. A live merge has one key stage: Fermat's temp files and passes are refused."""
    if sum(1 for stage in plan.pipeline() if stage.kind == "keys") > 1:
        raise RecipeError("fermat", "a merge into the loaded model cannot run Fermat's passes; merge into a file")
    for stage in plan.pipeline():
        if stage.kind != "keys":
            results[stage.result or stage.name] = run_whole_stage(
                stage, plan, readers, bound, log, lambda message="", **_: report(message=message), cancel)


def _write_in_workers(plan, write, wanted, state, tensors, report, options, dtype, chunk_bytes, log, cancel, results,
                      crew):
    """The keys on worker processes, their chunks copied into the model as they arrive (live_workers.py)."""
    sub = sub_plan(plan, write)
    sizes = {kp.key: math.prod(kp.shape) * kp.dtype.itemsize for kp in write}

    def started(key):
        state.merged[key] = PARTIAL

    def done(key):
        state.merged[key] = wanted[key][1]
        report.tally(key, sizes[key])

    setup = {"plan": sub, "results": results, "dtype": dtype, "device": options.device,
             "chunk_bytes": max(16 << 20, chunk_bytes // len(crew.workers))}
    log.extend(ChunkRun(sub, setup, crew, tensors, started, done, cancel).run())


def restore(target: LiveTarget, progress: Callable[[Progress], None] | None = None,
            cancel: threading.Event | None = None) -> LiveResult:
    """Bring back the checkpoint's own values in every key a live merge changed (read from its file).
    The grid (or the user) is done merging: the parked workers go too."""
    release_crew()
    with LOCK:
        start = time.monotonic()
        state = current_state(target)
        tensors = target.tensors()
        keys = [k for k in state.merged if k in tensors]
        report = Reporter(len(keys), sum(tensors[k].numel() * tensors[k].element_size() for k in keys), progress)
        target.before_write(keys)
        try:
            with torch.no_grad(), merge_torch_settings():
                restore_keys(state, keys, tensors, report, cancel)
        finally:
            settle(state, target)
        return LiveResult(f"loaded model ({os.path.basename(state.checkpoint)})", "", report.bytes,
                          time.monotonic() - start, 0, [], {}, restored=len(keys), kept=len(tensors) - len(keys))


def save_loaded(target: LiveTarget, path: str, overwrite: bool = False, hash_cache: HashCache | None = None) -> MergeResult:
    """Write the loaded merge to `path` with its recipe's metadata: every key of its plan, from the
    model's tensors (in the plan's output dtypes). Atomic; an existing file is refused unless `overwrite`."""
    with LOCK:
        state = current_state(target)
        if not state.merged or state.plan is None:
            raise LiveError("the loaded model holds no live merge to save (merge into it first)")
        if not state.complete or PARTIAL in state.merged.values():
            raise LiveError("the last live merge was interrupted; merge again or restore before saving")
        return _save(target, state, os.path.abspath(path), overwrite, hash_cache or HashCache())


def _save(target, state, path, overwrite, cache) -> MergeResult:
    start, plan = time.monotonic(), state.plan
    tensors = target.tensors()
    own, header = checkpoint_keys(state.checkpoint)
    target.before_write([kp.key for kp in plan.keys if kp.key in tensors])   # no LoRA baked into the file
    hashes = {s.path: cache.sha256(s.path) for s in plan.sources}
    meta = output_metadata(plan, hashes)
    meta["astolfo_merge_live"] = json.dumps({"saved_from": "the loaded model", "checkpoint": state.checkpoint,
                                             "recipe_sha256": state.recipe_hash})
    log = []
    with torch.no_grad(), SafetensorsWriter(path, [(k.key, k.dtype, k.shape) for k in plan.keys], meta, overwrite) as writer, \
            CheckpointReader(state.checkpoint, header) as reader:
        for kp in plan.keys:
            writer.write(kp.key, _saved_value(plan, kp, tensors, own, reader, log))
        sha = writer.commit()
    cache.put(path, sha)
    return MergeResult(path, sha, os.path.getsize(path), time.monotonic() - start, len(plan.keys), log,
                       dict(plan.component_summary))


def _saved_value(plan, kp, tensors, own, reader, log) -> torch.Tensor:
    """One key as the file merge would have written it: from the model when it holds it, else computed."""
    if kp.key in tensors and kp.key in own and key_signature(plan, kp, reader.path) is not None:
        return tensors[kp.key].detach().reshape(kp.shape).to(device="cpu", dtype=kp.dtype)
    readers = [CheckpointReader(s.path, s.header) for s in plan.sources]
    bound, value = Bindings(plan, {}), torch.empty(kp.shape, dtype=kp.dtype)
    try:
        with merge_torch_settings():
            dtype = torch.float64 if plan.recipe.precision == "fp64" else torch.float32
            write_key(plan, kp, value, readers, dtype, torch.device("cpu"), 64 << 20, log, None, bound, None)
    finally:
        bound.close()
        for r in readers:
            r.close()
    return value


def describe(target: LiveTarget, digests: bool = False) -> dict:
    """What the loaded model holds: its checkpoint, the live merge's label and recipe hash, how many
    keys differ from the file; with `digests`, the sha256 of every tensor's bytes as fp32 (so a caller
    can check the weights against a file without trusting this process's bookkeeping)."""
    with LOCK:
        state = current_state(target)
        out = {"checkpoint": state.checkpoint, "label": state.label, "recipe_sha256": state.recipe_hash,
               "merged_keys": len(state.merged), "complete": state.complete}
        if digests:
            out["digests"] = {key: tensor_digest(t) for key, t in sorted(target.tensors().items())}
        return out


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of `t` as contiguous little-endian fp32 bytes (integers: int64)."""
    wide = t.detach().to("cpu", torch.float32 if t.is_floating_point() else torch.int64).contiguous()
    return hashlib.sha256(wide.numpy().tobytes()).hexdigest()
