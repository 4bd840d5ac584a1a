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
(`merge_torch_settings`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core.devices import merge_torch_settings
from ..core.executors import WORKER_CHUNK_BYTES, Crew, auto_process_count
from ..core.key_chunks import key_chunks
from ..core.live_workers import ChunkRun, sub_plan
from ..core.metadata import output_metadata
from ..core.plan import GIB, KeyPlan, Plan, load_source
from ..core.run_options import MergeResult, Progress, RunOptions
from ..core.stage_run import Bindings, run_whole_stage
from ..core.stream import REWIND
from ..core.workers import ChunkWorkers
from ..errors import AstolfoError, Cancelled, RecipeError
from ..io import arch as archmod
from ..io.hashes import HashCache
from ..io.reader import CheckpointReader
from ..io.writer import SafetensorsWriter

PARTIAL = "partial"          # a key whose write was interrupted: neither the file's values nor a merge's
LIVE_MARK = "[Merger]"       # what the model's name carries while it holds a live merge
_LOCK = threading.Lock()     # one live operation at a time in this process


class LiveError(AstolfoError):
    """A live merge cannot go on (no model loaded, a shape the model does not have …)."""


@dataclass
class LiveState:
    """What a loaded model holds beyond its checkpoint file."""
    checkpoint: str                              # the file the model was loaded from (restores read it)
    merged: dict = field(default_factory=dict)   # key -> signature of what produced its values now
    recipe: object = None                        # the Recipe of the last live merge (None once restored)
    recipe_hash: str = ""                        # sha256 of that recipe without its output name
    plan: Plan | None = None                     # its plan (Save reads dtypes and metadata from it)
    complete: bool = True                        # False after a failed or cancelled merge (a mix of two)

    @property
    def label(self) -> str:
        """"[Merger] <hash>", the mark images and titles carry while a merge is loaded."""
        if not self.merged:
            return ""
        return f"{LIVE_MARK} {self.recipe_hash[:10]}" + ("" if self.complete else " (incomplete)")


class LiveTarget:
    """A loaded model as the live merge sees it. Subclasses say where its tensors are."""

    checkpoint: str = ""     # absolute path of the file the weights were loaded from
    state: LiveState | None = None

    def tensors(self) -> dict:
        """Canonical checkpoint key -> the model's own tensor (written in place)."""
        raise NotImplementedError

    def before_write(self, keys: list) -> None:
        """Called with the keys about to change (or be read by Save), before any byte moves:
        a host drops caches of these weights here (the WebUI's LoRA backups)."""

    def marked(self, state: LiveState) -> None:
        """Called after every change: the host shows `state.label` (empty once restored)."""


class TensorTarget(LiveTarget):
    """A plain mapping of tensors loaded from `checkpoint` (tests, scripts)."""

    def __init__(self, tensors: dict, checkpoint: str):
        self._tensors, self.checkpoint, self.state = tensors, os.path.abspath(checkpoint), None
        self.labels = []

    def tensors(self) -> dict:
        return self._tensors

    def marked(self, state: LiveState) -> None:
        self.labels.append(state.label)


@dataclass
class LiveResult(MergeResult):
    """A live merge or restore: `keys` written, `restored` re-read from the checkpoint, `kept` unchanged."""
    restored: int = 0
    kept: int = 0
    label: str = ""
    live: bool = True

    def summary(self) -> str:
        return (f"{self.path}\n  {self.keys} keys merged, {self.restored} restored from the checkpoint, "
                f"{self.kept} unchanged, {self.seconds:.1f} s")


def recipe_hash(recipe) -> str:
    """sha256 of the recipe without its output name (equal merges, equal hashes; as trials.recipe_key)."""
    doc = recipe.to_dict()
    doc.pop("output", None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_id(path: str) -> list:
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def key_signature(plan: Plan, kp: KeyPlan, checkpoint: str) -> str | None:
    """What produces `kp`'s values, as a short hash; None when the key is the loaded checkpoint's own
    value (copied from that very file, nothing applied) or a schedule buffer (the host keeps its own)."""
    if kp.component == archmod.OTHER:
        return None
    if (kp.action == "copy" and not kp.post and kp.reshape_from is None
            and _same_file(plan.sources[kp.source].path, checkpoint)
            and kp.dtype.itemsize >= plan.sources[kp.source].header.tensors[plan.sources[kp.source].keys[kp.key]].dtype.itemsize):
        return None
    recipe = plan.recipe
    doc = {"action": kp.action, "method": kp.method, "params": kp.params, "block": kp.block,
           "dtype": str(kp.dtype), "shape": list(kp.shape), "reshape": kp.reshape_from,
           "pool": [_file_id(plan.sources[i].path) for i in kp.pool],
           "base": _file_id(plan.sources[kp.base].path) if kp.base is not None else None,
           "source": _file_id(plan.sources[kp.source].path) if kp.source is not None else None,
           "seed": recipe.seed, "precision": recipe.precision, "nonfinite": recipe.nonfinite}
    if kp.pre or kp.post:   # LoRAs / stages baked in: what the recipe says about them
        doc["extra"] = recipe.extra
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def current_state(target: LiveTarget) -> LiveState:
    """The target's state, or a fresh one (nothing merged) when the host loaded other weights since."""
    state = target.state
    if state is None or not _same_file(state.checkpoint, target.checkpoint):
        state = LiveState(os.path.abspath(target.checkpoint))
        target.state = state
    return state


def _target_view(tensor: torch.Tensor, kp: KeyPlan) -> torch.Tensor:
    """The model's tensor seen in the plan's shape (same elements; e.g. a 1x1 conv stored as linear)."""
    shape = tuple(kp.shape)
    return tensor if tuple(tensor.shape) == shape else tensor.view(shape)


def _check_shapes(plan: Plan, keys: list, tensors: dict):
    for kp in keys:
        t = tensors[kp.key]
        if t.numel() != math.prod(kp.shape) or (tuple(t.shape) != tuple(kp.shape) and not t.is_contiguous()):
            raise LiveError(f"{kp.key}: the merge gives shape {list(kp.shape)} but the loaded model holds "
                            f"{list(t.shape)}; merge to a file instead")


def _checkpoint_keys(path: str) -> tuple:
    """(canonical key -> stored key, header) of the loaded checkpoint."""
    source = load_source(os.path.basename(path), path)
    return source.keys, source.header


def _ids_in_order(checkpoint: str, stored: str, shape) -> bool:
    """Whether the checkpoint's position ids are 0..n-1 already (what the plan would write)."""
    with CheckpointReader(checkpoint) as reader:
        ids = reader.read(stored)
    return tuple(ids.shape) == tuple(shape) and torch.equal(ids.reshape(-1).long(), torch.arange(ids.numel()))


class _Reporter:
    """Progress in the engine's terms (keys and bytes), so jobs and pages show live merges alike."""

    def __init__(self, total_keys, total_bytes, progress):
        self.start, self.total_keys, self.total_bytes, self.progress = time.monotonic(), total_keys, total_bytes, progress
        self.keys = self.bytes = 0

    def __call__(self, message="", key="", stage=""):
        if self.progress is not None:
            elapsed = time.monotonic() - self.start
            eta = (elapsed / self.bytes * (self.total_bytes - self.bytes)) if self.bytes and elapsed > 1 else None
            self.progress(Progress(self.keys, self.total_keys, self.bytes, self.total_bytes, elapsed, eta, key,
                                   message, stage))

    def tally(self, key, nbytes):
        self.keys += 1
        self.bytes += nbytes
        self(key=key)


def _restore_keys(state: LiveState, keys: list, tensors: dict, report: _Reporter, cancel):
    """Re-read `keys` from the checkpoint file into the model (cast to the model's dtype as loading did)."""
    if not keys:
        return
    stored, header = _checkpoint_keys(state.checkpoint)
    with CheckpointReader(state.checkpoint, header) as reader:
        for key in keys:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            t = tensors[key]
            value = reader.read(stored[key])
            t.copy_(value.reshape(t.shape))
            reader.release(stored[key])
            state.merged.pop(key, None)
            report.tally(key, t.numel() * t.element_size())


def _write_key(plan, kp, tensor, readers, dtype, device, chunk_bytes, log, cancel, bound, pool):
    """Stream one key's chunks into `tensor` (rows in order), as the engine produces them for a file
    (NaN/Inf inputs follow the recipe's policy there: a key that starts over comes as REWIND)."""
    view, start = _target_view(tensor, kp), 0
    for chunk in key_chunks(plan, kp, readers, dtype, device, chunk_bytes, log, cancel, bound, pool):
        if chunk is REWIND:
            start = 0
        elif view.dim() == 0:
            view.copy_(chunk.reshape(()))
        else:
            rows = chunk.reshape((-1,) + tuple(view.shape[1:]))
            view[start:start + rows.shape[0]].copy_(rows)
            start += rows.shape[0]


def merge_into(target: LiveTarget, plan: Plan, options: RunOptions | None = None,
               progress: Callable[[Progress], None] | None = None, cancel: threading.Event | None = None) -> LiveResult:
    """Make the loaded model hold `plan`'s output: changed keys merged, keys no longer merged restored."""
    options = options or RunOptions()
    plan.check_budget(options.memory_gb)
    with _LOCK:
        return _merge_into(target, plan, options, progress, cancel)


def _merge_into(target, plan, options, progress, cancel) -> LiveResult:
    start = time.monotonic()
    state = current_state(target)
    tensors = target.tensors()
    own, _ = _checkpoint_keys(state.checkpoint)
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
    report = _Reporter(len(write) + len(restore), total, progress)
    target.before_write(restore + [kp.key for kp in write])
    device = torch.device(options.device)
    dtype = torch.float64 if plan.recipe.precision == "fp64" else torch.float32
    chunk_bytes = options.chunk_bytes or max(16 * 1024 ** 2, int(options.memory_gb * GIB) // 2)
    state.recipe, state.recipe_hash, state.plan = plan.recipe, recipe_hash(plan.recipe), plan
    state.complete = False
    try:
        with torch.no_grad(), merge_torch_settings(device):
            _restore_keys(state, restore, tensors, report, cancel)
            _write_keys(plan, write, wanted, state, tensors, report, options, device, dtype, chunk_bytes, log, cancel)
        state.complete = True
    finally:
        _settle(state, target)
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
    crew = Crew(processes) if processes else None   # started first: the interpreters import torch meanwhile
    readers = [CheckpointReader(s.path, s.header) for s in plan.sources]
    pool = ChunkWorkers(options.threads or 1)
    results: dict = {}
    bound = Bindings(plan, results)
    try:
        _run_whole_stages(plan, readers, bound, results, log, report, cancel)
        if crew is not None:
            _write_in_workers(plan, write, wanted, state, tensors, report, options, dtype, chunk_bytes, log, cancel,
                              results, crew)
            return
        for kp in write:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            state.merged[kp.key] = PARTIAL     # until the last row is in
            _write_key(plan, kp, tensors[kp.key], readers, dtype, device, chunk_bytes, log, cancel, bound, pool)
            state.merged[kp.key] = wanted[kp.key][1]
            report.tally(kp.key, math.prod(kp.shape) * kp.dtype.itemsize)
    finally:
        if crew is not None:
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


def _settle(state: LiveState, target: LiveTarget):
    """After any change, finished or not: forget the recipe once nothing is merged, mark the model."""
    if not state.merged:
        state.recipe, state.recipe_hash, state.plan, state.complete = None, "", None, True
    target.marked(state)


def restore(target: LiveTarget, progress: Callable[[Progress], None] | None = None,
            cancel: threading.Event | None = None) -> LiveResult:
    """Bring back the checkpoint's own values in every key a live merge changed (read from its file)."""
    with _LOCK:
        start = time.monotonic()
        state = current_state(target)
        tensors = target.tensors()
        keys = [k for k in state.merged if k in tensors]
        report = _Reporter(len(keys), sum(tensors[k].numel() * tensors[k].element_size() for k in keys), progress)
        target.before_write(keys)
        try:
            with torch.no_grad(), merge_torch_settings():
                _restore_keys(state, keys, tensors, report, cancel)
        finally:
            _settle(state, target)
        return LiveResult(f"loaded model ({os.path.basename(state.checkpoint)})", "", report.bytes,
                          time.monotonic() - start, 0, [], {}, restored=len(keys), kept=len(tensors) - len(keys))


def save_loaded(target: LiveTarget, path: str, overwrite: bool = False, hash_cache: HashCache | None = None) -> MergeResult:
    """Write the loaded merge to `path` with its recipe's metadata: every key of its plan, from the
    model's tensors (in the plan's output dtypes). Atomic; an existing file is refused unless `overwrite`."""
    with _LOCK:
        state = current_state(target)
        if not state.merged or state.plan is None:
            raise LiveError("the loaded model holds no live merge to save (merge into it first)")
        if not state.complete or PARTIAL in state.merged.values():
            raise LiveError("the last live merge was interrupted; merge again or restore before saving")
        return _save(target, state, os.path.abspath(path), overwrite, hash_cache or HashCache())


def _save(target, state, path, overwrite, cache) -> MergeResult:
    start, plan = time.monotonic(), state.plan
    tensors = target.tensors()
    own, header = _checkpoint_keys(state.checkpoint)
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
            _write_key(plan, kp, value, readers, dtype, torch.device("cpu"), 64 << 20, log, None, bound, None)
    finally:
        bound.close()
        for r in readers:
            r.close()
    return value


def describe(target: LiveTarget, digests: bool = False) -> dict:
    """What the loaded model holds: its checkpoint, the live merge's label and recipe hash, how many
    keys differ from the file; with `digests`, the sha256 of every tensor's bytes as fp32 (so a caller
    can check the weights against a file without trusting this process's bookkeeping)."""
    with _LOCK:
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


def state_dict_target_keys(names) -> dict:
    """Model parameter name -> canonical checkpoint key, for models whose modules wrap others under a
    `wrapped` attribute (the WebUI's text-encoder hijack: `cond_stage_model.wrapped.transformer…`,
    `token_embedding.wrapped.weight`)."""
    return {name: ".".join(part for part in name.split(".") if part != "wrapped") for name in names}


def release_network_backups(model: torch.nn.Module, names) -> int:
    """Make the WebUI's built-in LoRA (extensions-builtin/Lora/networks.py) forget the weights of the
    modules owning `names` (model parameter names) before a live merge writes them.

    networks.py keeps per module `network_weights_backup` / `network_bias_backup` (the weights before
    any LoRA) and `network_current_names` (the LoRAs applied now); it restores the backup whenever the
    LoRA set changes. Left alone after a live merge, that backup would undo the merge, and the merge
    would overwrite applied LoRA deltas that the module believes are still there. So each affected
    module first gets its backup back (no LoRA left in any of its tensors), then forgets backups and
    names: the next generation backs up the merged weights and applies its LoRAs once, on top.
    Returns the number of modules reset."""
    owners = {}
    for name in names:
        parts = name.split(".")
        for depth in (1, 2):     # the owner, and its parent (a MultiheadAttention owns out_proj.weight's backup)
            if len(parts) > depth:
                owners.setdefault(".".join(parts[:-depth]), None)
    count = 0
    with torch.no_grad():
        for path in owners:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if _release(module):
                count += 1
    return count


def _release(module) -> bool:
    if not any(hasattr(module, a) for a in ("network_current_names", "network_weights_backup", "network_bias_backup")):
        return False
    weights, bias = getattr(module, "network_weights_backup", None), getattr(module, "network_bias_backup", None)
    if getattr(module, "network_current_names", ()):
        if isinstance(module, torch.nn.MultiheadAttention):
            if weights is not None:
                module.in_proj_weight.copy_(weights[0])
                module.out_proj.weight.copy_(weights[1])
            if bias is not None:
                module.out_proj.bias.copy_(bias)
        else:
            if weights is not None:
                module.weight.copy_(weights)
            if bias is not None and getattr(module, "bias", None) is not None:
                module.bias.copy_(bias)
    module.network_current_names = ()
    module.network_weights_backup = None
    module.network_bias_backup = None
    return True
