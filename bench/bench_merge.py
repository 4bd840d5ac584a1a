"""n_average of 2/4/8 full-size SD1-shaped fp16 checkpoints: ours (1 worker, 2 worker processes,
`--workers 0`, a local Ray with 2 CPUs; fp64 and fp32) vs sd-mecha vs naive vs the I/O floor.

    .venv/bin/python bench/bench_merge.py [--dir /tmp/astolfo-bench] [--sizes 2,4,8] [--scale 1]

Prints wall time and peak private memory (RssAnon) per contender, file-backed RSS separately, and
the ratios to the I/O floor (reading the inputs once with `cat` + writing/fsyncing one output-sized
file), and the ratios of each pair in common.PAIRS (2 workers / 1, Ray / 2 workers, ...). Inputs are
generated once (base + seeded deltas) and kept in --dir; page cache is warmed before each run so
every contender reads from memory alike.
"""
import argparse
import os
import sys

from common import gib, io_floor, make_inputs, print_ratios, run_measured, same_bytes, save_results, table, warm

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/astolfo-bench")
    ap.add_argument("--sizes", default="2,4,8")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--contenders", default="ours,ours2w,oursray,ours32,ours2w32,oursray32,mecha,naive")
    ap.add_argument("--memory-gb", type=float, default=1.5)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"generating inputs in {args.dir} (scale 1/{args.scale}) ...")
    paths = make_inputs(args.dir, max(sizes), "sd1", args.scale)[1:]
    rows, results = [], {}
    for n in sizes:
        inputs = paths[:n]
        out_bytes = os.path.getsize(inputs[0])
        warm(inputs)
        floor = io_floor(inputs, out_bytes, args.dir)
        rows.append({"N": n, "contender": "I/O floor (cat + write)", "wall s": f"{floor['floor']:.1f}",
                     "RssAnon GiB": "-", "RssFile GiB": "-", "x floor": "1.00"})
        for who in args.contenders.split(","):
            out = os.path.join(args.dir, f"out-{who}-{n}.safetensors")
            warm(inputs)
            r = run_measured([sys.executable, os.path.join(HERE, "contenders.py"), who, "n_average", out, *inputs,
                              "--memory-gb", str(args.memory_gb)])
            if os.path.exists(out):
                os.unlink(out)
            if r["rc"] != 0:
                print(f"{who} N={n} failed:\n{r['tail']}")
                continue
            results[f"{who}-{n}"] = {**r, "floor": floor}
            rows.append({"N": n, "contender": who, "wall s": f"{r['wall']:.1f}", "RssAnon GiB": gib(r["peak_RssAnon"]),
                         "RssFile GiB": gib(r["peak_RssFile"]), "x floor": f"{r['wall'] / floor['floor']:.2f}"})
            print(table(rows[-1:], list(rows[-1])), flush=True)
        print_ratios(results, f"-{n}", f"N={n}")
        same_bytes(results, f"-{n}", f"N={n}")
    print()
    print(table(rows, ["N", "contender", "wall s", "x floor", "RssAnon GiB", "RssFile GiB"]))
    save_results("bench_merge", results)


if __name__ == "__main__":
    main()
