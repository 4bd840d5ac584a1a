"""The output file's metadata: the recipe, the inputs and their hashes, and the merge lineage
(WebUI's sd_merge_models / sd_merge_recipe, modelspec)."""
from __future__ import annotations

import json

from .. import __version__
from ..io.hashes import HashCache, legacy_model_hash
from ..io.strict_json import loads as strict_loads
from .lineage import TRUNCATED_KEY as LINEAGE_NOTE, bound_lineage
from .plan_data import Plan
from .run_options import RunOptions


def output_metadata(plan: Plan, hashes: dict) -> dict:
    recipe = plan.recipe
    inputs = [{"name": s.name, "sha256": hashes.get(s.path)} for s in plan.sources]
    lineage = {}
    for src in plan.sources:
        for k, v in _json_field(src.header.metadata.get("sd_merge_models")).items():
            lineage.setdefault(k, v)
        sha = hashes.get(src.path)
        if sha:
            lineage[sha] = {"name": src.name, "legacy_hash": _safe_legacy_hash(src.path),
                            "sd_merge_recipe": _json_field(src.header.metadata.get("sd_merge_recipe")) or None}
    lineage, truncated = bound_lineage(lineage, (hashes.get(src.path) for src in plan.sources))
    webui_recipe = {"type": "astolfo_merge", "method": recipe.method, "params": recipe.params,
                    "pool": [hashes.get(plan.sources[[s.name for s in plan.sources].index(n)].path) for n in recipe.pool],
                    "recipe": recipe.to_dict()}
    meta = {
        "format": "pt",
        "astolfo_merge_version": __version__,
        "astolfo_merge_recipe": recipe.to_json(indent=None),
        "astolfo_merge_inputs": json.dumps(inputs),
        "sd_merge_recipe": json.dumps(webui_recipe),
        "sd_merge_models": json.dumps(lineage),
        "modelspec.architecture": {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2",
                                   "sdxl": "stable-diffusion-xl-v1-base"}[plan.arch],
        "modelspec.prediction_type": {"epsilon": "epsilon", "v": "v", "edm-v": "v", "edm": "epsilon"}[plan.prediction],
    }
    if truncated:
        meta[LINEAGE_NOTE] = truncated
    return meta


def _json_field(value) -> dict:
    if isinstance(value, dict):
        return value
    try:
        parsed = strict_loads(value) if isinstance(value, str) else {}
    except ValueError:   # JSONInputError too: hostile lineage (deep, huge) is dropped, not a crash
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _safe_legacy_hash(path):
    try:
        return legacy_model_hash(path)
    except OSError:
        return None


def input_hashes(plan: Plan, options: RunOptions, report) -> dict:
    if not options.hash_inputs:
        return {}
    cache = options.hash_cache or HashCache()
    out = {}
    for n, src in enumerate(plan.sources):
        if cache.get(src.path) is None:
            report(f"hashing input {n + 1}/{len(plan.sources)}: {src.name}", stage=f"hashing inputs {n + 1}/{len(plan.sources)}")
        out[src.path] = cache.sha256(src.path)
    return out
