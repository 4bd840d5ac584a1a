"""The TIES family (ALGORITHMS.md §5–§8, §10.2, §11): one rule per test."""
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
from astolfo_merge.methods.ties import GENERAL, PARAMS, CounterMasks, TorchMasks, uniforms

from conftest import load

FAMILY = ("ties", "ties_soup", "dare", "drop", "tsd", "tgmd", "della", "dgmla", "dgmiz")
FAST = settings(max_examples=15, deadline=None)


def pool(shape=(12, 5), n=4, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return base, [base + spread * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


shapes = st.sampled_from([(), (7,), (9, 4), (6, 3, 2, 2)])


# --- declarations ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY)
def test_every_preset_is_ties_general_with_its_values_pinned(name):
    method, general = get_method(name), get_method(GENERAL)
    assert method.preset_of == GENERAL and method.run is general.run
    assert {p.name for p in method.params} | set(method.fixed) == set(PARAMS)
    resolved = method.resolve_params({})
    base, models = pool()
    assert torch.equal(apply(name, models, base, seed=3), apply(GENERAL, models, base, resolved, seed=3))


def test_sign_rule_is_an_explicit_choice_not_a_boolean():
    sign = get_method("ties").param("sign")
    assert sign.kind == "choice" and set(sign.choices) == {"sum", "count"}


def test_every_parameter_has_help_and_a_default_inside_its_range():
    for name in FAMILY + (GENERAL,):
        for param in get_method(name).params:
            assert param.help, (name, param.name)
            param.validate(param.default, name)


def test_published_presets_carry_the_authors_values():
    assert get_method("ties_soup").fixed["sign"] == "count" and get_method("ties_soup").fixed["k"] == 1.0
    dgmla = get_method("dgmla").resolve_params({})
    assert (dgmla["p"], dgmla["eps"], dgmla["combine"], dgmla["rescale"]) == (0.1, -0.1, "median", False)
    tgmd = get_method("tgmd").resolve_params({})
    assert (tgmd["p"], tgmd["sign"], tgmd["combine"], tgmd["gm_eps"], tgmd["maxiter"], tgmd["ftol"]) == \
        (0.1, "count", "median", 1e-6, 100, 1e-20)
    assert get_method("drop").fixed["rescale"] is False and get_method("dare").resolve_params({})["rescale"] is True


# --- the math ----------------------------------------------------------------------------------

def test_trim_keeps_everything_tied_with_the_jth_smallest_magnitude():
    base = torch.zeros(10, dtype=torch.float64)
    delta = torch.tensor([1., -2, 3, -4, 5, 6, 7, 8, 9, 10], dtype=torch.float64)
    out = apply("ties", [base + delta], base, {"k": 0.2})          # j = 8: keep |d| >= 8
    assert torch.equal(out, torch.where(delta.abs() >= 8, delta, torch.zeros_like(delta)))


def test_sum_rule_follows_magnitude_and_count_rule_follows_the_majority():
    base = torch.zeros(1, dtype=torch.float64)
    models = [base + 3.0, base - 1.0, base - 1.0]
    assert float(apply("ties", models, base, {"k": 1.0})) == 3.0                     # Σ = +1 → only +3 agrees
    assert float(apply("ties_soup", models, base)) == -1.0                          # two votes for −
    assert float(apply("ties_soup", [base + 1.0, base - 1.0], base)) == 0.0         # a tied vote keeps the base


def test_disjoint_mean_ignores_dropped_and_disagreeing_members():
    base = torch.zeros(3, dtype=torch.float64)
    models = [base + torch.tensor([1., 2, -5]), base + torch.tensor([3., 0, 1]), base + torch.tensor([5., -1, 1])]
    out = apply("ties", models, base, {"k": 1.0, "lambda": 0.5})
    assert torch.allclose(out, 0.5 * torch.tensor([3., 2, -5], dtype=torch.float64))


def test_geometric_median_combine_keeps_filtered_zeros_as_points():
    base = torch.zeros(2, dtype=torch.float64)
    models = [base + torch.tensor([1., 1]), base + torch.tensor([1., 1]), base + torch.tensor([-1., 1])]
    out = apply("tgmd", models, base, {"p": 0.0})
    # F = {(1,1), (1,1), (0,1)} (the −1 disagrees): the median sits at the repeated point (1, 1)
    assert torch.allclose(out, torch.tensor([1., 1], dtype=torch.float64), atol=1e-5)


def test_dgmiz_blends_the_spectrum_of_the_dgmla_delta_toward_its_mean():
    base, models = pool((14, 9), 4, seed=6)
    dgmla = apply("dgmla", models, base, {"sign": "sum"}, seed=2)
    assert torch.allclose(apply("dgmiz", models, base, {"z": 1.0}, seed=2), dgmla, rtol=1e-12, atol=1e-13)
    sigma = torch.linalg.svdvals(dgmla - base)
    got = torch.linalg.svdvals(apply("dgmiz", models, base, {"z": 0.8}, seed=2) - base)
    assert torch.allclose(got, sigma.mean() + 0.8 * (sigma - sigma.mean()), rtol=1e-10)


def test_rescale_divides_the_merged_delta_once_by_one_minus_p():
    base, models = pool(seed=4)
    plain = apply("dare", models, base, {"p": 0.25, "rescale": False}, seed=9)
    scaled = apply("dare", models, base, {"p": 0.25, "rescale": True}, seed=9)
    assert torch.allclose(scaled - base, (plain - base) / 0.75, rtol=1e-13, atol=1e-15)


@FAST
@given(shape=shapes, n=st.integers(1, 5), name=st.sampled_from(["ties", "ties_soup", "tgmd", "dgmla"]))
def test_n_copies_of_one_model_merge_to_that_model(shape, n, name):
    base, (model,) = pool(shape, 1, seed=n)
    params = {"ties": {"k": 1.0}, "ties_soup": {}, "tgmd": {"p": 0.0}, "dgmla": {"p": 0.0, "eps": 0.0}}[name]
    assert torch.allclose(apply(name, [model] * n, base, params), model, rtol=1e-9, atol=1e-9)


@FAST
@given(shape=shapes, data=st.data(), name=st.sampled_from(["ties", "ties_soup", "tgmd"]))
def test_the_deterministic_members_do_not_depend_on_pool_order(shape, data, name):
    base, models = pool(shape, 4, seed=len(shape))
    order = data.draw(st.permutations(range(4)))
    params = {"ties": {"k": 0.5}, "ties_soup": {}, "tgmd": {"p": 0.0}}[name]
    a = apply(name, models, base, params)
    b = apply(name, [models[i] for i in order], base, params)
    assert torch.allclose(a, b, rtol=1e-7, atol=1e-9)     # the median is fixed to ~1e-9 (flat minimum)


# --- streaming and memory ------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("ties", {"k": 0.3}), ("ties_general", {"k": 0.4, "sign": "count"}),
                                         ("tgmd", {}), ("dgmla", {}), ("della", {"eps": 0.3})])
def test_chunked_path_equals_the_whole_tensor_path(name, params):
    base, models = pool((23, 6), 5, seed=11)
    whole = apply(name, models, base, params, seed=5)
    for kw in ({"chunk_rows": 4}, {"chunk_rows": 1}, {"budget_bytes": 2000}):
        inputs_log = TensorInputs(models, base, seed=5, **kw)
        method = get_method(name)
        part = torch.cat(list(method.run(inputs_log, method.resolve_params(params)))).reshape(base.shape)
        if get_method(name).resolve_params(params)["combine"] == "median":
            assert any("gram form" in m for m in inputs_log.messages)
            assert torch.allclose(part, whole, rtol=1e-7, atol=1e-9), kw
        else:
            assert torch.equal(part, whole), kw


@pytest.mark.parametrize("rng", ["counter", "torch"])
@pytest.mark.parametrize("name", ["dare", "tsd", "della"])
def test_same_seed_gives_the_same_bytes_whatever_the_chunking(name, rng):
    base, models = pool((17, 5), 3, seed=2)
    params = {"rng": rng, "p": 0.4}
    runs = [apply(name, models, base, params, seed=77, recipe_seed=5, chunk_rows=c) for c in (None, 1, 6)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    other = apply(name, models, base, params, seed=78, recipe_seed=6)
    assert not torch.equal(runs[0], other)


def test_counter_stream_of_an_element_does_not_depend_on_where_a_range_starts():
    whole = uniforms(123, 0, 1000)
    assert all((uniforms(123, s, 37) == whole[s:s + 37]).all() for s in (0, 1, 2, 3, 5, 401, 963))


def test_torch_masks_drawn_chunk_by_chunk_equal_one_draw_per_full_tensor():
    gen = torch.Generator().manual_seed(42)
    full = [torch.bernoulli(torch.full((10, 7), 0.7, dtype=torch.float64), generator=gen).bool() for _ in range(3)]
    masks = TorchMasks(42, 3, 0.7, 70, 7)
    masks.begin_pass()
    for a, b in ((0, 3), (3, 4), (4, 10)):
        for t in range(3):
            assert torch.equal(masks.chunk(t, a, b, (b - a, 7)), full[t][a:b])


def test_drop_keeps_about_one_minus_p_of_the_elements():
    masks = CounterMasks(seed=1, n=2, keep=0.7, row_elems=1000)
    kept = torch.cat([masks.chunk(t, 0, 100, (100, 1000)).reshape(-1) for t in range(2)]).double().mean()
    assert abs(float(kept) - 0.7) < 4 * math.sqrt(0.7 * 0.3 / 200_000)     # 4 sigma


def test_della_with_negative_eps_drops_the_largest_deltas_more_often():
    n = 40_000
    base = torch.zeros(n, dtype=torch.float64)
    model = base + torch.linspace(1e-3, 1.0, n, dtype=torch.float64)
    out = apply("ties_general", [model], base, {"p": 0.1, "eps": -0.1, "rng": "counter"}, seed=3)
    kept = (out != 0).double()
    small, large = float(kept[: n // 10].mean()), float(kept[-n // 10:].mean())
    # q = 0.9 − 0.1·(r/n − 1/2): ≈ 0.945 for the smallest tenth, ≈ 0.855 for the largest
    assert abs(small - 0.945) < 0.01 and abs(large - 0.855) < 0.01


def test_trim_threshold_pass_is_declared_as_workspace_for_the_plan():
    ties, soup = get_method("ties"), get_method("ties_soup")
    shape = (1000, 100)
    assert ties.workspace(shape, 4, ties.resolve_params({})) == 8 * 100_000 + 50_000   # + the k-th value's gathered values
    assert soup.workspace(shape, 4, soup.resolve_params({})) == 0
    assert get_method("dgmla").workspace(shape, 4, get_method("dgmla").resolve_params({})) >= 24 * 100_000


def test_engine_passes_the_recipe_seed_to_sd_mecha_compatible_masks(models):
    doc = {"pool": ["sd1-a.safetensors", "sd1-b.safetensors", "sd1-c.safetensors"], "base": "sd1-base.safetensors",
           "method": "tsd", "params": {"rng": "torch"}, "seed": 114514, "dtype": "fp32", "output": "tsd.safetensors"}
    plan = build_plan(parse_recipe(doc), str(models))
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    plan.keys = [kp for kp in plan.keys if kp.key == key]
    out = load(run_merge(plan, RunOptions(hash_inputs=False, memory_gb=0.02)).path)[key]
    sds = [load(models / f"sd1-{n}.safetensors")[key] for n in ("base", "a", "b", "c")]
    ref = apply("tsd", sds[1:], sds[0], {"rng": "torch"}, recipe_seed=114514, seed=1)
    assert torch.equal(out, ref.float())


# --- exact selection (bench/bench_kernels.py: the trim threshold without a full partition) ------

@pytest.mark.parametrize("case", ["normal", "ties", "nan", "inf", "zeros", "sorted", "few_values", "half_zeros"])
@pytest.mark.parametrize("q", [0.0, 1e-6, 0.2, 0.8, 0.999999, 1.0])
def test_kth_value_is_np_partitions_value(case, q):
    import numpy as np

    from astolfo_merge.methods.ties import SELECT_DIRECT, kth_value
    rng = np.random.default_rng(1)
    n = SELECT_DIRECT * 3 + 17
    v = np.abs(rng.standard_normal(n))
    if case == "ties":
        v = np.round(v * 8) / 8
    elif case == "nan":
        v[rng.integers(0, n, n // 3)] = np.nan
    elif case == "inf":
        v[rng.integers(0, n, 1000)] = np.inf
    elif case == "zeros":
        v[: n * 9 // 10] = 0.0
    elif case == "sorted":
        v.sort()
    elif case == "few_values":
        v = np.round(v * 2) / 2
    elif case == "half_zeros":
        v[rng.permutation(n)[: n // 2]] = 0.0
    j = min(n, max(1, int(q * n)))
    expect = np.partition(v.copy(), j - 1)[j - 1]
    got = kth_value(v.copy(), j)
    assert (got == expect) or (np.isnan(got) and np.isnan(expect))
