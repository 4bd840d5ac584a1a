"""Permutations of a UNet as data, and their use: a `PermutationSpec` (its variables, each axis as
segments, the tree of allowed permutations of each variable) applied to tensors, or sampled.

The spec of an architecture is derived from its key layout by spec.py (`build_spec`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Segment:
    """A run of `size` consecutive indices of one axis, renumbered by facet `facet` of `var`
    (None: never permuted)."""
    var: str | None
    facet: int
    size: int


@dataclass(frozen=True)
class Node:
    """The permutations allowed on [start, stop): a leaf allows any permutation; an inner node keeps
    each child's range and may exchange the children listed together in one of `classes` (their
    subtrees have the same shape), recursively."""
    start: int
    stop: int
    children: tuple = ()
    classes: tuple = ()

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class Variable:
    """One permutation variable. `facets` names independent permutations that share the tree's
    block (head) order — ("qk", "v") for attention, one facet elsewhere. `members` lists every use:
    (key, axis, offset on that axis, facet)."""
    name: str
    size: int
    kind: str
    facets: tuple = ("channels",)
    tree: Node | None = None
    members: list = field(default_factory=list)
    partitions: list = field(default_factory=list)   # GroupNorm groupings seen while building


@dataclass
class PermutationSpec:
    arch: str
    scale: int
    groups: int
    variables: dict                  # name -> Variable, in network order
    axes: dict                       # full key -> tuple(per axis: tuple[Segment] | None)
    unpermuted: tuple = ()           # UNet keys no variable touches

    def identity(self) -> dict:
        return {name: [np.arange(v.size) for _ in v.facets] for name, v in self.variables.items()}

    def random(self, seed: int) -> dict:
        """A uniformly chosen allowed permutation per variable (tests, benchmarks)."""
        rng = np.random.default_rng(seed)
        return {name: _sample(v.tree, rng, len(v.facets)) for name, v in self.variables.items()}

    def index(self, key: str, perms: dict) -> list | None:
        """Per-axis LongTensor indices that apply `perms` to `key` (None for a kept axis); None if
        the key has no permuted axis."""
        axes = self.axes.get(key)
        if axes is None:
            return None
        index = [axis_index(segs, perms) if segs is not None else None for segs in axes]
        return index if any(i is not None for i in index) else None


def axis_index(segments, perms) -> torch.Tensor | None:
    """Indices for one axis: the concatenation of each segment's permutation, offset by its start."""
    if all(s.var is None for s in segments):
        return None
    parts, offset = [], 0
    for s in segments:
        parts.append(offset + (perms[s.var][s.facet] if s.var is not None else np.arange(s.size)))
        offset += s.size
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def apply_index(t: torch.Tensor, index, skip_axis: int | None = None) -> torch.Tensor:
    """`t` with every axis's index applied (out[i] = t[index[i]]), except `skip_axis`."""
    if index is None:
        return t
    for axis, idx in enumerate(index):
        if idx is not None and axis != skip_axis:
            t = t.index_select(axis, idx.to(t.device))
    return t


def permute(t: torch.Tensor, key: str, spec: PermutationSpec, perms: dict) -> torch.Tensor:
    """The tensor `t` of `key` renumbered by `perms` (returned as is for keys outside the spec)."""
    return apply_index(t, spec.index(key, perms))


def _sample(node: Node, rng, facets: int) -> list:
    out = [np.empty(node.size, dtype=np.int64) for _ in range(facets)]
    if not node.children:
        for f in range(facets):
            out[f][:] = node.start + rng.permutation(node.size)
        return out
    source = list(range(len(node.children)))
    for cls in node.classes:
        for i, j in zip(cls, rng.permutation(cls)):
            source[i] = int(j)
    for i, child in enumerate(node.children):
        sub = _sample(node.children[source[i]], rng, facets)
        for f in range(facets):
            out[f][child.start - node.start:child.stop - node.start] = sub[f]
    return out

