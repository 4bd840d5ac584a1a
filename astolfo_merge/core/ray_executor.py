"""Running a plan's tasks on a Ray cluster (`--ray [ADDRESS]`), with the worker processes' per-task code.

What travels: the pickled plan and the methods' prepared state, put once into Ray's object store;
each task then gets small arguments (the temp output's path, its key span, the byte ranges and
dtypes of those keys) and returns a summary (keys done, their log lines). What does not: tensors.
Every task reads its inputs from their paths and writes its tensors with positioned writes into
its byte ranges of the preallocated temp output, so inputs and output must be on a path every node
sees (the same path on every node: NFS or the like). The driver (this process) hashes the finished
prefix of the file as tasks complete and commits atomically, as with worker processes. Any failure
or a cancel cancels every task (ray.cancel, force), removes the temp file and raises.

Ray is optional: without it `require_ray` gives a one-line error saying what to install.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import socket
import sys
import tempfile
import traceback

from ..errors import AstolfoError, Cancelled, OptionError
from ..io.writer import SafetensorsWriter
from .devices import task_resources
from .executors import OrderedHasher
from .tasks import cut_tasks
from .worker_process import WORKER_MODULE, WorkerError, pack_error, unpack_error, usable_cores

RAY_MISSING = "Ray is not installed (needed for --ray): pip install ray==2.60.0"
LOCAL = ("", "local")
CONNECT_S = 5.0      # how long an ADDRESS may take to accept a TCP connection before we give up
POLL_S = 0.1
SETTLE_S = 10.0      # after a failure or cancel: how long to wait for cancelled tasks to stop
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A folder whose `pydantic` fails to import: put first on the path of the local Ray's own processes
# when the environment has pydantic v1 (the WebUI's pin), which Ray 2.60 refuses outright.
HIDE_PYDANTIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ray_path")


class RayNotInstalled(OptionError):
    def __init__(self):
        AstolfoError.__init__(self, RAY_MISSING)
        self.option, self.problem = "--ray", RAY_MISSING


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def require_ray():
    """The `ray` module, or RayNotInstalled (one line: what to install)."""
    if not ray_installed():
        raise RayNotInstalled()
    _ray_without_pydantic_v1()
    import ray  # optional dependency: imported only when a merge asks for Ray
    return ray


def _pydantic_v1() -> bool:
    try:
        return int(importlib.metadata.version("pydantic").split(".")[0]) < 2
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


def _ray_without_pydantic_v1():
    """Ray 2.60 raises on import of its pydantic shim when pydantic v1 is installed (the WebUI pins
    v1). Ray only uses pydantic for its dashboard and to serialise pydantic models, neither of which
    a merge needs: load Ray's shim once with pydantic hidden, so Ray treats it as absent."""
    if "ray._common.pydantic_compat" in sys.modules or not _pydantic_v1():
        return
    held = sys.modules.get("pydantic", ...)
    sys.modules["pydantic"] = None     # `import pydantic` raises ImportError meanwhile
    try:
        importlib.import_module("ray._common.pydantic_compat")
    finally:
        if held is ...:
            del sys.modules["pydantic"]
        else:
            sys.modules["pydantic"] = held


@contextlib.contextmanager
def ray_session(address):
    """Ray connected for one merge: the running one when this process already has Ray up (a test,
    a host that manages Ray); a local Ray with this machine's cores for "" / "local"; else the
    cluster at `address` ("auto": the cluster this node belongs to). What this started is shut down
    afterwards."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    if address in LOCAL:
        try:
            start_local(ray, usable_cores())
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise OptionError("--ray", f"cannot start a local Ray: {_first_line(exc)}") from None
    else:
        connect(ray, address)
    try:
        yield ray
    finally:
        ray.shutdown()


def connect(ray, address: str):
    """ray.init on a running cluster, or one OptionError saying why not. A HOST:PORT nobody answers
    on is refused within CONNECT_S (Ray itself retries for minutes); a cluster with token
    authentication (what `ray start` sets up by default) rejects a driver that does not send its token."""
    if address != "auto":
        _reachable(address)
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if _caused_by(exc, "AuthenticationError", "InvalidAuthToken"):
            raise OptionError("--ray", f"the Ray cluster at {address} refused this process: it uses token "
                                       "authentication; set RAY_AUTH_MODE=token, with the cluster's token in "
                                       "~/.ray/auth_token or RAY_AUTH_TOKEN") from None
        raise OptionError("--ray", f"cannot connect to Ray at {address}: {_first_line(exc)}") from None


def _reachable(address: str):
    """HOST:PORT (or ray://HOST:PORT) accepts a TCP connection, else one OptionError naming it."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise OptionError("--ray", f"{address!r} is not a Ray address: give HOST:PORT (the head node's "
                                   "`ray start --head --port`), 'auto', or nothing for a local Ray")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_S).close()
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise OptionError("--ray", f"cannot reach Ray at {address} ({why}): is `ray start --head "
                                   f"--port {port}` running there, and the port open from this machine?") from None


def _caused_by(exc: BaseException, *needles: str) -> bool:
    """Whether any exception in `exc`'s chain is named, or says, one of `needles` (Ray passes the
    GCS client's last error on as text inside a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if any(n == type(exc).__name__ or n in str(exc) for n in needles):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def node_pythonpath() -> list:
    """What a Ray node's processes need first on PYTHONPATH to run this package's tasks: the folder
    that hides pydantic v1 (when this environment has it) and the package's root. A local Ray gets
    it here; a cluster's nodes get it from `PYTHONPATH=... ray start` (README: multi-node)."""
    return ([HIDE_PYDANTIC] if _pydantic_v1() else []) + [PACKAGE_ROOT]


def start_local(ray, num_cpus: int, temp_dir: str | None = None):
    """A local Ray whose processes (and so the tasks) import this package, do not see pydantic v1,
    and run at normal priority, as worker processes do (Ray renices its workers to 15 by default:
    on a busy machine that made a merge 2-3x slower than on worker processes). Ray's processes
    take these from the environment when they start, here; the user's own settings win."""
    before = os.environ.get("PYTHONPATH")
    wanted = {"PYTHONPATH": os.pathsep.join(node_pythonpath() + ([before] if before else [])),
              "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0")}
    held = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 _temp_dir=temp_dir or os.path.join(tempfile.gettempdir(), "astolfo-ray"))
    finally:
        for name, value in held.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ray_task(setup, tmp, ranges, dtypes, first, stop):
    """One task on a Ray worker: the worker processes' own per-key code (worker_main.run_keys), named
    by module as worker processes are started, then a summary. Errors come back as data."""
    import torch
    worker = importlib.import_module(WORKER_MODULE)
    worker.worker_torch_settings()     # the same torch as a worker process: one thread, no TF32
    logs = {}
    try:
        with torch.no_grad():
            worker.run_keys(setup, tmp, ranges, dtypes, first, stop,
                            finished=lambda index, log: logs.__setitem__(index, log))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the driver as data
        return {"error": pack_error(exc), "trace": traceback.format_exc(limit=8), "logs": logs}
    return {"keys": list(range(first, stop)), "logs": logs}


def run_on_ray(ray, plan, writer: SafetensorsWriter, setup: dict, on_key, cancel) -> tuple:
    """Fill `writer` (positioned) with `plan`'s keys as Ray tasks; (sha256, key logs)."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    setup = dict(setup, chunk_bytes=max(16 << 20, setup["chunk_bytes"] // cpus))
    shared = ray.put(setup)        # the plan and prepared state: once, not per task
    remote = ray.remote(**task_resources(setup["device"]), max_retries=0)(ray_task)
    ranges, dtypes = writer.ranges(), {k: d for k, d, _s in writer.entries}
    pending = {}
    for task in cut_tasks(plan.keys, cpus):
        keys = [plan.keys[i].key for i in task.indices]
        pending[remote.remote(shared, writer.tmp, {k: ranges[k] for k in keys}, {k: dtypes[k] for k in keys},
                              task.first, task.stop)] = task
    done, logs, frontier = [False] * len(plan.keys), {}, 0
    hasher = OrderedHasher(writer.tmp)
    try:
        hasher.advance(writer.data_start)
        while pending:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in ready:
                task = pending.pop(ref)
                summary = _result(ray, ref, task, plan)
                logs.update(summary["logs"])
                for index in summary["keys"]:
                    done[index] = True
                    on_key(index)
                while frontier < len(done) and done[frontier]:
                    frontier += 1
                hasher.advance(ranges[plan.keys[frontier].key][0] if frontier < len(done) else writer.total_bytes)
        sha = hasher.finish(writer.total_bytes)
        return sha, [line for i in sorted(logs) for line in logs[i]]
    except BaseException:
        _cancel_all(ray, list(pending))
        raise
    finally:
        hasher.close()


def _result(ray, ref, task, plan) -> dict:
    try:
        summary = ray.get(ref)
    except ray.exceptions.RayError as exc:   # the worker died, or Ray lost the task
        cause = _first_line(exc)
        raise WorkerError(f"Ray task {task.id + 1} (keys {plan.keys[task.first].key} .. "
                          f"{plan.keys[task.stop - 1].key}) failed: {cause}; no output was written") from None
    if "error" in summary:
        raise unpack_error(summary["error"], summary["trace"])
    return summary


def _cancel_all(ray, refs):
    """Cancel every task still running (its worker killed, so nothing writes on) and wait briefly."""
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - already finished or gone
            pass
    if refs:
        try:
            ray.wait(refs, num_returns=len(refs), timeout=SETTLE_S)
        except Exception:  # noqa: BLE001
            pass
