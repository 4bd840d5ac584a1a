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
interpreters to import torch. With automatic workers a merge with none parked runs in this process;
a grid parks them before its first cell (`warm_crew`). A restore, a different worker count or the
timer closes them.
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
    """The keys of `plan` on `crew`, written into `tensors`; calls `on_start(key)` / `on_done(key)`.

    A chunk for a CPU tensor of its own dtype is read from the pipe straight into the tensor by the
    worker's reading thread (`place`: no copy in this process, and the workers' pipes are read in
    parallel); one in another dtype (an fp16 output in an fp32 model) is read into that thread's
    scratch buffer and widened into the tensor there; a GPU model's arrive as buffers and are copied
    here (`_copy`). A key is marked started before its first byte lands, and done after its last."""

    def __init__(self, plan, setup: dict, crew: Crew, tensors: dict, on_start, on_done, cancel):
        super().__init__(plan, dict(setup, send_chunks=True), crew, cancel)
        self.tensors, self.on_start, self.on_done = tensors, on_start, on_done
        self.offsets, self.placed, self.logs = {}, {}, []
        self.scratch = threading.local()

    def run(self) -> list:
        for w in self.workers:
            w.sink = self
        try:
            self._run_tasks()
        finally:
            for w in self.workers:
                w.sink = None
        return self.logs

    def place(self, key, dtype, nbytes):
        """(A worker's reading thread.) The bytes of `key`'s tensor this chunk fills, or None."""
        tensor, source = self.tensors[key], _DTYPES[dtype]
        if tensor.device.type != "cpu":
            return None
        if key not in self.placed:
            self.on_start(key)
        at, count = self.placed.get(key, 0), nbytes // source.itemsize
        self.placed[key] = at + count
        target = tensor.detach().view(-1)[at:at + count]
        if tensor.dtype == source:
            return target.view(torch.uint8).numpy()
        scratch = getattr(self.scratch, "buffer", None)
        if scratch is None or len(scratch) < nbytes:
            scratch = self.scratch.buffer = bytearray(nbytes)
        return memoryview(scratch)[:nbytes], lambda: target.copy_(
            torch.frombuffer(scratch, dtype=torch.uint8, count=nbytes).view(source))

    def rewind(self, key):
        """(A worker's reading thread.) `key` starts over: its placed chunks are written again."""
        if key in self.placed:
            self.placed[key] = 0

    def _started(self, key):
        self.offsets[key] = 0
        self.on_start(key)

    def _key(self, index, lines) -> int:
        self.logs.extend(lines)
        self.on_done(self.plan.keys[index].key)
        return 1

    def _other(self, msg):
        if msg[0] == "chunk" and msg[3] is not None:      # None: placed by the reading thread already
            self._copy(*msg[1:])
        elif msg[0] == "rewind":
            self.offsets[msg[1]] = 0

    def _death(self, w):
        return WorkerError(f"live merge worker {w.index + 1} {w.exit_cause()}"
                           + (f" while merging key '{w.key}'" if w.key else ""))

    def _copy(self, key, dtype, data):
        chunk = torch.frombuffer(data, dtype=torch.uint8).view(_DTYPES[dtype])     # a bytearray: no copy
        flat = self.tensors[key].view(-1)
        at = self.offsets.get(key, 0)
        flat[at:at + chunk.numel()].copy_(chunk)
        self.offsets[key] = at + chunk.numel()


KEEP_S = 60.0
_kept: dict = {"crew": None, "timer": None, "ready": None}     # ready: set once the crew is parked (or closed)
_kept_lock = threading.Lock()


def take_crew(count: int, wait: bool = True) -> Crew | None:
    """`count` workers for a live merge: the kept crew when it has as many and all are alive. Else
    with `wait` a fresh crew (its interpreters import torch while the parent prepares); without
    (`--workers 0`: auto) None: the merge runs in this process. Starting interpreters costs more
    than one merge gains from them (a full SD1 weighted sum in fp64 on 2 cores: ~3.3 s in-process,
    ~2.7 s on 2 parked workers, ~4.5 s on 2 fresh ones); a grid starts them once, before its first
    cell (`warm_crew`)."""
    with _kept_lock:
        crew, timer, ready = _kept["crew"], _kept["timer"], _kept["ready"]
        if crew is not None and not wait and not ready.is_set() and len(crew.workers) == count:
            return None              # still starting: this merge runs here, that crew serves the next
        _kept.update(crew=None, timer=None, ready=None)
    if timer is not None:
        timer.cancel()
    if crew is not None:
        ready.wait(timeout=30)
        if len(crew.workers) == count and crew.alive():
            return crew
        crew.close()
    return Crew(count, keep=True) if wait else None


def warm_crew(count: int) -> bool:
    """Start `count` workers and park them for the next live merges (unless such a crew is kept
    already); True once they are parked. Never while the host computes: interpreters importing
    torch next to a generation on all cores slowed its first image several times over (measured)."""
    crew = kept_crew(wait=True)
    if crew is None or len(crew.workers) != count or not crew.alive():
        keep_crew(Crew(count, keep=True))
    crew = kept_crew(wait=True)
    return crew is not None and crew.alive()


def keep_crew(crew: Crew):
    """Park `crew` (after a finished merge, or freshly started) for the next live merge; closed
    after KEEP_S idle seconds."""
    ready = threading.Event()
    timer = threading.Timer(KEEP_S, _expire, args=(crew,))
    timer.daemon = True
    with _kept_lock:
        old, old_timer = _kept["crew"], _kept["timer"]
        _kept.update(crew=crew, timer=timer, ready=ready)
    if old_timer is not None:
        old_timer.cancel()
    if old is not None and old is not crew:
        old.close()
    crew.settle()            # closes the crew when a worker died or did not answer
    ready.set()
    timer.start()


def release_crew():
    """Close the kept crew now (after a grid's restore, on the timer, at shutdown)."""
    with _kept_lock:
        crew, timer = _kept["crew"], _kept["timer"]
        _kept.update(crew=None, timer=None, ready=None)
    if timer is not None:
        timer.cancel()
    if crew is not None:
        crew.close()


def kept_crew(wait: bool = False) -> Crew | None:
    """The kept crew, if any (tests); `wait`: once it is parked."""
    crew, ready = _kept["crew"], _kept["ready"]
    if crew is not None and wait:
        ready.wait(timeout=30)
    return crew


def _expire(crew: Crew):
    with _kept_lock:
        if _kept["crew"] is not crew:
            return
        _kept.update(crew=None, timer=None, ready=None)
    crew.close()


def sub_plan(plan, keys: list):
    """`plan` reduced to `keys` (the ones to write), sources and recipe unchanged."""
    return dataclasses.replace(plan, keys=list(keys))
