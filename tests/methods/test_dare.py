"""The TIES family's random drops (ALGORITHMS.md §7, §11.1: DARE, DROP, DELLA; methods/dare.py): one rule per test."""
from __future__ import annotations

import math

import pytest
import torch

from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.methods import apply
from astolfo_merge.methods.dare import CounterMasks, TorchMasks, uniforms

from conftest import load


def pool(shape=(12, 5), n=4, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return base, [base + spread * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


# --- the math ----------------------------------------------------------------------------------

def test_rescale_divides_the_merged_delta_once_by_one_minus_p():
    base, models = pool(seed=4)
    plain = apply("dare", models, base, {"p": 0.25, "rescale": False}, seed=9)
    scaled = apply("dare", models, base, {"p": 0.25, "rescale": True}, seed=9)
    assert torch.allclose(scaled - base, (plain - base) / 0.75, rtol=1e-13, atol=1e-15)



# --- masks: the same bytes whatever the chunking ------------------------------------------------


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
