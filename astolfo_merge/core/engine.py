"""Executing a plan: `run_merge`, the entry point, checks the options, then runs the plan's pipeline.

Key by key, chunk by chunk, straight into the streaming writer (pipeline.py, key_chunks.py). Cancel
and errors abort the writer, so nothing half-written stays behind.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from ..errors import AstolfoError, Cancelled, OutputExistsError, RecipeError
from .executors import changed_input, input_stats
from .pipeline import Pipeline
from .plan_data import Plan
from .ray_executor import require_ray
from .run_options import MergeResult, Progress, RunOptions, check_outputs, process_count


def run_merge(plan: Plan, options: RunOptions | None = None, progress: Callable[[Progress], None] | None = None,
              cancel: threading.Event | None = None) -> MergeResult:
    """Run `plan`'s pipeline (plan.stages, stages.py): whole-plan stages once, in this process; key
    stages as tasks here or on worker processes (`options.workers`). Returns the result of the stage
    that writes the plan's output, with the log of the whole run."""
    options = options or RunOptions()
    if plan.output is None:
        raise RecipeError("output", "no output file given")
    check_outputs(plan, options)
    plan.check_budget(options.memory_gb)
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device", "CUDA was asked for but torch sees no CUDA device")
    if options.ray is not None:
        require_ray()                 # before any work: one line saying what to install
    else:
        process_count(plan, options)     # a bad worker count or budget is refused before any work
    stats = input_stats(plan)
    run = Pipeline(plan, options, progress, cancel, device)
    try:
        return run.run()
    except (Cancelled, OutputExistsError):
        raise
    except (AstolfoError, RuntimeError, ValueError, OSError) as exc:   # an input changed: name it, not the symptom
        changed = changed_input(stats, f"reading it failed ({exc.__class__.__name__})")
        if changed is not None:
            raise changed from exc
        raise
    finally:
        run.close()
