"""Running a plan's stages (stages.py): the whole-plan stages, once, in the process that asked for
the merge, and the per-key steps bound to code in whichever process runs a key.

Why split this way: a whole-plan stage (Re-Basin weight matching, the Fermat matching) reads many
keys and decides for all of them, so it runs once; its result is plain data (permutation indices,
paths, the checked LoRA files) that goes to every key task with the plan. `Bindings` turns a key's
steps (stages.Step) into functions of its chunks in the process that runs the key, opening what
they read (LoRA files, the Fermat temp a) on first use and closing it with the run.
"""
from __future__ import annotations

import inspect
import os
import threading

from ..errors import CheckpointError
from ..io.reader import CheckpointReader
from ..methods import get_method
from .fermat import base_source, combine, match
from .lora import lora_bake
from .stages import FERMAT_A, FERMAT_MATCH, LORAS, prepare_result


class Bindings:
    """A run's stage results (`results`, data) and the key steps bound to them, for one process."""

    def __init__(self, plan, results: dict):
        self.plan, self.results = plan, results
        self._bakes, self._lock = {}, threading.Lock()
        self._a_reader = None

    def state(self, method: str):
        """What the method's prepare stage found (None without one)."""
        return self.results.get(prepare_result(method))

    def post(self, kp) -> list:
        """The key's output steps as functions (chunk, start_row, stop_row) -> chunk."""
        return [self._bind(step, kp) for step in kp.post]

    def pre(self, kp, source) -> list:
        """The steps applied to what the method reads of pool member `source`."""
        return [self._bind(step, kp) for step in kp.pre.get(source, ())]

    def _bind(self, step, kp):
        if step.kind == "lora":
            return self._bake(step.ref).adder(kp.key, tuple(kp.shape), step.multiplier)
        if step.kind == "fermat":
            return _FermatStep(self, kp, step.ref)
        raise ValueError(f"unknown step {step.kind!r} for key {kp.key}")

    def _bake(self, index):
        with self._lock:
            if index not in self._bakes:
                self._bakes[index] = lora_bake(self.results[LORAS][index])
            return self._bakes[index]

    def a_reader(self) -> CheckpointReader:
        with self._lock:
            if self._a_reader is None:
                self._a_reader = CheckpointReader(self.results[FERMAT_A])
            return self._a_reader

    def close(self):
        if self._a_reader is not None:
            self._a_reader.close()
            self._a_reader = None


class _FermatStep:
    """The step ("fermat", what) of one UNet key: R (its whole tensor, compute dtype) -> a, b or c."""

    def __init__(self, bound: Bindings, kp, what: str):
        self.bound, self.key, self.shape, self.what = bound, kp.key, kp.shape, what

    def __call__(self, r, start, stop):
        a = self.bound.a_reader().read(self.key).reshape(self.shape).to(device=r.device, dtype=r.dtype)
        index = None if self.what == "a" else self.bound.results[FERMAT_MATCH].get(self.key)
        return combine(a, r, index, self.what)


def run_whole_stage(stage, plan, readers, bound: Bindings, log, report, cancel):
    """Run a whole-plan stage once; returns its result (data)."""
    if stage.kind == "prepare":
        method = get_method(stage.method)
        report(f"preparing {stage.method}")
        wanted = inspect.signature(method.prepare).parameters
        extra = {name: value for name, value in (("cancel", cancel), ("bindings", bound)) if name in wanted}
        return method.prepare(plan, readers, log, report, **extra)
    if stage.kind == "bake":
        for use in stage.loras:        # the files the key tasks will open: still there, still files
            if not os.path.isfile(use.path):
                raise CheckpointError(use.path, f"{use.where}: the LoRA file is gone since the merge was planned")
        return list(stage.loras)
    if stage.kind == "match":
        r_index = base_source(plan)
        with CheckpointReader(bound.results[stage.source]) as a_reader:
            return match(plan, a_reader, readers[r_index], report, cancel, log)
    raise ValueError(f"unknown whole-plan stage {stage.kind!r}")
