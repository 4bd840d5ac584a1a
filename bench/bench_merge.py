"""n_average of 2/4/8 full-size SD1-shaped fp16 checkpoints: ours (1 worker, 2 worker processes,
`--workers 0`, a local Ray with 2 CPUs; fp64 and fp32) vs sd-mecha vs naive vs the I/O floor.

    .venv/bin/python bench/bench_merge.py [--dir /tmp/astolfo-bench] [--sizes 2,4,8] [--scale 1]
        [--arch sd1|sdxl] [--repeats 3] [--contenders ours,ours2w,...,ourscuda]

Prints wall time (the median of --repeats runs, each run's time beside it) and peak private memory
(RssAnon) per contender, file-backed RSS separately, and
the ratios to the I/O floor (reading the inputs once with `cat` + writing/fsyncing one output-sized
file), and the ratios of each pair in common.PAIRS (2 workers / 1, Ray / 2 workers, ...). Inputs are
generated once (base + seeded deltas) and kept in --dir; page cache is warmed before each run so
every contender reads from memory alike.
"""
import argparse
import os
import sys

from common import (
    gib,
    io_floor,
    make_inputs,
    median_run,
    print_ratios,
    run_measured,
    same_bytes,
    save_results,
    table,
    warm,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/astolfo-bench")
    ap.add_argument("--sizes", default="2,4,8")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--contenders", default="ours,ours2w,oursray,ours32,ours2w32,oursray32,mecha,naive")
    ap.add_argument("--memory-gb", type=float, default=1.5)
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"])
    ap.add_argument("--repeats", type=int, default=1, help="runs per contender; the median is reported")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"generating inputs in {args.dir} ({args.arch}, scale 1/{args.scale}) ...")
    paths = make_inputs(args.dir, max(sizes), args.arch, args.scale)[1:]
    rows, results = [], {}
    for n in sizes:
        inputs = paths[:n]
        out_bytes = os.path.getsize(inputs[0])
        warm(inputs)
        floors = sorted((io_floor(inputs, out_bytes, args.dir) for _ in range(max(1, args.repeats))),
                        key=lambda f: f["floor"])
        floor = floors[(len(floors) - 1) // 2]
        rows.append({"N": n, "contender": "I/O floor (cat + write)", "wall s": f"{floor['floor']:.1f}",
                     "RssAnon GiB": "-", "RssFile GiB": "-", "x floor": "1.00",
                     "runs s": " ".join(f"{f['floor']:.1f}" for f in floors)})
        for who in args.contenders.split(","):
            out = os.path.join(args.dir, f"out-{who}-{n}.safetensors")

            def once():
                warm(inputs)
                r = run_measured([sys.executable, os.path.join(HERE, "contenders.py"), who, "n_average", out, *inputs,
                                  "--memory-gb", str(args.memory_gb)])
                if os.path.exists(out):
                    os.unlink(out)
                return r

            r = median_run(once, args.repeats)
            if r["rc"] != 0:
                print(f"{who} N={n} failed:\n{r['tail']}")
                continue
            results[f"{who}-{n}"] = {**r, "floor": floor}
            rows.append({"N": n, "contender": who, "wall s": f"{r['wall']:.1f}", "RssAnon GiB": gib(r["peak_RssAnon"]),
                         "RssFile GiB": gib(r["peak_RssFile"]), "x floor": f"{r['wall'] / floor['floor']:.2f}",
                         "runs s": " ".join(f"{w:.1f}" for w in r["walls"])})
            print(table(rows[-1:], list(rows[-1])), flush=True)
        print_ratios(results, f"-{n}", f"N={n}")
        same_bytes(results, f"-{n}", f"N={n}")
    print()
    print(table(rows, ["N", "contender", "wall s", "x floor", "RssAnon GiB", "RssFile GiB", "runs s"]))
    save_results("bench_merge", results)


if __name__ == "__main__":
    main()
