"""The CUDA path up to the device boundary (this machine has no GPU): which GPU each worker takes,
what a Ray task asks for, the fp64 note, the torch settings a merge holds and gives back, and the
page-locked read buffers."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from astolfo_merge.core.devices import (
    fp64_note,
    fp64_rate,
    host_buffer,
    merge_torch_settings,
    task_resources,
    worker_device,
)
from astolfo_merge.core.worker_process import Crew
from astolfo_merge.core.workers import auto_workers


def test_workers_spread_over_the_gpus_round_robin_and_an_explicit_gpu_is_kept():
    assert [worker_device("cuda", i, count=2) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert [worker_device("cuda:1", i, count=4) for i in range(3)] == ["cuda:1"] * 3
    assert worker_device("cpu", 3, count=2) == "cpu"
    assert worker_device("cuda", 1, count=0) == "cuda"      # no GPU seen: the merge's own check refuses it


def test_each_worker_process_is_told_its_number():
    with Crew(2) as crew:
        assert [w.proc.args[-1] for w in crew.workers] == ["0", "1"]


def test_a_ray_task_asks_for_a_gpu_only_on_cuda():
    assert task_resources("cpu") == {"num_cpus": 1, "num_gpus": 0}
    assert task_resources("cuda") == task_resources("cuda:0") == {"num_cpus": 1, "num_gpus": 1}


@pytest.mark.parametrize("name, capability, rate, noted", [
    ("NVIDIA H100 80GB HBM3", (9, 0), 2, False),
    ("NVIDIA A100-SXM4-80GB", (8, 0), 2, False),
    ("Tesla V100-SXM2-16GB", (7, 0), 2, False),
    ("NVIDIA GeForce RTX 4090", (8, 9), 64, True),
    ("NVIDIA GeForce RTX 3060", (8, 6), 64, True),
    ("NVIDIA GeForce RTX 5090", (12, 0), 64, True),
    ("Tesla T4", (7, 5), 32, True),
    ("NVIDIA GeForce GTX 1080", (6, 1), 32, True),
])
def test_an_fp64_merge_on_a_gpu_with_slow_fp64_is_noted_and_fp32_offered(name, capability, rate, noted):
    props = SimpleNamespace(name=name, major=capability[0], minor=capability[1])
    assert fp64_rate(capability) == rate
    note = fp64_note("cuda", torch.float64, props)
    if noted:
        assert name in note and f"1/{rate}" in note and "--precision fp32" in note and "Compute precision" in note
    else:
        assert note is None
    assert fp64_note("cuda", torch.float32, props) is None      # fp32 asked for: nothing to offer
    assert fp64_note("cpu", torch.float64, props) is None


def test_a_merge_holds_one_thread_and_exact_fp32_products_on_cuda_and_gives_them_back():
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.set_num_threads(2)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True    # as A1111 sets them
        with pytest.raises(KeyError):
            with merge_torch_settings("cuda"):
                assert torch.get_num_threads() == 1
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
                raise KeyError("a merge that fails still gives the host its settings back")
        assert torch.get_num_threads() == 2
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with merge_torch_settings("cpu"):        # a CPU merge leaves the host's GPU settings alone
            assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_reads_bound_for_a_gpu_land_in_page_locked_memory_and_fall_back_when_refused():
    locked = []

    def pin(n):
        t = torch.empty(n, dtype=torch.uint8)
        locked.append(t)
        return t

    buf = host_buffer(1000, torch.device("cuda"), pin)
    assert len(locked) == 1 and buf.nbytes == 1000
    assert np.shares_memory(buf, locked[0].numpy())           # the reads land in the locked pages themselves
    assert host_buffer(1000, torch.device("cpu"), pin).nbytes == 1000 and len(locked) == 1

    def refuse(n):
        raise RuntimeError("cannot lock more pages (RLIMIT_MEMLOCK)")

    assert host_buffer(64, torch.device("cuda"), refuse).nbytes == 64
    if not torch.cuda.is_available():       # torch's own pinned allocator with no driver: plain pages
        assert host_buffer(64, torch.device("cuda")).nbytes == 64


def test_a_gpu_merge_reads_on_one_chunk_thread_while_the_other_computes():
    assert auto_workers("cuda") == 2 and auto_workers("cpu") == 1
