"""SLERP of two models (methods/slerp.py): one rule per test; sd-mecha parity is in test_differential_mecha.py."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.errors import RecipeError
from astolfo_merge.methods import TensorInputs, apply, get_method
from astolfo_merge.methods.shapes import spans

from conftest import close, load, run_cli

FAST = settings(max_examples=15, deadline=None)


def pair(shape=(12, 5), seed=0, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    return a, a + spread * torch.randn(shape, generator=g, dtype=torch.float64)


def run(a, b, alpha, **kw):
    """(output, log) of slerp on a and b; kw goes to TensorInputs (chunk_rows / budget_bytes pick the form)."""
    method = get_method("slerp")
    inputs = TensorInputs([a, b], **kw)
    parts = list(method.run(inputs, method.resolve_params({"alpha": alpha})))
    out = parts[0] if len(parts) == 1 else torch.cat([p.reshape((-1,) + a.shape[1:]) for p in parts])
    return out.reshape(a.shape), inputs.messages


def test_orthogonal_directions_meet_at_the_normalised_midpoint_scaled_by_the_mean_norm():
    a, b = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert close(apply("slerp", [a, b], params={"alpha": 0.5}), torch.tensor([1.0, 1.0], dtype=torch.float64) * 2 / math.sqrt(2))


def test_the_output_stays_on_the_great_circle_at_angle_alpha_omega():
    a, b = pair()
    omega = math.acos(float((a * b).sum() / (a.norm() * b.norm())))
    out = apply("slerp", [a, b], params={"alpha": 0.3})
    assert math.isclose(math.acos(float((a * out).sum() / (a.norm() * out.norm()))), 0.3 * omega, rel_tol=1e-9)


def test_alpha_zero_and_one_give_the_end_points():
    a, b = pair()
    assert close(apply("slerp", [a, b], params={"alpha": 0.0}), a) and close(apply("slerp", [a, b], params={"alpha": 1.0}), b)


@pytest.mark.parametrize("kw", [{}, {"chunk_rows": 2}])
def test_parallel_directions_fall_back_to_lerp_in_both_forms(kw):
    a, _ = pair()
    out, log = run(a, 3.0 * a, 0.25, **kw)
    assert close(out, torch.lerp(a, 3.0 * a, 0.25)) and "lerp" in log[-1]


@pytest.mark.parametrize("kw", [{}, {"chunk_rows": 2}])
def test_antiparallel_directions_fall_back_to_lerp_in_both_forms(kw):
    """The deliberate difference from sd-mecha, which divides rounding noise by sin(pi) there."""
    a, _ = pair()
    out, log = run(a, -0.5 * a, 0.3, **kw)
    assert close(out, torch.lerp(a, -0.5 * a, 0.3)) and log[-1].endswith("antiparallel: lerp")


def test_a_zero_tensor_falls_back_to_lerp():
    a, _ = pair()
    assert close(apply("slerp", [a, torch.zeros_like(a)], params={"alpha": 0.4}), 0.6 * a)


@FAST
@given(st.sampled_from([(), (9,), (8, 5), (4, 3, 2, 2)]), st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_the_gram_form_over_row_chunks_equals_the_direct_form(shape, seed, alpha):
    a, b = pair(shape, seed)
    direct, log_direct = run(a, b, alpha)
    chunked, log_chunked = run(a, b, alpha, chunk_rows=1)
    assert close(chunked, direct, rtol=1e-10, atol=1e-12)
    rows = shape[0] if shape else 1
    assert "direct form" in log_direct[-1] and ("gram form" in log_chunked[-1] or rows == 1)


def test_the_budget_chooses_the_gram_form_and_bounds_the_chunks():
    a, b = pair((64, 16))
    row_bytes, budget = 16 * 8, 16 * 8 * 10              # ten rows of fp64: the whole key does not fit
    out, log = run(a, b, 0.5, budget_bytes=budget)
    assert "gram form over" in log[-1] and close(out, run(a, b, 0.5)[0], rtol=1e-10, atol=1e-12)
    shape = get_method("slerp").shape
    chunks = spans(TensorInputs([a, b], budget_bytes=budget), shape)
    assert len(chunks) > 1 and all((stop - start) * row_bytes * shape.resident(2) <= budget for start, stop in chunks)


def test_the_declaration_drives_recipe_validation():
    with pytest.raises(RecipeError, match="at most 2 models"):
        parse_recipe({"pool": ["a.safetensors", "b.safetensors", "c.safetensors"], "method": "slerp"})
    with pytest.raises(RecipeError, match="params.alpha"):
        parse_recipe({"pool": ["a.safetensors", "b.safetensors"], "method": "slerp", "params": {"alpha": 1.5}})


def test_the_cli_lists_it_and_merges_with_it(models, tmp_path):
    listed = {m["name"]: m for m in json.loads(run_cli("methods", "--json", cwd=tmp_path).stdout)}
    assert [p["name"] for p in listed["slerp"]["params"]] == ["alpha"] and listed["slerp"]["shape"] == "gram"
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "slerp",
                                  "params": {"alpha": 0.4}, "output": "slerp.safetensors"}))
    proc = run_cli("merge", recipe, "--models-dir", models, "--no-hash", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out, a, b = (load(models / f"{name}.safetensors") for name in ("slerp", "sd1-a", "sd1-b"))
    merged = [k for k in out if out[k].is_floating_point() and k in a and a[k].shape == out[k].shape]
    for key in merged[::50]:           # the engine's forms (Gram beyond ~37k elements) agree with the direct one
        ref = apply("slerp", [a[key], b[key]], params={"alpha": 0.4}).to(out[key].dtype)
        assert close(out[key], ref, rtol=2e-3, atol=1e-6), key
