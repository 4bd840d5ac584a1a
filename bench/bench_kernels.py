"""Per-element cost of the n-ary methods' math, old vs new, one thread, in one process.

    .venv/bin/python bench/bench_kernels.py [--old 3b017ea] [--methods ties,model_stock,geometric_median]
        [--n 8] [--keys conv,linear] [--repeats 3] [--profile]

The "old" methods are loaded from git (`git show REV:astolfo_merge/methods/*.py`) into a private
package beside the working tree's ones, so both run on the same inputs in the same process,
interleaved (old, new, old, new, ...), and the median of the repeats is reported as nanoseconds per
INPUT element (pool models only: time / (N · numel)). Each pair's outputs are also compared byte for
byte (a rewrite must not change the bytes).

Inputs: N seeded fp16 fine-tunes of full-size SD1 keys held in memory (base + 0.05·std·randn, like
astolfo_merge.features.demo), read the way the engine reads them (fp16 widened through fp32 into one stack per
chunk) and cut into row chunks with the engine's own rule and a 1.5 GiB merge budget. File reads and
page faults are NOT included: this measures the methods' arithmetic, which is what dominated
(TIES k = 0.2 at N = 8: ~54 ns per input element against ~0.5 ns to read it).

Keys: conv = 1280×1280×3×3 (SD1's largest UNet convs; most of the UNet's weights are convs and
linears of this row width or less), linear = 320×320 (a small attention projection: one chunk holds
many rows), bias = 1280 (1-D: the whole-tensor forms).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from astolfo_merge.methods import registry  # noqa: E402
from astolfo_merge.methods.registry import KeyInputs, get_method  # noqa: E402

KEYS = {"conv": (1280, 1280, 3, 3), "linear": (320, 320), "wide": (1280, 5120), "bias": (1280,)}
PARAMS = {"ties": {"k": 0.2}, "model_stock": {}, "geometric_median": {}, "ties_soup": {}, "tgmd": {},
          "dare": {}, "karcher": {}, "dgmla": {}}
MEMORY_GB = 1.5


class HalfInputs(KeyInputs):
    """fp16 tensors in memory, read like key_inputs.FileKeyInputs reads safetensors pages: one widening
    copy per chunk for all N models (fp16 -> fp32 staging -> compute dtype), engine chunk sizes."""

    def __init__(self, models, base, dtype=torch.float64, seed=0, budget_bytes=int(MEMORY_GB * 2 ** 30) // 2):
        self.models, self.base = [m.reshape(-1) for m in models], None if base is None else base.reshape(-1)
        self.shape, self.n, self.has_base = tuple(models[0].shape), len(models), base is not None
        self.dtype, self.seed, self.recipe_seed, self.budget_bytes, self.key = dtype, seed, seed, budget_bytes, "bench"
        self.row = max(1, math.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        self.wide = None
        self.messages = []

    def _widen(self, sources, out):
        count = sources[0].numel()
        if self.wide is None or self.wide.numel() < len(sources) * count:
            self.wide = torch.empty(len(sources) * count)
        wide = self.wide[:len(sources) * count].view(len(sources), count)
        torch._foreach_copy_(list(wide.unbind(0)), sources)
        return out.copy_(wide)

    def _shape(self, a, b):
        return ((b - a),) + self.shape[1:] if self.shape else ()

    def read_rows(self, i, start, stop, out=None):
        src = self.models[i][start * self.row:stop * self.row]
        out = torch.empty(src.numel(), dtype=self.dtype) if out is None else out.reshape(-1)
        return self._widen([src], out.view(1, -1)).reshape(self._shape(start, stop))

    def read_base_rows(self, start, stop, out=None):
        src = self.base[start * self.row:stop * self.row]
        out = torch.empty(src.numel(), dtype=self.dtype) if out is None else out.reshape(-1)
        return self._widen([src], out.view(1, -1)).reshape(self._shape(start, stop))

    def read_stack(self, start, stop, minus_base=False):
        srcs = [m[start * self.row:stop * self.row] for m in self.models]
        stack = torch.empty((self.n, srcs[0].numel()), dtype=self.dtype)
        self._widen(srcs, stack)
        stack = stack.reshape((self.n,) + self._shape(start, stop))
        if minus_base:
            stack -= self.read_base_rows(start, stop)
        return stack

    def pool_dtypes(self):
        return (torch.float16,) * self.n

    def chunks(self, resident, tile=None):
        """key_inputs.FileKeyInputs.chunks with one chunk in flight."""
        from astolfo_merge.methods.shapes import CACHE_TILE, row_spans
        return row_spans(self.shape, self.dtype.itemsize, resident, self.budget_bytes, tile=tile or CACHE_TILE)

    def log(self, message):
        self.messages.append(message)


def make_pool(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    fan_in = max(1, math.prod(shape[1:])) if len(shape) > 1 else 50
    base = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    std = float(base.std())
    models = [(base + 0.05 * std * torch.randn(shape, generator=g)).half() for _ in range(n)]
    return base.half(), models


def load_old(rev: str) -> dict:
    """The methods modules of git revision `rev`, loaded as a private package whose `register` only
    collects (so they do not collide with the working tree's registrations): {method name: Method}."""
    name = "astolfo_merge._bench_old_methods"
    pkg = types.ModuleType(name)
    pkg.__path__ = []
    sys.modules[name] = pkg
    proxy = types.ModuleType(name + ".registry")
    proxy.__dict__.update({k: v for k, v in vars(registry).items() if not k.startswith("__")})
    collected = {}
    proxy.register = lambda method: collected.setdefault(method.name, method)
    sys.modules[name + ".registry"] = proxy
    out = {}
    for stem in ("isotropic", "median", "karcher", "model_stock", "droptrim"):
        try:
            source = subprocess.run(["git", "show", f"{rev}:astolfo_merge/methods/{stem}.py"], cwd=ROOT, check=True,
                                    capture_output=True, text=True).stdout
        except subprocess.CalledProcessError:
            continue
        spec = importlib.util.spec_from_loader(f"{name}.{stem}", loader=None)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = name
        sys.modules[f"{name}.{stem}"] = module
        exec(compile(source, f"{rev}:{stem}.py", "exec"), module.__dict__)
        out[stem] = module
    return collected


def run_once(run, method, models, base, params, dtype):
    inputs = HalfInputs(models, base if method.needs_base else None, dtype=dtype, seed=3)
    t0 = time.perf_counter()
    parts = list(run(inputs, method.resolve_params(params)))
    elapsed = time.perf_counter() - t0
    return elapsed, parts


def same(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="3b017ea", help="git revision of the 'old' methods (default: before issue 14 item 6)")
    ap.add_argument("--methods", default="ties,model_stock,geometric_median")
    ap.add_argument("--keys", default="conv,linear")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="fp64", choices=("fp64", "fp32"))
    ap.add_argument("--only-new", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile one run of the new version per method and key")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = torch.float64 if args.precision == "fp64" else torch.float32
    old = {} if args.only_new else load_old(args.old)
    print(f"torch {torch.__version__}, 1 thread, N = {args.n}, {args.precision}, old = {args.old}, "
          f"median of {args.repeats}, ns per input element (time / (N·numel))", flush=True)
    for key in args.keys.split(","):
        shape = KEYS[key]
        base, models = make_pool(shape, args.n)
        numel = math.prod(shape)
        for name in args.methods.split(","):
            method = get_method(name)
            params = PARAMS.get(name, {})
            runs = {"new": method.run} if args.only_new else {"old": old[name].run, "new": method.run}
            times = {who: [] for who in runs}
            outputs = {}
            for _ in range(args.repeats):
                for who, run in runs.items():
                    elapsed, parts = run_once(run, method, models, base, params, dtype)
                    times[who].append(elapsed)
                    outputs[who] = parts
            ns = {who: statistics.median(t) / (args.n * numel) * 1e9 for who, t in times.items()}
            line = f"{name:18s} {key:7s} {str(shape):22s} " + "  ".join(
                f"{who} {ns[who]:7.2f} ns ({statistics.median(times[who]):.3f} s)" for who in runs)
            if "old" in runs:
                line += f"  speed-up {ns['old'] / ns['new']:.2f}x  bytes {'SAME' if same(outputs['old'], outputs['new']) else 'DIFFER'}"
            print(line, flush=True)
            if args.profile:
                import cProfile
                import pstats
                prof = cProfile.Profile()
                prof.enable()
                run_once(method.run, method, models, base, params, dtype)
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
