"""Component swap: "this file's UNET + that file's TE0 + ..." through one recipe (REPAIR.md §10.7)."""
from __future__ import annotations

import json

import pytest
import torch

from astolfo_merge.cli.commands import main
from astolfo_merge.errors import ArchitectureError, RecipeError
from astolfo_merge.features.swap import swap
from astolfo_merge.io import arch
from astolfo_merge.io.header import read_header

from conftest import TEST_SCALE, load

XL_POS = arch.POSITION_IDS["sdxl"]


def component_keys(arch_name, comp) -> list:
    return [k for k, s in arch.layout(arch_name, TEST_SCALE).items() if s.component == comp and not k.endswith("position_ids")]


def test_each_component_comes_bit_for_bit_from_its_file(models, tmp_path):
    result = swap("sdxl-a.safetensors", tmp_path / "swapped.safetensors", te0="sdxl-b.safetensors",
                  te1="sdxl-c.safetensors", vae="sdxl-base.safetensors", models_dir=str(models), hash_inputs=False)
    out = load(result.path)
    assert set(out) == set(arch.layout("sdxl", TEST_SCALE))
    for comp, donor in (("unet", "sdxl-a"), ("te0", "sdxl-b"), ("te1", "sdxl-c"), ("vae", "sdxl-base")):
        source = load(models / f"{donor}.safetensors")
        assert all(torch.equal(out[k], source[k]) and out[k].dtype == source[k].dtype
                   for k in component_keys("sdxl", comp)), comp
    assert torch.equal(out[XL_POS], torch.arange(77).reshape(1, 77))


def test_the_swap_is_a_recipe_embedded_in_the_output(models, tmp_path):
    result = swap("sd1-a.safetensors", tmp_path / "swapped.safetensors", vae="sd1-base.safetensors",
                  models_dir=str(models), hash_inputs=False)
    recipe = json.loads(read_header(result.path).metadata["astolfo_merge_recipe"])
    assert (recipe["pool"], recipe["method"]) == (["sd1-a.safetensors"], "n_average")
    assert recipe["components"] == {"vae": {"take": "sd1-base.safetensors"}}


def test_markers_come_from_the_unet_file(models, tmp_path):
    result = swap("sdxl-vpred.safetensors", tmp_path / "swapped.safetensors", te0="sdxl-a.safetensors",
                  models_dir=str(models), hash_inputs=False)
    ident = arch.identify(read_header(result.path).shapes)
    assert (ident.prediction, ident.ztsnr, ident.is_full) == ("v", True, True)


def test_a_donor_missing_only_position_ids_is_fine(models, tmp_path):
    result = swap("sdxl-a.safetensors", tmp_path / "swapped.safetensors", te0="sdxl-pruned.safetensors",
                  models_dir=str(models), hash_inputs=False)
    assert XL_POS in load(result.path)


def test_a_donor_with_a_partial_component_is_refused(models, make_checkpoint, tmp_path):
    make_checkpoint("novae.safetensors", "sdxl", variant=7, drop=component_keys("sdxl", "vae")[:3], folder=models)
    with pytest.raises(ArchitectureError, match="its VAE is partial .* repair it first"):
        swap("sdxl-a.safetensors", tmp_path / "x.safetensors", vae="novae.safetensors", models_dir=str(models))
    assert not (tmp_path / "x.safetensors").exists()


def test_components_of_another_architecture_are_refused(models, tmp_path):
    with pytest.raises(ArchitectureError, match="same architecture"):
        swap("sd1-a.safetensors", tmp_path / "x.safetensors", vae="sdxl-base.safetensors", models_dir=str(models))
    with pytest.raises(ArchitectureError, match="has no TE1"):
        swap("sd1-a.safetensors", tmp_path / "x.safetensors", te1="sd1-b.safetensors", models_dir=str(models))


def test_a_swap_needs_at_least_one_component_to_take(models, tmp_path):
    with pytest.raises(RecipeError, match="--te0 / --te1 / --vae"):
        swap("sd1-a.safetensors", tmp_path / "x.safetensors", models_dir=str(models))


def test_cli_swap_writes_the_file(models, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    code = main(["swap", "--unet", "sd1-a.safetensors", "--te0", "sd1-b.safetensors", "--vae", "sd1-c.safetensors",
                 "-o", str(out), "--models-dir", str(models), "--no-hash", "-q"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    out_t, b = load(out), load(models / "sd1-b.safetensors")
    assert all(torch.equal(out_t[k], b[k]) for k in component_keys("sd1", "te0"))
