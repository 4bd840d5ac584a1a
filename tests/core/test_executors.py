"""Executors (executors.py, worker_process.py, worker_main.py, tasks.py): the same bytes in this process and in N
worker processes; a killed worker, a shrinking input or a cancel leave nothing behind and the
parent alive; a merge leaves the host's torch settings as they were."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

from astolfo_merge.core import worker_process
from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.core.tasks import cut_tasks, key_cost
from astolfo_merge.errors import Cancelled, CheckpointError, MemoryBudgetError, MergeKeyError
from astolfo_merge.features.lora_synth import write_synthetic_lora
from astolfo_merge.io.tempfiles import partial_path
from astolfo_merge.io.writer import save_file
from astolfo_merge.methods.rebasin.permutation import permute
from astolfo_merge.methods.rebasin.spec import build_spec

from conftest import ROOT, TEST_SCALE, cli, load, run_recipe

SLOW = 0.01     # RunOptions.throttle (seconds per key, in every worker): time to act mid-merge
POOL = ["sd1-a.safetensors", "sd1-b.safetensors", "sd1-c.safetensors"]
BASE = "sd1-base.safetensors"


def recipe(doc: dict, **fields):
    return parse_recipe({"output": "out.safetensors", "dtype": "fp32", **doc, **fields})


def merge(models, doc, folder, workers, progress=None, cancel=None, throttle=0.0):
    """Run `doc` into `folder`/out.safetensors (same recipe, so the same metadata, in every folder)."""
    os.makedirs(folder, exist_ok=True)
    return run_recipe(models, recipe(doc), folder / "out.safetensors", progress, cancel, workers=workers,
                      throttle=throttle)


@pytest.fixture
def spawned(monkeypatch):
    """The worker processes started during the test, in start order."""
    started = []

    class Recorded(worker_process.WorkerProcess):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            started.append(self)

    monkeypatch.setattr(worker_process, "WorkerProcess", Recorded)
    return started


@pytest.fixture
def copies(models, tmp_path):
    """A folder with real copies of the SD1 files (tests truncate them; `models` only links)."""
    folder = tmp_path / "copies"
    folder.mkdir()
    for name in POOL + [BASE]:
        shutil.copyfile(models / name, folder / name)
    return folder


def leftovers(folder) -> list:
    return sorted(f for f in os.listdir(folder) if not f.startswith("sd1-"))


# -- tasks ---------------------------------------------------------------------------------------------
def test_tasks_cover_every_key_once_in_order_and_balance_the_cost(models):
    plan = build_plan(recipe({"pool": POOL, "base": BASE, "method": "ties"}), str(models))
    tasks = cut_tasks(plan.keys, workers=3)
    assert [i for t in tasks for i in t.indices] == list(range(len(plan.keys)))
    total, biggest = sum(key_cost(k) for k in plan.keys), max(key_cost(k) for k in plan.keys)
    assert sum(t.cost for t in tasks) == pytest.approx(total)
    left = total
    for t in tasks:       # half a worker's share of what is left, down to the grain of total / 48
        assert t.cost < max(total / 48, left / 6) + biggest
        left -= t.cost
    assert tasks[0].cost >= total / 6          # large first: few tasks while every worker is busy ...
    assert all(t.cost < total / 48 + biggest for t in tasks[-3:])   # ... small last: a short tail
    assert len(tasks) <= 3 * 4 * 4
    merged = next(k for k in plan.keys if k.action == "merge")
    assert key_cost(merged) > key_cost(dataclasses.replace(merged, action="copy")) == math.prod(merged.shape)


# -- host isolation ------------------------------------------------------------------------------------
def test_an_in_process_merge_leaves_the_hosts_torch_settings_as_they_were(models, tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with torch.enable_grad():
            merge(models, {"pool": POOL[:2], "method": "weighted_sum"}, tmp_path / "w1", workers=1)
            assert torch.is_grad_enabled()
        assert torch.get_num_threads() == 3
        assert torch.get_default_dtype() == torch.float32
    finally:
        torch.set_num_threads(before)


# -- same bytes ----------------------------------------------------------------------------------------
# Each recipe covers several methods at once through components (UNet / text encoder / VAE), so the
# matrix needs few worker start-ups.
MATRIX = {
    "fp64: dare (seeded) / model_stock / geometric_median": {
        "pool": POOL, "base": BASE, "method": "dare", "params": {"p": 0.6}, "seed": 7, "precision": "fp64",
        "components": {"te0": {"method": "model_stock"}, "vae": {"method": "geometric_median"}}},
    "fp32: n_average / weighted_sum / ties": {
        "pool": POOL, "base": BASE, "method": "n_average", "precision": "fp32",
        "components": {"te0": {"method": "weighted_sum", "pool": POOL[:2], "params": {"alpha": 0.3}},
                       "vae": {"method": "ties", "params": {"k": 0.5}}}},
    "fp64: rebasin (prepared permutations) / basin_sum / n_average": {
        "pool": ["sd1-a.safetensors", "sd1-b-permuted.safetensors"], "method": "rebasin", "seed": 5, "precision": "fp64",
        "components": {"te0": {"method": "basin_sum"}, "vae": {"method": "n_average"}}},
    "fp64: della (seeded) / karcher / tsd (seeded)": {
        "pool": POOL, "base": BASE, "method": "della", "seed": 11, "precision": "fp64",
        "components": {"te0": {"method": "karcher"}, "vae": {"method": "tsd"}}},
    "fp32: dgmla (seeded) / iso_c / add_difference": {
        "pool": POOL, "base": BASE, "method": "dgmla", "seed": 3, "precision": "fp32",
        "components": {"te0": {"method": "iso_c"}, "vae": {"method": "add_difference", "pool": POOL[:2]}}},
    # stages: LoRA bake-in (into one pool member before, into the result after), then Fermat a -> match -> c
    # with a kept b, every key stage on the workers
    "fp64: fermat + LoRA bake-in (before and after) over ties": {
        "pool": ["sd1-a.safetensors", "sd1-b-permuted.safetensors"], "base": BASE, "method": "ties", "seed": 4,
        "fermat": {"keep_b": True},
        "loras": [{"file": "bake.safetensors", "strength": 0.5, "when": "before", "models": ["sd1-a.safetensors"]},
                  {"file": "bake.safetensors", "strength": 0.25, "blocks": {"IN04": 2.0}}]},
}


def _inputs(models):
    """B under a random permutation (Re-Basin and Fermat then have real permutations to find and
    ship) and a LoRA file to bake."""
    spec = build_spec("sd1", TEST_SCALE)
    perms = spec.random(2)
    save_file({k: permute(v, k, spec, perms) for k, v in load(models / "sd1-b.safetensors").items()},
              models / "sd1-b-permuted.safetensors")
    write_synthetic_lora(models / "bake.safetensors", "sd1", TEST_SCALE, algo="locon", seed=5)


def _untimed(log, folder=""):
    """The log without timings and without the run's own folder (side outputs are logged by path)."""
    return [re.sub(r"; [0-9.]+ s$", "", line).replace(str(folder), "<out>") for line in log]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_one_and_two_worker_processes_write_the_same_bytes(models, tmp_path, spawned, name):
    _inputs(models)
    here = merge(models, MATRIX[name], tmp_path / "w1", workers=1)
    assert spawned == []
    there = merge(models, MATRIX[name], tmp_path / "w2", workers=2)
    key_stages = sum(stage.kind == "keys" for stage in build_plan(recipe(MATRIX[name]), str(models)).stages)
    assert len(spawned) == 2 * key_stages and all(w.proc.returncode is not None for w in spawned)
    for tag in [""] + (["-b"] if MATRIX[name].get("fermat") else []):
        ours = tmp_path / "w1" / f"out{tag}.safetensors"
        assert (tmp_path / "w2" / f"out{tag}.safetensors").read_bytes() == ours.read_bytes(), tag
    written = hashlib.sha256((tmp_path / "w2" / "out.safetensors").read_bytes()).hexdigest()
    assert there.sha256 == here.sha256 == written
    assert _untimed(there.log, tmp_path / "w2") == _untimed(here.log, tmp_path / "w1")
    assert leftovers(tmp_path / "w2") == sorted(os.listdir(tmp_path / "w1"))    # no temp file stays


@pytest.mark.slow
def test_nan_inputs_fail_or_are_skipped_alike_in_process_and_in_workers(models, tmp_path):
    """'fail': the same error; 'skip': the key is started over without that input (a rewind of
    its byte range in the worker) and the bytes match."""
    sd = load(models / "sd1-b.safetensors")
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1 and "diffusion_model" in k)
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, models / "sd1-nan.safetensors")
    doc = {"pool": ["sd1-a.safetensors", "sd1-nan.safetensors", "sd1-c.safetensors"], "method": "n_average"}
    errors, skipped = [], []
    for workers in (1, 2):
        with pytest.raises(MergeKeyError) as caught:
            merge(models, doc, tmp_path / f"w{workers}", workers)
        errors.append((caught.value.key, caught.value.files, str(caught.value)))
        assert leftovers(tmp_path / f"w{workers}") == []
        skipped.append(merge(models, {**doc, "nonfinite": "skip"}, tmp_path / f"skip{workers}", workers))
    assert errors[0] == errors[1] and errors[0][0] == key
    assert skipped[0].sha256 == skipped[1].sha256
    assert any(key in line and "left out" in line for line in skipped[1].log) and skipped[0].log == skipped[1].log


def test_user_errors_cross_the_pipe_with_their_class_and_fields():
    sent = worker_process.pack_error(CheckpointError("/m/a.safetensors", "truncated"))
    back = worker_process.unpack_error(pickle.loads(pickle.dumps(sent)))
    assert type(back) is CheckpointError and back.path == "/m/a.safetensors" and str(back) == "/m/a.safetensors: truncated"
    internal = worker_process.unpack_error(worker_process.pack_error(ZeroDivisionError("boom")))
    assert isinstance(internal, RuntimeError) and "ZeroDivisionError: boom" in str(internal)


@pytest.mark.skipif(getattr(worker_process.fcntl, "F_GETPIPE_SZ", None) is None, reason="Linux pipes only")
def test_a_workers_output_pipe_is_widened_where_the_os_allows_and_left_alone_where_not():
    read, write = os.pipe()
    with os.fdopen(read, "rb") as stream, os.fdopen(write, "wb"):
        worker_process.widen_pipe(stream)
        with open("/proc/sys/fs/pipe-max-size") as f:
            allowed = int(f.read()) >= worker_process.PIPE_BYTES or os.geteuid() == 0
        size = worker_process.fcntl.fcntl(read, worker_process.fcntl.F_GETPIPE_SZ)
        assert size == worker_process.PIPE_BYTES if allowed else size < worker_process.PIPE_BYTES
        worker_process.widen_pipe(stream)       # the same size again, or one above the limit: no error
    with open(os.devnull, "rb") as not_a_pipe:
        worker_process.widen_pipe(not_a_pipe)


def test_workers_get_glibc_malloc_settings_unless_the_user_chose_their_own(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")
    env = worker_process.worker_env()
    assert env["MALLOC_MMAP_THRESHOLD_"] == worker_process.WORKER_MALLOC["MALLOC_MMAP_THRESHOLD_"]
    assert env["MALLOC_TRIM_THRESHOLD_"] == "4096"


# -- faults --------------------------------------------------------------------------------------------
def _after_keys(n, action):
    """A progress callback that runs `action` once, when n keys are done."""
    fired = threading.Event()

    def progress(p):
        if p.keys_done >= n and not fired.is_set():
            fired.set()
            action()
    return progress


@pytest.mark.slow
def test_a_killed_worker_fails_the_merge_with_its_cause_and_leaves_nothing(models, tmp_path, spawned):
    kill = _after_keys(10, lambda: os.kill(spawned[0].proc.pid, signal.SIGKILL))
    with pytest.raises(worker_process.WorkerError, match=r"merge worker 1 of 2 killed by SIGKILL.*no output was written"):
        merge(models, {"pool": POOL, "method": "n_average"}, tmp_path / "out", workers=2, progress=kill, throttle=SLOW)
    assert leftovers(tmp_path / "out") == []
    assert all(w.proc.returncode is not None for w in spawned)


def test_an_input_shrinking_mid_merge_names_the_file(copies, tmp_path, spawned):
    victim = copies / "sd1-b.safetensors"
    shrink = _after_keys(10, lambda: os.truncate(victim, os.path.getsize(victim) // 3))
    with pytest.raises(CheckpointError) as caught:
        merge(copies, {"pool": POOL, "method": "n_average"}, tmp_path / "out", workers=2, progress=shrink, throttle=SLOW)
    assert str(victim) in str(caught.value)
    assert leftovers(tmp_path / "out") == [] and not os.path.exists(partial_path(tmp_path / "out" / "out.safetensors"))
    assert all(w.proc.returncode is not None for w in spawned)


def test_a_cancel_stops_every_worker_and_leaves_nothing(models, tmp_path, spawned):
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        merge(models, {"pool": POOL, "method": "n_average"}, tmp_path / "out", workers=2,
              progress=_after_keys(10, cancel.set), cancel=cancel, throttle=SLOW)
    assert leftovers(tmp_path / "out") == []
    assert len(spawned) == 2 and all(w.proc.returncode is not None for w in spawned)


JOB_SCRIPT = r"""
import os, sys, torch
from astolfo_merge.core import jobs
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.core.plan import build_plan
from astolfo_merge.methods.rebasin.permutation import permute
from astolfo_merge.methods.rebasin.spec import build_spec
from astolfo_merge.core.recipe import parse_recipe
folder, victim = sys.argv[1], sys.argv[2]
torch.set_num_threads(3)
recipe = parse_recipe({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "n_average", "output": "o.safetensors"})
job = jobs.manager("test").submit(build_plan(recipe, folder), RunOptions(hash_inputs=False, throttle=0.01))
while job.snapshot().keys_done < 10 and not job.done_event.is_set():
    job.done_event.wait(0.01)
os.truncate(victim, os.path.getsize(victim) // 3)
job.done_event.wait(60)
print("status:", job.snapshot().status)
print("error:", job.snapshot().error)
print("threads:", torch.get_num_threads())
print("left:", sorted(f for f in os.listdir(folder) if not f.startswith("sd1-")))
"""


def test_a_job_whose_input_shrinks_fails_clearly_and_the_host_lives_on(copies):
    """The host runs in its own process here, so that a broken isolation fails this test, not pytest."""
    victim = copies / "sd1-b.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", JOB_SCRIPT, str(copies), str(victim)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert lines["status"] == "failed"
    assert str(victim) in lines["error"]
    assert lines["threads"] == "3"
    assert lines["left"] == "[]"


# -- CLI -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_workers_flag_runs_worker_processes_with_the_same_bytes(models, tmp_path):
    doc = {"pool": POOL[:2], "method": "weighted_sum", "params": {"alpha": 0.3}}
    (tmp_path / "r.json").write_text(json.dumps({**doc, "output": "out.safetensors", "dtype": "fp32"}))
    rc, out, err = cli("merge", tmp_path / "r.json", "--models-dir", models, "--no-hash", "--workers", "2", cwd=tmp_path)
    assert rc == 0, err
    here = merge(models, doc, tmp_path / "w1", workers=1)
    assert f"sha256 {here.sha256}" in out


@pytest.mark.parametrize("value", ["-1", "two"])
def test_cli_refuses_a_bad_workers_value_in_one_line(models, tmp_path, value):
    (tmp_path / "r.json").write_text(json.dumps({"pool": POOL[:2], "method": "n_average"}))
    rc, _, err = cli("merge", tmp_path / "r.json", "--models-dir", models, "--workers", value, cwd=tmp_path)
    assert rc == 2 and "--workers: must be 0 (auto) or a positive integer" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["-1", "nan", "61"])
def test_cli_refuses_a_bad_throttle_in_one_line(models, tmp_path, value):
    (tmp_path / "r.json").write_text(json.dumps({"pool": POOL[:2], "method": "n_average"}))
    rc, _, err = cli("merge", tmp_path / "r.json", "--models-dir", models, "--throttle", value, cwd=tmp_path)
    assert rc == 2 and "--throttle: must be a number of seconds from 0 to 60" in err and "Traceback" not in err


def test_a_full_disk_fails_before_any_work_naming_the_folder(models, tmp_path, monkeypatch, spawned):
    def no_space(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(CheckpointError, match=r"out: not enough free disk space for the output"):
        merge(models, {"pool": POOL[:2], "method": "n_average"}, tmp_path / "out", workers=2)
    assert leftovers(tmp_path / "out") == []
    assert all(w.proc.returncode is not None for w in spawned)


def test_more_workers_than_the_budget_holds_is_refused_with_the_figure(models, tmp_path):
    plan = build_plan(recipe({"pool": POOL[:2], "method": "n_average"}), str(models), str(tmp_path / "o.safetensors"))
    with pytest.raises(MemoryBudgetError, match=r"16 worker processes need about [0-9.]+ GiB .*raise --memory-gb"):
        run_merge(plan, RunOptions(hash_inputs=False, workers=16, memory_gb=1.0))
    assert not os.path.exists(tmp_path / "o.safetensors")
