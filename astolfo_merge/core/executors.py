"""Running a plan's tasks in worker processes, supervised from the process that asked for the merge.

Why processes: torch ops are single-threaded here (chunks are cache-sized), so more cores need
more interpreters; and a worker that dies (SIGKILL, out of memory, SIGBUS when an input shrinks
under its memory map) must not take the host (the WebUI, the standalone app) with it.

How: the parent fixes the output header up front (a positioned `SafetensorsWriter`: header written,
file sized), starts N workers as fresh interpreters (`python -m astolfo_merge.core.worker_main`, never a
fork of the host and never a re-import of the host's `__main__`), sends each the pickled plan (plain
data), the results of its whole-plan stages and the output's byte ranges, then hands out tasks as
workers free up.
Workers write their tensors with positioned writes and report each key; the parent hashes the
finished prefix of the file meanwhile, and commits (fsync, atomic rename) when all keys are in.
Any failure or a cancel kills every worker and removes the temp file.
The worker interpreters and the wire they speak are in worker_process.py.
"""
from __future__ import annotations

import collections
import hashlib
import os
import queue
import threading

from ..errors import AstolfoError, Cancelled, CheckpointError
from ..io.writer import SafetensorsWriter
from .tasks import cut_tasks
from .worker_process import Crew, WorkerError, WorkerProcess, frame, unpack_error

HASH_BLOCK = 8 << 20
POLL_S = 0.1


class OrderedHasher:
    """sha256 of the output, read back in file order as the finished prefix grows (page cache, a
    background thread), so the digest is ready soon after the last key lands."""

    def __init__(self, path):
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._hash, self._done, self._target = hashlib.sha256(), 0, 0
        self._error, self._stop = None, False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="astolfo-hasher")
        self._thread.start()

    def advance(self, upto: int):
        with self._cv:
            self._target = max(self._target, upto)
            self._cv.notify_all()

    def finish(self, total: int) -> str:
        self.advance(total)
        with self._cv:
            self._cv.wait_for(lambda: self._error or self._done >= total)
        if self._error:
            raise self._error
        return self._hash.hexdigest()

    def close(self):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
        os.close(self._fd)

    def _run(self):
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or self._target > self._done)
                if self._stop:
                    return
                begin, end = self._done, min(self._target, self._done + HASH_BLOCK)
            try:
                data = _pread(self._fd, end - begin, begin)
                if not data:
                    raise OSError(f"output temp file ends at {begin} bytes")
                self._hash.update(data)
            except OSError as exc:
                with self._cv:
                    self._error = exc
                    self._cv.notify_all()
                return
            with self._cv:
                self._done = begin + len(data)
                self._cv.notify_all()


class TaskRun:
    """A plan's tasks handed out to a crew's workers, and their messages read until every key is
    done. Subclasses say what a finished key means (`_key`), what else they take (`_other`) and how a
    dead worker is reported (`_death`); a cancel, a worker's error or its death raise here."""

    def __init__(self, plan, setup: dict, crew: Crew, cancel):
        self.plan, self.setup, self.cancel = plan, setup, cancel
        self.workers, self.inbox, self.keep = crew.workers, crew.inbox, crew.keep
        self.tasks = collections.deque(cut_tasks(plan.keys, len(self.workers)))

    def _run_tasks(self):
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
            kind = msg[0]
            if kind == "key":
                left -= self._key(msg[1], msg[2])
            elif kind == "started":
                w.key = self.plan.keys[msg[1]].key
                self._started(w.key)
            elif kind == "task":
                self._assign(w)
            elif kind == "parked":
                w.parked = True
            elif kind == "error":
                raise unpack_error(msg[1], msg[2])
            elif kind == "exit":
                if not w.stopping:
                    raise self._death(w)
            else:
                self._other(msg)

    def _assign(self, w: WorkerProcess):
        if self.tasks:
            w.task = self.tasks.popleft()
            w.send(("task", w.task.id, w.task.first, w.task.stop))
        else:
            w.task, w.stopping = None, True
            w.send(("park",) if self.keep else ("stop",))

    def _key(self, index: int, lines: list) -> int:
        """Key `index` is done (its log `lines`); returns how many keys that newly finishes (0 or 1)."""
        raise NotImplementedError

    def _started(self, key: str):
        pass

    def _other(self, msg: tuple):
        pass

    def _death(self, w: WorkerProcess) -> AstolfoError:
        raise NotImplementedError


class WorkerRun(TaskRun):
    """One merge's tasks on a crew, and the bookkeeping. `run()` returns (sha256, per-key logs)."""

    def __init__(self, plan, writer: SafetensorsWriter, setup: dict, crew: Crew, on_key, cancel):
        super().__init__(plan, setup, crew, cancel)
        self.writer, self.on_key = writer, on_key
        self.ranges = writer.ranges()
        self.done = [False] * len(plan.keys)
        self.key_logs = {}
        self.frontier = 0          # keys [0, frontier) are all written
        self.inputs = input_stats(plan)
        self.hasher = None

    def run(self) -> tuple:
        self.hasher = OrderedHasher(self.writer.tmp)
        try:
            self.hasher.advance(self.writer.data_start)
            self._run_tasks()
            return (self.hasher.finish(self.writer.total_bytes),
                    [line for i in sorted(self.key_logs) for line in self.key_logs[i]])
        finally:
            self.hasher.close()

    def _key(self, index, lines) -> int:
        if self.done[index]:
            return 0
        self.done[index] = True
        if lines:
            self.key_logs[index] = lines
        while self.frontier < len(self.done) and self.done[self.frontier]:
            self.frontier += 1
        if self.frontier < len(self.done):
            self.hasher.advance(self.ranges[self.plan.keys[self.frontier].key][0])
        else:
            self.hasher.advance(self.writer.total_bytes)
        self.on_key(index)
        return 1

    def _death(self, w: WorkerProcess) -> AstolfoError:
        """Why a worker is gone: an input that changed under it (named), else how it died."""
        cause = w.exit_cause()
        changed = changed_input(self.inputs, f"the worker reading it {cause}")
        if changed is not None:
            return changed
        where = f" while merging key '{w.key}'" if w.key else ""
        tail = "; ".join(line for line in list(w.stderr_tail)[-3:] if line)
        return WorkerError(f"merge worker {w.index + 1} of {len(self.workers)} {cause}{where}; no output was written"
                           + (f" (its last output: {tail})" if tail else ""))


def _pread(fd, size, at) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, size, at)
    os.lseek(fd, at, os.SEEK_SET)     # Windows: this fd is the hasher's alone
    return os.read(fd, size)


def input_stats(plan) -> dict:
    """path -> (size, mtime_ns) of every input, to tell later whether one changed mid-merge."""
    return {s.path: _stat(s.path) for s in plan.sources}


def changed_input(stats: dict, consequence: str) -> CheckpointError | None:
    """The first input whose size or mtime differs from `stats`, as the error to report, else None.
    Why: a file shrinking under a read shows up as a crash (SIGBUS) or a garbled tensor far from
    its cause; the user needs the file's name."""
    for path, before in stats.items():
        now = _stat(path)
        if now != before:
            was, size = before[0] if before else None, now[0] if now else None
            what = ("was deleted" if now is None else f"shrank from {was} to {size} bytes" if was and size < was
                    else f"changed (size {was} -> {size} bytes, new mtime)")
            return CheckpointError(path, f"{what} during the merge; {consequence}; no output was written")
    return None


def _stat(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def run_tasks(plan, writer: SafetensorsWriter, setup: dict, crew: Crew, on_key, cancel) -> tuple:
    """Fill `writer` (positioned) with `plan`'s keys on the crew's workers; (sha256, key logs)."""
    setup = dict(setup, tmp=writer.tmp, ranges=writer.ranges(), dtypes={k: d for k, d, _s in writer.entries})
    return WorkerRun(plan, writer, setup, crew, on_key, cancel).run()
