"""A live merge's keys computed in worker processes, their chunks sent back over the worker pipes.

Why: the WebUI process runs a live merge on one torch thread (its own settings stay as they are)
and the interpreter's lock makes chunk threads no faster; worker processes (executors.py) use the
other cores. Each worker runs the engine's own `_write_key` with a writer that sends every chunk
to the parent ("chunk" frames, worker_main.ChunkSender); the parent copies it straight into the
model's tensor at the key's running offset. A key is in flight on one worker only, so its chunks
arrive in row order. Any failure or a cancel kills the workers; keys written so far keep their
signatures, the key in flight stays marked partial (restore or the next merge rewrites it).
"""
from __future__ import annotations

import collections
import dataclasses
import queue

import torch

from ..errors import Cancelled
from .executors import POLL_S, Crew, WorkerError, frame, unpack_error
from .tasks import cut_tasks

_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                                      torch.float8_e4m3fn, torch.float8_e5m2, torch.int64, torch.int32)}


class ChunkRun:
    """The keys of `plan` on `crew`, copied into `tensors`; calls `on_start(key)` / `on_done(key)`."""

    def __init__(self, plan, setup: dict, crew: Crew, tensors: dict, on_start, on_done, cancel):
        self.plan = plan
        self.setup = dict(setup, send_chunks=True)
        self.workers, self.inbox = crew.workers, crew.inbox
        self.tasks = collections.deque(cut_tasks(plan.keys, len(self.workers)))
        self.tensors, self.on_start, self.on_done, self.cancel = tensors, on_start, on_done, cancel
        self.offsets, self.logs = {}, []

    def run(self) -> list:
        setup = frame(("setup", self.setup))
        for w in self.workers:
            w.send_frame(setup)
            self._assign(w)
        left = len(self.plan.keys)
        while left:
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled()
            try:
                w, msg = self.inbox.get(timeout=POLL_S)
            except queue.Empty:
                continue
            left -= self._handle(w, msg)
        return self.logs

    def _handle(self, w, msg) -> int:
        kind = msg[0]
        if kind == "chunk":
            self._copy(*msg[1:])
        elif kind == "rewind":
            self.offsets[msg[1]] = 0
        elif kind == "started":
            w.key = self.plan.keys[msg[1]].key
            self.offsets[w.key] = 0
            self.on_start(w.key)
        elif kind == "key":
            self.logs.extend(msg[2])
            self.on_done(self.plan.keys[msg[1]].key)
            return 1
        elif kind == "task":
            self._assign(w)
        elif kind == "error":
            raise unpack_error(msg[1], msg[2])
        elif kind == "exit" and not w.stopping:
            raise WorkerError(f"live merge worker {w.index + 1} {w.exit_cause()}"
                              + (f" while merging key '{w.key}'" if w.key else ""))
        return 0

    def _copy(self, key, dtype, data):
        chunk = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(_DTYPES[dtype])
        flat = self.tensors[key].view(-1)
        at = self.offsets.get(key, 0)
        flat[at:at + chunk.numel()].copy_(chunk)
        self.offsets[key] = at + chunk.numel()

    def _assign(self, w):
        if self.tasks:
            w.task = self.tasks.popleft()
            w.send(("task", w.task.id, w.task.first, w.task.stop))
        else:
            w.task, w.stopping = None, True
            w.send(("stop",))


def sub_plan(plan, keys: list):
    """`plan` reduced to `keys` (the ones to write), sources and recipe unchanged."""
    return dataclasses.replace(plan, keys=list(keys))
