"""Method declarations: one per method; the CLI, the recipe validation and the tab's forms are
generated from them (ARCHITECTURE.md "Methods as declarations").

A method is a pure function `run(inputs, params) -> Iterator[Tensor]` over one key: `inputs` gives
bounded access to the N pool tensors (and the base) of that key, whole or by row ranges; the
function yields the output in row-major chunks (or once, whole). It never opens files or knows
about threads, devices or budgets: its declared shape (shapes.py) gives it its row chunks, its
workspace and, for Gram-shaped math, the direct or the Gram form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..errors import RecipeError
from .shapes import Shape, elementwise, row_spans

DEFAULT_SHAPE = elementwise(lambda n: n + 2)   # N inputs, the base and the output: one chunk each


@dataclass(frozen=True)
class Param:
    name: str
    kind: str                    # float | int | bool | choice | floats
    default: object = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple = ()
    help: str = ""
    step: float | None = None    # a hint for sliders

    def validate(self, value, where: str):
        field_name = f"{where}.{self.name}"
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise RecipeError(field_name, f"must be true or false, got {value!r}")
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise RecipeError(field_name, f"must be one of {', '.join(map(str, self.choices))}; got {value!r}")
            return value
        if self.kind == "floats":
            if value is None:
                return None
            if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                raise RecipeError(field_name, f"must be a list of numbers, got {value!r}")
            for i, v in enumerate(value):
                if not _finite(v):
                    raise RecipeError(f"{field_name}[{i}]", f"must be a finite number, got {v!r}")
            for v in value:
                self._check_range(float(v), field_name)
            return [float(v) for v in value]
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise RecipeError(field_name, f"must be an integer, got {value!r}")
            self._check_range(value, field_name)
            return value
        if not _is_number(value):
            raise RecipeError(field_name, f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise RecipeError(field_name, f"must be finite, got {value!r}")
        self._check_range(value, field_name)
        return value

    def _check_range(self, value, field_name):
        if self.minimum is not None and value < self.minimum:
            raise RecipeError(field_name, f"{value} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise RecipeError(field_name, f"{value} is above the maximum {self.maximum}")

    def to_dict(self):
        return {"name": self.name, "type": self.kind, "default": self.default, "min": self.minimum,
                "max": self.maximum, "choices": list(self.choices) or None, "help": self.help}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:     # an integer too large for a float
        return False


@dataclass(frozen=True)
class Method:
    """A method's declaration: its math (`run`), its shape (how it meets memory; shapes.py decides
    chunking, residency, workspace and direct-vs-Gram from it) and what the forms, the CLI and the
    recipe validation need to know."""
    name: str
    title: str
    help: str
    run: Callable[["KeyInputs", dict], Iterator[torch.Tensor]]
    shape: Shape = DEFAULT_SHAPE
    params: tuple = ()
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    block_param: str | None = None   # the parameter MBW block weights override
    random: bool = False
    preset_of: str | None = None
    fixed: dict = field(default_factory=dict)   # preset values (not shown in forms)
    # Optional whole-plan stage run once before the key loop (e.g. Re-Basin's weight matching):
    # prepare(plan, readers, log, progress[, cancel][, bindings]) -> state, a stage of the plan's pipeline;
    # the state must be plain data (it is sent to worker processes); each key's inputs expose it as `inputs.state`.
    prepare: Callable | None = None

    @property
    def propagates_nonfinite(self) -> bool:
        """The engine's input scan is skipped for linear shapes (see Shape.linear)."""
        return self.shape.linear

    def workspace(self, shape, n, params) -> int:
        """Bytes one key holds beside its row chunks (whole-tensor statistics), from the shape."""
        return self.shape.workspace_bytes(shape, n, params)

    def param(self, name) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve_params(self, given: dict | None, where="params") -> dict:
        given = dict(given or {})
        known = {p.name for p in self.params}
        unknown = sorted(set(given) - known - set(self.fixed))
        if unknown:
            raise RecipeError(f"{where}.{unknown[0]}", f"unknown parameter for method '{self.name}' "
                              f"(known: {', '.join(sorted(known)) or 'none'})")
        out = {}
        for p in self.params:
            out[p.name] = p.validate(given[p.name], where) if p.name in given else p.default
        out.update(self.fixed)
        return out

    def to_dict(self):
        return {"name": self.name, "title": self.title, "help": self.help, "needs_base": self.needs_base,
                "min_models": self.min_models, "max_models": self.max_models, "shape": self.shape.kind,
                "block_param": self.block_param, "random": self.random, "preset_of": self.preset_of,
                "fixed": self.fixed, "params": [p.to_dict() for p in self.params]}


METHODS: dict = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str, where="method") -> Method:
    if name not in METHODS:
        raise RecipeError(where, f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def add_in_order(acc: torch.Tensor, terms, first_weight: float = 1.0) -> torch.Tensor:
    """first_weight·acc + Σ weight·term over (term, weight) pairs, added in the order given, in place
    in `acc` (a tensor the caller owns). The one definition of sum_rows' rounding, whatever the reads."""
    if first_weight != 1.0:
        acc.mul_(first_weight)
    for term, weight in terms:
        acc.add_(term, alpha=weight)
    return acc


EXACT_FP16_SUM = 8192   # fp16 values are multiples of 2^-24 below 2^16: up to 2^13 of them sum exactly in fp64


class KeyInputs:
    """What a method sees of one key. Subclassed by the engine (files) and `TensorInputs` (tests)."""

    key: str = ""
    shape: tuple = ()
    n: int = 0
    has_base: bool = False
    dtype: torch.dtype = torch.float64
    device: torch.device = torch.device("cpu")
    seed: int = 0
    state: object = None         # what the method's `prepare` returned (None without one)
    recipe_seed: int | None = None   # the recipe's own seed (sd-mecha-compatible RNG re-seeds every key with it)
    budget_bytes: int | None = None  # the chunk budget in bytes (None: unbounded); read by shapes.py only

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) else 1

    def read(self, i: int) -> torch.Tensor:
        return self.read_rows(i, 0, self.rows)

    def read_base(self) -> torch.Tensor:
        return self.read_base_rows(0, self.rows)

    def read_rows(self, i, start, stop, out=None) -> torch.Tensor:
        """Rows [start, stop) of pool model i in the compute dtype: a fresh tensor the caller owns,
        or, with `out` (a compute-dtype tensor of that many elements), written into `out` (saves an
        allocation per read in loops that only need the values briefly)."""
        raise NotImplementedError

    def read_base_rows(self, start, stop, out=None) -> torch.Tensor:
        raise NotImplementedError

    def read_stack(self, start, stop, minus_base: bool = False) -> torch.Tensor:
        """The N pool tensors' rows [start, stop) stacked as [n, rows, ...] (or [n] for 0-d keys),
        in the compute dtype; with `minus_base`, the deltas to the base."""
        first = self.read_rows(0, start, stop)
        stack = torch.empty((self.n,) + tuple(first.shape), dtype=first.dtype, device=first.device)
        stack[0] = first
        for i in range(1, self.n):
            self.read_rows(i, start, stop, out=stack[i])
        if minus_base:
            stack -= self.read_base_rows(start, stop)
        return stack

    def sum_rows(self, start, stop, weights) -> torch.Tensor:
        """Σ weights[i]·(pool model i) over rows [start, stop): a fresh compute-dtype tensor. Models
        with weight 0 are not read. The terms are added in pool order, except where any order gives
        the same bits: unit weights over at most EXACT_FP16_SUM fp16 models in fp64, whose sum is
        exact, are summed by one reduction op."""
        used = [i for i, w in enumerate(weights) if w != 0]
        if not used:
            return torch.zeros((stop - start,) + tuple(self.shape[1:]), dtype=self.dtype, device=self.device)
        if self.exact_unit_sum(weights):
            return self.read_stack(start, stop).sum(dim=0)
        return add_in_order(self.read_rows(used[0], start, stop),
                            ((self.read_rows(i, start, stop), weights[i]) for i in used[1:]), weights[used[0]])

    def exact_unit_sum(self, weights) -> bool:
        """True when Σ pool models is exact in the compute dtype, so any summation order gives the
        same bits: every weight 1, fp16 values (multiples of 2^-24 below 2^16), fp64, ≤ 8192 terms."""
        return (self.dtype == torch.float64 and len(weights) == self.n <= EXACT_FP16_SUM
                and all(w == 1.0 for w in weights) and all(d == torch.float16 for d in self.pool_dtypes()))

    def pool_dtypes(self) -> tuple:
        """The dtype each pool model's values have before the cast to the compute dtype (what the
        file stores, unless something was applied to them on the way). Lets a method know when a
        computation is exact in any order (e.g. any sum of up to 8192 fp16 values in fp64)."""
        return (self.dtype,) * self.n

    def chunks(self, resident: int, tile=None):
        """Row ranges such that `resident` compute-dtype chunks fit the budget (and, where the inputs
        bound chunks by the cache, the shapes.Tile `tile`)."""
        raise NotImplementedError

    def imap(self, fn: Callable[[int, int], object], spans) -> Iterator:
        """`fn(start, stop)` for every span, results in span order. The engine may run several spans
        at once on worker threads (`chunks` then leaves room for each), so `fn` must only read its own
        rows and touch no state shared with other spans; here, serially."""
        for a, b in spans:
            yield fn(a, b)

    def log(self, message: str):
        pass


class TensorInputs(KeyInputs):
    """In-memory inputs: for tests and for callers that already hold tensors."""

    def __init__(self, tensors, base=None, key="tensor", dtype=torch.float64, seed=0, chunk_rows=None,
                 recipe_seed=None, budget_bytes=None):
        self.tensors, self.base = list(tensors), base
        ref = self.tensors[0] if self.tensors else base
        self.shape, self.n, self.has_base = tuple(ref.shape), len(self.tensors), base is not None
        self.key, self.dtype, self.seed, self.chunk_rows = key, dtype, seed, chunk_rows
        self.recipe_seed, self.budget_bytes = recipe_seed, budget_bytes
        self.messages = []

    def _rows(self, t, start, stop, out=None):
        t = t if t.dim() else t.reshape(1)
        rows = t[start:stop]
        rows = rows.to(self.dtype, copy=True) if out is None else out.reshape(rows.shape).copy_(rows)
        return rows if len(self.shape) else rows.reshape(())

    def read_rows(self, i, start, stop, out=None):
        return self._rows(self.tensors[i], start, stop, out)

    def read_base_rows(self, start, stop, out=None):
        return self._rows(self.base, start, stop, out)

    def pool_dtypes(self):
        return tuple(t.dtype for t in self.tensors)

    def chunks(self, resident, tile=None):
        """Like the engine's (`resident` chunks fit the budget), without its cache bound (`tile`):
        whole keys unless `chunk_rows` or `budget_bytes` says otherwise."""
        return row_spans(self.shape, self.dtype.itemsize, resident, self.budget_bytes, tile=None,
                         max_rows=self.chunk_rows)

    def log(self, message):
        self.messages.append(message)


def apply(method: Method | str, tensors, base=None, params=None, **kw) -> torch.Tensor:
    """Run a method on in-memory tensors and return the whole output (tests, notebooks)."""
    method = get_method(method) if isinstance(method, str) else method
    inputs = TensorInputs(tensors, base, **kw)
    parts = list(method.run(inputs, method.resolve_params(params)))
    out = parts[0] if len(parts) == 1 else torch.cat([p.reshape((-1,) + inputs.shape[1:]) for p in parts])
    return out.reshape(inputs.shape)
