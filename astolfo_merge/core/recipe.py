"""The recipe: the one description of a merge (CLI, tab, embedded in every output).

Validation happens here, before any work, with errors that name the field. File names are
resolved later by the plan (they need a models folder).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

from ..errors import RecipeError
from ..io.arch import ARCH_TITLES, COMPONENTS, block_names
from ..io.paths import read_recipe_text
from ..io.strict_json import JSONInputError, depth as strict_depth, loads as strict_loads
from ..methods import get_method
from .stages import fermat_options, validate_loras

RECIPE_VERSION = 1
MAX_RECIPE_DEPTH = 16     # the deepest field is loras[i].blocks.NAME (4 levels)
MAX_RECIPE_DIGITS = 30    # seeds are below 2**63 (19 digits)
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


BLOCK_NAMES_HELP = "SD1/SD2: BASE, IN00-IN11, M00, OUT00-OUT11; SDXL: BASE, IN00-IN08, M00, OUT00-OUT08, VAE"


def _check_blocks(blocks, where, method_name):
    """block name -> value of the method's block parameter: names known to some architecture (the plan
    checks them against the inputs' own), values finite and inside the parameter's range."""
    if blocks is None:
        return {}
    if not isinstance(blocks, dict):
        raise RecipeError(where, "must be an object of block name -> number")
    method = get_method(method_name)
    if blocks and not method.block_param:
        raise RecipeError(where, f"method '{method_name}' has no parameter that block weights can override")
    param = method.param(method.block_param) if blocks else None
    known = set().union(*(block_names(a) for a in ARCH_TITLES))
    out = {}
    for name, value in blocks.items():
        block = str(name).upper()
        if block not in known:
            raise RecipeError(f"{where}.{name}", f"unknown block ({BLOCK_NAMES_HELP})")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RecipeError(f"{where}.{name}", f"must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise RecipeError(f"{where}.{name}", "is far too large a number") from None
        if not math.isfinite(value):
            raise RecipeError(f"{where}.{name}", f"must be finite, got {value!r}")
        if param.minimum is not None and value < param.minimum or param.maximum is not None and value > param.maximum:
            low, high = (f"{b:g}" if b is not None else "" for b in (param.minimum, param.maximum))
            raise RecipeError(f"{where}.{name}", f"{value:g} is outside [{low}, {high}], the range of "
                                                 f"{method_name}'s {param.name}")
        if block in out:
            raise RecipeError(f"{where}.{name}", f"block {block} is given twice")
        out[block] = value
    return out


def check_block_names(recipe: "Recipe", arch: str):
    """At plan time, when the architecture is known: every block name exists in it."""
    names = block_names(arch)
    for where, blocks in [("blocks", recipe.blocks)] + [(f"components.{c}.blocks", r.blocks)
                                                       for c, r in recipe.components.items()]:
        for block in blocks or {}:
            if block not in names:
                raise RecipeError(f"{where}.{block}", f"{ARCH_TITLES[arch]} has no block {block} "
                                                      f"(blocks: {', '.join(names)})")


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
    check_encodable(name, where)
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    return name


def check_encodable(name: str, where: str) -> str:
    """A name the file system can store and a terminal can print: refuses lone surrogates (from JSON
    escapes or undecodable bytes) and characters outside the file system's encoding."""
    try:
        name.encode("utf-8")
        name.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
    except UnicodeEncodeError as exc:
        raise RecipeError(where, f"{ascii(name)} cannot be used as a file name: {ascii(exc.object[exc.start:exc.end])} "
                                 f"is not a character the file system can store") from None
    return name


def parse_recipe(doc) -> Recipe:
    """Validate a recipe document (dict or JSON text); raise RecipeError naming the field."""
    if isinstance(doc, (str, bytes, bytearray)):
        try:
            doc = strict_loads(doc, max_depth=MAX_RECIPE_DEPTH, max_digits=MAX_RECIPE_DIGITS, what="field")
        except JSONInputError as exc:
            raise RecipeError("(document)", str(exc)) from None
    elif strict_depth(doc, MAX_RECIPE_DEPTH) > MAX_RECIPE_DEPTH:   # a dict from the tab or a script
        raise RecipeError("(document)", f"is nested too deeply (more than {MAX_RECIPE_DEPTH} levels)")
    if not isinstance(doc, dict):
        raise RecipeError("(document)", "must be a JSON object")
    unknown = sorted(str(k) for k in set(doc) - TOP_FIELDS)
    if unknown:
        raise RecipeError(unknown[0], f"unknown field (known: {', '.join(sorted(TOP_FIELDS))})")
    version = doc.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise RecipeError("version", f"unsupported recipe version {_short(version)} (this tool reads {RECIPE_VERSION})")
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
    recipe = Recipe(pool=pool, method=method, params=params, base=base,
                    blocks=_check_blocks(doc.get("blocks"), "blocks", method))
    recipe.components = _parse_components(doc.get("components"), recipe)
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise RecipeError("seed", f"must be an integer from 0 to 2**63 - 1, got {_short(seed)}")
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
    if "note" in doc and doc["note"] is not None and not isinstance(doc["note"], str):
        raise RecipeError("note", f"must be text, got {_short(doc['note'])}")
    recipe.extra = {k: doc[k] for k in ("loras", "fermat", "note") if k in doc}
    if doc.get("fermat") not in (None, False):
        fermat_options(doc["fermat"])   # validates the field now, before any work
    if doc.get("loras"):
        validate_loras(doc["loras"])
    return recipe


def _choice(doc, name, choices, default):
    value = doc.get(name, default)
    if not isinstance(value, str) or value not in choices:
        raise RecipeError(name, f"must be one of {', '.join(choices)}; got {_short(value)}")
    return value


def _short(value, limit: int = 60) -> str:
    """A value for a message: huge integers by their size (their repr may even fail), long ones cut."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 30:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + " … " + text[-2:]


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
        unknown = sorted(str(k) for k in set(rule) - COMPONENT_FIELDS)
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
        blocks = _check_blocks(rule.get("blocks"), f"{where}.blocks", method)
        out[name] = ComponentRule(method=method, params=params, pool=pool, base=rule.get("base"), blocks=blocks or None)
    return out


def load_recipe(path) -> Recipe:
    """A recipe file (CLI and tab alike): read with bounds by paths.read_recipe_text, then validated."""
    return _parse_from(read_recipe_text(path), "(file)", path)


def recipe_from_metadata(metadata: dict, source=None) -> Recipe:
    """The recipe embedded in a merged checkpoint's metadata (`source`: that file, for messages)."""
    text = metadata.get("astolfo_merge_recipe")
    if not text:
        raise RecipeError("(metadata)", f"{source or 'this checkpoint'} carries no AstolfoMerge recipe")
    return _parse_from(text, "(metadata)", f"the recipe in {source}" if source else None)


def _parse_from(doc, field_name, where) -> Recipe:
    """parse_recipe, with a problem of the document as a whole naming where it came from."""
    try:
        return parse_recipe(doc)
    except RecipeError as exc:
        if exc.field == "(document)" and where:
            raise RecipeError(field_name, f"{where} {exc.problem}") from None
        raise
