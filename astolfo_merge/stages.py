"""A plan's pipeline as plain data: what a merge runs, in order, and the per-key steps it applies.

Why data: a plan must reach worker processes (or another machine) by pickle and be rebuilt the same
from the recipe and the models folder, so it holds no closures, open files or readers. What runs
where is decided from these declarations (`stage_run`: whole-plan stages in the process that asked
for the merge, once; key stages as tasks on any executor); what a whole-plan stage finds (Re-Basin
permutations, the Fermat matching, the checked LoRA files) is handed to the key tasks as data.

Stage kinds, in the order a plan declares them:
  prepare  a method's whole-plan `prepare` (e.g. Re-Basin weight matching) -> its state
  bake     the LoRA / LyCORIS files the keys' "lora" steps bake in -> [LoraUse]
  keys     a set of output keys written to one file (the output, a temp file, a side output)
  match    Fermat's weight matching between R and amp(a, R, 2) over the temp a -> key -> indices
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
