"""Worker interpreters as the parent sees them: how many to start, starting them (`WorkerProcess`,
`Crew`), and the wire both sides speak (length-prefixed pickles over stdin / stdout, errors as
plain data). What they run and how the parent supervises a merge is in executors.py.
"""
from __future__ import annotations

import collections
import contextlib
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time

from ..errors import AstolfoError

try:
    import fcntl
except ImportError:             # Windows
    fcntl = None

WORKER_MODULE = "astolfo_merge.core.worker_main"
WORKER_CHUNK_BYTES = 64 << 20       # the smallest chunk budget a worker is planned with
AUTO_MIN_OUTPUT_BYTES = 64 << 20    # auto: smaller merges run in-process (starting a worker costs ~1 s)
PIPE_BYTES = 1 << 20                # a worker's stdout pipe (Linux; unprivileged limit: fs/pipe-max-size)
# glibc's malloc in a worker (ignored by other C libraries; the user's own settings win): chunk
# buffers (up to 8 MB) come from the heap and stay there between chunks. By default glibc maps such
# buffers fresh and unmaps them on free until its threshold has crept up, and returns the top of the
# heap early: each new worker then zero-filled its pages again chunk after chunk, which made the
# first live-merge cell of a fresh crew 0.3-0.5 s slower than the next (bench/README.md).
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}


class WorkerError(AstolfoError):
    """A worker process died or failed outside any key: names the cause."""


def auto_process_count(memory_bytes: int, output_bytes: int, per_worker_bytes: int) -> int:
    """Workers for `--workers 0`: one per usable core, as many as the budget gives each what it
    needs (`per_worker_bytes`: interpreter + a chunk budget + the plan's largest workspace); 1
    (in-process) for merges too small to pay for starting interpreters."""
    if output_bytes < AUTO_MIN_OUTPUT_BYTES:
        return 1
    return max(1, min(usable_cores(), memory_bytes // max(1, per_worker_bytes)))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # macOS, Windows
        return os.cpu_count() or 1


# -- the wire: length-prefixed pickles over the worker's stdin / stdout ---------------------------
# A "chunk" message (a live merge's output bytes) is a pickled header ("chunk", key, dtype, nbytes)
# followed by the nbytes raw: written from the tensor's memory and read straight into the model's
# tensor where the reader has a sink for it (live_workers.ChunkRun), else into one buffer; never pickled.
RAW_KIND = "chunk"


def frame(obj) -> bytes:
    """`obj` pickled with its length in front. Pickle in the thread that owns `obj`: a pickler walks
    an object's attribute dict by borrowed reference, so pickling on another thread while this one
    runs on crashed the interpreter (a use-after-free in CPython 3.11's garbage collector)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return struct.pack("<Q", len(data)) + data


def send_frame(stream, obj):
    stream.write(frame(obj))
    stream.flush()


def send_raw(stream, header: tuple, payload):
    """A RAW_KIND message: `header` + the size of `payload` (a contiguous buffer), then its bytes."""
    view = memoryview(payload).cast("B")
    stream.write(frame(header + (view.nbytes,)))
    stream.write(view)
    stream.flush()


def read_frame(stream, sink=None):
    """The next object, or None at end of stream. A RAW_KIND message comes with its payload in place
    of its size: a bytearray, or None when `sink.place(key, dtype, nbytes)` gave the buffer it was
    read into (or a buffer and what to call once it is full); `sink.rewind(key)` sees each "rewind"
    first."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    data = stream.read(size)
    if len(data) < size:
        return None
    obj = pickle.loads(data)
    if obj[0] == RAW_KIND:
        placed = sink.place(*obj[1:]) if sink is not None else None
        placed, then = placed if isinstance(placed, tuple) else (placed, None)
        payload = bytearray(obj[-1]) if placed is None else placed
        if not _read_into(stream, memoryview(payload).cast("B")):
            return None
        if then is not None:
            then()
        obj = obj[:-1] + (payload if placed is None else None,)
    elif obj[0] == "rewind" and sink is not None:
        sink.rewind(obj[1])
    return obj


def widen_pipe(stream):
    """Give the pipe under `stream` PIPE_BYTES of buffer where the OS allows it (Linux), else leave
    it. A live merge's chunks (2.1 GB for SD1) cross a worker's stdout: through Linux's default
    64 KiB pipe that took 2.1-2.8 s of copying and wake-ups on the 2-core machine, through 1 MiB 1.0 s."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsize is not None:
        with contextlib.suppress(OSError):      # above the system's pipe-max-size: keep the default
            fcntl.fcntl(stream.fileno(), setsize, PIPE_BYTES)


def _read_into(stream, view) -> bool:
    got = 0
    while got < view.nbytes:
        n = stream.readinto(view[got:])
        if not n:
            return False
        got += n
    return True


def pack_error(exc: BaseException) -> tuple:
    """An exception as plain data (user errors keep their class and fields; their constructors take
    other arguments than `args`, so they do not survive a plain pickle round trip)."""
    if isinstance(exc, AstolfoError):
        cls = type(exc)
        return ("astolfo", cls.__module__, cls.__qualname__, str(exc), dict(exc.__dict__))
    return ("internal", type(exc).__name__, str(exc))


def unpack_error(packed: tuple, trace: str = "") -> BaseException:
    if packed[0] == "astolfo":
        _, module, name, message, fields = packed
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, AstolfoError):
            exc = cls.__new__(cls)
            exc.args = (message,)
            exc.__dict__.update(fields)
            return exc
        return AstolfoError(message)
    return RuntimeError(f"merge worker failed: {packed[1]}: {packed[2]}" + (f"\n{trace}" if trace else ""))


# -- workers ---------------------------------------------------------------------------------------
class WorkerProcess:
    """One worker interpreter: its pipes, the tail of its stderr, and the task it is running."""

    def __init__(self, index: int, inbox: queue.Queue):
        self.index, self.task, self.key, self.stopping, self.parked = index, None, None, False, False
        self.sink = None            # where raw chunks land (read_frame), while a live merge runs
        self.stderr_tail = collections.deque(maxlen=20)
        self.proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, str(index)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=worker_env())
        widen_pipe(self.proc.stdout)
        self._outbox: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=target, args=args, daemon=True, name=f"astolfo-worker-{index}{tag}")
                         for target, args, tag in ((self._pump, (inbox,), ""), (self._drain_stderr, (), "-err"),
                                                   (self._feed, (), "-in"))]
        for thread in self._threads:
            thread.start()

    def send(self, obj):
        """Queue a message: the pipe takes it while the worker may still be importing torch, so the
        parent never blocks on a worker (a dead one is reported by its reader). Pickled here, on the
        caller's thread (see `frame`); the feeding thread only writes bytes."""
        self.send_frame(frame(obj))

    def send_frame(self, data: bytes):
        """Queue an already framed message (one pickle of the plan serves every worker)."""
        self._outbox.put(data)

    def _feed(self):
        while (data := self._outbox.get()) is not None:
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (OSError, ValueError):
                return

    def _pump(self, inbox):
        try:
            while (msg := read_frame(self.proc.stdout, self.sink)) is not None:
                inbox.put((self, msg))
        except Exception as exc:  # noqa: BLE001 - a garbled stream is a dead worker
            self.stderr_tail.append(f"unreadable message: {exc}")
        inbox.put((self, ("exit",)))

    def _drain_stderr(self):
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr_tail.append(line.decode("utf-8", "replace").rstrip())

    def kill(self):
        self._outbox.put(None)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._threads[0].join(timeout=10)     # the reader: nothing lands in a sink after kill returns
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass

    def exit_cause(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"


def worker_env() -> dict:
    """The host's environment, this package importable (first, and not shadowed by the working
    folder: PYTHONSAFEPATH, Python 3.11+), torch on one thread per worker."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONSAFEPATH"] = "1"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    for name, value in WORKER_MALLOC.items():
        env.setdefault(name, value)
    return env


class Crew:
    """Worker processes started as early as possible (a fresh interpreter needs a second or more to
    import torch: meanwhile the parent hashes inputs and prepares). Closing kills what is left.
    `keep`: workers park at the end of a run instead of exiting, ready for another (`settle`)."""

    def __init__(self, count: int, keep: bool = False):
        self.inbox: queue.Queue = queue.Queue()
        self.keep = keep
        self.workers = [WorkerProcess(i, self.inbox) for i in range(count)]

    def alive(self) -> bool:
        """Every worker running and nothing unread from them (a parked crew says nothing)."""
        return self.inbox.empty() and all(w.proc.poll() is None for w in self.workers)

    def settle(self, timeout: float = 10.0) -> bool:
        """After a finished run of a kept crew: park the workers not yet told to, and read every
        message left until each has answered "parked", so the next run starts on an empty inbox.
        False (and the crew closed) when one died or did not answer in `timeout` seconds."""
        for w in self.workers:
            if not w.stopping:
                w.stopping = True
                w.send(("park",))
        waiting = {w.index for w in self.workers if not w.parked}
        deadline = time.monotonic() + timeout
        while waiting:
            try:
                w, msg = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if msg[0] == "parked":
                waiting.discard(w.index)
            elif msg[0] in ("exit", "error"):
                break
        if waiting:
            self.close()
            return False
        for w in self.workers:
            w.task, w.key, w.stopping, w.parked = None, None, False, False
        return True

    def close(self):
        for w in self.workers:
            w.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

