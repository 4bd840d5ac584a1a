"""Model Stock (ALGORITHMS.md §9): one rule per test."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from astolfo_merge.methods import TensorInputs, apply, get_method

ESTIMATORS = ("consecutive-last-axis", "all-pairs-flat", "all-pairs-rowwise")
FAST = settings(max_examples=15, deadline=None)
shapes = st.sampled_from([(), (9,), (8, 5), (4, 3, 2, 2)])


def pool(shape=(10, 6), n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    common = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    return base, [base + common + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def test_two_models_follow_the_paper_formula():
    base = torch.zeros(2, 2, dtype=torch.float64)
    a = base + torch.tensor([[1.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    b = base + torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    out = apply("model_stock", [a, b], base)
    cos0 = 1 / 2 ** 0.5                            # row 0: 45°; row 1: parallel
    t0 = 2 * cos0 / (1 + cos0)
    expected = torch.stack([t0 * (a[0] + b[0]) / 2, (a[1] + b[1]) / 2])
    assert torch.allclose(out, expected, rtol=1e-14, atol=0)


def test_whole_tensor_estimator_uses_one_t_for_the_key():
    base, models = pool()
    out = apply("model_stock", models, base, {"estimator": "all-pairs-flat"})
    ratio = (out - base) / (sum(models) / len(models) - base)
    assert torch.allclose(ratio, ratio.reshape(-1)[0].expand_as(ratio), rtol=1e-10)


def test_undefined_t_keeps_the_base_and_is_logged():
    base = torch.zeros(3, 4, dtype=torch.float64)
    a = base + torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b = base - (a - base)                             # cos = −1 with N = 2: 1 + (N − 1)·cos = 0
    inputs = TensorInputs([a, b], base)
    method = get_method("model_stock")
    out = torch.cat(list(method.run(inputs, method.resolve_params({}))))
    assert torch.equal(out, base) and any("undefined" in m for m in inputs.messages)


@FAST
@given(shape=shapes, n=st.integers(2, 5), estimator=st.sampled_from(ESTIMATORS))
def test_n_copies_of_one_model_give_that_model(shape, n, estimator):
    base, (model, *_) = pool(shape, 1, seed=n)
    out = apply("model_stock", [model] * n, base, {"estimator": estimator})
    assert torch.allclose(out, model, rtol=1e-10, atol=1e-12)


@FAST
@given(shape=shapes, data=st.data(), estimator=st.sampled_from(ESTIMATORS[1:]))
def test_all_pairs_estimators_do_not_depend_on_pool_order(shape, data, estimator):
    base, models = pool(shape, 4, seed=3)
    order = data.draw(st.permutations(range(4)))
    a = apply("model_stock", models, base, {"estimator": estimator})
    b = apply("model_stock", [models[i] for i in order], base, {"estimator": estimator})
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(13, 6), (9,), (5, 4, 3, 3)])
def test_chunked_path_equals_the_whole_tensor_path(estimator, shape):
    base, models = pool(shape, 5, seed=7)
    whole = apply("model_stock", models, base, {"estimator": estimator})
    for kw in ({"chunk_rows": 2}, {"chunk_rows": 1}, {"budget_bytes": 1500}):
        assert torch.allclose(apply("model_stock", models, base, {"estimator": estimator}, **kw), whole,
                              rtol=1e-12, atol=1e-14), kw


def test_rowwise_estimators_never_split_a_row():
    base, models = pool((7, 6), 3, seed=2)
    for estimator in ("consecutive-last-axis", "all-pairs-rowwise"):
        whole = apply("model_stock", models, base, {"estimator": estimator})
        assert torch.equal(apply("model_stock", models, base, {"estimator": estimator}, chunk_rows=1), whole)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_short_last_axis_dots_are_torchs_sum_bit_for_bit(length, dtype):
    from astolfo_merge.methods.stock import _last_axis_dots
    g = torch.Generator().manual_seed(length)
    x = torch.randn(7, 300, 5, length, generator=g, dtype=torch.float64)
    x *= torch.exp(3 * torch.randn(7, 300, 5, 1, generator=g, dtype=torch.float64))
    x = x.to(dtype)
    x.view(-1)[::7] = 0.0
    x.view(-1)[::11] = -0.0
    x[:, ::13] = -0.0
    x[:, 5::17] = 0.0
    x[::2, 3::19] *= -1
    ref = (x[:-1] * x[1:]).sum(dim=-1)
    got = _last_axis_dots(x[:-1], x[1:])
    assert torch.equal(ref.view(torch.int64 if dtype == torch.float64 else torch.int32),
                       got.view(torch.int64 if dtype == torch.float64 else torch.int32))
