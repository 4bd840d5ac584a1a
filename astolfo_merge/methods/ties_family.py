"""The TIES family's shared declarations: its parameters, one key's values (Config), its shape and workspace.

Every member of the family (ties.py: trim, sign election, combine, the declarations; dare.py: the
random drops) reads one key's parameters through `Config` and chunks its rows through `FAMILY`, so the
presets share the same Param objects and the same memory rules.
"""
from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np

from .median import GM_PARAMS
from .registry import Param
from .shapes import two_pass

BLOCK = 1 << 20          # elements per RNG / ranking block (a multiple of 8 for the bit packing)
GENERAL = "ties_general"


# --- parameters -------------------------------------------------------------------------------

def _gm(name, new_name):
    param = next(p for p in GM_PARAMS if p.name == name)
    return replace(param, name=new_name, help="geometric median: " + param.help)


PARAMS = {p.name: p for p in (
    Param("k", "float", 1.0, 0.0, 1.0, step=0.01,
          help="trim: fraction of each delta KEPT by magnitude (1 keeps all). Threshold = the j-th smallest |delta| "
               "with j = max(floor((1 − k)·numel), 1); elements tied with it are kept (sd-mecha's rule)"),
    Param("sign", "choice", "sum", choices=("sum", "count"),
          help="sign election: 'sum' = sign of the summed deltas (paper TIES); 'count' = majority of the signs, "
               "one model one vote (TIES-SOUP). A tie elects 0, and that element keeps the base's value"),
    Param("lambda", "float", 1.0, -1.0, 3.0, step=0.01, help="scale λ of the merged delta: base + λ·delta"),
    Param("p", "float", 0.0, 0.0, 0.99, step=0.01,
          help="drop probability of every delta element (DARE); 0 drops nothing"),
    Param("rescale", "bool", False,
          help="divide the merged delta by (1 − p) (DARE). Off = the author's DROP: inside the disjoint mean the "
               "survivors' mean is already unbiased"),
    Param("eps", "float", 0.0, -1.0, 1.0, step=0.01,
          help="DELLA window: keep probability q = clamp(1 − p + eps·(r/n − (n + 1)/(2n)), 0, 1), r = magnitude "
               "rank 1..n over the whole tensor. eps > 0 keeps large deltas more often (paper), eps < 0 drops "
               "them more often (the author's −0.1); 0 = plain DARE"),
    Param("combine", "choice", "mean", choices=("mean", "median"),
          help="'mean' = disjoint mean of the deltas that agree with the elected sign (TIES); 'median' = "
               "geometric median of the sign-filtered deltas, dropped/disagreeing entries kept as zeros (TGMD, DGMLA)"),
    _gm("eps", "gm_eps"), _gm("maxiter", "maxiter"), _gm("ftol", "ftol"),
    Param("spectrum", "choice", "keep", choices=("keep", "iso_z"),
          help="'iso_z' reshapes the singular values of the merged delta: σ' = μ + z·(σ − μ) (the author's "
               "DGMIZ = DGMLA + Iso-Z, §12.3); 'keep' leaves it"),
    Param("z", "float", 0.8, -2.0, 4.0, step=0.05,
          help="Iso-Z blend: 0 = flat spectrum (Iso-C-like), 1 = unchanged; the author used 0.8 and 2.0"),
    Param("geometric_mean", "bool", False, help="Iso-Z: μ = geometric mean of σ (the fork's apply_exp)"),
    Param("high_dim", "bool", True, help="Iso-Z: also transform convs, viewed as [out, in·kh·kw] (apply_high_dim)"),
    Param("clamp", "bool", False, help="Iso-Z: clamp σ' at 0 (z > 1 can make it negative; the author does not clamp)"),
    Param("rng", "choice", "counter", choices=("counter", "torch"),
          help="'counter': Philox stream per key and model, the same bytes whatever the chunking or threads; "
               "'torch': sd-mecha 1.x compatible masks (CPU torch.Generator seeded with the recipe seed, "
               "torch.bernoulli over each full tensor in pool order)"),
)}


ATTRIBUTE = {"lambda": "lam"}    # parameter names that are Python keywords


class Config(SimpleNamespace):
    """One key's parameters as attributes, one per PARAMS entry (`lam` for 'lambda'), and the values
    derived from them. Built from PARAMS: a new parameter needs no edit here."""

    @classmethod
    def of(cls, params: dict) -> "Config":
        return cls(**{ATTRIBUTE.get(name, name): params[name] for name in PARAMS})

    @property
    def drops(self) -> bool:
        return self.p > 0.0 or self.eps != 0.0

    @property
    def keep(self) -> float:
        """Base keep probability; in torch mode from sd-mecha's float32 `probability` tensor."""
        return 1.0 - (float(np.float32(self.p)) if self.rng == "torch" else self.p)

    @property
    def divisor(self) -> float:
        if not self.rescale or self.p == 0.0:
            return 1.0
        return float(np.float32(1.0) - np.float32(self.p)) if self.rng == "torch" else 1.0 - self.p


def workspace(shape, n, params) -> int:
    """Bytes held outside the row chunks: a full tensor for the trim thresholds, the DELLA ranking."""
    numel = math.prod(shape) if shape else 1
    need = 8 * numel + numel // 2 if params.get("k", 1.0) < 1.0 else 0   # + kth_value's gathered values
    if params.get("eps", 0.0) != 0.0:
        need = max(need, 28 * numel)     # |τ| (8) + argsort indices (8) + its merge buffer (~4) + ranks (4..8)
    if params.get("spectrum") == "iso_z" and len(shape) >= 2:
        need = max(need, 16 * numel)     # the merged delta + its transform (the SVD form only when 4 copies fit)
    return need


# The row chunks hold the N deltas of the chunk and their signs; the statistic passes (trim
# thresholds, DELLA ranks) one model at a time; the workspace is the whole-tensor statistic.
FAMILY = two_pass(lambda n: 2 * n + 6, workspace=workspace)

