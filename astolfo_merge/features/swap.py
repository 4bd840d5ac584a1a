"""Component swap: "this file's UNET + that file's TE0 + ..." (REPAIR.md §10.7, the seeds' TE swaps).

Not a separate writer: it is a recipe — an N-way average over the one UNET file (exact: x·1/1)
with `components.<name>.take` for every other file named — run through plan + engine, so the
output carries the recipe, position ids are reset and markers come from the UNET file like in
any merge.
"""
from __future__ import annotations

import os

from ..core.engine import run_merge
from ..core.plan import build_plan
from ..core.plan_inputs import load_source, resolve_file
from ..core.recipe import OUTPUT_DTYPES, parse_recipe
from ..core.run_options import RunOptions
from ..errors import ArchitectureError, RecipeError
from ..io.header import NAME_OF
from .repair_plan import dominant_float_dtype

SWAPPABLE = ("te0", "te1", "vae")
_RECIPE_DTYPE = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}


def swap_recipe(unet: str, takes: dict, dtype: str) -> dict:
    """The recipe document: UNET (and every component not named) from `unet`, the rest taken."""
    unknown = sorted(set(takes) - set(SWAPPABLE))
    if unknown:
        raise RecipeError(f"components.{unknown[0]}", f"cannot be swapped (swappable: {', '.join(SWAPPABLE)})")
    doc = {"pool": [unet], "method": "n_average", "dtype": dtype,
           "note": "component swap: " + ", ".join([f"unet from {unet}"] + [f"{c} from {f}" for c, f in takes.items()])}
    components = {comp: {"take": name} for comp, name in takes.items() if name}
    if components:
        doc["components"] = components
    return doc


def _check_donors(unet_source, takes: dict, models_dir):
    """Each named file must hold that component complete, in the UNET file's architecture."""
    for comp, name in takes.items():
        source = load_source(name, resolve_file(name, models_dir, f"components.{comp}.take"))
        ident = source.identity
        status = ident.components.get(comp)
        if status is None:
            raise ArchitectureError(f"{name} is {ident.title}, which has no {comp.upper()}; "
                                    f"{unet_source.name} is {unet_source.identity.title}")
        if status.status != "complete":
            raise ArchitectureError(f"{name}: its {comp.upper()} is {status.status} ({status.present}/{status.expected} keys); "
                                    "repair it first (python -m astolfo_merge repair) or choose another file")


def default_dtype(source) -> str:
    name = NAME_OF[dominant_float_dtype(source.header)]
    return _RECIPE_DTYPE.get(name, "fp32")


def swap(unet: str, output: str, te0=None, te1=None, vae=None, models_dir=None, dtype=None,
         overwrite=False, hash_inputs=True, progress=None):
    """Write UNET of `unet` + the named components of the other files into `output`."""
    takes = {c: f for c, f in (("te0", te0), ("te1", te1), ("vae", vae)) if f}
    if not takes:
        raise RecipeError("components", "name at least one of --te0 / --te1 / --vae to swap in")
    main = load_source(unet, resolve_file(unet, models_dir, "pool[0]"))
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise RecipeError("dtype", f"must be one of {', '.join(OUTPUT_DTYPES)}")
    _check_donors(main, takes, models_dir)
    recipe = parse_recipe(swap_recipe(unet, takes, dtype or default_dtype(main)))
    plan = build_plan(recipe, models_dir, os.path.abspath(output))
    return run_merge(plan, RunOptions(overwrite=overwrite, hash_inputs=hash_inputs), progress=progress)
