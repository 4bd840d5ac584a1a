"""Where a merge computes: the device each worker takes, the torch settings a merge holds while it
runs, page-locked read buffers for a GPU, and a note when a GPU's fp64 is slow.

CUDA, as the executors use it (`--device cuda`, with in-process, worker-process or Ray runs):
- worker processes spread over the GPUs round-robin (`worker_device`: worker i on cuda:i mod count);
  an explicit index (`cuda:1`) keeps every worker on that GPU; Ray tasks ask Ray for one GPU each
  (`task_resources`), and Ray makes it the task's cuda:0;
- inputs are read into page-locked (pinned) host buffers (`host_buffer`), so the copy to the GPU is
  one DMA, not a staged copy through a driver buffer;
- two chunk threads (workers.auto_workers): one reads the next chunk's rows from the files while the
  other's chunk is on the GPU, so reads overlap with compute;
- the arithmetic stays what the recipe asked for: fp64 in fp64, and fp32 matrix products without
  TF32 (which keeps 10 mantissa bits; A1111 turns it on for its own sampling), restored afterwards in
  the host process.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

# fp64 throughput as a fraction of fp32, by compute capability: the data-centre parts run fp64 at
# half rate (P100, V100, A100, H100/H200, B100/B200); Kepler's K40/K80 at a third; the gaming and
# workstation parts at 1/32 (Maxwell, Pascal, Turing) or 1/64 (Ampere GA10x, Ada, Blackwell GB20x).
FP64_RATE_BY_CAPABILITY = {(6, 0): 2, (7, 0): 2, (8, 0): 2, (9, 0): 2, (10, 0): 2, (3, 5): 3, (3, 7): 3}
SLOW_FP64_RATE = 16        # at or beyond 1/16 of fp32, a GPU's fp64 merge can be slower than the CPU's


def worker_device(device: str, index: int, count: int | None = None) -> str:
    """The device worker `index` computes on: "cuda" spreads the workers over the `count` GPUs
    (torch's device count when not given) round-robin; "cuda:K" and "cpu" are used as given."""
    dev = torch.device(device)
    if dev.type != "cuda" or dev.index is not None:
        return device
    count = torch.cuda.device_count() if count is None else count
    return f"cuda:{index % count}" if count > 0 else device


def task_resources(device: str) -> dict:
    """What one Ray task asks the cluster for: a CPU, and a GPU of its own when the merge runs on CUDA
    (Ray then sets the task's CUDA_VISIBLE_DEVICES, so "cuda" is that GPU)."""
    return {"num_cpus": 1, "num_gpus": 1 if torch.device(device).type == "cuda" else 0}


def fp64_rate(capability: tuple) -> int:
    """fp32 / fp64 throughput of a GPU of compute capability `capability` (major, minor)."""
    capability = tuple(capability)
    if capability in FP64_RATE_BY_CAPABILITY:
        return FP64_RATE_BY_CAPABILITY[capability]
    return 64 if capability[0] >= 8 else 32


def fp64_note(device: str, dtype: torch.dtype, properties=None) -> str | None:
    """A log line when an fp64 merge runs on a GPU whose fp64 is slow, offering fp32; else None.
    `properties`: torch.cuda.get_device_properties of the GPU (looked up when not given)."""
    dev = torch.device(device)
    if dev.type != "cuda" or dtype != torch.float64:
        return None
    if properties is None:
        if not torch.cuda.is_available():
            return None
        properties = torch.cuda.get_device_properties(dev.index or 0)
    rate = fp64_rate((properties.major, properties.minor))
    if rate < SLOW_FP64_RATE:
        return None
    return (f"note: {properties.name} (compute capability {properties.major}.{properties.minor}) runs fp64 at "
            f"about 1/{rate} of its fp32 rate, so this fp64 merge may take longer than on the CPU; compute "
            "precision fp32 (--precision fp32, or the tab's Compute precision) is much faster there, and fp64 "
            "stays exact")


@contextlib.contextmanager
def merge_torch_settings(device: str | torch.device = "cpu"):
    """Torch as a merge needs it while it runs here, restored afterwards (a host such as the WebUI
    keeps its own settings): one thread — parallelism is across chunks (ChunkWorkers) or processes;
    streaming chunks are too small for torch's thread team to pay off, and on a busy machine every
    parallel op waits for a descheduled team member (measured: 10x slower) — and on CUDA, fp32
    matrix products without TF32."""
    before = torch.get_num_threads()
    cuda = torch.device(device).type == "cuda"
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) if cuda else None
    torch.set_num_threads(1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def worker_torch_settings():
    """A worker process's torch, for its whole life (its own process: nothing to restore): what
    `merge_torch_settings` holds for a merge in the host."""
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def host_buffer(nbytes: int, device: torch.device, pin=None) -> np.ndarray:
    """A reusable landing buffer of `nbytes` for reads bound for `device`: page-locked for CUDA (one
    DMA to the GPU), plain memory otherwise or where the system refuses to lock more pages.
    `pin(nbytes)` makes the page-locked tensor (torch's pinned allocator; tests pass their own)."""
    if device.type == "cuda":
        pin = pin or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        try:
            return pin(nbytes).numpy()     # the array keeps its tensor (and the locked pages) alive
        except RuntimeError:               # RLIMIT_MEMLOCK, or no CUDA driver: plain pages still work
            pass
    return np.empty(nbytes, dtype=np.uint8)
