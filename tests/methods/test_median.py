"""Geometric median (ALGORITHMS.md §10.1) and Karcher mean (§13.1): one rule per test."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.methods import TensorInputs, apply, get_method
from astolfo_merge.methods.median import weiszfeld_direct, weiszfeld_gram

FAST = settings(max_examples=15, deadline=None)
shapes = st.sampled_from([(), (9,), (8, 5), (4, 3, 2, 2)])


def points(shape=(10, 4), n=5, seed=0, offset=1.0):
    g = torch.Generator().manual_seed(seed)
    centre = offset * torch.randn(shape, generator=g, dtype=torch.float64)
    return [centre + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def run(name, tensors, params=None, **kw):
    method = get_method(name)
    inputs = TensorInputs(tensors, **kw)
    out = list(method.run(inputs, method.resolve_params(params)))
    shape = inputs.shape
    return (out[0] if len(out) == 1 else torch.cat([p.reshape((-1,) + shape[1:]) for p in out])).reshape(shape), inputs.messages


# --- geometric median ---------------------------------------------------------------------------

def test_geometric_median_of_x_x_y_is_x():
    x, y = points(n=2, seed=3)
    out = apply("geometric_median", [x, x, y])
    # the distance floor eps = 1e-6 leaves the median within ~eps of x
    assert float(torch.linalg.vector_norm(out - x)) < 1e-6


def test_geometric_median_resists_a_minority_outlier():
    pool = points(n=5, seed=1)
    pool[0] = pool[0] + 100.0
    out = apply("geometric_median", pool)
    mean = sum(pool) / 5
    centre = sum(pool[1:]) / 4
    assert float(torch.linalg.vector_norm(out - centre)) < 0.05 * float(torch.linalg.vector_norm(mean - centre))


@FAST
@given(shape=shapes, n=st.integers(1, 4))
def test_n_copies_of_one_model_give_that_model(shape, n):
    (x,) = points(shape, 1, seed=n)
    assert torch.allclose(apply("geometric_median", [x] * n), x, rtol=1e-12, atol=1e-12)
    assert torch.allclose(apply("karcher", [x] * n), x, rtol=1e-9, atol=1e-12)


@FAST
@given(shape=shapes, data=st.data(), name=st.sampled_from(["geometric_median", "karcher"]))
def test_pool_order_does_not_matter(shape, data, name):
    pool = points(shape, 4, seed=len(shape) + 7)
    order = data.draw(st.permutations(range(4)))
    a, b = apply(name, pool), apply(name, [pool[i] for i in order])
    # Weiszfeld runs until the objective stops changing in fp64; the point itself is then fixed only to
    # ~sqrt(ulp) of the objective's flat minimum, so another summation order moves it by ~1e-9
    assert torch.allclose(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kw", [{"chunk_rows": 3}, {"chunk_rows": 1}, {"budget_bytes": 3000}])
def test_gram_form_equals_the_direct_form(kw):
    pool = points((25, 6), 6, seed=5, offset=20.0)   # far from the origin: centring must prevent cancellation
    direct, log = run("geometric_median", pool)
    gram, log_gram = run("geometric_median", pool, **kw)
    assert "direct form" in log[0] and "gram form" in log_gram[0]
    assert torch.allclose(gram, direct, rtol=1e-9, atol=1e-9)


def test_weiszfeld_on_the_gram_matrix_matches_weiszfeld_on_the_points():
    pool = points((30,), 7, seed=2)
    flat = torch.stack(pool)
    median, iters = weiszfeld_direct(pool, 1e-6, 100, 1e-20)
    coeffs, _ = weiszfeld_gram(flat @ flat.T, 1e-6, 100, 1e-20)
    assert iters >= 1 and math.isclose(float(coeffs.sum()), 1.0, rel_tol=1e-12)
    assert torch.allclose(coeffs @ flat, median, rtol=1e-8, atol=1e-10)


def test_maxiter_zero_is_the_plain_mean():
    pool = points(n=3, seed=8)
    assert torch.allclose(apply("geometric_median", pool, None, {"maxiter": 0}), sum(pool) / 3, rtol=1e-14, atol=0)


# --- Karcher -------------------------------------------------------------------------------------

def test_karcher_of_two_directions_is_their_normalised_midpoint_scaled_by_the_mean_norm():
    a = torch.tensor([3.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = apply("karcher", [a, b], None, {"max_iter": 50, "tol": 1e-12})
    expected = 2.0 * torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    assert torch.allclose(out, expected, rtol=1e-9, atol=1e-12)


def test_karcher_weights_pull_the_direction_toward_the_heavier_model():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = apply("karcher", [a, b], None, {"weights": [3.0, 1.0], "max_iter": 100, "tol": 1e-12})
    angle = math.atan2(float(out[1]), float(out[0]))
    assert math.isclose(angle, math.pi / 8, rel_tol=1e-6)        # a quarter of the way along the arc


def test_karcher_leaves_zero_norm_models_out_of_the_direction_but_in_the_scale():
    a = torch.tensor([2.0, 0.0], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    out = apply("karcher", [a, zero])
    assert torch.allclose(out, torch.tensor([1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("kw", [{"chunk_rows": 2}, {"budget_bytes": 2000}])
def test_karcher_gram_form_equals_the_direct_form(kw):
    pool = points((21, 5), 5, seed=9, offset=0.3)
    direct, log = run("karcher", pool, {"max_iter": 30, "tol": 1e-12})
    gram, log_gram = run("karcher", pool, {"max_iter": 30, "tol": 1e-12}, **kw)
    assert "direct form" in log[0] and "gram form" in log_gram[0]
    assert torch.allclose(gram, direct, rtol=1e-9, atol=1e-12)


def test_engine_logs_which_form_each_key_used(models):
    doc = {"pool": ["sd1-a.safetensors", "sd1-b.safetensors", "sd1-c.safetensors"], "method": "geometric_median",
           "dtype": "fp32", "output": "gm.safetensors"}
    plan = build_plan(parse_recipe(doc), str(models))
    plan.keys = [kp for kp in plan.keys if kp.action == "merge"][:40]
    result = run_merge(plan, RunOptions(hash_inputs=False))
    assert sum("geometric median: direct form" in line for line in result.log) == 40
