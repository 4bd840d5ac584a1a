"""Per-component L2 distances and delta cosines (the seeds' "L2 diagrams"), streamed in fp64."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from astolfo_merge.cli.commands import main
from astolfo_merge.errors import ArchitectureError, MemoryBudgetError, RecipeError
from astolfo_merge.features.analysis import Analysis, ComponentDistances, analyze, plot
from astolfo_merge.io import arch

from conftest import TEST_SCALE, load

POOL = ["sd1-a.safetensors", "sd1-b.safetensors", "sd1-c.safetensors"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def direct(models, names, base=None) -> dict:
    """Component -> (L2 per model, cosine matrix), computed the obvious way on whole tensors in fp64."""
    tensors = [load(models / n) for n in names]
    ref_tensors = load(models / base) if base else None
    out = {}
    for comp in ("unet", "te0", "vae"):
        keys = [k for k, s in arch.layout("sd1", TEST_SCALE).items() if s.component == comp and not k.endswith("position_ids")]
        flat = torch.stack([torch.cat([t[k].double().reshape(-1) for k in keys]) for t in tensors])
        ref = torch.cat([ref_tensors[k].double().reshape(-1) for k in keys]) if base else flat.mean(dim=0)
        deltas = flat - ref
        norms = deltas.norm(dim=1)
        out[comp] = (norms.numpy(), (deltas @ deltas.T / torch.outer(norms, norms)).numpy())
    return out


def test_distances_to_a_base_equal_a_direct_fp64_computation(models):
    result = analyze([models / n for n in POOL], base=models / "sd1-base.safetensors")
    expected = direct(models, POOL, "sd1-base.safetensors")
    assert result.reference == "base sd1-base" and list(result.components) == ["unet", "te0", "vae"]
    for comp, (l2, cosine) in expected.items():
        assert np.allclose(result.components[comp].l2, l2, rtol=1e-12, atol=0)
        assert np.allclose(result.components[comp].cosine, cosine, rtol=1e-10, atol=1e-12)


def test_without_a_base_the_reference_is_the_pool_mean(models):
    result = analyze([models / n for n in POOL])
    expected = direct(models, POOL)
    assert result.reference == "pool mean"
    for comp, (l2, cosine) in expected.items():
        assert np.allclose(result.components[comp].l2, l2, rtol=1e-12, atol=0)
        assert np.allclose(result.components[comp].cosine, cosine, rtol=1e-10, atol=1e-12)


def test_a_tiny_memory_budget_gives_the_same_numbers(models):
    paths = [models / n for n in POOL]
    roomy = analyze(paths, memory_gb=1.0)
    tight = analyze(paths, memory_gb=16 * 1024 / 2 ** 30)   # 16 KiB: many row chunks per key
    for comp in roomy.components:
        assert np.allclose(roomy.components[comp].gram, tight.components[comp].gram, rtol=1e-12, atol=1e-15)


def test_a_budget_smaller_than_one_row_is_refused_with_the_need(models):
    with pytest.raises(MemoryBudgetError, match="raise --memory-gb"):
        analyze([models / n for n in POOL], memory_gb=64 / 2 ** 30)


def test_pairwise_l2_is_the_distance_between_models(models):
    result = analyze([models / n for n in POOL], base=models / "sd1-base.safetensors")
    a, b = load(models / POOL[0]), load(models / POOL[1])
    keys = [k for k, s in arch.layout("sd1", TEST_SCALE).items() if s.component == "vae"]
    expected = torch.cat([(a[k].double() - b[k].double()).reshape(-1) for k in keys]).norm().item()
    assert result.components["vae"].pairwise_l2[0, 1] == pytest.approx(expected, rel=1e-9)


def test_keys_some_input_lacks_are_skipped_and_listed(models, make_checkpoint):
    final_norm = [k for k in arch.layout("sd1", TEST_SCALE) if "final_layer_norm" in k]
    make_checkpoint("nonorm.safetensors", "sd1", variant=8, drop=final_norm, folder=models)
    result = analyze([models / "sd1-a.safetensors", models / "nonorm.safetensors"])
    assert sorted(result.components["te0"].skipped) == sorted(final_norm)
    assert result.components["te0"].keys == 196 - len(final_norm)


def test_mixed_architectures_are_refused(models):
    with pytest.raises(ArchitectureError, match="same architecture"):
        analyze([models / "sd1-a.safetensors", models / "sdxl-a.safetensors"])


def test_one_model_needs_a_base(models):
    with pytest.raises(RecipeError, match="give --base"):
        analyze([models / "sd1-a.safetensors"])


def test_cli_writes_json_numbers_and_a_png(models, tmp_path, capsys):
    png = tmp_path / "l2.png"
    args = ["analyze", *[str(models / n) for n in POOL], "--base", str(models / "sd1-base.safetensors"),
            "--json", "--plot", str(png)]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    expected = direct(models, POOL, "sd1-base.safetensors")
    assert doc["models"] == ["sd1-a", "sd1-b", "sd1-c"] and doc["reference"] == "base sd1-base"
    assert np.allclose(doc["components"]["unet"]["l2_to_reference"], expected["unet"][0], rtol=1e-12)
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000


def _synthetic(n, components=("unet",)) -> Analysis:
    rng = np.random.default_rng(n)
    names = [f"_x{i:02d}-communityModelWithAVeryLongName_v{i}" for i in range(n)]
    comps = {}
    for comp in components:
        x = rng.normal(size=(n, 64))
        comps[comp] = ComponentDistances(comp, 10, 64, x @ x.T)
    return Analysis(names, names, "pool mean", "sdxl", 1, comps)


def test_the_plot_grows_with_the_number_of_models(tmp_path):
    from PIL import Image
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    plot(_synthetic(5), small)
    plot(_synthetic(50), large)
    (w5, h5), (w50, h50) = Image.open(small).size, Image.open(large).size
    assert w50 > 1.5 * w5 and h50 > 1.5 * h5
