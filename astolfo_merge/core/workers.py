"""Chunk workers: a key's row chunks computed on several threads, results handed back in order.

Torch and numpy release the GIL inside their kernels, so single-threaded ops on different chunks run
truly in parallel; one chunk per task keeps every op cache-sized. At most `workers + 2` chunks are
alive at once (each worker busy, one result queued, one being consumed), which is what `in_flight`
reports so that the chunk size leaves room for all of them in the memory budget.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait


def auto_workers(device: str = "cpu") -> int:
    """The default number of chunk threads. CPU: one, i.e. chunks computed inline. Measured on the
    2-core CI machine (bench/README.md): two chunk threads are slower than one (8-model average,
    fp32: 17.7 s with one, 34.8 s with two), because each op's Python-side dispatch holds the GIL,
    the ops on cache-sized chunks are short, and the writer's hashing thread needs the second core;
    more are opt-in (`threads`) for machines where they pay off. CUDA: two, so that one thread reads
    the next chunk's rows from the files (no GIL held in the reads) while the other's chunk is on
    the GPU — the reads overlap with the compute (devices.py)."""
    return 2 if device == "cuda" else 1


class ChunkWorkers:
    """A thread pool for ordered, bounded maps over row spans (one per merge run)."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="astolfo-chunk") if self.workers > 1 else None

    @property
    def in_flight(self) -> int:
        return self.workers + 2 if self._pool else 1

    def imap(self, fn, spans):
        """fn(a, b) for each (a, b) in spans, in order. If the consumer stops early (an error, a
        cancel), chunks not started are dropped and running ones finish before this returns."""
        spans = list(spans)
        if self._pool is None or len(spans) < 2:
            for a, b in spans:
                yield fn(a, b)
            return
        pending = deque()
        try:
            for a, b in spans:
                pending.append(self._pool.submit(fn, a, b))
                if len(pending) > self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            wait(pending)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
