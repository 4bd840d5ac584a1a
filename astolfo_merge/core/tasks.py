"""A plan's keys cut into tasks: contiguous runs of keys, large first and smaller toward the end.

Why contiguous: the output's byte ranges follow the key order, so finished tasks extend a prefix of
the file the finisher can hash while later tasks still run. Why several tasks per worker, shrinking
(guided self-scheduling): costs are estimates (a TIES key costs far more than a copy of the same
size), so workers that finish early take the next task rather than wait for a fixed share, and the
last tasks are small, so no worker is left with a long task while the others have nothing to do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..methods import get_method
from ..methods.shapes import relative_cost

TASKS_PER_WORKER = 4


@dataclass(frozen=True)
class Task:
    """Keys plan.keys[first:stop], with their estimated cost."""
    id: int
    first: int
    stop: int
    cost: float

    @property
    def indices(self) -> range:
        return range(self.first, self.stop)


def key_cost(kp) -> float:
    """Elements x method cost: what a key costs to produce, in units of one copied element."""
    elements = max(1, math.prod(kp.shape))
    if kp.action != "merge":
        return float(elements)
    method = get_method(kp.method)
    per_input = relative_cost(method.shape) * (2.0 if method.random else 1.0)
    inputs = len(kp.pool) + (kp.base is not None)
    return elements * (1.0 + per_input * inputs)


def cut_tasks(keys, workers: int, per_worker: int = TASKS_PER_WORKER) -> list:
    """Contiguous tasks, each about half a worker's share of the cost still left (total / (2 x workers)
    first), never below total / (workers x per_worker x 4): the tail's grain. A costlier key is a task
    alone."""
    costs = [key_cost(kp) for kp in keys]
    if not costs:
        return []
    workers = max(1, workers)
    left = sum(costs)
    grain = left / (workers * per_worker * 4)
    tasks, first, acc = [], 0, 0.0
    for i, cost in enumerate(costs):
        acc += cost
        if acc >= max(grain, left / (2 * workers)) or i == len(costs) - 1:
            tasks.append(Task(len(tasks), first, i + 1, acc))
            first, left, acc = i + 1, left - acc, 0.0
    return tasks
