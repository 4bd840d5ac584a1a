"""The best permutation inside a spec tree: max Σ_f Σ_i C_f[i, σ_f(i)] (linear assignment with structure).

Weight matching asks, for one variable, for the permutation σ maximising ⟨C, σ⟩ where
C[i, j] = ⟨A's unit i, B's unit j⟩. Unconstrained, that is one linear assignment problem (LAP,
`scipy.optimize.linear_sum_assignment(maximize=True)`). A spec tree (permutation.Node) restricts σ to
exchanging whole blocks (GroupNorm groups, attention heads) and shuffling inside them; because the
objective is a sum over blocks, the optimum decomposes exactly: the value of sending block a onto
block b is the optimum inside the pair (recursively), and the block order is one small LAP over
those values. Facets (attention's q/k and v) share the block order but get their own inner
assignment, so the value of a pair is the sum of the facets' inner optima.

Cost: a class of k exchangeable blocks of size s costs k² LAPs of size s plus one of size k
(32 GroupNorm groups of 40: 1024 LAPs of 40×40, a few tens of ms).
"""
from __future__ import annotations

import numpy as np

from .permutation import Node


def _solve(scores):
    """The maximising assignment (rows, cols). scipy is imported here, not at module load: it adds
    half a second to every start of the CLI and the tab, and only Re-Basin needs it."""
    from scipy.optimize import linear_sum_assignment
    return linear_sum_assignment(scores, maximize=True)


def best_permutation(tree: Node, costs) -> tuple:
    """(permutations, value): one index array per facet (`perm[i]` = B's unit placed at position i)
    and the optimal Σ. `costs` are the facets' square float64 matrices, size tree.size."""
    value, maps = _match(tree, tree, costs)
    return maps, value


def score(costs, perms) -> float:
    """⟨C, σ⟩ of given permutations (the value `best_permutation` improves on)."""
    return float(sum(c[np.arange(len(p)), p].sum() for c, p in zip(costs, perms)))


def _match(a: Node, b: Node, costs) -> tuple:
    """Best value of mapping a's positions onto b's units (a and b have the same shape)."""
    if not a.children:
        maps, value = [], 0.0
        for c in costs:
            block = c[a.start:a.stop, b.start:b.stop]
            rows, cols = _solve(block)
            value += float(block[rows, cols].sum())
            maps.append(b.start + cols[np.argsort(rows)])
        return value, maps
    maps = [np.empty(a.size, dtype=np.int64) for _ in costs]
    value = 0.0
    movable = {i for cls in a.classes for i in cls}

    def place(i, result):
        child = a.children[i]
        for m, part in zip(maps, result[1]):
            m[child.start - a.start:child.stop - a.start] = part
        return result[0]

    for i in range(len(a.children)):
        if i not in movable:
            value += place(i, _match(a.children[i], b.children[i], costs))
    for cls in a.classes:
        if all(not a.children[i].children and a.children[i].size == 1 for i in cls):
            value += _match_units(a, b, cls, costs, maps)
            continue
        pairs = {(x, y): _match(a.children[i], b.children[j], costs) for x, i in enumerate(cls) for y, j in enumerate(cls)}
        values = np.array([[pairs[x, y][0] for y in range(len(cls))] for x in range(len(cls))])
        rows, cols = _solve(values)
        for x, y in zip(rows, cols):
            value += place(cls[x], pairs[x, y])
    return value, maps


def _match_units(a: Node, b: Node, cls, costs, maps) -> float:
    """A class of single-unit leaves (e.g. 1-wide heads): one LAP, no inner problems."""
    rows_ix = [a.children[i].start for i in cls]
    cols_ix = np.array([b.children[j].start for j in cls])
    values = [c[np.ix_(rows_ix, cols_ix)] for c in costs]
    rows, cols = _solve(sum(values))
    for m in maps:
        for x, y in zip(rows, cols):
            m[rows_ix[x] - a.start] = cols_ix[y]
    return float(sum(v[rows, cols].sum() for v in values))
