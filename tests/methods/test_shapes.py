"""shapes.py: one chunking rule, the direct-or-Gram choice, the plan's bytes per shape."""
from __future__ import annotations

import pytest
import torch

from astolfo_merge.methods import METHODS, TensorInputs, apply
from astolfo_merge.methods.shapes import (
    CACHE_TILE,
    ELEMENTWISE,
    ELEMENTWISE_TILE,
    GramMath,
    Shape,
    combine_rows,
    elementwise,
    gram,
    gram_key,
    iterative,
    key_peak_bytes,
    row_spans,
    spans,
    two_pass,
)

from conftest import close


@pytest.mark.parametrize("resident,in_flight,budget", [(2, 1, 4096), (7, 1, 4096), (3, 4, 40_000), (250, 1, 64)])
def test_row_spans_cover_every_row_once_and_fit_the_budget_per_span_in_flight(resident, in_flight, budget):
    shape, itemsize = (50, 8), 8
    chunks = row_spans(shape, itemsize, resident, budget, in_flight=in_flight)
    assert [a for a, _ in chunks] == [0] + [b for _, b in chunks[:-1]] and chunks[-1][1] == 50
    assert all(b - a == 1 or in_flight * resident * (b - a) * 8 * itemsize <= budget for a, b in chunks)


def test_row_spans_bound_a_chunk_by_the_cache_unless_told_not_to():
    shape = (4096, 64)                                     # 262144 fp64 elements: more than one cache-sized chunk
    assert len(row_spans(shape, 8, 3, None)) > 1
    assert row_spans(shape, 8, 3, None, tile=None) == [(0, 4096)]
    assert row_spans((), 8, 3, 1) == [(0, 1)] and row_spans((0, 5), 8, 3, None) == [(0, 0)]


ELEMENTWISE_METHODS = [m for m in METHODS.values() if m.shape.kind == ELEMENTWISE]


@pytest.mark.parametrize("method", ELEMENTWISE_METHODS, ids=lambda m: m.name)
def test_every_elementwise_method_gives_the_same_bits_whatever_the_chunking(method):
    """What lets elementwise passes take a larger cache tile than the others (ELEMENTWISE_TILE)."""
    gen = torch.Generator().manual_seed(3)
    n = min(max(method.min_models, 3), method.max_models or 3)
    base = torch.randn(37, 5, 3, generator=gen, dtype=torch.float64).half()
    tensors = [base + 0.05 * torch.randn(base.shape, generator=gen, dtype=torch.float64).half() for _ in range(n)]
    whole = apply(method, tensors, base, seed=7, recipe_seed=11)
    for rows in (1, 4, 16):
        assert torch.equal(apply(method, tensors, base, seed=7, recipe_seed=11, chunk_rows=rows), whole), rows


def test_elementwise_passes_take_the_larger_tile_and_the_others_keep_theirs():
    key = (1280, 1280, 3, 3)
    assert ELEMENTWISE_TILE.rows(11520, 3, 8) > CACHE_TILE.rows(11520, 3, 8) >= 1
    asked = []

    class Inputs:
        n = 2

        def chunks(self, resident, tile):
            asked.append(tile)
            return row_spans(key, 8, resident, None, tile=tile)
    spans(Inputs(), elementwise(3))
    spans(Inputs(), two_pass(3))
    spans(Inputs(), elementwise(3), "statistic")
    assert asked == [ELEMENTWISE_TILE, CACHE_TILE, CACHE_TILE]


def weighted_mean(weights):
    """A Gram-shaped test method whose two forms give the same Σ w_i x_i (the Gram is not needed)."""
    coeffs = torch.tensor(weights, dtype=torch.float64)
    return GramMath("mean", lambda points: (sum(w * p for w, p in zip(weights, points)), "direct"),
                    lambda g: (coeffs, f"gram {tuple(g.shape)}"))


@pytest.mark.parametrize("kw,form", [({}, "direct form, direct"), ({"chunk_rows": 3}, "gram form over 4 chunks, gram (2, 2)")])
def test_the_direct_form_runs_when_the_key_fits_one_chunk_else_the_gram_form(kw, form):
    g = torch.Generator().manual_seed(1)
    models = [torch.randn(10, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    inputs = TensorInputs(models, **kw)
    out = torch.cat(list(gram_key(inputs, gram(lambda n: n + 3), weighted_mean([0.25, 0.75]))))
    assert close(out, 0.25 * models[0] + 0.75 * models[1]) and inputs.messages == [f"mean: {form}"]


def test_the_direct_form_needs_its_own_residency_to_fit():
    """A key that fits the Gram passes' chunk but not the direct form's tensors takes the Gram form."""
    models = [torch.ones(10, 4, dtype=torch.float64)] * 2
    row_bytes = 4 * 8
    inputs = TensorInputs(models, budget_bytes=10 * row_bytes * 5)   # 5 whole-key tensors fit, 7 do not
    list(gram_key(inputs, iterative(5, direct=7), weighted_mean([0.5, 0.5])))
    assert inputs.messages == ["mean: gram form over 1 chunks, gram (2, 2)"]


def test_math_without_a_direct_form_takes_the_gram_form_on_the_deltas_with_its_own_rows():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 3, generator=g, dtype=torch.float64)
    models = [base + torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    inputs = TensorInputs(models, base)
    seen = []

    def coefficients(gram):
        seen.append(gram)
        return torch.full((3,), 1 / 3, dtype=torch.float64), "mean delta"
    math_ = GramMath("delta mean", None, coefficients, rows=lambda c, deltas, a, b: base[a:b] + combine_rows(c, deltas),
                     deltas=True)
    out = torch.cat(list(gram_key(inputs, gram(4), math_)))
    deltas = torch.stack([m - base for m in models]).reshape(3, -1)
    assert close(seen[0], deltas @ deltas.T) and close(out, sum(models) / 3)
    assert inputs.messages == ["delta mean: gram form over 1 chunks, mean delta"]


def test_the_plan_counts_workspace_beside_the_chunks_and_whole_tensors_alone():
    def workspace(shape, n, params):
        return 8 * shape[0] * shape[1] if params["whole_statistic"] else 0
    shape = two_pass(5, workspace=workspace)
    assert key_peak_bytes(shape, (100, 10), 3, {"whole_statistic": True}, 1000) == 1000 + 8000
    assert key_peak_bytes(shape, (100, 10), 3, {"whole_statistic": False}, 1000) == 1000
    assert key_peak_bytes(two_pass(3, whole=2), (100, 10), 3, {}, 1000) == 2 * 1000 * 8
    assert key_peak_bytes(elementwise(3), (100, 10), 3, {}, 1000) == 0


def test_a_shape_of_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown method shape 'whole_tensor'"):
        Shape("whole_tensor", lambda n: 2)
