"""TIES (k = 0.2), Model Stock and the geometric median on N = 4 and 8 full-size SD1-shaped fp16
checkpoints: ours (1 worker; `ours2w`: 2 worker processes; `oursray`: a local Ray with 2 CPUs) vs
sd-mecha 1.1.8, side by side, each contender in its own process (memory summed over all its
processes). The ratio columns compare each row to `ours` (1 worker); the lines after each method
print the pairs in common.PAIRS (Ray / 2 workers among them).

    .venv/bin/python bench/bench_methods.py [--dir /tmp/astolfo-bench] [--sizes 4,8] [--scale 1]
        [--methods ties,model_stock,geometric_median] [--contenders ours,ours2w,oursray,mecha] [--memory-gb 1.5]
        [--arch sd1|sdxl] [--repeats 3]

Prints wall time (the median of --repeats runs, each run's time beside it) and peak private memory (RssAnon, read from /proc/<pid>/status of the child) per
contender, the ratios mecha/ours, and the time to read the inputs once (`cat` to /dev/null). Inputs
(base + seeded deltas, astolfo_merge.features.demo.write_synthetic) are generated once into --dir and shared
with bench_merge.py; `--scale 16` makes a quick smoke run. Both contenders compute in fp64.
"""
import argparse
import os
import sys

from common import gib, make_inputs, median_run, print_ratios, run_measured, same_bytes, save_results, table, warm

HERE = os.path.dirname(os.path.abspath(__file__))
PARAMS = {"ties": '{"k": 0.2}', "model_stock": "{}", "geometric_median": "{}"}
NEEDS_BASE = {"ties": True, "model_stock": True, "geometric_median": False}
# Model Stock's t = N·cos / (1 + (N − 1)·cos) is unbounded: on a few keys of the synthetic fine-tunes it
# gives values beyond fp16, which ours refuses by default: write them
# as they come (Inf), as sd-mecha does, so the timing is of the whole merge.
NONFINITE = {"model_stock": "keep"}


def read_once(paths) -> float:
    return run_measured(["cat", *paths], discard_stdout=True)["wall"]


def contender(who, method, inputs, base, folder, memory_gb):
    out = os.path.join(folder, f"out-{who}-{method}-{len(inputs)}.safetensors")
    cmd = [sys.executable, os.path.join(HERE, "contenders.py"), who, method, out, *inputs,
           "--memory-gb", str(memory_gb), "--params", PARAMS[method], "--precision", "fp64"]
    if NEEDS_BASE[method]:
        cmd += ["--base", base]
    if method in NONFINITE and who.startswith("ours"):
        cmd += ["--nonfinite", NONFINITE[method]]
    warm(inputs + ([base] if NEEDS_BASE[method] else []))
    result = run_measured(cmd)
    if os.path.exists(out):
        os.unlink(out)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/astolfo-bench")
    ap.add_argument("--sizes", default="4,8")
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension divisible by it (16: smoke test)")
    ap.add_argument("--methods", default="ties,model_stock,geometric_median")
    ap.add_argument("--contenders", default="ours,ours2w,oursray,mecha")
    ap.add_argument("--memory-gb", type=float, default=1.5)
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"])
    ap.add_argument("--repeats", type=int, default=1, help="runs per contender; the median is reported")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    who_all = args.contenders.split(",")
    print(f"generating inputs in {args.dir} ({args.arch} at 1/{args.scale}) ...", flush=True)
    paths = make_inputs(args.dir, max(sizes), args.arch, args.scale)
    base, fine_tunes = paths[0], paths[1:]
    rows, results = [], {}
    for n in sizes:
        inputs = fine_tunes[:n]
        warm(inputs + [base])
        read = read_once(inputs + [base])
        rows.append({"method": "-", "N": n, "contender": "read inputs once (cat)", "wall s": f"{read:.1f}",
                     "RssAnon GiB": "-", "x ours time": "", "x ours RssAnon": ""})
        print(table(rows[-1:], list(rows[-1])), flush=True)
        for method in methods:
            got = {}
            for who in who_all:
                r = median_run(lambda: contender(who, method, inputs, base, args.dir, args.memory_gb), args.repeats)
                if r["rc"] != 0:
                    print(f"{who} {method} N={n} failed:\n{r['tail']}", flush=True)
                    continue
                got[who] = r
                results[f"{who}-{method}-{n}"] = {**r, "read_once": read}
            for who, r in got.items():
                row = {"method": method, "N": n, "contender": who, "wall s": f"{r['wall']:.1f}",
                       "RssAnon GiB": gib(r["peak_RssAnon"]), "x ours time": "", "x ours RssAnon": "",
                       "runs s": " ".join(f"{w:.1f}" for w in r["walls"])}
                if who != "ours" and "ours" in got:
                    row["x ours time"] = f"{r['wall'] / got['ours']['wall']:.2f}x"
                    row["x ours RssAnon"] = f"{r['peak_RssAnon'] / max(1, got['ours']['peak_RssAnon']):.2f}x"
                rows.append(row)
                print(table(rows[-1:], list(rows[-1])), flush=True)
            print_ratios(results, f"-{method}-{n}", f"{method} N={n}")
            same_bytes(results, f"-{method}-{n}", f"{method} N={n}")
    print()
    print(table(rows, ["method", "N", "contender", "wall s", "RssAnon GiB", "x ours time", "x ours RssAnon", "runs s"]))
    save_results(f"bench_methods-s{args.scale}", results)


if __name__ == "__main__":
    main()
