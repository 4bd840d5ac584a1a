"""Background merge jobs (astolfo_merge/core/jobs.py): one at a time, cancel, progress, re-attach."""
from __future__ import annotations

import os
import time

import pytest

from astolfo_merge.core import jobs
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.errors import Cancelled

SLOW = 0.01     # RunOptions.throttle, seconds per key: a 1131-key merge then takes ~11 s unless cancelled


def plan_for(models, output="out.safetensors", pool=("sd1-a.safetensors", "sd1-b.safetensors")):
    recipe = parse_recipe({"pool": list(pool), "method": "weighted_sum", "params": {"alpha": 0.3}, "output": output})
    return build_plan(recipe, str(models), str(models / output))


def options(throttle=0.0):
    return RunOptions(hash_inputs=False, throttle=throttle)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def manager(request):
    """A fresh manager per test (named after it), cancelled at the end whatever happened."""
    m = jobs.manager(f"test:{request.node.name}")
    yield m
    m.cancel()
    for job in m.jobs():
        job.done_event.wait(10)


def test_a_second_merge_is_refused_while_one_runs(models, manager):
    first = manager.submit(plan_for(models, "first.safetensors"), options(SLOW))
    wait_for(lambda: first.snapshot().keys_done > 0)
    with pytest.raises(jobs.JobBusyError, match="already running .*first.safetensors"):
        manager.submit(plan_for(models, "second.safetensors"), options())
    assert manager.current() is first
    assert manager.busy()


def test_a_queued_merge_runs_after_the_running_one(models, manager):
    first = manager.submit(plan_for(models, "first.safetensors"), options(SLOW))
    wait_for(lambda: first.snapshot().keys_done > 0)
    second = manager.submit(plan_for(models, "second.safetensors"), options(), queue=True)
    assert second.snapshot().status == jobs.QUEUED and manager.current() is first
    manager.cancel(first.id)
    second.wait(30)
    assert first.status == jobs.CANCELLED and second.status == jobs.DONE
    assert (models / "second.safetensors").is_file() and not (models / "first.safetensors").exists()
    assert not manager.busy()


def test_cancel_leaves_no_file(models, manager):
    job = manager.submit(plan_for(models), options(SLOW))
    wait_for(lambda: job.snapshot().keys_done >= 3)
    assert manager.cancel()
    with pytest.raises(Cancelled):
        job.wait(10)
    snap = job.snapshot()
    assert snap.status == jobs.CANCELLED and "no file was written" in snap.error
    assert 0 < snap.keys_done < snap.keys_total
    assert not (models / "out.safetensors").exists()
    assert not [n for n in os.listdir(models) if n.endswith(".partial")]


def test_cancel_with_nothing_running_says_so(manager):
    assert manager.cancel() is False


def test_progress_snapshots_count_keys_to_the_end(models, manager):
    seen = []
    job = manager.submit(plan_for(models), options(), on_done=lambda result: seen.append(job.snapshot().keys_done))
    result = job.wait(30)
    snap = job.snapshot()
    assert snap.status == jobs.DONE and snap.finished and not snap.active
    assert snap.keys_done == snap.keys_total == len(job.plan.keys) == 1131
    assert snap.fraction == 1.0 and snap.eta is None
    assert snap.result is result and result.path == str(models / "out.safetensors")
    assert seen == [1131], "on_done runs after the last key, before the job counts as done"
    assert snap.log[0].startswith("queued:") and snap.log[-1].startswith("done in")


def test_snapshot_versions_grow_while_a_job_runs(models, manager):
    job = manager.submit(plan_for(models), options(0.001))
    versions, fractions = [], []
    while not job.done_event.is_set():
        snap = job.snapshot()
        versions.append(snap.version)
        fractions.append(snap.fraction)
        job.done_event.wait(0.05)
    assert versions == sorted(versions) and versions[-1] > versions[0]
    assert fractions == sorted(fractions) and any(0 < f < 1 for f in fractions)


def test_a_reloaded_page_reattaches_to_the_running_job(models, request):
    """The manager lives in the package: a second lookup (a reloaded page, a re-executed
    WebUI script) gets the same manager and sees the running job and its progress."""
    key = f"test:{request.node.name}"
    job = jobs.manager(key).submit(plan_for(models), options(SLOW))
    try:
        wait_for(lambda: job.snapshot().keys_done > 0)
        again = jobs.manager(key)
        assert again is jobs.manager(key)
        assert again.current() is job
        assert again.get(job.id) is job
        snap = again.current().snapshot()
        assert snap.status == jobs.RUNNING and snap.keys_done > 0 and snap.active
    finally:
        jobs.manager(key).cancel()
        job.done_event.wait(10)


def test_a_failed_merge_reports_its_error_and_frees_the_host(models, manager):
    plan = plan_for(models)
    (models / "out.safetensors").write_bytes(b"already here")
    job = manager.submit(plan, options())
    with pytest.raises(Exception, match="exists"):
        job.wait(30)
    snap = job.snapshot()
    assert snap.status == jobs.FAILED and "out.safetensors" in snap.error
    assert (models / "out.safetensors").read_bytes() == b"already here"
    assert not manager.busy()


def test_a_failing_host_refresh_does_not_fail_the_merge(models, manager):
    def broken_refresh(result):
        raise RuntimeError("checkpoint list locked")
    job = manager.submit(plan_for(models), options(), on_done=broken_refresh)
    job.wait(30)
    assert job.status == jobs.DONE
    assert any("could not register it: checkpoint list locked" in line for line in job.snapshot().log)


def test_exit_cancels_running_merges_so_no_temp_file_stays(models, manager):
    job = manager.submit(plan_for(models), options(SLOW))
    wait_for(lambda: job.snapshot().keys_done > 0)
    jobs._cancel_on_exit(timeout=10)
    assert job.status == jobs.CANCELLED
    assert not [n for n in os.listdir(models) if n.endswith(".partial") or n == "out.safetensors"]
