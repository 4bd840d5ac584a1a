"""`python -m astolfo_merge rebasin-spec`: what the Re-Basin spec permutes, per permutation group.

Merging with Re-Basin goes through recipes (`"method": "rebasin"` / `"basin_sum"`, or `"fermat": true`
on any merge with a base); this command only shows the function-preserving spec behind them.
"""
from __future__ import annotations

import json
from collections import Counter


def describe(node) -> str:
    """One line for a spec tree: how its range splits and what may move."""
    if not node.children:
        return f"any order of {node.size}"
    sizes = sorted({c.size for c in node.children})
    movable = sum(len(c) for c in node.classes)
    inner = describe(node.children[0]) if len({describe(c) for c in node.children}) == 1 else "mixed"
    return (f"{len(node.children)} blocks of {'/'.join(map(str, sizes))} ({movable} exchangeable), "
            f"each: {inner}")


def cmd_rebasin_spec(args):
    from ..methods.rebasin.spec import build_spec
    spec = build_spec(args.arch, args.scale)
    rows = [{"group": v.name, "kind": v.kind, "size": v.size, "facets": list(v.facets), "uses": len(v.members),
             "structure": describe(v.tree)} for v in spec.variables.values()]
    if args.json:
        print(json.dumps({"arch": spec.arch, "scale": spec.scale, "groupnorm_groups": spec.groups, "groups": rows,
                          "unpermuted_keys": list(spec.unpermuted)}, indent=2))
        return 0
    kinds = ", ".join(f"{n} {k}" for k, n in Counter(v.kind for v in spec.variables.values()).items())
    print(f"{args.arch} 1/{args.scale}: {len(spec.variables)} permutation groups ({kinds}); "
          f"{len(spec.axes)} UNet keys permuted, {len(spec.unpermuted)} kept")
    for r in rows:
        facets = f" facets {'+'.join(r['facets'])}" if len(r["facets"]) > 1 else ""
        print(f"  {r['group']}: {r['kind']}, {r['size']} units{facets}, {r['uses']} uses — {r['structure']}")
    return 0


def add(sub):
    p = sub.add_parser("rebasin-spec", help="list the function-preserving Re-Basin permutation groups of a UNet")
    p.add_argument("--arch", default="sdxl", choices=["sd1", "sd2", "sdxl"])
    p.add_argument("--scale", type=int, default=1, help="layout scale (1 = full size)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rebasin_spec)
