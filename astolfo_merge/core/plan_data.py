"""The plan as plain data: its input files (`Source`), what each output key does (`KeyPlan`), and the
`Plan` with its predicted peak memory and budget check (built by plan.py).

A plan is plain data (`Plan.to_data()`): per key its dtype, shape, byte range, sources, method,
resolved params, block weight and seed, and the pipeline of stages the merge runs (stages.py) —
no closures or open files, so it pickles to worker processes, and the same recipe and models
folder rebuild the same plan.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from ..errors import MemoryBudgetError
from ..io import arch as archmod
from ..io.header import NAME_OF, Header
from ..methods import get_method
from ..methods.shapes import key_peak_bytes
from .recipe import Recipe
from .stages import Stage

GIB = 1024 ** 3
OVERHEAD_BYTES = 256 * 1024 ** 2     # interpreter, torch, buffers of the writer


@dataclass
class Source:
    """One input file: header + identification. `keys` maps canonical key -> stored key."""
    name: str
    path: str
    header: Header
    identity: archmod.Identity
    keys: dict = field(default_factory=dict)

    def has(self, key) -> bool:
        return key in self.keys

    def shape(self, key):
        stored = self.keys[key]
        return self.header.tensors[stored].shape


@dataclass
class KeyPlan:
    key: str
    shape: tuple
    dtype: torch.dtype            # output dtype
    action: str                   # merge | copy | position_ids | zeros
    component: str = archmod.OTHER
    block: str | None = None
    method: str | None = None
    params: dict = field(default_factory=dict)
    pool: list = field(default_factory=list)     # source indices contributing
    base: int | None = None
    source: int | None = None    # for copy
    reshape_from: tuple | None = None
    note: str = ""
    # Steps (stages.Step, data) applied to every produced chunk, in order, in the compute dtype
    # before the cast to `dtype` (e.g. a LoRA bake-in adds its delta here, Fermat writes c).
    post: list = field(default_factory=list)
    # Steps applied to the inputs: source index -> [Step], applied to what the method reads of that
    # source as a pool member (compute dtype; never to base reads), e.g. a LoRA baked into it first.
    pre: dict = field(default_factory=dict)
    seed: int | None = None               # key_seed(recipe seed, key): the seeded methods' RNG for this key
    block_weight: float | None = None     # the MBW block value that set params[method.block_param], if any
    span: tuple | None = None             # (begin, end) byte offsets in the output's data section

    def to_data(self) -> dict:
        """The key as JSON-able data (see Plan.to_data)."""
        out = {"key": self.key, "shape": list(self.shape), "dtype": NAME_OF[self.dtype], "action": self.action,
               "component": self.component, "span": list(self.span) if self.span else None, "seed": self.seed}
        for name in ("block", "method", "base", "source", "note", "block_weight"):
            value = getattr(self, name)
            if value not in (None, ""):
                out[name] = value
        if self.params:
            out["params"] = dict(self.params)
        if self.pool:
            out["pool"] = list(self.pool)
        if self.reshape_from:
            out["reshape_from"] = list(self.reshape_from)
        if self.post:
            out["post"] = [step.to_data() for step in self.post]
        if self.pre:
            out["pre"] = {str(src): [step.to_data() for step in steps] for src, steps in self.pre.items()}
        return out


def key_seed(seed: int, key: str) -> int:
    """Per-key seed: independent of key order and of what runs the key."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def assign_spans(keys) -> int:
    """Give each key its byte range in the data section, in key order (as the writer lays them out);
    returns the data size."""
    at = 0
    for kp in keys:
        size = math.prod(kp.shape) * kp.dtype.itemsize
        kp.span = (at, at + size)
        at += size
    return at


@dataclass
class Plan:
    recipe: Recipe
    arch: str
    scale: int
    prediction: str
    sources: list
    keys: list
    output: str | None
    log: list = field(default_factory=list)
    component_summary: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)    # (recipe field, path) of every file read, LoRAs included
    stages: list = field(default_factory=list)    # the pipeline (stages.Stage), in order

    def pipeline(self) -> list:
        """The stages to run: the declared ones, or (a plan put together by hand) its keys into its output."""
        return self.stages or [Stage("keys", "output")]

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.recipe.precision == "fp64" else torch.float32

    def to_data(self) -> dict:
        """The whole plan as JSON-able data: what a merge will do, key by key and stage by stage."""
        keys = [kp.to_data() for kp in self.keys]
        return {"recipe": self.recipe.to_dict(), "arch": self.arch, "scale": self.scale, "prediction": self.prediction,
                "output": self.output, "sources": [{"name": s.name, "path": s.path} for s in self.sources],
                "keys": keys, "stages": [st.to_data(lambda ks: [kp.to_data() for kp in ks]) for st in self.stages],
                "log": list(self.log)}

    @property
    def output_bytes(self) -> int:
        return sum(math.prod(k.shape) * k.dtype.itemsize for k in self.keys)

    def peak_bytes(self, budget_bytes: int) -> int:
        """Predicted peak private memory with this budget (chunked methods fill at most the budget)."""
        need = 0
        for kp in self.keys:
            if kp.action != "merge":
                continue
            need = max(need, key_peak_bytes(get_method(kp.method).shape, kp.shape, len(kp.pool), kp.params,
                                             min(budget_bytes, self._chunk_floor())))
        return OVERHEAD_BYTES + max(min(budget_bytes, self._chunk_floor()), need)

    def _chunk_floor(self) -> int:
        return 64 * 1024 ** 2

    def check_budget(self, memory_gb: float):
        budget = int(memory_gb * GIB)
        peak = self.peak_bytes(budget)
        if peak > budget + OVERHEAD_BYTES:
            raise MemoryBudgetError(f"this merge needs about {peak / GIB:.2f} GiB but the budget is "
                                    f"{memory_gb:.2f} GiB; raise --memory-gb to at least {math.ceil(peak / GIB * 10) / 10}")
        return peak
