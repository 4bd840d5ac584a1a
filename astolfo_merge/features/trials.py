"""Merge-then-XYZ: recipe variants merged to real files, cached by recipe hash (A1111.md §6.4).

An XYZ axis value ("alpha 0.3", or a recipe file) becomes a recipe; its canonical hash names the
output `_merger_trials/<method>-<hash>.safetensors` in the host's models folder, so a cell whose
recipe was merged before (in this grid or an earlier one) is never merged again. The merge runs
as an ordinary job of the host (queued behind a running one), so the tab shows its progress.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import threading

from ..core import jobs
from ..core.plan import build_plan
from ..core.recipe import Recipe, load_recipe, parse_recipe
from ..core.stages import validate_loras
from ..errors import RecipeError
from ..io.paths import Folders, confine_recipe
from ..methods import get_method

TRIALS_DIR = "_merger_trials"          # not a dot-folder: the WebUI skips those when listing
TEMPLATE_FILE = "xyz-template.json"
_LOCK = threading.Lock()
# What the [Merger] axes did in the running grid (the WebUI glue): whether a cell merged into the
# loaded model, and the live merge loaded before the grid (brought back afterwards). Kept here, in
# the package, so a wrapper installed before a "Reload UI" and the reloaded glue share it.
GRID: dict = {}


def recipe_key(recipe: Recipe) -> str:
    """sha256 of the recipe without its output name: equal merges get equal keys."""
    doc = recipe.to_dict()
    doc.pop("output", None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def trial_name(recipe: Recipe) -> str:
    return f"{TRIALS_DIR}/{recipe.method}-{recipe_key(recipe)[:16]}.safetensors"


def save_template(host, doc: dict) -> str:
    """Store the tab's current recipe as the template the "[Merger] alpha" axis varies."""
    recipe = parse_recipe(doc)
    folder = host.recipes_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, TEMPLATE_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(recipe.to_json())
    return path


def load_template(host) -> Recipe:
    path = os.path.join(host.recipes_dir(), TEMPLATE_FILE)
    if not os.path.isfile(path):
        raise RecipeError("(XYZ template)", "no template yet: compose a merge in the AstolfoMerge tab and press "
                                            "'Use as XYZ template'")
    return load_recipe(path)


def alpha_param(recipe: Recipe) -> str:
    """The parameter "[Merger] alpha" sets: the method's block parameter, else one named alpha."""
    method = get_method(recipe.method)
    if method.block_param:
        return method.block_param
    if any(p.name == "alpha" for p in method.params):
        return "alpha"
    raise RecipeError("method", f"method '{recipe.method}' has no alpha-like parameter to vary")


def with_alpha(recipe: Recipe, value: float) -> Recipe:
    """The template with its alpha-like parameter set to `value` (validated like any recipe)."""
    doc = recipe.to_dict()
    doc.pop("output", None)
    doc["params"] = {**doc.get("params", {}), alpha_param(recipe): float(value)}
    return parse_recipe(doc)


def recipe_files(host) -> list:
    """Recipe files the "[Merger] recipe" axis offers (names relative to the recipes folder)."""
    folder = host.recipes_dir()
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(".json") and n != TEMPLATE_FILE)


def load_named_recipe(host, name: str) -> Recipe:
    """A recipe file of the recipes folder ("x" finds x.json); names outside it are refused."""
    folders = Folders(host)
    path = folders.recipe(name, "(XYZ recipe)")
    if not os.path.lexists(path) and not name.lower().endswith(".json"):
        path = folders.recipe(name + ".json", "(XYZ recipe)")
    if not os.path.lexists(path):
        raise RecipeError("(XYZ recipe)", f"recipe file {name!r} not found in {host.recipes_dir()}")
    return load_recipe(path)


def check(host, recipe: Recipe):
    """Resolve every file of `recipe` now (the grid should fail before its first image)."""
    confine_recipe(host, recipe)
    build_plan(host.resolved(recipe), host.models_dir(), None)


def live_plan(host, recipe: Recipe):
    """The plan of a cell merged into the loaded model (live.py): no output file."""
    confine_recipe(host, recipe)
    return build_plan(host.resolved(recipe), host.models_dir(), None)


def trials_dir(host) -> str:
    return os.path.join(host.models_dir(), TRIALS_DIR)


def trial_files(host) -> list:
    """The cached cell files (path, bytes) in the trials folder."""
    folder = trials_dir(host)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors") and os.path.isfile(path) and not os.path.islink(path):
            found.append((path, os.path.getsize(path)))
    return found


def empty_trials(host, keep=()) -> tuple:
    """Delete the cached cell files (not `keep`, e.g. the file the host has loaded): (count, bytes) freed."""
    kept = {os.path.realpath(p) for p in keep if p}
    count = freed = 0
    with _LOCK:
        for path, size in trial_files(host):
            if os.path.realpath(path) in kept:
                continue
            os.remove(path)
            count, freed = count + 1, freed + size
    if count:
        host.refresh()
    return count, freed


def run_trial(host, recipe: Recipe, on_done=None, timeout=None) -> tuple:
    """(path, merged now?) of the file for `recipe`, merging it unless that file exists already."""
    recipe = copy.deepcopy(recipe)
    recipe.output = trial_name(recipe)
    path = os.path.join(host.models_dir(), recipe.output)
    with _LOCK:
        if os.path.isfile(path):
            return path, False
        os.makedirs(os.path.dirname(path), exist_ok=True)
        confine_recipe(host, recipe, path)
        plan = build_plan(host.resolved(recipe), host.models_dir(), path)
        job = jobs.manager(host.key).submit(plan, host.run_options(), title=f"XYZ cell: {recipe.output}",
                                            on_done=on_done, queue=True)
        job.wait(timeout)
    return path, True


def with_lora_strength(recipe, strength: float, index: int = 0):
    """The recipe with `loras[index].strength` set (the "[Merger] LoRA strength" XYZ axis; like
    with_alpha: a Recipe in, a validated Recipe out, output name dropped)."""
    doc = recipe.to_dict()
    doc.pop("output", None)
    loras = [dict(entry) for entry in doc.get("loras") or []]
    if not 0 <= index < len(loras):
        raise RecipeError("loras", f"has no entry {index} (the recipe lists {len(loras)} LoRA file(s))")
    loras[index]["strength"] = float(strength)
    validate_loras(loras)
    return parse_recipe({**doc, "loras": loras})
