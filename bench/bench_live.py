"""Live merge (features/live.py) into a loaded model: seconds per grid cell, in this process vs on
worker processes (fresh each cell, or parked once before the grid as the XYZ glue does), beside
the time to read the inputs once. Full-size synthetic fp16 inputs; the loaded model is the base in
fp32 (what the WebUI holds with --no-half); each cell merges every key with another alpha.

    .venv/bin/python bench/bench_live.py [--arch sd1] [--precision fp64] [--cells 5] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from safetensors.torch import load_file

from common import GIB, make_inputs, warm


def cells(target, folder, names, precision, options, count, before=None) -> list:
    from astolfo_merge.core.plan import build_plan
    from astolfo_merge.core.recipe import parse_recipe
    from astolfo_merge.features import live
    out = []
    for i in range(count):
        recipe = parse_recipe({"pool": names, "method": "weighted_sum", "params": {"alpha": 0.1 + 0.8 * i / count},
                               "precision": precision, "output": "x.safetensors"})
        plan = build_plan(recipe, folder, None)
        if before is not None:
            before()
        started = time.monotonic()
        live.merge_into(target, plan, options)
        out.append(time.monotonic() - started)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default="/tmp/astolfo-bench")
    p.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"])
    p.add_argument("--precision", default="fp64", choices=["fp64", "fp32"])
    p.add_argument("--cells", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-gb", type=float, default=1.5)
    args = p.parse_args(argv)
    from astolfo_merge.core import live_workers  # after common: it puts the repository on sys.path
    from astolfo_merge.core.plan import build_plan
    from astolfo_merge.core.recipe import parse_recipe
    from astolfo_merge.core.run_options import RunOptions
    from astolfo_merge.features import live, live_state
    paths = make_inputs(args.folder, 1, args.arch)
    names = [os.path.basename(x) for x in paths]
    warm(paths)
    started = time.monotonic()
    warm(paths)
    floor = time.monotonic() - started
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(paths[0]).items()}
    target = live_state.TensorTarget(tensors, paths[0])
    here = RunOptions(hash_inputs=False, workers=1, memory_gb=args.memory_gb)
    workers = RunOptions(hash_inputs=False, workers=args.workers, memory_gb=args.memory_gb)
    auto = RunOptions(hash_inputs=False, workers=0, memory_gb=args.memory_gb)
    results = {"in this process (workers 1)": cells(target, args.folder, names, args.precision, here, args.cells),
               f"{args.workers} fresh workers each cell": cells(target, args.folder, names, args.precision, workers,
                                                               args.cells, before=live_workers.release_crew)}
    live_workers.release_crew()
    started = time.monotonic()
    parked = live.start_workers(target, build_plan(parse_recipe({"pool": names, "method": "weighted_sum",
                                                                 "precision": args.precision}), args.folder, None), auto)
    start_s = time.monotonic() - started
    results[f"auto: {parked} workers parked before the grid ({start_s:.2f} s once)"] = cells(
        target, args.folder, names, args.precision, auto, args.cells)
    live_workers.release_crew()
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{args.arch} {args.precision}, model {size / GIB:.2f} GiB fp32, {torch.get_num_threads()} torch threads "
          f"here, {os.cpu_count()} cores; reading both inputs once: {floor:.2f} s")
    base = statistics.median(results["in this process (workers 1)"])
    for name, walls in results.items():
        median = statistics.median(walls)
        print(f"  {name:58s} median {median:6.2f} s  ({median / base:.2f}x in-process, {median / floor:.2f}x read)"
              f"  cells {[round(w, 2) for w in walls]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
