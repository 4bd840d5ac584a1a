"""Iso-C and Iso-Z (ALGORITHMS.md §12): one rule per test."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from astolfo_merge.methods import TensorInputs, get_method

FAST = settings(max_examples=12, deadline=None)


def pool(shape=(12, 8), n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return base, [base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def run(name, models, base, params=None, key="model.diffusion_model.x.weight", **kw):
    method = get_method(name)
    inputs = TensorInputs(models, base, key=key, **kw)
    parts = list(method.run(inputs, method.resolve_params(params)))
    return torch.cat([p.reshape((-1,) + inputs.shape[1:]) for p in parts]).reshape(inputs.shape), inputs.messages


def test_iso_c_flattens_the_spectrum_of_the_summed_deltas():
    base, models = pool()
    out, _ = run("iso_c", models, base)
    total = sum(m - base for m in models)
    sigma = torch.linalg.svdvals(total)
    got = torch.linalg.svdvals(out - base)
    assert torch.allclose(got, sigma.mean().expand_as(got), rtol=1e-10)
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    assert torch.allclose(out - base, sigma.mean() * u @ vh, rtol=1e-10, atol=1e-12)


def test_iso_c_gives_other_keys_the_mean_delta():
    for shape, key in (((12,), "x.bias"), ((4, 3, 2, 2), "x.conv.weight"), ((6, 6), "conditioner.embedders.1.model.text_projection")):
        base, models = pool(shape)
        out, _ = run("iso_c", models, base, key=key)
        assert torch.allclose(out, sum(models) / 3, rtol=1e-13, atol=1e-14), key


@FAST
@given(shape=st.sampled_from([(9, 5), (5, 9), (4, 3, 2, 2)]), seed=st.integers(0, 50))
def test_iso_z_with_z_1_is_the_identity_on_the_merged_delta(shape, seed):
    base, models = pool(shape, seed=seed)
    out, _ = run("iso_z", models, base, {"z": 1.0, "high_dim": True})
    assert torch.allclose(out, base + sum(m - base for m in models), rtol=1e-10, atol=1e-12)


@FAST
@given(shape=st.sampled_from([(9, 5), (5, 9), (7,), (4, 3, 2, 2)]), seed=st.integers(0, 50))
def test_iso_z_with_z_0_equals_iso_c(shape, seed):
    base, models = pool(shape, seed=seed)
    z0, _ = run("iso_z", models, base, {"z": 0.0, "high_dim": False})
    c, _ = run("iso_c", models, base)
    assert torch.allclose(z0, c, rtol=1e-12, atol=1e-13)


def test_iso_z_blends_each_singular_value_toward_the_mean():
    base, models = pool((10, 7), seed=4)
    out, _ = run("iso_z", models, base, {"z": 0.8})
    sigma = torch.linalg.svdvals(sum(m - base for m in models))
    expected = sigma.mean() + 0.8 * (sigma - sigma.mean())
    assert torch.allclose(torch.linalg.svdvals(out - base), expected, rtol=1e-10)


def test_geometric_mean_option_uses_the_geometric_mean_of_the_spectrum():
    base, models = pool((8, 6), seed=5)
    out, _ = run("iso_z", models, base, {"z": 0.0, "geometric_mean": True})
    sigma = torch.linalg.svdvals(sum(m - base for m in models))
    got = torch.linalg.svdvals(out - base)
    assert torch.allclose(got, torch.exp(torch.log(sigma).mean()).expand_as(got), rtol=1e-10)


def test_high_dim_transforms_convs_only_when_asked():
    base, models = pool((4, 3, 2, 2), seed=6)
    kept, _ = run("iso_z", models, base, {"z": 0.0, "high_dim": False})
    assert torch.allclose(kept, sum(models) / 3, rtol=1e-13)
    flat, _ = run("iso_z", models, base, {"z": 0.0, "high_dim": True})
    got = torch.linalg.svdvals((flat - base).reshape(4, -1))
    assert torch.allclose(got, got.mean().expand_as(got), rtol=1e-10)


@pytest.mark.parametrize("name", ["iso_c", "iso_z"])
def test_an_all_zero_delta_keeps_the_base_and_is_logged(name):
    base, _ = pool()
    out, log = run(name, [base.clone(), base.clone()], base)
    assert torch.equal(out, base) and torch.isfinite(out).all()
    assert any("all zeros" in m for m in log)


@pytest.mark.parametrize("shape", [(30, 8), (8, 30)])
@pytest.mark.parametrize("z", [0.0, 0.8, 2.0])
def test_gram_form_equals_the_svd_form(shape, z):
    base, models = pool(shape, seed=8)
    svd, log = run("iso_z", models, base, {"z": z})
    gram, log_gram = run("iso_z", models, base, {"z": z}, budget_bytes=4000, chunk_rows=3)
    assert "svd form" in log[0] and "gram form" in log_gram[0]
    assert torch.allclose(gram, svd, rtol=1e-9, atol=1e-11)


def test_clamp_keeps_sharpened_singular_values_non_negative():
    base, models = pool((10, 7), seed=9)
    out, _ = run("iso_z", models, base, {"z": 4.0, "clamp": True})
    sigma = torch.linalg.svdvals(sum(m - base for m in models))
    expected = (sigma.mean() + 4.0 * (sigma - sigma.mean())).clamp(min=0)
    got = torch.linalg.svdvals(out - base)
    assert torch.allclose(got, expected.sort(descending=True).values, rtol=1e-9, atol=1e-12)
