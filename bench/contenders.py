"""One merge per process, so each contender's memory is measured alone.

usage: python bench/contenders.py (ours|ours2t|ours2w|oursauto|oursray|ourscuda|ourscudaw[32]|mecha|naive) METHOD OUT IN... [--base B]
       [--memory-gb X] [--params JSON]

ours = 1 worker (in-process, the library default); ours2t = 2 chunk threads; ours2w = 2 worker
processes (`--workers 2`); oursauto = the CLI's default `--workers 0` (as many worker processes as
cores and the budget allow); oursray = a local Ray with 2 CPUs started for the merge (`--ray`:
Ray's start-up and shutdown are inside the time, its processes inside the memory); ourscuda = on
the GPU (`--device cuda`) in-process, ourscudaw = worker processes spread over the GPUs; a trailing
32 = fp32 arithmetic (ours32, ours2w32, ourscuda32, ...).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ours(method, out, inputs, base, memory_gb, params, precision, threads=0, workers=1, ray=None, nonfinite="fail",
         device="cpu"):
    from astolfo_merge.core.engine import run_merge
    from astolfo_merge.core.plan import build_plan
    from astolfo_merge.core.recipe import parse_recipe
    from astolfo_merge.core.run_options import RunOptions
    doc = {"pool": inputs, "method": method, "params": params, "precision": precision, "dtype": "fp16",
           "nonfinite": nonfinite}
    if base:
        doc["base"] = base
    plan = build_plan(parse_recipe(doc), None, out)
    return run_merge(plan, RunOptions(memory_gb=memory_gb, overwrite=True, hash_inputs=False, threads=threads,
                                   workers=workers, ray=ray, device=device))


def mecha(method, out, inputs, base, memory_gb, params, precision, nonfinite="keep"):
    import sd_mecha
    import torch
    models = [sd_mecha.model(p) for p in inputs]
    dtype = torch.float64 if precision == "fp64" else torch.float32
    if method == "n_average":
        recipe = sd_mecha.n_average(*models)
    elif method == "ties":
        # paper TIES: base + ties_sum(deltas, k, vote_sgn=True), built from the merge methods themselves
        # (sd-mecha's `add_difference` wrapper trips over the still-unknown merge space of the ties node)
        from sd_mecha.extensions.builtin.merge_methods import linear, ties
        b = sd_mecha.model(base)
        deltas = [sd_mecha.subtract(m, b) for m in models]
        recipe = linear.add_difference(b, ties.ties_sum(*deltas, k=params.get("k", 0.2), vote_sgn=True), alpha=1.0)
    elif method == "model_stock":
        b = sd_mecha.model(base)
        recipe = sd_mecha.n_model_stock(b, *models)
    elif method == "geometric_median":
        recipe = sd_mecha.geometric_median(*models)
    else:
        raise SystemExit(f"no sd-mecha mapping for {method}")
    sd_mecha.merge(recipe, merge_dtype=dtype, output_dtype=torch.float16, output=out, threads=1,
                   check_finite_output=False)


def naive(method, out, inputs, base, memory_gb, params, precision, nonfinite="keep"):
    """Load every model whole, average in fp32, save: what notebooks do."""
    from safetensors.torch import load_file, save_file
    sds = [load_file(p) for p in inputs]
    result = {}
    for k in sds[0]:
        if sds[0][k].is_floating_point():
            result[k] = (sum(sd[k].float() for sd in sds) / len(sds)).half()
        else:
            result[k] = sds[0][k]
    save_file(result, out)


if __name__ == "__main__":
    args = sys.argv[1:]
    who, method, out = args[:3]
    rest, base, memory_gb, params, precision, nonfinite = [], None, 1.5, {}, "fp64", "fail"
    it = iter(args[3:])
    for a in it:
        if a == "--base":
            base = next(it)
        elif a == "--memory-gb":
            memory_gb = float(next(it))
        elif a == "--params":
            params = json.loads(next(it))
        elif a == "--precision":
            precision = next(it)
        elif a == "--nonfinite":     # ours only: what to write where fp16 overflows (the peers write it as is)
            nonfinite = next(it)
        else:
            rest.append(a)
    t = time.time()
    if who.startswith("ours") and who.endswith("32"):   # fp32 arithmetic (what the naive notebook average uses)
        who, precision = who[:-2], "fp32"
    extra = {}
    if who == "ours2t":     # ours with two chunk-worker threads
        who, extra = "ours", {"threads": 2}
    if who == "ours2w":     # ours on two worker processes
        who, extra = "ours", {"workers": 2}
    if who == "oursauto":   # the CLI's default: --workers 0
        who, extra = "ours", {"workers": 0}
    if who == "oursray":    # a local Ray (this machine's 2 CPUs), started and stopped by the merge
        who, extra = "ours", {"ray": "local"}
    if who == "ourscuda":   # on the GPU (`--device cuda`), in this process
        who, extra = "ours", {"device": "cuda"}
    if who == "ourscudaw":  # on the GPUs, one worker process per GPU
        import torch
        who, extra = "ours", {"device": "cuda", "workers": max(2, torch.cuda.device_count())}
    result = {"ours": ours, "mecha": mecha, "naive": naive}[who](method, out, rest, base, memory_gb, params, precision,
                                                                  nonfinite=nonfinite, **extra)
    sha = f", sha256 {result.sha256}" if result is not None else ""   # the bench compares ours' bytes across executors
    print(f"{who} {method} done in {time.time() - t:.1f} s{sha}")
