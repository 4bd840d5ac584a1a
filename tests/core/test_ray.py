"""The Ray executor (ray_executor.py) on one local Ray for the module (2 CPUs): the same bytes as in
this process, a failing task or a cancel leave nothing, the CLI flag, and the one-line error
without Ray; and on a real cluster started with `ray start --head`, reached by its ADDRESS from the
CLI: the bytes of 1 and 2 worker processes, one-line errors for an address nobody answers on and
for a cluster whose token the driver lacks."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from test_executors import BASE, POOL, _after_keys, _untimed, copies, leftovers, recipe  # noqa: F401

from astolfo_merge.cli import commands as cli_module
from astolfo_merge.core import pipeline, ray_executor
from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.errors import Cancelled, CheckpointError, OptionError
from astolfo_merge.io.tempfiles import partial_path

from conftest import run_cli

ray = pytest.importorskip("ray")

# n_average in fp32 for the UNet, a seeded dare and geometric_median through per-component rules.
DOC = {"pool": POOL, "base": BASE, "method": "n_average", "precision": "fp32", "seed": 7,
       "components": {"te0": {"method": "dare", "params": {"p": 0.6}}, "vae": {"method": "geometric_median"}}}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: 2 CPUs, no dashboard, its files under a temp folder in /tmp."""
    temp = tempfile.mkdtemp(prefix="astolfo-ray-", dir="/tmp")
    ray_executor.require_ray()
    ray_executor.start_local(ray, 2, temp_dir=temp)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head started as the README tells users to (`PYTHONPATH=... ray start --head --port P
    --block`), 2 CPUs, with token authentication on a token of its own (not ~/.ray's); yields its
    ADDRESS and the environment a driver needs to join it; its process group is stopped afterwards."""
    temp = tempfile.mkdtemp(prefix="astolfo-rayc-", dir="/tmp")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port = _free_port()
    env = {**os.environ, **auth, "PYTHONPATH": os.pathsep.join(ray_executor.node_pythonpath())}
    log = open(os.path.join(temp, "ray-start.log"), "w+")
    head = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
                             "--num-cpus", "2", "--port", str(port),
                             "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_started(head, log)
        yield f"127.0.0.1:{port}", auth
    finally:
        _stop_group(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_started(head, log, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.seek(0)
        if "Ray runtime started" in log.read():
            return
        if head.poll() is not None:
            break
        time.sleep(0.5)
    log.seek(0)
    pytest.fail(f"`ray start --head` did not start:\n{log.read()[-3000:]}")


def _stop_group(head):
    """SIGTERM to the head's process group (Ray's processes started by `ray start` stay in it), SIGKILL after 5 s."""
    try:
        os.killpg(head.pid, 15)
        head.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, 9)
        head.wait(10)
    except ProcessLookupError:
        pass


def merge(models, doc, folder, progress=None, cancel=None, **options):
    os.makedirs(folder, exist_ok=True)
    plan = build_plan(recipe(doc), str(models), str(folder / "out.safetensors"))
    return run_merge(plan, RunOptions(hash_inputs=False, **options), progress, cancel)


def test_in_process_and_ray_write_the_same_bytes(models, tmp_path, local_ray):
    here = merge(models, DOC, tmp_path / "here", workers=1)
    there = merge(models, DOC, tmp_path / "ray", ray="local")
    written = hashlib.sha256((tmp_path / "ray" / "out.safetensors").read_bytes()).hexdigest()
    assert there.sha256 == here.sha256 == written
    assert _untimed(there.log) == _untimed(here.log)
    assert leftovers(tmp_path / "ray") == ["out.safetensors"]
    assert ray.is_initialized()          # a Ray the merge did not start is left running


def test_a_local_rays_tasks_run_at_normal_priority_as_worker_processes_do(local_ray):
    """Ray renices its workers to 15 by default; start_local asks for 0 (a merge must not crawl
    behind every other process of a busy machine)."""
    assert ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote()) == os.nice(0)


def test_an_input_truncated_before_the_tasks_read_it_fails_naming_it_and_leaves_nothing(copies, tmp_path, local_ray,  # noqa: F811
                                                                                        monkeypatch):
    victim = copies / "sd1-b.safetensors"
    real = pipeline.run_on_ray

    def truncate_first(*args, **kw):
        os.truncate(victim, os.path.getsize(victim) // 3)
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "run_on_ray", truncate_first)
    with pytest.raises(CheckpointError) as caught:
        merge(copies, {"pool": POOL, "method": "n_average"}, tmp_path / "out", ray="local")
    assert str(victim) in str(caught.value)
    assert leftovers(tmp_path / "out") == [] and not os.path.exists(partial_path(tmp_path / "out" / "out.safetensors"))


def test_a_cancel_cancels_every_task_and_leaves_nothing(models, tmp_path, local_ray):
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        merge(models, {"pool": POOL, "method": "n_average"}, tmp_path / "out", ray="local",
              progress=_after_keys(1, cancel.set), cancel=cancel, throttle=0.02)
    assert leftovers(tmp_path / "out") == []


def test_cli_ray_flag_runs_the_merge_on_ray_with_the_same_bytes(models, tmp_path, local_ray, capsys):
    """In this process, so the merge uses the module's Ray (already up: left running afterwards)."""
    doc = {"pool": POOL[:2], "method": "weighted_sum", "params": {"alpha": 0.3}}
    (tmp_path / "r.json").write_text(json.dumps({**doc, "output": "out.safetensors", "dtype": "fp32"}))
    rc = cli_module.main(["merge", str(tmp_path / "r.json"), "--models-dir", str(models), "--no-hash", "--quiet",
                          "--ray"])
    out = capsys.readouterr().out
    assert rc == 0
    here = merge(models, doc, tmp_path / "w1", workers=1)
    assert f"sha256 {here.sha256}" in out and ray.is_initialized()


def test_without_ray_the_cli_says_what_to_install_in_one_line(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ray_executor, "ray_installed", lambda: False)
    (tmp_path / "r.json").write_text(json.dumps({"pool": POOL[:2], "method": "n_average", "output": "o.safetensors"}))
    rc = cli_module.main(["merge", str(tmp_path / "r.json"), "--models-dir", str(models), "--no-hash", "--ray"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1] == "error: " + ray_executor.RAY_MISSING
    assert "pip install ray==" in ray_executor.RAY_MISSING and "Traceback" not in err
    assert not os.path.exists(models / "o.safetensors")


# -- a cluster reached by its address ------------------------------------------------------------------
def _cli_merge(models, folder, doc, *flags, env=None):
    """`python -m astolfo_merge merge` of `doc` into `folder` (a subprocess: Ray is not up in it)."""
    folder.mkdir(exist_ok=True)
    (folder / "r.json").write_text(json.dumps({**doc, "output": "out.safetensors", "dtype": "fp32"}))
    return run_cli("merge", folder / "r.json", "--models-dir", models, "-o", folder / "out.safetensors", "--no-hash",
                   "--quiet", *flags, cwd=folder, env_extra=env, timeout=300)


def test_a_merge_on_a_cluster_by_address_writes_the_bytes_of_one_and_two_workers(models, tmp_path, ray_cluster):
    address, auth = ray_cluster
    proc = _cli_merge(models, tmp_path / "cluster", DOC, "--ray", address, env=auth)
    assert proc.returncode == 0, proc.stderr
    written = hashlib.sha256((tmp_path / "cluster" / "out.safetensors").read_bytes()).hexdigest()
    one, two = merge(models, DOC, tmp_path / "w1", workers=1), merge(models, DOC, tmp_path / "w2", workers=2)
    assert f"sha256 {written}" in proc.stdout and one.sha256 == two.sha256 == written
    assert leftovers(tmp_path / "cluster") == ["out.safetensors", "r.json"]


def test_a_cluster_whose_token_the_driver_lacks_is_refused_in_one_line(models, tmp_path, ray_cluster):
    address, _auth = ray_cluster      # Ray retries the refused token for 20 s by default: 2 s here
    quick = {"RAY_gcs_rpc_server_connect_timeout_s": "2", "RAY_gcs_server_port_wait_time_s": "1"}
    proc = _cli_merge(models, tmp_path / "out", DOC, "--ray", address, env=quick)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith(f"error: --ray: the Ray cluster at {address} refused") and "RAY_AUTH_MODE=token" in last
    assert leftovers(tmp_path / "out") == ["r.json"]


@pytest.mark.parametrize("address, problem", [
    ("127.0.0.1:{port}", "cannot reach Ray at 127.0.0.1:{port} (Connection refused)"),
    ("head-node", "'head-node' is not a Ray address: give HOST:PORT"),
])
def test_an_address_that_is_not_a_ray_head_is_refused_at_once_naming_it(address, problem):
    port = _free_port()            # nothing listens on it
    started = time.monotonic()
    with pytest.raises(OptionError) as caught:
        ray_executor.connect(ray, address.format(port=port))
    assert caught.value.option == "--ray" and problem.format(port=port) in caught.value.problem
    assert time.monotonic() - started < ray_executor.CONNECT_S
