"""Weight matching (ALGORITHMS.md §14.1) on a full-size SD1-shaped UNet, on the CPU: time and memory.

    .venv/bin/python bench/bench_rebasin.py [--arch sd1] [--scale 1] [--sweeps 10] [--permute]
                                            [--start propagate|identity] [--dir /tmp/astolfo-rebasin-bench]
                                            [--threads N] [--json out.json]

Writes two UNet-only fp16 checkpoints once into --dir (A = the synthetic base, B = a seeded 5 %
"fine-tune"; with --permute B is also renumbered by a random function-preserving permutation, so
the matching has to find it), then runs the matching exactly as the `rebasin` method's prepare
stage does: tensors read key by key through CheckpointReader, fp64 cost matrices through numpy's
BLAS, the permutations the only whole-model state. Prints the number of permutation groups, the
largest assignment problem, seconds for the start phase and every sweep, peak RSS, and with
--permute how many groups were recovered exactly (π⁻¹).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from astolfo_merge.features.demo import model_tensor  # noqa: E402
from astolfo_merge.io import arch as archmod  # noqa: E402
from astolfo_merge.io.reader import CheckpointReader  # noqa: E402
from astolfo_merge.io.writer import SafetensorsWriter  # noqa: E402
from astolfo_merge.methods.rebasin.matching import inverse, weight_matching  # noqa: E402
from astolfo_merge.methods.rebasin.permutation import permute  # noqa: E402
from astolfo_merge.methods.rebasin.spec import build_spec  # noqa: E402


def write_unet(path, arch, scale, variant, perms=None):
    """UNet keys only, fp16, generated and written key by key (bounded memory)."""
    spec = build_spec(arch, scale)
    layout = {k: s.shape for k, s in archmod.layout(arch, scale).items() if s.component == archmod.UNET}
    with SafetensorsWriter(path, [(k, torch.float16, s) for k, s in layout.items()], {"bench": "rebasin"}) as w:
        for key, shape in layout.items():
            t = model_tensor(key, shape, 0, variant, 0.05)
            w.write(key, (permute(t, key, spec, perms) if perms else t).to(torch.float16))
        w.commit()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--sweeps", type=int, default=10)
    ap.add_argument("--start", default="propagate", choices=["propagate", "identity"])
    ap.add_argument("--permute", action="store_true", help="renumber B by a random spec permutation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default="/tmp/astolfo-rebasin-bench")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (numpy's BLAS: OPENBLAS_NUM_THREADS)")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = build_spec(args.arch, args.scale)
    pi = spec.random(seed=1234) if args.permute else None
    os.makedirs(args.dir, exist_ok=True)
    tag = f"{args.arch}-s{args.scale}"
    path_a = os.path.join(args.dir, f"{tag}-A.safetensors")
    path_b = os.path.join(args.dir, f"{tag}-B{'-permuted' if pi else ''}.safetensors")
    for path, variant, perms in ((path_a, None, None), (path_b, 1, pi)):
        if not os.path.exists(path):
            began = time.monotonic()
            write_unet(path, args.arch, args.scale, variant, perms)
            print(f"wrote {path} ({os.path.getsize(path) / 1e9:.2f} GB, {time.monotonic() - began:.0f} s)")
    sizes = sorted(v.size for v in spec.variables.values())
    params = sum(np.prod(s.shape) for s in archmod.layout(args.arch, args.scale).values() if s.component == archmod.UNET)
    print(f"{tag}: {params / 1e6:.0f} M UNet weights, {len(spec.variables)} permutation groups, "
          f"largest assignment {sizes[-1]}×{sizes[-1]}; torch threads {torch.get_num_threads()}")
    with CheckpointReader(path_a) as ra, CheckpointReader(path_b) as rb:
        result = weight_matching(spec, ra.read, rb.read, seed=args.seed, sweeps=args.sweeps, start=args.start,
                                 report=lambda m: print(f"  {m}", flush=True))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    numbers = {"arch": args.arch, "scale": args.scale, "groups": len(spec.variables), "start": args.start,
               "start_seconds": round(result.start_seconds, 1), "sweeps": result.sweeps, "converged": result.converged,
               "sweep_seconds": [round(s, 1) for s in result.sweep_seconds], "total_seconds": round(result.seconds, 1),
               "changed_per_sweep": result.changed, "peak_rss_gib": round(peak_gib, 2)}
    if pi:
        truth = inverse(pi)
        numbers["recovered_groups"] = sum(all(np.array_equal(p, q) for p, q in zip(result.perms[n], truth[n]))
                                          for n in spec.variables)
    print(result.summary(spec))
    print(json.dumps(numbers, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)


if __name__ == "__main__":
    main()
