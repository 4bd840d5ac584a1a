"""Weight matching (Git Re-Basin, arXiv 2209.04836 §3.2): permutations π of B maximising Σ_k ⟨A_k, π(B_k)⟩.

Coordinate descent: each sweep visits the spec's variables in an order drawn from the recipe seed;
for one variable it builds C = Σ over its uses of A[unit, ·] · π_others(B)[unit, ·]ᵀ (B with every
*other* variable's current permutation applied), and takes the best allowed permutation
(`assignment.best_permutation`) if it beats the current one. Sweeps stop when none improves.

Memory: tensors are read on demand, one key at a time, through `read_a(key)` / `read_b(key)`, and
kept in their stored dtype (fp16: a quarter of fp64); they become fp64 only in column chunks of
≤ 32 MB for the products. The permutations (integer vectors) are the only whole-model state. Peak:
a few stored-dtype copies of the largest key (SD1/SDXL conv 1280×2560×3×3: 59 MB in fp16) plus
one n×n fp64 cost matrix (210 MB for SDXL's 5120 feed-forward units) and the LAP's copy of it.

Determinism: visiting order from `seed` (Python's `random.Random`, stable across versions); one
variable at a time, no thread races. C is computed with numpy (OpenBLAS), whose gemm splits work
over output blocks only, so C — and every decision — is bitwise the same for any thread count;
torch's MKL gemm splits the reduction and differs in the last bits between 1 and 2 threads
(measured), which could flip a near-tie.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ...errors import Cancelled
from .assignment import best_permutation, score
from .permutation import PermutationSpec, apply_index, axis_index

RELATIVE_TOLERANCE = 1e-12     # a gain below this fraction of the score is rounding, not progress
CHUNK_ELEMENTS = 1 << 22       # columns per product: ≤ 32 MB of fp64 per operand chunk


@dataclass
class MatchResult:
    perms: dict                       # variable -> [index array per facet]
    sweeps: int                       # sweeps run
    converged: bool                   # the last sweep changed nothing
    gains: list = field(default_factory=list)      # total objective gain per sweep
    changed: list = field(default_factory=list)    # variables changed per sweep
    seconds: float = 0.0
    start_seconds: float = 0.0                     # the propagation start
    sweep_seconds: list = field(default_factory=list)

    def summary(self, spec: PermutationSpec) -> str:
        state = "converged" if self.converged else "stopped at the sweep limit"
        moved = sum(any((p != np.arange(len(p))).any() for p in ps) for ps in self.perms.values())
        gains = ", ".join(f"{g:.4g}" for g in self.gains)
        return (f"re-basin: {len(spec.variables)} permutation groups, {self.sweeps} sweep(s), {state}; "
                f"{moved} group(s) permuted; objective gain per sweep: {gains}; {self.seconds:.1f} s")


def cost_matrices(spec: PermutationSpec, name: str, perms: dict, read_a, read_b, keys=None,
                  settled: set | None = None) -> list | None:
    """The facets' n×n float64 matrices C_f for variable `name` (None if none of its keys counts).

    With `settled`, a use counts only if every other axis of its tensor is unpermuted or indexed by
    a settled variable (vectors always count), and at least one such matrix use must exist: the
    propagation start of `weight_matching`."""
    var = spec.variables[name]
    uses = {}
    for key, axis, offset, facet in var.members:
        if keys is None or key in keys:
            uses.setdefault(key, []).append((axis, offset, facet))
    if settled is not None:
        uses = {k: u for k, u in uses.items() if _anchored(spec, k, u[0][0], settled)}
        if all(len(spec.axes[k]) == 1 for k in uses):
            return None
    if not uses:
        return None
    costs = [np.zeros((var.size, var.size)) for _ in var.facets]
    for key, items in uses.items():
        axis = items[0][0]
        a = read_a(key)                                 # stored dtype: fp64 only chunk by chunk
        b = apply_index(read_b(key), _index(spec, key, perms), skip_axis=axis)
        for _axis, offset, facet in items:
            x, y = _units(a, axis, offset, var.size), _units(b, axis, offset, var.size)
            step = max(1, CHUNK_ELEMENTS // var.size)   # fixed by the shapes: the same sums for any thread count
            for start in range(0, x.shape[1], step):
                costs[facet] += unit_products(_float64(x[:, start:start + step]), _float64(y[:, start:start + step]))
    return costs


def unit_products(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x @ yᵀ (n×m by n×m -> n×n) in float64 through numpy's BLAS: bitwise independent of the
    thread count (see the module docstring), unlike torch.matmul on MKL for skinny shapes."""
    return x @ y.T


def _anchored(spec, key, axis, settled) -> bool:
    return all(s.var is None or s.var in settled
               for i, segs in enumerate(spec.axes[key]) if i != axis for s in segs)


def _index(spec, key, perms):
    return [axis_index(segs, perms) for segs in spec.axes[key]]


def _units(t: torch.Tensor, axis: int, offset: int, size: int) -> torch.Tensor:
    """Rows = the variable's units on `axis`, columns = everything else flattened (t's dtype)."""
    return t.narrow(axis, offset, size).movedim(axis, 0).reshape(size, -1)


def _float64(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.to(torch.float64).numpy())


def weight_matching(spec: PermutationSpec, read_a: Callable, read_b: Callable, *, seed: int = 0, sweeps: int = 10,
                    keys=None, report: Callable[[str], None] | None = None, cancel=None,
                    start: str = "propagate") -> MatchResult:
    """Align B to A. `keys`: the full key names both models provide (None: all spec keys).
    `report(message)` gets throttled progress; `cancel` (threading.Event) is checked between groups.

    `start`: "identity" is the paper's start (every π = id). "propagate" first settles the
    variables outward from the never-permuted axes (latent, text context, timestep and label
    inputs): a variable is matched only through tensors whose other axes are already settled, in
    seeded random order, until all are settled. Plain coordinate descent from identity can lock
    into a self-consistent wrong optimum where many variables share one space (SDXL's depth-10
    transformers: measured on permuted copies); propagation never matches through a still-unknown
    neighbour, and for fine-tunes of one base it lands on identity as before."""
    began = time.monotonic()
    perms = spec.identity()
    rng = random.Random(seed)
    result = MatchResult(perms, 0, False)
    progress = _Throttle(report)
    if start == "propagate":
        _propagate(spec, perms, read_a, read_b, keys, rng, progress, cancel)
    elif start != "identity":
        raise ValueError(f"unknown start {start!r}")
    result.start_seconds = time.monotonic() - began
    names = list(spec.variables)
    for sweep in range(1, sweeps + 1):
        sweep_began = time.monotonic()
        order = names[:]
        rng.shuffle(order)
        gain_total, changed = 0.0, 0
        for n, name in enumerate(order, 1):
            _check(cancel)
            costs = cost_matrices(spec, name, perms, read_a, read_b, keys)
            gain = _improve(spec, name, perms, costs)
            if gain:
                gain_total += gain
                changed += 1
            progress(f"re-basin sweep {sweep}/{sweeps}, group {n}/{len(order)} ({name}): "
                     f"gain {gain:.4g}, {changed} improved this sweep", n == len(order))
        result.sweeps = sweep
        result.gains.append(gain_total)
        result.changed.append(changed)
        result.sweep_seconds.append(time.monotonic() - sweep_began)
        if changed == 0:
            result.converged = True
            break
    result.seconds = time.monotonic() - began
    return result


def _propagate(spec, perms, read_a, read_b, keys, rng, progress, cancel):
    """Settle every variable once, each through already-settled neighbours only (see weight_matching)."""
    settled, pending = set(), list(spec.variables)
    while pending:
        rng.shuffle(pending)
        left = []
        for name in pending:
            _check(cancel)
            costs = cost_matrices(spec, name, perms, read_a, read_b, keys, settled)
            if costs is None:
                left.append(name)
                continue
            _improve(spec, name, perms, costs)
            settled.add(name)
            progress(f"re-basin start: {len(settled)}/{len(spec.variables)} groups settled ({name})")
        if len(left) == len(pending):
            break                            # the rest touches no available key: stays identity
        pending = left


def _improve(spec, name, perms, costs) -> float:
    """Take the best allowed permutation if it beats the current one; return the gain (0: kept)."""
    if costs is None:
        return 0.0
    candidate, new = best_permutation(spec.variables[name].tree, costs)
    old = score(costs, perms[name])
    gain = new - old
    if gain > RELATIVE_TOLERANCE * max(abs(old), abs(new), 1e-300):
        perms[name] = candidate
        return gain
    return 0.0


def _check(cancel):
    if cancel is not None and cancel.is_set():
        raise Cancelled()


class _Throttle:
    """Forward progress messages at most once a second (and always when `force`)."""

    def __init__(self, report):
        self.report, self.last = report, 0.0

    def __call__(self, message, force=False):
        now = time.monotonic()
        if self.report and (force or now - self.last >= 1.0):
            self.last = now
            self.report(message)


def inverse(perms: dict) -> dict:
    """π⁻¹ per variable and facet (argsort of each index array)."""
    return {k: [np.argsort(p) for p in v] for k, v in perms.items()}
