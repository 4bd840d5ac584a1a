"""The Ray executor (ray_executor.py) on one local Ray for the module (2 CPUs): the same bytes as in
this process, a failing task or a cancel leave nothing, the CLI flag, and the one-line error
without Ray."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading

import pytest

from astolfo_merge import cli as cli_module, engine, ray_executor
from astolfo_merge.checkpoint import partial_path
from astolfo_merge.engine import RunOptions, run_merge
from astolfo_merge.errors import Cancelled, CheckpointError
from astolfo_merge.plan import build_plan
from test_executors import BASE, POOL, SLOW_KEYS, _after_keys, _untimed, copies, leftovers, recipe  # noqa: F401

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


def test_an_input_truncated_before_the_tasks_read_it_fails_naming_it_and_leaves_nothing(copies, tmp_path, local_ray,  # noqa: F811
                                                                                        monkeypatch):
    victim = copies / "sd1-b.safetensors"
    real = engine.run_on_ray

    def truncate_first(*args, **kw):
        os.truncate(victim, os.path.getsize(victim) // 3)
        return real(*args, **kw)

    monkeypatch.setattr(engine, "run_on_ray", truncate_first)
    with pytest.raises(CheckpointError) as caught:
        merge(copies, {"pool": POOL, "method": "n_average"}, tmp_path / "out", ray="local")
    assert str(victim) in str(caught.value)
    assert leftovers(tmp_path / "out") == [] and not os.path.exists(partial_path(tmp_path / "out" / "out.safetensors"))


def test_a_cancel_cancels_every_task_and_leaves_nothing(models, tmp_path, local_ray, monkeypatch):
    monkeypatch.setenv(SLOW_KEYS, "0.02")
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        merge(models, {"pool": POOL, "method": "n_average"}, tmp_path / "out", ray="local",
              progress=_after_keys(1, cancel.set), cancel=cancel)
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
    assert rc == 2 and err.strip().splitlines()[-1] == "error: Ray is not installed: pip install 'ray[default]'"
    assert "Traceback" not in err
    assert not os.path.exists(models / "o.safetensors")
