"""What the tab's form means, without gradio: the pieces that map its widgets to and from a Recipe.

The tab has one shape of a recipe, `recipe.Recipe`: it reads its widgets, by field name, into a
Recipe, whose `to_dict` is validated by `recipe.parse_recipe` (so the tab, the CLI and the XYZ axes
accept exactly the same recipes) and is the JSON the tab shows and saves; it fills its widgets back
from any Recipe (a saved file, or the one embedded in a merged checkpoint). Here: component rows <->
component rules, the fields the form carries without showing them, the LoRA rows.
"""
from __future__ import annotations

import functools
import types

from ..core.naming import default_output_name
from ..core.recipe import ComponentRule, Recipe
from ..io import arch as archmod
from ..methods import METHODS

MAIN, OWN, TAKE, BASE = "main", "own", "take", "base"
MODES = {MAIN: "Main method", OWN: "Own method", TAKE: "Take from a model", BASE: "Keep base"}
MODE_OF_LABEL = {label: mode for mode, label in MODES.items()}
COMPONENT_TITLES = {"unet": "UNET", "te0": "TE0 (CLIP-L)", "te1": "TE1 (OpenCLIP)", "vae": "VAE"}


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


def component_rule(mode: str, take=None, method=None, params=None, pool=None, carried=None) -> ComponentRule | None:
    """The recipe rule of one component row; None for "main method" (no rule). `carried` holds the
    base / blocks of a loaded recipe's own-method rule, which the row shows no widget for."""
    if mode == TAKE:
        return ComponentRule(take=take)
    if mode == BASE:
        return ComponentRule(take="base")
    if mode != OWN:
        return None
    carried = carried or {}
    blocks = carried.get("blocks")
    return ComponentRule(method=method, params=clean_params(method, params or {}), pool=list(pool or []) or None,
                         base=carried.get("base") or None, blocks=dict(blocks) if blocks else None)


def component_mode(rule: ComponentRule | None) -> str:
    """The row mode that shows `rule` (the inverse of `component_rule`)."""
    if rule is None:
        return MAIN
    if rule.take == "base":
        return BASE
    return TAKE if rule.take else OWN


def arch_components(rules: dict, arch: str | None) -> dict:
    """The rules of the components the pool's architecture has (rows of other components are ignored;
    "main method" rows write no rule)."""
    return {name: rules[name] for name in components_of(arch) if rules.get(name) is not None}


def component_carry(recipe: Recipe) -> dict:
    """Per own-method component, the base / blocks the rows do not show (carried back by `component_rule`)."""
    return {name: {"base": rule.base, "blocks": dict(rule.blocks) if rule.blocks else None}
            for name, rule in recipe.components.items()
            if component_mode(rule) == OWN and (rule.base or rule.blocks)}


def form_carry(recipe: Recipe) -> dict:
    """The recipe fields the form shows no widget for (note, fermat, …, and the per-component output
    dtypes beside the radio's default), kept as loaded. LoRAs have their rows."""
    carry = {k: v for k, v in recipe.extra.items() if k != "loras"}
    if isinstance(recipe.dtype, dict):
        carry["dtype"] = {k: v for k, v in recipe.dtype.items() if k != "default"}
    return carry


def carried_dtype(default: str, carry: dict) -> str | dict:
    """The recipe's `dtype`: the radio's value, as the default beside any carried per-component dtypes."""
    per_component = (carry or {}).get("dtype")
    return {**per_component, "default": default} if isinstance(per_component, dict) else default


def carried_extra(carry: dict, loras: list) -> dict:
    """The recipe's `extra`: the carried fields, then the LoRA rows' `loras` (when any)."""
    extra = {k: v for k, v in (carry or {}).items() if k not in ("loras", "dtype")}
    if loras:
        extra["loras"] = [dict(entry) for entry in loras]
    return extra


def slots(prefix: str, widgets) -> dict:
    """Widgets of a repeated group by field name: prefix.0, prefix.1, …"""
    return {f"{prefix}.{i}": w for i, w in enumerate(widgets)}


def slot_values(named: dict, prefix: str, count: int) -> list:
    """The values of a group named with `slots`, in slot order."""
    return [named[f"{prefix}.{i}"] for i in range(count)]


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
