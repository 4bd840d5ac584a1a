"""`python -m astolfo_merge bake MODEL --lora X:0.8 [--lora Y:0.5] -o OUT`: LoRA bake-in from the command line.

It builds the same recipe the tab would (the model alone in the pool, `n_average` over one model =
the model itself, the LoRAs under "loras") and runs it through the ordinary plan and engine, so the
output carries the recipe and can be re-run with `merge OUT.safetensors`.
"""
from __future__ import annotations

import os
import sys
import threading

from ..errors import RecipeError
from .common import memory_gb_arg, progress_printer


def parse_lora_arg(text: str, when: str = "after") -> dict:
    """'file[:strength]' -> a recipe `loras` entry (a trailing ':number' is the strength)."""
    name, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            name, strength = head, float(tail)
        except ValueError:
            pass
    if not name.strip():
        raise RecipeError("--lora", f"{text!r} names no file")
    return {"file": os.path.abspath(name) if os.path.isfile(name) else name, "strength": strength, "when": when}


def bake_recipe(model: str, loras: list, dtype: str = "fp16", precision: str = "fp64") -> dict:
    return {"pool": [os.path.basename(model)], "method": "n_average", "dtype": dtype, "precision": precision,
            "loras": loras}


def cmd_bake(args):
    from ..core.engine import run_merge
    from ..core.plan import build_plan
    from ..core.recipe import parse_recipe
    from ..core.run_options import RunOptions

    models_dir = args.models_dir or os.path.dirname(os.path.abspath(args.model))
    loras = [parse_lora_arg(text) for text in args.lora]
    recipe = parse_recipe(bake_recipe(args.model, loras, args.dtype, args.precision))
    plan = build_plan(recipe, models_dir, args.output)
    print(f"baking {len(loras)} LoRA file(s) into {os.path.basename(args.model)} -> {plan.output}", file=sys.stderr)
    for line in plan.log:
        print(f"  note: {line}", file=sys.stderr)
    options = RunOptions(device=args.device, memory_gb=args.memory_gb, overwrite=args.overwrite, hash_inputs=not args.no_hash)
    result = run_merge(plan, options, progress=None if args.quiet else progress_printer(), cancel=threading.Event())
    print(result.summary())
    return 0


def add(sub):
    p = sub.add_parser("bake", help="bake LoRA / LyCORIS files into a checkpoint at a strength")
    p.add_argument("model", help="the checkpoint to bake into")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH]",
                   help="a LoRA / LyCORIS file and its strength (default 1); repeat for several")
    p.add_argument("--output", "-o", required=True, help="output path")
    p.add_argument("--models-dir", help="folder to resolve file names in (default: the model's folder; LoRAs are "
                                        "also looked up in the WebUI's Lora / LyCORIS folders next to it)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--precision", default="fp64", choices=["fp64", "fp32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--memory-gb", type=memory_gb_arg, default=1.5)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-hash", action="store_true", help="do not hash inputs for the metadata")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_bake)
