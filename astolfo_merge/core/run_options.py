"""What a run is given and gives back (RunOptions, Progress, MergeResult), and the checks of a run's
options before any work: worker processes against the memory budget, the files it will write.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from ..errors import MemoryBudgetError, OutputExistsError, RecipeError, check_memory_gb, check_throttle
from ..io.hashes import HashCache
from .plan_data import GIB, OVERHEAD_BYTES, Plan
from .plan_inputs import refuse_input_as_output
from .stages import OUTPUT, TEMP
from .worker_process import WORKER_CHUNK_BYTES, auto_process_count


@dataclass
class RunOptions:
    device: str = "cpu"
    threads: int = 0                 # chunk worker threads; 0 = auto (1: see workers.auto_workers)
    memory_gb: float = 1.5
    overwrite: bool = False
    hash_inputs: bool = True
    hash_cache: HashCache | None = None
    chunk_bytes: int | None = None   # override the per-key chunk budget (tests, benchmarks)
    workers: int = 1                 # 1 = in this process; N > 1 = N worker processes; 0 = auto (worker_process.py)
    isolate: bool | None = None      # True: worker processes even for one worker, so a dying merge spares the
                                     # host (None: background jobs isolate, direct calls do not)
    throttle: float = 0.0            # seconds to pause after each key, in every worker: a merge that leaves a
                                     # shared disk and CPU to others; front ends' --throttle (tests use it to
                                     # watch progress and cancel on tiny models)
    ray: str | None = None           # None: no Ray; "" or "local": a local Ray for the merge; else a cluster address

    def __post_init__(self):   # every front end (CLI, tab, app, scripts) builds these: refuse NaN / inf / <= 0 here
        self.memory_gb = check_memory_gb(self.memory_gb)
        self.throttle = check_throttle(self.throttle)


@dataclass
class Progress:
    keys_done: int
    keys_total: int
    bytes_done: int
    bytes_total: int
    elapsed: float
    eta: float | None
    key: str = ""
    message: str = ""
    stage: str = ""     # what runs before the keys, e.g. "hashing inputs 2/5" ("" while merging keys)

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


@dataclass
class MergeResult:
    path: str
    sha256: str
    size: int
    seconds: float
    keys: int
    log: list = field(default_factory=list)
    components: dict = field(default_factory=dict)

    def summary(self) -> str:
        comps = "; ".join(f"{k}: {v}" for k, v in self.components.items())
        return (f"wrote {self.path}\n  {self.keys} keys, {self.size / 1e6:.1f} MB, {self.seconds:.1f} s\n"
                f"  sha256 {self.sha256}\n  components: {comps}")


ETA_AFTER_FRACTION, ETA_AFTER_SECONDS = 0.02, 2.0   # no ETA before this much of the merge (hashing excluded)


def merge_eta(merging_s: float, done_bytes: int, total_bytes: int) -> float | None:
    """Seconds left, from the merge's own rate (hashing not counted), once the rate means something."""
    if done_bytes < ETA_AFTER_FRACTION * total_bytes or merging_s < ETA_AFTER_SECONDS or not done_bytes:
        return None
    return merging_s / done_bytes * (total_bytes - done_bytes)


def process_count(plan: Plan, options: RunOptions) -> int:
    """Worker processes to run `plan` on; 0 = in this process (`workers` 1, unless `isolate`)."""
    if isinstance(options.workers, bool) or not isinstance(options.workers, int) or options.workers < 0:
        raise RecipeError("workers", f"must be 0 (auto) or a positive integer, got {options.workers!r}")
    budget, share = int(options.memory_gb * GIB), plan.peak_bytes(WORKER_CHUNK_BYTES)
    count = options.workers or auto_process_count(budget, plan.output_bytes, share)
    if count > 1 and count * share > budget + OVERHEAD_BYTES:
        need = math.ceil(count * share / GIB * 10) / 10
        raise MemoryBudgetError(f"{count} worker processes need about {need} GiB together but the budget is "
                                f"{options.memory_gb:.2f} GiB; raise --memory-gb to {need} or use fewer workers")
    return 0 if count == 1 and not options.isolate else count


def stage_output(plan: Plan, stage) -> str | None:
    """The file a key stage writes: the plan's output, a side file, or None for a temp file."""
    if stage.output == OUTPUT:
        return plan.output
    return None if stage.output == TEMP else stage.output


def check_outputs(plan: Plan, options: RunOptions):
    """Every file the pipeline writes, before any work: never an input, never replaced unless asked."""
    for stage in plan.pipeline():
        path = stage_output(plan, stage) if stage.kind == "keys" else None
        if path is None:
            continue
        refuse_input_as_output(plan, path)
        if os.path.exists(path) and not options.overwrite:
            raise OutputExistsError(path)
