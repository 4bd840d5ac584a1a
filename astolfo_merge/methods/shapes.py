"""Method shapes: how a method's math meets memory, decided in one place.

A method declares its shape and keeps only its math; this module alone turns the shape and the
chunk budget into row chunks (how many chunk-sized tensors are resident at once), workspace (bytes
held beside the chunks, for the plan's peak) and, for Gram-shaped and iterative methods, the form:
direct (the key's N tensors fit one chunk: the method's own operations on whole tensors, the golden
form) or Gram (the N×N inner products accumulated over row chunks, a small solve on them, then one
more pass producing Σ c_i x_i), so memory stays bounded whatever the key's size.

Kinds:
* elementwise — each output row from the same rows of the inputs: one pass of rows(a, b);
* two_pass    — a whole-tensor statistic first (a trim threshold, a ranking, a spectrum), then an apply pass;
* gram        — the N×N products of the models, then a closed-form combine (SLERP);
* iterative   — the N×N products, then an iteration on them (Weiszfeld's median, the Karcher mean).

Why here, beside the registry, and not in core: the methods' math runs its passes through these
functions, and core (plan, tasks, engine) sits above methods; core reads the same declarations
(plan.peak_bytes: key_peak_bytes; tasks.key_cost: relative_cost; the engine's inputs: row_spans).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

ELEMENTWISE, TWO_PASS, GRAM, ITERATIVE = "elementwise", "two_pass", "gram", "iterative"
KINDS = (ELEMENTWISE, TWO_PASS, GRAM, ITERATIVE)
# Relative cost per input element, for cutting a plan into tasks of equal cost (bench/README.md).
COST = {ELEMENTWISE: 1.0, TWO_PASS: 2.0, GRAM: 4.0, ITERATIVE: 4.0}
WHOLE_COST = 8.0              # shapes that hold whole tensors of the key
STATISTIC_RESIDENT = 4        # a statistic pass reads one model at a time: its rows, the base's, two temporaries
COPY_RESIDENT = 2             # streaming one model through: its rows and the output
SPILL_FRACTION = 8            # per-element state (bit masks) kept in memory up to 1/8 of the budget
WHOLE_COPIES_FIT = 4          # a dense factorisation (an SVD) holds about 4 copies of its matrix

Count = Callable[[int], int]  # N models -> a number of tensors

MIN_CHUNK_ELEMENTS = 1 << 14        # below this, per-op overhead dominates


@dataclass(frozen=True)
class Tile:
    """The cache bound of a row chunk: what a method holds of one chunk (`resident` tensors) should
    stay in cache, but each op also costs ~5-10 us of dispatch, so chunks must not get too small either.

    elements  at most this many elements per tensor;
    bytes     all `resident` tensors of one chunk together."""
    elements: int
    bytes: int

    def rows(self, row_elems: int, resident: int, itemsize: int) -> int:
        per_tensor = min(self.elements, max(MIN_CHUNK_ELEMENTS, self.bytes // (resident * itemsize)))
        return max(1, per_tensor // row_elems)


# Passes that accumulate over chunks (statistics, Gram products, sums over rows) give bits that
# depend on where the chunks end: their tile is fixed for good (512 KiB of fp64 per tensor).
CACHE_TILE = Tile(1 << 16, 2 << 20)
# Elementwise passes give the same bits whatever the chunking, so their tile follows the speed
# alone: 4x larger, a full-size SD1 live weighted sum in one process (fp64, 2 models) took 2.60 s
# against 3.39 s, and an 8-way average on one worker 9.0 s against 12.4 s (bench/README.md: the
# chunks' tensors then sit in L3, not L2, but a quarter of the ops are dispatched);
# tests/methods/test_shapes.py checks the bits of every elementwise method.
ELEMENTWISE_TILE = Tile(1 << 18, 8 << 20)


@dataclass(frozen=True)
class Shape:
    """What a method declares about its memory; never a number at a call site.

    resident  chunk-sized tensors alive at once per row span of the main pass, for N models;
    statistic two_pass: the same for the statistic pass (one model at a time);
    direct    gram / iterative: tensors the direct form holds when the whole key is one chunk;
    whole     full tensors of the key held at once (a statistic the size of the key, e.g. an SVD);
    workspace other bytes held beside the chunks: workspace(tensor shape, N, params);
    linear    a NaN/Inf in any input read always reaches the output, so the engine checks only the
              output and looks for the culprit input only when the output is not finite."""
    kind: str
    resident: Count
    statistic: Count | None = None
    direct: Count | None = None
    whole: Count | None = None
    workspace: Callable[[tuple, int, dict], int] | None = None
    linear: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown method shape {self.kind!r} (known: {', '.join(KINDS)})")

    def workspace_bytes(self, shape, n, params) -> int:
        return 0 if self.workspace is None else self.workspace(tuple(shape), n, params)


def _count(value) -> Count | None:
    if value is None or callable(value):
        return value
    return lambda n, value=int(value): value


def elementwise(resident, *, linear=False, workspace=None) -> Shape:
    return Shape(ELEMENTWISE, _count(resident), workspace=workspace, linear=linear)


def two_pass(resident, *, statistic=STATISTIC_RESIDENT, whole=None, workspace=None) -> Shape:
    return Shape(TWO_PASS, _count(resident), statistic=_count(statistic), whole=_count(whole), workspace=workspace)


def gram(resident, *, direct=None, workspace=None) -> Shape:
    return Shape(GRAM, _count(resident), direct=_count(direct), workspace=workspace)


def iterative(resident, *, direct=None, workspace=None) -> Shape:
    return Shape(ITERATIVE, _count(resident), direct=_count(direct), workspace=workspace)


# --- chunking and residency -----------------------------------------------------------------------

def row_spans(tensor_shape, itemsize: int, resident: int, budget: int | None, *, in_flight: int = 1,
              tile: Tile | None = CACHE_TILE, max_rows: int | None = None) -> list:
    """Row ranges [(start, stop)] of a key such that `resident` chunk-sized tensors of `itemsize`
    bytes per element fit `budget` bytes (None: unbounded) for each of `in_flight` spans worked on at
    once; with a cache `tile`, also small enough to stay in cache; a row is never split. The one
    chunking rule: the engine's and the in-memory inputs (KeyInputs.chunks) both ask it."""
    rows = tensor_shape[0] if tensor_shape else 1
    row_elems = max(1, math.prod(tensor_shape[1:])) if tensor_shape else 1
    step = rows if max_rows is None else max_rows
    if budget is not None:
        step = min(step, budget // max(1, in_flight * resident * row_elems * itemsize))
    if tile is not None:
        step = min(step, tile.rows(row_elems, resident, itemsize))
    step = max(1, min(rows, step))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)] or [(0, 0)]


def spans(inputs, shape: Shape, stage: str = "main") -> list:
    """Row ranges of one key for a pass of this shape: `stage` is "main", "statistic" (one model at a
    time) or "direct" (the whole key, when it fits)."""
    resident = {"main": shape.resident, "statistic": shape.statistic or (lambda n: STATISTIC_RESIDENT),
                "direct": shape.direct or shape.resident}[stage]
    tile = ELEMENTWISE_TILE if shape.kind == ELEMENTWISE and stage == "main" else CACHE_TILE
    return inputs.chunks(resident=resident(inputs.n), tile=tile)


def stream(inputs, shape: Shape, rows: Callable[[int, int], torch.Tensor]) -> Iterator[torch.Tensor]:
    """An elementwise pass: rows(a, b) for every span of the main pass, in order (the engine may run
    several spans at once on worker threads, see KeyInputs.imap)."""
    return inputs.imap(rows, spans(inputs, shape))


def stream_model(inputs, i: int = 0) -> Iterator[torch.Tensor]:
    """Pool model i, unchanged, in row chunks."""
    return inputs.imap(lambda a, b: inputs.read_rows(i, a, b), inputs.chunks(resident=COPY_RESIDENT))


# --- workspace ------------------------------------------------------------------------------------

def budget(inputs) -> int | None:
    """The key's chunk budget in bytes (None: unbounded)."""
    return getattr(inputs, "budget_bytes", None)


def whole_copies_fit(inputs, matrix: torch.Tensor, copies: int = WHOLE_COPIES_FIT) -> bool:
    """Whether `copies` copies of a whole-key `matrix` fit the budget (a dense factorisation's form)."""
    limit = budget(inputs)
    return limit is None or copies * matrix.numel() * matrix.element_size() <= limit


def spill_limit(inputs) -> int | None:
    """Bytes of per-element state (e.g. bit masks) to keep in memory before spilling to a file."""
    limit = budget(inputs)
    return None if limit is None else limit // SPILL_FRACTION


def key_peak_bytes(shape: Shape, tensor_shape, n: int, params: dict, chunk_bytes: int) -> int:
    """Bytes one key of this shape holds at its peak when its chunks fill `chunk_bytes` (for the
    plan's memory check): the chunks plus the workspace, or the whole tensors it holds."""
    need = 0
    if shape.workspace is not None:
        need = chunk_bytes + shape.workspace_bytes(tensor_shape, n, params)
    if shape.whole is not None:
        need = max(need, shape.whole(n) * math.prod(tensor_shape) * 8)
    return need


def relative_cost(shape: Shape) -> float:
    """Cost per input element relative to a copy, for cutting plans into tasks (tasks.py)."""
    return WHOLE_COST if shape.whole is not None else COST[shape.kind]


# --- the Gram form --------------------------------------------------------------------------------

@dataclass(frozen=True)
class GramMath:
    """The math of a Gram-shaped or iterative method for one key, in both forms; `combine` picks one.

    label              names the form in the key's log (None: not logged);
    direct(points)     -> (output, note): on the N whole tensors (a list), the method's own operations
                       (None: the Gram form always);
    coefficients(gram) -> (c, note): on the fp64 N×N Gram matrix of the points;
    rows(c, stack, a, b) the output rows [a, b) from c and the points' rows (None: Σ c_i x_i);
    centre             the Gram matrix of the points centred on their per-element mean (translation-
                       invariant math such as distances: centring avoids ‖x_i‖² cancelling);
    deltas             the points are the pool models' deltas to the base (else the models)."""
    label: str | None
    direct: Callable[[list], tuple] | None
    coefficients: Callable[[torch.Tensor], tuple]
    rows: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor] | None = None
    centre: bool = False
    deltas: bool = False


def iterative_math(label: str, direct, coefficients, *args, centre: bool = False) -> GramMath:
    """The GramMath of an iterative method whose two forms return (result, iterations) and take the
    same trailing `args`: each key's log names the iterations it took."""
    return GramMath(label, lambda points: _iterations(direct(points, *args)),
                    lambda gram: _iterations(coefficients(gram, *args)), centre=centre)


def _iterations(result: tuple) -> tuple:
    value, iters = result
    return value, f"{iters} iteration(s)"


def accumulate_gram(gram: torch.Tensor, stack: torch.Tensor, centre: bool) -> None:
    """gram += Y Yᵀ for the chunk stack [n, ...]; with `centre`, Y = stack − its per-element mean
    (modifies `stack` in place; callers pass a stack they no longer need)."""
    flat = stack.reshape(stack.shape[0], -1)
    if centre:
        flat -= flat.mean(dim=0, keepdim=True)
    gram += (flat @ flat.T).to(torch.float64)


def combine_rows(coeffs: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """Σ c_i x_i over the stack [n, *chunk] -> [*chunk]."""
    flat = stack.reshape(stack.shape[0], -1)
    return (coeffs.to(flat.dtype) @ flat).reshape(stack.shape[1:])


def gram_matrix(stacks: Iterable[torch.Tensor], centre: bool) -> torch.Tensor | None:
    """The fp64 N×N Gram matrix accumulated over a pass of [n, *chunk] stacks (None for no stacks)."""
    gram = None
    for stack in stacks:
        if gram is None:
            gram = torch.zeros(stack.shape[0], stack.shape[0], dtype=torch.float64)
        accumulate_gram(gram, stack, centre)
    return gram


def combine(stacks: Callable[[], Iterable[torch.Tensor]], chunk_spans: list, math_: GramMath,
            log: Callable[[str], None], direct: bool | None = None) -> Iterator[torch.Tensor]:
    """The output of a Gram-shaped method, yielded in the row chunks `chunk_spans`.

    `stacks()` starts a fresh pass and yields one [n, *chunk] stack per span, in order (a pass may
    re-read and re-derive its points; it must produce the same values every time). The direct form
    (one pass) when `direct`, by default when there is one span; else the Gram form (two passes)."""
    if math_.direct is not None and (len(chunk_spans) == 1 if direct is None else direct):
        (stack,) = list(stacks())
        out, note = math_.direct(list(stack.unbind(0)))
        if math_.label:
            log(f"{math_.label}: direct form, {note}")
        yield out
        return
    coeffs, note = math_.coefficients(gram_matrix(stacks(), math_.centre))
    if math_.label:
        log(f"{math_.label}: gram form over {len(chunk_spans)} chunks, {note}")
    for (a, b), stack in zip(chunk_spans, stacks()):
        yield combine_rows(coeffs, stack) if math_.rows is None else math_.rows(coeffs, stack, a, b)


def gram_key(inputs, shape: Shape, math_: GramMath) -> Iterator[torch.Tensor]:
    """A Gram-shaped method over the key's pool tensors (or their deltas): the direct form when the
    whole key fits one chunk of the shape's `direct` residency, else the Gram form over the chunks of
    its main residency."""
    whole = spans(inputs, shape, "direct")
    direct = len(whole) == 1 and math_.direct is not None
    chunk_spans = whole if direct else spans(inputs, shape)
    return combine(lambda: (inputs.read_stack(a, b, minus_base=math_.deltas) for a, b in chunk_spans), chunk_spans,
                   math_, inputs.log, direct)
