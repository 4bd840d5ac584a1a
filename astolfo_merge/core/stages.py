"""A plan's pipeline as plain data: what a merge runs, in order, and the per-key steps it applies.

Why data: a plan must reach worker processes (or another machine) by pickle and be rebuilt the same
from the recipe and the models folder, so it holds no closures, open files or readers. What runs
where is decided from these declarations (`stage_run`: whole-plan stages in the process that asked
for the merge, once; key stages as tasks on any executor); what a whole-plan stage finds (Re-Basin
permutations, the Fermat matching, the checked LoRA files) is handed to the key tasks as data.

The recipe fields that declare stages are validated here too (`validate_loras`, `fermat_options`),
below the modules that plan and run them, so the recipe can check them without importing those.

Stage kinds, in the order a plan declares them:
  prepare  a method's whole-plan `prepare` (e.g. Re-Basin weight matching) -> its state
  bake     the LoRA / LyCORIS files the keys' "lora" steps bake in -> [LoraUse]
  keys     a set of output keys written to one file (the output, a temp file, a side output)
  match    Fermat's weight matching between R and amp(a, R, 2) over the temp a -> key -> indices
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import RecipeError
from ..io.arch import block_names

OUTPUT = "output"   # a key stage writing the plan's output
TEMP = "temp"       # a key stage writing a hidden temp file next to the output, removed after the merge


@dataclass(frozen=True)
class Step:
    """One transform of a key's chunks (compute dtype), named by what it applies:
    ("lora", i, m): add m x the delta of plan stage "bake"'s LoRA i; ("fermat", what): write a, b or c
    from the temp a, R and the matching (`whole`: needs the key's whole tensor in one chunk)."""
    kind: str
    ref: object
    multiplier: float = 1.0
    whole: bool = False

    def to_data(self) -> list:
        return [self.kind, self.ref, self.multiplier] + (["whole"] if self.whole else [])


@dataclass(frozen=True)
class LoraUse:
    """A LoRA file baked in: where the recipe names it, its path, when, and the modules that fit."""
    where: str
    path: str
    when: str
    targets: dict = field(default_factory=dict, hash=False)   # module name -> lora_names.Target

    def to_data(self) -> dict:
        return {"where": self.where, "path": self.path, "when": self.when, "modules": sorted(self.targets)}


@dataclass
class Stage:
    """One stage of the pipeline. `result`: the name later stages and the key tasks find its result
    under. Key stages: `keys` (None: the plan's own keys), `output` (OUTPUT, TEMP or a side file's
    path), `note` (the recipe note written into a side output's metadata), `label` (progress prefix)."""
    kind: str
    name: str
    result: str | None = None
    method: str | None = None
    keys: list | None = None
    output: str = OUTPUT
    label: str = ""
    note: str | None = None
    loras: list = field(default_factory=list)
    source: str | None = None       # match: the temp file stage whose output it reads

    def to_data(self, keys_data) -> dict:
        out = {"kind": self.kind, "name": self.name}
        for name in ("result", "method", "output", "label", "note", "source"):
            value = getattr(self, name)
            if value not in (None, "") and not (name == "output" and self.kind != "keys"):
                out[name] = value
        if self.loras:
            out["loras"] = [use.to_data() for use in self.loras]
        if self.keys is not None:
            out["keys"] = keys_data(self.keys)
        return out


def prepare_result(method: str) -> str:
    return f"prepare {method}"


LORAS = "loras"           # result of the bake stage
FERMAT_A = "fermat a"     # result of the Fermat temp stage: the temp file's path
FERMAT_MATCH = "fermat match"


# -- the recipe fields that declare stages ------------------------------------------------------
LORA_FIELDS = ("file", "strength", "blocks", "when", "models")
WHEN = ("after", "before")
STRENGTH_LIMIT = 20.0


def validate_loras(value) -> list:
    """The recipe's `loras` list with defaults filled in; RecipeError names `loras[i].field`."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecipeError("loras", "must be a list of objects like {\"file\": \"x.safetensors\", \"strength\": 0.8}")
    known_blocks = set(block_names("sd1")) | set(block_names("sdxl"))
    out = []
    for i, entry in enumerate(value):
        where = f"loras[{i}]"
        if not isinstance(entry, dict):
            raise RecipeError(where, "must be an object with at least a 'file'")
        unknown = sorted(set(entry) - set(LORA_FIELDS))
        if unknown:
            raise RecipeError(f"{where}.{unknown[0]}", f"unknown field (known: {', '.join(LORA_FIELDS)})")
        name = entry.get("file")
        if not isinstance(name, str) or not name.strip():
            raise RecipeError(f"{where}.file", "is required: the LoRA / LyCORIS file name")
        strength = _number(entry.get("strength", 1.0), f"{where}.strength")
        if abs(strength) > STRENGTH_LIMIT:
            raise RecipeError(f"{where}.strength", f"{strength} is outside [-{STRENGTH_LIMIT}, {STRENGTH_LIMIT}]")
        blocks = entry.get("blocks") or {}
        if not isinstance(blocks, dict):
            raise RecipeError(f"{where}.blocks", "must be an object of block name -> number")
        blocks = {str(k).upper(): _number(v, f"{where}.blocks.{k}") for k, v in blocks.items()}
        for block in blocks:
            if block not in known_blocks:
                raise RecipeError(f"{where}.blocks.{block}", "unknown block (SD1: BASE, IN00-IN11, M00, OUT00-OUT11; "
                                                             "SDXL: BASE, IN00-IN08, M00, OUT00-OUT08, VAE)")
        when = entry.get("when", "after")
        if when not in WHEN:
            raise RecipeError(f"{where}.when", f"must be 'after' (bake into the merged result) or 'before' "
                                               f"(bake into each pool member); got {when!r}")
        models = entry.get("models")
        if models is not None:
            if when != "before":
                raise RecipeError(f"{where}.models", "only applies with \"when\": \"before\"")
            if not isinstance(models, list) or not models or not all(isinstance(m, str) and m.strip() for m in models):
                raise RecipeError(f"{where}.models", "must be a non-empty list of pool file names")
        out.append({"file": name, "strength": strength, "blocks": blocks, "when": when, "models": models})
    return out


def _number(value, where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(where, f"must be a finite number, got {value!r}")
    return float(value)


OPTION_FIELDS = {"keep_a": bool, "keep_b": bool, "sweeps": int, "start": str}


@dataclass(frozen=True)
class FermatOptions:
    keep_a: bool = False
    keep_b: bool = False
    sweeps: int = 10
    start: str = "propagate"


def fermat_options(value) -> FermatOptions:
    """The recipe's `fermat` field: true, or an object with keep_a / keep_b / sweeps / start."""
    if value is True:
        return FermatOptions()
    if not isinstance(value, dict):
        raise RecipeError("fermat", f"must be true or an object with {', '.join(OPTION_FIELDS)}; got {value!r}")
    for name, given in value.items():
        kind = OPTION_FIELDS.get(name)
        if kind is None:
            raise RecipeError(f"fermat.{name}", f"unknown field (known: {', '.join(OPTION_FIELDS)})")
        if not isinstance(given, kind) or (kind is int and isinstance(given, bool)):
            raise RecipeError(f"fermat.{name}", f"must be {kind.__name__}, got {given!r}")
    opts = FermatOptions(**value)
    if not 1 <= opts.sweeps <= 100:
        raise RecipeError("fermat.sweeps", f"must be between 1 and 100, got {opts.sweeps}")
    if opts.start not in ("propagate", "identity"):
        raise RecipeError("fermat.start", f"must be 'propagate' or 'identity', got {opts.start!r}")
    return opts
