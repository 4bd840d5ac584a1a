"""`python -m astolfo_merge repair` and `swap`: thin clients of repair.py and swap.py."""
from __future__ import annotations

import json
import sys

from .common import DEFAULT_MODELS_DIR, progress_printer


def cmd_repair(args):
    from ..features.repair_write import default_output, repair_file
    output = args.output or default_output(args.file)
    result = repair_file(args.file, args.base, output, keep_ema=args.keep_ema,
                         position_ids="omit" if args.omit_position_ids else "reset",
                         overwrite=args.overwrite, hash_base=not args.no_hash, dry_run=args.dry_run)
    if args.dry_run:
        plan = result
        if args.json:
            print(json.dumps({"file": plan.path, "base": plan.base_path, "output": output,
                              "needs_base": plan.needs_base, "filled": plan.filled, "reshaped": plan.reshaped,
                              "renamed": plan.renamed, "position_ids": plan.position_ids,
                              "dropped": [{"key": k, "kind": t, "bytes": b} for k, t, b in plan.dropped],
                              "kept": plan.kept, "keys": len(plan.steps), "bytes": plan.output_bytes,
                              "warnings": plan.warnings}, indent=2))
        else:
            print("\n".join(plan.lines()))
            print(f"dry run: nothing written (would write {output})"
                  + ("; needs --base to fill the missing keys" if plan.needs_base else ""))
        return 0
    for warning in result.plan.warnings:
        print(f"  warning: {warning}", file=sys.stderr)
    print(result.summary())
    return 0


def cmd_swap(args):
    from ..features.swap import swap
    result = swap(args.unet, args.output, te0=args.te0, te1=args.te1, vae=args.vae, models_dir=args.models_dir,
                  dtype=args.dtype, overwrite=args.overwrite, hash_inputs=not args.no_hash,
                  progress=None if args.quiet else progress_printer())
    for line in result.log:
        print(f"  note: {line}", file=sys.stderr)
    print(result.summary())
    return 0


def add_repair(sub):
    p = sub.add_parser("repair", help="fill a pruned / 'BROKEN' checkpoint's missing keys from a base (never strips)",
                       description="Output key set = the canonical keys of the detected architecture + the file's "
                                   "markers. The file's own tensors are copied bit for bit; missing keys come from "
                                   "--base; position ids are rewritten as int64 0..76.")
    p.add_argument("file")
    p.add_argument("--base", help="a complete model of the same architecture, for the missing keys")
    p.add_argument("--output", "-o", help="output file (default: FILE-repaired.safetensors)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--keep-ema", action="store_true", help="keep model_ema.* keys (dropped by default)")
    p.add_argument("--omit-position-ids", action="store_true", help="leave TE0 position ids out instead of writing 0..76")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-hash", action="store_true", help="do not hash the base for the repair record")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    p.set_defaults(func=cmd_repair)


def add_swap(sub):
    p = sub.add_parser("swap", help="this file's UNET + that file's TE0/TE1/VAE, as one new checkpoint",
                       description="Components not named come from the --unet file (as do marker keys). Runs as a "
                                   "recipe (n_average over [UNET file] + components.*.take), embedded in the output.")
    p.add_argument("--unet", required=True, help="the file whose UNET (and unnamed components) are kept")
    p.add_argument("--te0", help="file to take TE0 (CLIP-L) from")
    p.add_argument("--te1", help="file to take TE1 (OpenCLIP) from")
    p.add_argument("--vae", help="file to take the VAE from")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, help="where relative file names are looked up first")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="output dtype (default: the UNET file's)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-hash", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_swap)
