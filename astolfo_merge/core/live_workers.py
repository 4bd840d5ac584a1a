"""A live merge's keys computed in worker processes, their chunks sent back over the worker pipes.

Why: the WebUI process runs a live merge on one torch thread (its own settings stay as they are)
and the interpreter's lock makes chunk threads no faster; worker processes (executors.py) use the
other cores. Each worker runs the engine's own `write_key` (key_chunks.py) with a writer that sends every chunk
to the parent ("chunk" frames, worker_main.ChunkSender); the parent copies it straight into the
model's tensor at the key's running offset. A key is in flight on one worker only, so its chunks
arrive in row order. Any failure or a cancel kills the workers; keys written so far keep their
signatures, the key in flight stays marked partial (restore or the next merge rewrites it).

After a merge that finished, its workers are kept parked for KEEP_S seconds (`take_crew` /
`keep_crew`): the next cell of a grid starts on them instead of waiting ~1.5 s for fresh
interpreters to import torch. A restore, a different worker count or the timer closes them.
"""
from __future__ import annotations

import dataclasses
import threading

import torch

from .executors import TaskRun
from .worker_process import Crew, WorkerError

_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                                      torch.float8_e4m3fn, torch.float8_e5m2, torch.int64, torch.int32)}


class ChunkRun(TaskRun):
    """The keys of `plan` on `crew`, copied into `tensors`; calls `on_start(key)` / `on_done(key)`."""

    def __init__(self, plan, setup: dict, crew: Crew, tensors: dict, on_start, on_done, cancel):
        super().__init__(plan, dict(setup, send_chunks=True), crew, cancel)
        self.tensors, self.on_start, self.on_done = tensors, on_start, on_done
        self.offsets, self.logs = {}, []

    def run(self) -> list:
        self._run_tasks()
        return self.logs

    def _started(self, key):
        self.offsets[key] = 0
        self.on_start(key)

    def _key(self, index, lines) -> int:
        self.logs.extend(lines)
        self.on_done(self.plan.keys[index].key)
        return 1

    def _other(self, msg):
        if msg[0] == "chunk":
            self._copy(*msg[1:])
        elif msg[0] == "rewind":
            self.offsets[msg[1]] = 0

    def _death(self, w):
        return WorkerError(f"live merge worker {w.index + 1} {w.exit_cause()}"
                           + (f" while merging key '{w.key}'" if w.key else ""))

    def _copy(self, key, dtype, data):
        chunk = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(_DTYPES[dtype])
        flat = self.tensors[key].view(-1)
        at = self.offsets.get(key, 0)
        flat[at:at + chunk.numel()].copy_(chunk)
        self.offsets[key] = at + chunk.numel()


KEEP_S = 60.0
_kept: dict = {"crew": None, "timer": None}
_kept_lock = threading.Lock()


def take_crew(count: int) -> Crew:
    """`count` workers for a live merge: the kept crew when it has as many and all are alive, else a
    fresh one (started at once: the interpreters import torch while the parent prepares)."""
    crew = _take_kept()
    if crew is not None and len(crew.workers) == count and crew.alive():
        return crew
    if crew is not None:
        crew.close()
    return Crew(count, keep=True)


def keep_crew(crew: Crew):
    """After a finished merge: park `crew` for the next one, closed after KEEP_S idle seconds."""
    if not crew.settle():
        return
    timer = threading.Timer(KEEP_S, release_crew)
    timer.daemon = True
    with _kept_lock:
        old = _kept["crew"]
        if _kept["timer"] is not None:
            _kept["timer"].cancel()
        _kept.update(crew=crew, timer=timer)
    if old is not None:
        old.close()
    timer.start()


def release_crew():
    """Close the kept crew now (after a grid's restore, on the timer, at shutdown)."""
    crew = _take_kept()
    if crew is not None:
        crew.close()


def kept_crew() -> Crew | None:
    """The parked crew, if any (for tests and the tab's status)."""
    return _kept["crew"]


def _take_kept() -> Crew | None:
    with _kept_lock:
        crew, timer = _kept["crew"], _kept["timer"]
        _kept.update(crew=None, timer=None)
    if timer is not None:
        timer.cancel()
    return crew


def sub_plan(plan, keys: list):
    """`plan` reduced to `keys` (the ones to write), sources and recipe unchanged."""
    return dataclasses.replace(plan, keys=list(keys))
