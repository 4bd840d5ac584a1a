"""What a loaded model holds under a live merge (live.py): its state, the target interface, the
results, each key's signature, and the per-key reads and writes that merge, restore and save share.

Keys absent from `LiveState.merged` hold the loaded checkpoint's own values; the others map to a
signature of what produced them. Nothing here imports gradio or the WebUI.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from ..core.key_chunks import key_chunks
from ..core.plan_data import KeyPlan, Plan
from ..core.plan_inputs import load_source
from ..core.run_options import MergeResult, Progress
from ..core.stream import REWIND
from ..errors import AstolfoError, Cancelled
from ..io import arch as archmod
from ..io.reader import CheckpointReader

PARTIAL = "partial"          # a key whose write was interrupted: neither the file's values nor a merge's
LIVE_MARK = "[Merger]"       # what the model's name carries while it holds a live merge
LOCK = threading.Lock()      # one live operation at a time in this process


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


def checkpoint_keys(path: str) -> tuple:
    """(canonical key -> stored key, header) of the loaded checkpoint."""
    source = load_source(os.path.basename(path), path)
    return source.keys, source.header


class Reporter:
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


def restore_keys(state: LiveState, keys: list, tensors: dict, report: Reporter, cancel):
    """Re-read `keys` from the checkpoint file into the model (cast to the model's dtype as loading did)."""
    if not keys:
        return
    stored, header = checkpoint_keys(state.checkpoint)
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


def write_key(plan, kp, tensor, readers, dtype, device, chunk_bytes, log, cancel, bound, pool):
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


def settle(state: LiveState, target: LiveTarget):
    """After any change, finished or not: forget the recipe once nothing is merged, mark the model."""
    if not state.merged:
        state.recipe, state.recipe_hash, state.plan, state.complete = None, "", None, True
    target.marked(state)
