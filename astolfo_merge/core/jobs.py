"""Background merge jobs for the tabs: one merge at a time per host, progress snapshots, cancel.

Why here and not in the UI: the WebUI re-executes `scripts/*.py` on "Reload UI" and browsers
disconnect, but modules of this package stay in `sys.modules`; a job owned by a `JobManager` of
this module keeps running and a reloaded page simply asks the same manager again (A1111.md §1.2,
§5.5). Gradio events only submit, cancel and read snapshots; they never wait for a merge.

A manager runs jobs on one worker thread (started on demand, gone when idle). A second submit
while a job is running is refused with a message (`JobBusyError`) unless the caller asks to queue
(`queue=True`, used by the XYZ grid, which waits for its turn).
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import itertools
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from ..errors import AstolfoError, Cancelled
from .engine import run_merge
from .run_options import MergeResult, Progress, RunOptions

LOG_LINES = 200                 # lines kept per job (the tab shows the tail)
PROGRESS_LOG_INTERVAL_S = 2.0   # a "keys done" log line at most this often

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class JobBusyError(AstolfoError):
    """A merge is already running on this host; names it and says what to do."""


@dataclass
class Snapshot:
    """What a page shows of a job, copied under the job's lock (safe to read from any thread)."""
    id: str
    title: str
    status: str
    keys_done: int = 0
    keys_total: int = 0
    fraction: float = 0.0
    elapsed: float = 0.0
    eta: float | None = None
    message: str = ""
    stage: str = ""             # Progress.stage: e.g. "hashing inputs 2/5" before the keys start
    log: list = field(default_factory=list)
    error: str | None = None
    result: MergeResult | None = None
    output: str | None = None
    version: int = 0

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def active(self) -> bool:
        return self.status in (QUEUED, RUNNING)


class Job:
    """One merge: a plan, run options, a cancel flag, and the progress seen so far."""

    _ids = itertools.count(1)

    def __init__(self, plan, options: RunOptions, title: str, on_done: Callable[[MergeResult], object] | None,
                 runner: Callable | None = None):
        self.id = f"job-{next(self._ids)}-{int(time.time())}"
        if options.isolate is None:   # merges run in worker processes: the host's torch settings stay as
            options = dataclasses.replace(options, isolate=True)   # they are and a dying worker spares it
        self.plan, self.options, self.title, self.on_done = plan, options, title, on_done
        self.runner = runner or run_merge   # runner(plan, options, progress=, cancel=) -> result (live.py: no file)
        self.cancel_event = threading.Event()
        self.done_event = threading.Event()
        self._lock = threading.Lock()
        self._log = collections.deque(maxlen=LOG_LINES)
        self._progress: Progress | None = None
        self._started = None
        self._last_log = 0.0
        self.status = QUEUED
        self.error: str | None = None
        self.result: MergeResult | None = None
        self.version = 0
        self.log(f"queued: {title}")

    # -- reading ------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self._lock:
            p = self._progress
            elapsed = (time.monotonic() - self._started) if self._started and not self.done_event.is_set() else \
                (self.result.seconds if self.result else (p.elapsed if p else 0.0))
            done = self.status == DONE
            return Snapshot(
                self.id, self.title, self.status,
                keys_done=p.keys_done if p else 0, keys_total=p.keys_total if p else len(self.plan.keys),
                fraction=1.0 if done else (p.fraction if p else 0.0), elapsed=elapsed,
                eta=None if self.status != RUNNING or not p else p.eta, message=p.message if p else "",
                stage=p.stage if p and self.status == RUNNING else "", log=list(self._log), error=self.error, result=self.result, output=self.plan.output,
                version=self.version)

    def wait(self, timeout=None) -> MergeResult:
        """Block until the job ends; return its result or raise what ended it."""
        if not self.done_event.wait(timeout):
            raise TimeoutError(f"{self.title}: still running after {timeout} s")
        if self.status == CANCELLED:
            raise Cancelled()
        if self.status == FAILED:
            raise AstolfoError(self.error or "merge failed")
        return self.result

    # -- writing (worker thread) ----------------------------------------------------------------
    def log(self, line: str):
        with self._lock:
            self._log.append(line)
            self.version += 1

    def _set(self, **changes):
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value)
            self.version += 1

    def _on_progress(self, p: Progress):
        with self._lock:
            self._progress = p
            self.version += 1
        if p.message:
            self.log(p.message)
        elif p.elapsed - self._last_log >= PROGRESS_LOG_INTERVAL_S:
            self._last_log = p.elapsed
            self.log(f"{p.keys_done}/{p.keys_total} keys ({100 * p.fraction:.0f}%)")

    def _run(self):
        if self.cancel_event.is_set():
            self._finish(CANCELLED, error="cancelled before it started")
            return
        self._started = time.monotonic()
        self._set(status=RUNNING)
        self.log(f"started: {len(self.plan.keys)} keys -> {self.plan.output or self.title}")
        for line in self.plan.log:
            self.log(f"note: {line}")
        try:
            result = self.runner(self.plan, self.options, progress=self._on_progress, cancel=self.cancel_event)
        except Cancelled:
            self._finish(CANCELLED, error="cancelled; no file was written")
            return
        except AstolfoError as exc:
            self._finish(FAILED, error=str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - the page must learn about any failure
            self.log(traceback.format_exc(limit=6))
            self._finish(FAILED, error=f"internal error: {exc.__class__.__name__}: {exc}")
            return
        for line in result.log[len(self.plan.log):]:
            self.log(f"note: {line}")
        if self.on_done is not None:
            try:
                message = self.on_done(result)
                if message:
                    self.log(str(message))
            except Exception as exc:  # noqa: BLE001 - the file is written; only the host refresh failed
                self.log(f"warning: the merge is written but the host could not register it: {exc}")
        self._set(result=result)
        self._finish(DONE)

    def _finish(self, status, error=None):
        self._set(status=status, error=error)
        self.log({DONE: f"done in {self.result.seconds:.1f} s: {self.result.path}" if self.result else "done",
                  FAILED: f"failed: {error}", CANCELLED: error or "cancelled"}[status])
        self.done_event.set()


class JobManager:
    """Runs the jobs of one host, one at a time, on a worker thread of this package."""

    HISTORY = 20

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()
        self._running: Job | None = None
        self._history: collections.deque = collections.deque(maxlen=self.HISTORY)
        self._worker: threading.Thread | None = None

    def submit(self, plan, options: RunOptions | None = None, title: str | None = None,
               on_done: Callable[[MergeResult], object] | None = None, queue: bool = False,
               runner: Callable | None = None) -> Job:
        """Start `plan` now, or queue it behind the running job (`queue=True`), or refuse. `runner`
        replaces `run_merge` (a live merge into the loaded model, a restore)."""
        job = Job(plan, options or RunOptions(), title or os.path.basename(plan.output or "merge"), on_done, runner)
        with self._lock:
            busy = self._active_locked()
            if busy is not None and not queue:
                snap = busy.snapshot()
                raise JobBusyError(f"a merge is already running ({snap.title}, {100 * snap.fraction:.0f}%); "
                                   "wait for it to finish or cancel it first")
            self._queue.append(job)
            self._history.append(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name=f"astolfo-merge-{self.name}", daemon=True)
                self._worker.start()
        return job

    def _work(self):
        while True:
            with self._lock:
                if not self._queue:
                    self._running = None
                    self._worker = None
                    return
                job = self._running = self._queue.popleft()
            job._run()

    def cancel(self, job_id: str | None = None) -> bool:
        """Cancel the given job (default: the running one). True if a job was told to stop."""
        with self._lock:
            candidates = ([self._running] if self._running else []) + list(self._queue)
        for job in candidates:
            if job_id is None or job.id == job_id:
                job.cancel_event.set()
                job.log("cancel requested")
                return True
        return False

    def _active_locked(self) -> Job | None:
        if self._running is not None and not self._running.done_event.is_set():
            return self._running
        return self._queue[0] if self._queue else None

    def busy(self) -> bool:
        with self._lock:
            return self._active_locked() is not None

    def current(self) -> Job | None:
        """The running job, else the next queued one, else the most recent finished one."""
        with self._lock:
            if self._running is not None:
                return self._running
            if self._queue:
                return self._queue[0]
            return self._history[-1] if self._history else None

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return next((j for j in self._history if j.id == job_id), None)

    def jobs(self) -> list:
        with self._lock:
            return list(self._history)


_MANAGERS: dict = {}
_MANAGERS_LOCK = threading.Lock()


def manager(host_key: str) -> JobManager:
    """The job manager of one host, kept for the life of the process (survives Reload UI)."""
    with _MANAGERS_LOCK:
        if host_key not in _MANAGERS:
            _MANAGERS[host_key] = JobManager(host_key)
        return _MANAGERS[host_key]


@atexit.register
def _cancel_on_exit(timeout: float = 10.0):
    """Stop running merges when the process exits, so their temp files are removed (daemon threads
    would otherwise die mid-write and leave a `.partial` file behind)."""
    with _MANAGERS_LOCK:
        managers = list(_MANAGERS.values())
    running = [j for m in managers for j in m.jobs() if not j.done_event.is_set()]
    for job in running:
        job.cancel_event.set()
    for job in running:
        job.done_event.wait(timeout)
