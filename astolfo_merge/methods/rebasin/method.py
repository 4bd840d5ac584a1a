"""The `rebasin` and `basin_sum` methods (ALGORITHMS.md §14.1, §14.4) on the engine's prepare hook.

`prepare` runs weight matching once over the UNet keys this method merges, reading A and B key by
key through the engine's readers; the permutations are the state every key then sees. `run` is
per key: wa·A + wb·B + wp·π(B), streamed in row chunks. A key whose rows are permuted needs B's
whole tensor (at most ~105 MB in fp64, SDXL's ff.net.0.proj); everything else streams like a
weighted sum. Keys outside the spec (text encoders, VAE, the latent bias) have π = id.
"""
from __future__ import annotations

import functools
import math

import torch

from ..registry import Method, Param, register
from ..shapes import elementwise, spans
from .matching import weight_matching
from .permutation import PermutationSpec, apply_index
from .spec import build_spec

ALPHA_HELP = ("weight of the re-based B: 0 gives A, 1 gives π(B) (B renumbered, the same function as B); "
              "block weights override it per block")
SWEEPS = Param("sweeps", "int", 10, 1, 100, help="most coordinate-descent sweeps over all permutation groups; "
               "stops earlier once no group improves")
START = Param("start", "choice", "propagate", choices=("propagate", "identity"),
              help="'propagate': settle groups outward from the never-permuted inputs first (robust; finds "
                   "permuted copies exactly); 'identity': the paper's start, every permutation = id")


class RebasinState:
    """What `prepare` hands every key: the spec and B's permutations (the only whole-model state)."""

    def __init__(self, spec: PermutationSpec, perms: dict, keys: set):
        self.spec, self.perms, self.keys = spec, perms, keys

    def index(self, key: str):
        """Per-axis indices that renumber B's tensor of `key`, or None when it keeps B's order."""
        return self.spec.index(key, self.perms) if key in self.keys else None


def prepare(plan, readers, log, progress, cancel=None, bindings=None, *, method: str) -> RebasinState | None:
    """Weight matching over the UNet keys `method` merges (the plan's prepare stage: once, before any
    key; `bindings` applies the keys' steps, e.g. a LoRA baked into a pool member first)."""
    spec = build_spec(plan.arch, plan.scale)
    mine = [kp for kp in plan.keys if kp.action == "merge" and kp.method == method and kp.key in spec.axes]
    if not mine:
        return None
    pool = list(mine[0].pool)
    mine = [kp for kp in mine if list(kp.pool) == pool]
    _warn_unaligned(plan, spec, pool, log)
    sources = [plan.sources[i] for i in pool]
    by_key = {kp.key: kp for kp in mine}
    dtype = torch.float64 if plan.recipe.precision == "fp64" else torch.float32

    def reader(n):
        def read(key):
            kp = by_key[key]
            t = readers[pool[n]].read(sources[n].keys[key]).reshape(kp.shape)   # stored dtype: matching upcasts in chunks
            steps = bindings.pre(kp, pool[n]) if bindings is not None and kp.pre.get(pool[n]) else ()
            if steps:                               # e.g. a LoRA baked into this pool member
                t = t.to(dtype)
                for pre in steps:
                    t = pre(t, 0, t.shape[0])
            return t
        return read

    params = mine[0].params
    progress(f"re-basin: matching {sources[1].name} to {sources[0].name} "
             f"({len(spec.variables)} permutation groups, up to {params['sweeps']} sweeps)")
    result = weight_matching(spec, reader(0), reader(1), seed=plan.recipe.seed, sweeps=params["sweeps"],
                             keys=set(by_key), report=progress, cancel=cancel, start=params["start"])
    log.append(result.summary(spec))
    return RebasinState(spec, result.perms, set(by_key))


def _warn_unaligned(plan, spec, pool, log):
    copied = [kp.key for kp in plan.keys if kp.action == "copy" and kp.source == pool[1] and kp.key in spec.axes]
    if copied:
        log.append(f"re-basin: {len(copied)} UNet key(s) only B has are copied without B's permutation "
                   f"(e.g. {copied[0]}); repair A first for a consistent result")


def blend(inputs, wa: float, wb: float, wp: float):
    """wa·A + wb·B + wp·π(B) for one key, in row chunks (π from `inputs.state`)."""
    index = inputs.state.index(inputs.key) if inputs.state is not None else None
    if index is None:
        wb, wp = wb + wp, 0.0
    rows_moved = index is not None and index[0] is not None
    if rows_moved:                               # rows of π(B) come from anywhere in B: hold it whole
        whole_b = inputs.read(1)
        whole_pb = apply_index(whole_b, index)
        if not wb:
            whole_b = None
    for a, b in spans(inputs, SHAPE):
        x = inputs.read_rows(0, a, b).mul_(wa)
        if rows_moved:
            y, py = (whole_b[a:b] if wb else None), whole_pb[a:b]
        else:
            y = inputs.read_rows(1, a, b)
            py = apply_index(y, index) if wp else None
        if wb:
            x.add_(y, alpha=wb)
        if wp:
            x.add_(py, alpha=wp)
        yield x


LARGEST_PERMUTED = 1280 * 2560 * 3 * 3   # elements of the biggest UNet tensor (SD1/SDXL output_blocks.0.0.in_layers.2)


def _workspace(shape, n, params) -> int:
    """Bytes `blend` holds beside its row chunks: B and π(B) whole (≤ 8 bytes each) when π moves the
    rows. Only UNet tensors are permuted, so no key holds more than LARGEST_PERMUTED elements twice."""
    return 2 * 8 * min(math.prod(shape), LARGEST_PERMUTED)


# Chunks: A's rows, B's and π(B)'s (views into the workspace when π moves rows).
SHAPE = elementwise(3, workspace=_workspace)


def _run_rebasin(inputs, params):
    alpha = params["alpha"]
    yield from blend(inputs, 1.0 - alpha, 0.0, alpha)


def _run_basin_sum(inputs, params):
    # alpha·(alpha·A + (1 − alpha)·B) + (1 − alpha)·((1 − alpha)·A + alpha·π(B)), expanded
    a = params["alpha"]
    yield from blend(inputs, a * a + (1.0 - a) ** 2, a * (1.0 - a), (1.0 - a) * a)


register(Method(
    "rebasin", "Git Re-Basin (weight matching)",
    "(1 − alpha)·A + alpha·π(B): π renumbers B's UNet hidden units to best match A (weight matching: coordinate "
    "descent over permutation groups, each step a linear assignment). π is function-preserving — GroupNorm "
    "groups, attention heads, residual paths and GEGLU halves are respected — so π(B) is the same network as B. "
    "The matching runs once over the whole UNet before the merge (minutes to hours at full size); text "
    "encoders and VAE get the plain weighted sum. Deterministic for a given seed.",
    _run_rebasin,
    params=(Param("alpha", "float", 0.5, 0.0, 1.0, help=ALPHA_HELP, step=0.01), SWEEPS, START),
    shape=SHAPE, min_models=2, max_models=2, block_param="alpha", random=True, prepare=functools.partial(prepare, method="rebasin")))

register(Method(
    "basin_sum", "BasinSum (weighted sum + Re-Basin)",
    "alpha·(alpha·A + (1 − alpha)·B) + (1 − alpha)·Rebasin(A, B, alpha), the author's 'enhanced weighted sum'. "
    "Note the two readings of alpha in this definition: in the linear part alpha weighs A, inside Rebasin it "
    "weighs π(B); at the default 0.5 both agree (0.25·A + 0.25·B + 0.5·Rebasin(A, B, 0.5)).",
    _run_basin_sum,
    params=(Param("alpha", "float", 0.5, 0.0, 1.0, help="alpha of the definition: weight of A in the linear part, "
                  "of π(B) inside Rebasin (0.5: both agree); block weights override it per block", step=0.01),
            SWEEPS, START),
    shape=SHAPE, min_models=2, max_models=2, block_param="alpha", random=True, prepare=functools.partial(prepare, method="basin_sum")))
