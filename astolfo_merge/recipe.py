"""The recipe: the one description of a merge (CLI, tab, embedded in every output).

Validation happens here, before any work, with errors that name the field. File names are
resolved later by the plan (they need a models folder).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from .arch import COMPONENTS
from .errors import RecipeError
from .methods import get_method

RECIPE_VERSION = 1
PRECISIONS = ("fp32", "fp64")
OUTPUT_DTYPES = ("fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
DEFAULT_DTYPE = "fp16"   # also what a per-component dtype object gives the components it does not name
NONFINITE = ("fail", "skip", "keep", "zero")  # inputs: fail / skip that input for that key / keep; zero = nan_to_num outputs
TOP_FIELDS = {"version", "pool", "base", "method", "params", "blocks", "components", "seed", "precision",
              "dtype", "output", "allow_mixed_prediction", "nonfinite", "position_ids", "loras", "fermat", "note"}
COMPONENT_FIELDS = {"take", "method", "params", "pool", "base", "blocks"}
_RESERVED = re.compile(r"^(con|prn|aux|nul|com\d|lpt\d)(\..*)?$", re.I)


@dataclass
class ComponentRule:
    """How one component is produced: `take` a file (or "base"), else merge with method/pool/base."""
    take: str | None = None
    method: str | None = None
    params: dict | None = None
    pool: list | None = None
    base: str | None = None
    blocks: dict | None = None

    def to_dict(self):
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Recipe:
    pool: list
    method: str
    params: dict = field(default_factory=dict)
    base: str | None = None
    blocks: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict)    # name -> ComponentRule
    seed: int = 0
    precision: str = "fp64"
    dtype: str | dict = DEFAULT_DTYPE   # one output dtype, or component (or "default") -> dtype
    output: str | None = None
    allow_mixed_prediction: bool = False
    nonfinite: str = "fail"
    position_ids: str = "reset"
    extra: dict = field(default_factory=dict)         # fields owned by other features (loras, fermat, note)

    def to_dict(self) -> dict:
        out = {"version": RECIPE_VERSION, "pool": list(self.pool), "method": self.method, "params": dict(self.params)}
        if self.base is not None:
            out["base"] = self.base
        if self.blocks:
            out["blocks"] = dict(self.blocks)
        if self.components:
            out["components"] = {k: v.to_dict() for k, v in self.components.items()}
        out.update({"seed": self.seed, "precision": self.precision,
                    "dtype": dict(self.dtype) if isinstance(self.dtype, dict) else self.dtype})
        if self.output is not None:
            out["output"] = self.output
        if self.allow_mixed_prediction:
            out["allow_mixed_prediction"] = True
        if self.nonfinite != "fail":
            out["nonfinite"] = self.nonfinite
        if self.position_ids != "reset":
            out["position_ids"] = self.position_ids
        out.update(self.extra)
        return out

    def to_json(self, indent=2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def dtype_of(self, component: str) -> str:
        """The output dtype name of `component`'s floating-point weights."""
        if isinstance(self.dtype, str):
            return self.dtype
        return self.dtype.get(component, self.dtype.get("default", DEFAULT_DTYPE))

    def files(self) -> list:
        """Every file name the recipe mentions (pool, base, component pools and takes)."""
        names = list(self.pool) + ([self.base] if self.base else [])
        for rule in self.components.values():
            names += list(rule.pool or []) + ([rule.base] if rule.base else [])
            if rule.take and rule.take != "base":
                names.append(rule.take)
        return list(dict.fromkeys(names))


def _str_list(value, where) -> list:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise RecipeError(where, "must be a non-empty list of file names")
    return list(value)


def _opt_str(value, where):
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise RecipeError(where, "must be a file name")
    return value


def _check_method(name, params, pool_len, has_base, where):
    method = get_method(name, f"{where}method" if where else "method")
    resolved = method.resolve_params(params, f"{where}params")
    if pool_len < method.min_models:
        raise RecipeError(f"{where}pool", f"method '{name}' needs at least {method.min_models} models, got {pool_len}")
    if method.max_models is not None and pool_len > method.max_models:
        raise RecipeError(f"{where}pool", f"method '{name}' takes at most {method.max_models} models, got {pool_len}")
    if method.needs_base and not has_base:
        raise RecipeError(f"{where}base", f"method '{name}' needs a base model")
    return resolved


def _check_blocks(blocks, where):
    if blocks is None:
        return {}
    if not isinstance(blocks, dict):
        raise RecipeError(where, "must be an object of block name -> number")
    out = {}
    for name, value in blocks.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RecipeError(f"{where}.{name}", f"must be a number, got {value!r}")
        out[str(name).upper()] = float(value)
    return out


def check_output_name(name, where="output") -> str:
    """An output name stays inside the models folder: no absolute path, no '..', no reserved names."""
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(where, "must be a file name")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise RecipeError(where, f"{name!r} is an absolute path; give a name inside the models folder")
    parts = re.split(r"[\\/]", name)
    if any(p in ("..", ".", "") for p in parts):
        raise RecipeError(where, f"{name!r} escapes or is not a plain name inside the models folder")
    if any(_RESERVED.match(p) or p.startswith(".") for p in parts) or "\x00" in name:
        raise RecipeError(where, f"{name!r} is a reserved or hidden file name")
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    return name


def parse_recipe(doc) -> Recipe:
    """Validate a recipe document (dict or JSON text); raise RecipeError naming the field."""
    if isinstance(doc, (str, bytes)):
        try:
            doc = json.loads(doc)
        except json.JSONDecodeError as exc:
            raise RecipeError("(document)", f"is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RecipeError("(document)", "must be a JSON object")
    unknown = sorted(set(doc) - TOP_FIELDS)
    if unknown:
        raise RecipeError(unknown[0], f"unknown field (known: {', '.join(sorted(TOP_FIELDS))})")
    version = doc.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise RecipeError("version", f"unsupported recipe version {version!r} (this tool reads {RECIPE_VERSION})")
    if "pool" not in doc:
        raise RecipeError("pool", "is required")
    pool = _str_list(doc["pool"], "pool")
    base = _opt_str(doc.get("base"), "base")
    method = doc.get("method")
    if not isinstance(method, str):
        raise RecipeError("method", "is required (see `python -m astolfo_merge methods`)")
    params = doc.get("params") or {}
    if not isinstance(params, dict):
        raise RecipeError("params", "must be an object")
    params = _check_method(method, params, len(pool), base is not None, "")
    recipe = Recipe(pool=pool, method=method, params=params, base=base, blocks=_check_blocks(doc.get("blocks"), "blocks"))
    block_param = get_method(method).block_param
    if recipe.blocks and not block_param:
        raise RecipeError("blocks", f"method '{method}' has no parameter that block weights can override")
    recipe.components = _parse_components(doc.get("components"), recipe)
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise RecipeError("seed", f"must be a non-negative integer, got {seed!r}")
    recipe.seed = seed
    recipe.precision = _choice(doc, "precision", PRECISIONS, "fp64")
    recipe.dtype = _parse_dtype(doc.get("dtype", DEFAULT_DTYPE))
    recipe.nonfinite = _choice(doc, "nonfinite", NONFINITE, "fail")
    recipe.position_ids = _choice(doc, "position_ids", ("reset", "omit"), "reset")
    if doc.get("output") is not None:
        recipe.output = check_output_name(doc["output"])
    amp = doc.get("allow_mixed_prediction", False)
    if not isinstance(amp, bool):
        raise RecipeError("allow_mixed_prediction", "must be true or false")
    recipe.allow_mixed_prediction = amp
    recipe.extra = {k: doc[k] for k in ("loras", "fermat", "note") if k in doc}
    if doc.get("fermat") not in (None, False):
        from .rebasin.fermat import fermat_options   # validates the field now, before any work
        fermat_options(doc["fermat"])
    if doc.get("loras"):
        from .lora import validate_loras
        validate_loras(doc["loras"])
    return recipe


def _choice(doc, name, choices, default):
    value = doc.get(name, default)
    if value not in choices:
        raise RecipeError(name, f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def _parse_dtype(value):
    """A dtype name, or an object of component (unet / te0 / te1 / vae / default) -> dtype name."""
    if isinstance(value, dict):
        if not value:
            raise RecipeError("dtype", "an empty object names no component; give a dtype name or e.g. "
                              '{"unet": "fp8_e4m3fn", "default": "fp16"}')
        for name, choice in value.items():
            if name not in COMPONENTS + ("default",):
                raise RecipeError(f"dtype.{name}", f"unknown component (known: {', '.join(COMPONENTS)}, default)")
            if choice not in OUTPUT_DTYPES:
                raise RecipeError(f"dtype.{name}", f"must be one of {', '.join(OUTPUT_DTYPES)}; got {choice!r}")
        return dict(value)
    if value not in OUTPUT_DTYPES:
        raise RecipeError("dtype", f"must be one of {', '.join(OUTPUT_DTYPES)}, or an object of component "
                          f"(unet / te0 / te1 / vae / default) -> dtype; got {value!r}")
    return value


def _parse_components(doc, recipe: Recipe) -> dict:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise RecipeError("components", "must be an object keyed by unet / te0 / te1 / vae")
    out = {}
    for name, rule in doc.items():
        where = f"components.{name}"
        if name not in COMPONENTS:
            raise RecipeError(where, f"unknown component (known: {', '.join(COMPONENTS)})")
        if not isinstance(rule, dict):
            raise RecipeError(where, "must be an object")
        unknown = sorted(set(rule) - COMPONENT_FIELDS)
        if unknown:
            raise RecipeError(f"{where}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(COMPONENT_FIELDS))})")
        if "take" in rule:
            if len(rule) > 1:
                raise RecipeError(where, "'take' cannot be combined with method/params/pool/base")
            take = _opt_str(rule["take"], f"{where}.take")
            if take == "base" and not recipe.base:
                raise RecipeError(f"{where}.take", "'base' needs a recipe base model")
            out[name] = ComponentRule(take=take)
            continue
        method = rule.get("method", recipe.method)
        pool = _str_list(rule["pool"], f"{where}.pool") if "pool" in rule else None
        base = _opt_str(rule.get("base"), f"{where}.base") or recipe.base
        if "params" in rule and not isinstance(rule["params"], dict):
            raise RecipeError(f"{where}.params", "must be an object")
        params_in = rule.get("params", recipe.params if method == recipe.method else {})
        params = _check_method(method, params_in, len(pool or recipe.pool), base is not None, f"{where}.")
        blocks = _check_blocks(rule.get("blocks"), f"{where}.blocks")
        if blocks and not get_method(method).block_param:
            raise RecipeError(f"{where}.blocks", f"method '{method}' has no parameter that block weights can override")
        out[name] = ComponentRule(method=method, params=params, pool=pool, base=rule.get("base"), blocks=blocks or None)
    return out


def load_recipe(path) -> Recipe:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise RecipeError("(file)", f"cannot read {path}: {exc.strerror}") from None
    return parse_recipe(text)


def recipe_from_metadata(metadata: dict) -> Recipe:
    """The recipe embedded in a merged checkpoint's metadata."""
    text = metadata.get("astolfo_merge_recipe")
    if not text:
        raise RecipeError("(metadata)", "this checkpoint carries no AstolfoMerge recipe")
    return parse_recipe(text)
