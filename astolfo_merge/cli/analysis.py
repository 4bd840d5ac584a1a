"""`python -m astolfo_merge analyze`: per-component L2 distances and delta cosines, as text, JSON and a PNG."""
from __future__ import annotations

import json
import sys

from .common import memory_gb_arg


def cmd_analyze(args):
    from ..features.analysis import analyze, check_plot_path, plot
    state = {"component": None}
    if args.plot:   # before minutes of reading: a bad extension, missing folder or existing file
        check_plot_path(args.plot, args.overwrite)

    def progress(comp, _key):
        if not args.json and comp != state["component"]:
            state["component"] = comp
            print(f"reading {comp} …", file=sys.stderr)

    result = analyze(args.files, base=args.base, memory_gb=args.memory_gb, progress=progress)
    if args.plot:
        plot(result, args.plot, overwrite=args.overwrite)
    if args.json:
        doc = result.to_dict()
        if args.plot:
            doc["plot"] = args.plot
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(result.lines()))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def add_analyze(sub):
    p = sub.add_parser("analyze", help="per-component L2 distance to a base (or the pool mean) and delta cosines",
                       description="Streams key by key in fp64 within --memory-gb; the seeds' 'L2 diagrams'.")
    p.add_argument("files", nargs="+")
    p.add_argument("--base", help="reference model (default: the mean of the given models)")
    p.add_argument("--plot", metavar="OUT.png", help="write bar charts + cosine heatmaps per component "
                                                     "(.png, .svg, .pdf, .jpg, .webp)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--memory-gb", type=memory_gb_arg, default=1.0, help="budget for the resident row chunks")
    p.set_defaults(func=cmd_analyze)
