"""A plan's keys cut into tasks: contiguous runs of keys of about equal estimated cost.

Why contiguous: the output's byte ranges follow the key order, so finished tasks extend a prefix of
the file the finisher can hash while later tasks still run. Why several tasks per worker: costs
are estimates (a TIES key costs far more than a copy of the same size), so workers that finish
early take the next task rather than wait for a fixed share.
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
    """Contiguous tasks of about total / (workers x per_worker) cost each (a costlier key is a task alone)."""
    costs = [key_cost(kp) for kp in keys]
    if not costs:
        return []
    target = sum(costs) / max(1, workers * per_worker)
    tasks, first, acc = [], 0, 0.0
    for i, cost in enumerate(costs):
        acc += cost
        if acc >= target or i == len(costs) - 1:
            tasks.append(Task(len(tasks), first, i + 1, acc))
            first, acc = i + 1, 0.0
    return tasks
