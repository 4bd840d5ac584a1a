"""What the tab's form means, without gradio: a `FormState` and its two-way mapping to a recipe.

The tab reads its widgets into a FormState, turns it into a recipe document (validated by
`recipe.parse_recipe`, so the tab, the CLI and the XYZ axes accept exactly the same recipes), and
fills its widgets back from any recipe (a saved file, or the one embedded in a merged checkpoint).
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field

from . import arch as archmod
from .methods import METHODS
from .naming import default_output_name
from .recipe import Recipe

MAIN, OWN, TAKE, BASE = "main", "own", "take", "base"
MODES = {MAIN: "Main method", OWN: "Own method", TAKE: "Take from a model", BASE: "Keep base"}
MODE_OF_LABEL = {label: mode for mode, label in MODES.items()}
COMPONENT_TITLES = {"unet": "UNET", "te0": "TE0 (CLIP-L)", "te1": "TE1 (OpenCLIP)", "vae": "VAE"}


@dataclass
class ComponentChoice:
    """How one component is produced (see recipe `components`)."""
    mode: str = MAIN
    take: str | None = None          # TAKE: the file to copy the component from
    method: str | None = None        # OWN: its own method, params and (optional) pool
    params: dict = field(default_factory=dict)
    pool: list = field(default_factory=list)
    base: str | None = None          # OWN, from a loaded recipe only: the form shows no widget for these,
    blocks: dict | None = None       # it carries them unchanged


@dataclass
class FormState:
    pool: list = field(default_factory=list)
    method: str = "weighted_sum"
    params: dict = field(default_factory=dict)
    base: str | None = None
    blocks_enabled: bool = False
    blocks: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict)   # name -> ComponentChoice
    output: str | None = None
    dtype: str = "fp16"
    precision: str = "fp64"
    seed: int = 0
    allow_mixed_prediction: bool = False
    nonfinite: str = "fail"
    position_ids: str = "reset"
    extra: dict = field(default_factory=dict)        # recipe fields the form does not show, kept as loaded
    loras: list = field(default_factory=list)        # the recipe's `loras` (lora.py), from the LoRA rows


@functools.lru_cache(maxsize=None)
def components_of(arch: str | None) -> tuple:
    """The components an architecture has (SD1: unet, te0, vae; SD2: unet, te1, vae; SDXL: all four)."""
    if arch is None:
        return archmod.COMPONENTS
    present = {spec.component for spec in archmod.layout(arch, 1).values()}
    return tuple(c for c in archmod.COMPONENTS if c in present)


def shown_params(method) -> list:
    """The parameters a form shows for `method` (presets' fixed values are not editable)."""
    return [p for p in method.params if p.name not in method.fixed]


def clean_params(method_name: str, params: dict) -> dict:
    """Only the method's own, non-empty parameters (None means 'use the default')."""
    method = METHODS.get(method_name)
    if method is None:
        return dict(params)
    names = {p.name for p in shown_params(method)}
    return {k: v for k, v in params.items() if k in names and v is not None}


def recipe_doc(state: FormState, arch: str | None = None) -> dict:
    """The recipe document the form describes (validate it with `parse_recipe`).

    Component rules are written only for components the pool's architecture has and only when
    they differ from "main method".
    """
    doc = {"pool": list(state.pool), "method": state.method, "params": clean_params(state.method, state.params)}
    if state.base:
        doc["base"] = state.base
    if state.blocks_enabled and state.blocks:
        doc["blocks"] = dict(state.blocks)
    components = {}
    for name in components_of(arch):
        choice = state.components.get(name)
        if choice is None or choice.mode == MAIN:
            continue
        if choice.mode == TAKE:
            components[name] = {"take": choice.take}
        elif choice.mode == BASE:
            components[name] = {"take": "base"}
        else:
            rule = {"method": choice.method, "params": clean_params(choice.method, choice.params)}
            if choice.pool:
                rule["pool"] = list(choice.pool)
            if choice.base:
                rule["base"] = choice.base
            if choice.blocks:
                rule["blocks"] = dict(choice.blocks)
            components[name] = rule
    if components:
        doc["components"] = components
    per_component = state.extra.get("dtype")    # a loaded recipe's per-component dtypes; the radio is the default
    dtype = {**per_component, "default": state.dtype} if isinstance(per_component, dict) else state.dtype
    doc.update({"seed": int(state.seed), "precision": state.precision, "dtype": dtype})
    if state.output:
        doc["output"] = state.output
    if state.allow_mixed_prediction:
        doc["allow_mixed_prediction"] = True
    if state.nonfinite != "fail":
        doc["nonfinite"] = state.nonfinite
    if state.position_ids != "reset":
        doc["position_ids"] = state.position_ids
    doc.update({k: v for k, v in state.extra.items() if k not in ("loras", "dtype")})
    if state.loras:
        doc["loras"] = [dict(entry) for entry in state.loras]
    return doc


def state_from_recipe(recipe: Recipe) -> FormState:
    """The form that reproduces `recipe` (every field the recipe has; defaults elsewhere)."""
    state = FormState(pool=list(recipe.pool), method=recipe.method, params=dict(recipe.params), base=recipe.base,
                      blocks_enabled=bool(recipe.blocks), blocks=dict(recipe.blocks), output=recipe.output,
                      dtype=recipe.dtype_of("default"), precision=recipe.precision, seed=recipe.seed,
                      allow_mixed_prediction=recipe.allow_mixed_prediction, nonfinite=recipe.nonfinite,
                      position_ids=recipe.position_ids,
                      extra={k: v for k, v in recipe.extra.items() if k != "loras"}
                      | ({"dtype": {k: v for k, v in recipe.dtype.items() if k != "default"}}
                         if isinstance(recipe.dtype, dict) else {}),
                      loras=[dict(entry) for entry in recipe.extra.get("loras") or []])
    for name, rule in recipe.components.items():
        if rule.take == "base":
            state.components[name] = ComponentChoice(BASE)
        elif rule.take:
            state.components[name] = ComponentChoice(TAKE, take=rule.take)
        else:
            state.components[name] = ComponentChoice(OWN, method=rule.method, params=dict(rule.params or {}),
                                                     pool=list(rule.pool or []), base=rule.base,
                                                     blocks=dict(rule.blocks) if rule.blocks else None)
    return state


def auto_output_name(pool, method) -> str | None:
    """naming.default_output_name for a pool and method (None while the pool is empty)."""
    if not pool:
        return None
    return default_output_name(types.SimpleNamespace(pool=list(pool), method=method))


def merge_selection(previous: list, shown: list, checked: list) -> list:
    """The pool after a click in a filtered checkbox list, in selection order.

    Models hidden by the filter keep their state; newly checked ones go to the end (pool order
    matters: A/B of weighted_sum, per-model weights).
    """
    shown_set, checked_set = set(shown), set(checked)
    kept = [n for n in previous if n not in shown_set or n in checked_set]
    return kept + [n for n in checked if n not in set(kept)]


# -- LoRA rows ---------------------------------------------------------------------------------
LORA_ROWS = 4                 # rows the tab shows: (file, strength, when)
LORA_WHEN = ("after", "before")


def lora_rows(loras: list, n: int = LORA_ROWS) -> tuple:
    """(n rows of (file | None, strength, when), carry) for the tab's LoRA rows. The carry keeps what
    rows do not show — per-block strengths and `models` by file, entries beyond `n` — unchanged."""
    rows = [(e["file"], float(e.get("strength", 1.0)), e.get("when", "after")) for e in loras[:n]]
    rows += [(None, 1.0, "after")] * (n - len(rows))
    fields = {e["file"]: {k: e[k] for k in ("blocks", "models") if e.get(k)} for e in loras[:n]}
    return rows, {"fields": {f: v for f, v in fields.items() if v}, "overflow": [dict(e) for e in loras[n:]]}


def loras_from_rows(rows, carry=None) -> list:
    """The recipe's `loras` from the rows (empty file: no entry), with the carried fields put back."""
    carry = carry or {}
    out = []
    for file, strength, when in rows:
        if not file or file == "(none)":
            continue
        entry = {"file": file, "strength": float(1.0 if strength is None else strength),
                 "when": when if when in LORA_WHEN else "after"}
        for key, value in (carry.get("fields") or {}).get(file, {}).items():
            if key != "models" or entry["when"] == "before":
                entry[key] = value
        out.append(entry)
    return out + [dict(e) for e in carry.get("overflow") or []]
