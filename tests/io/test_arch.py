"""Architecture identification, components and MBW blocks (REPAIR.md §2–§3, ALGORITHMS.md §15)."""
import json

import pytest

from astolfo_merge.io import arch
from astolfo_merge.io.header import read_header

from conftest import SHARED


@pytest.mark.parametrize("name,counts", [
    ("sd1", {"unet": 686, "te0": 197, "vae": 248}),
    ("sd2", {"unet": 686, "te1": 294, "vae": 248}),
    ("sdxl", {"unet": 1680, "te0": 197, "te1": 390, "vae": 248}),
])
def test_canonical_layouts_have_the_component_counts_of_the_sources(name, counts):
    lay = arch.layout(name)
    got = {}
    for spec in lay.values():
        got[spec.component] = got.get(spec.component, 0) + 1
    assert got == counts


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_full_size_header_maps_from_the_shared_key_data_are_identified(name):
    keys = json.loads((SHARED / "data" / "keys" / f"{name}.json").read_text())["keys"]
    shapes = {k: tuple(v["shape"]) for k, v in keys.items() if not k.startswith("model_ema.")
              and k not in ("v_pred", "ztsnr", "edm_vpred.sigma_min", "edm_vpred.sigma_max")}
    ident = arch.identify(shapes)
    assert (ident.arch, ident.scale, ident.is_full) == (name, 1, True)
    assert ident.unknown == []


@pytest.mark.parametrize("file,expected", [("sd1-a", "sd1"), ("sdxl-b", "sdxl")])
def test_scaled_down_test_checkpoints_are_identified_like_full_size_files(demo_dir, file, expected):
    header = read_header(demo_dir / f"{file}.safetensors")
    ident = arch.identify(header.shapes)
    assert (ident.arch, ident.scale, ident.is_full) == (expected, 64, True)


def test_prediction_markers_are_detected(demo_dir):
    ident = arch.identify(read_header(demo_dir / "sdxl-vpred.safetensors").shapes)
    assert ident.prediction == "v" and ident.ztsnr and sorted(ident.markers) == ["v_pred", "ztsnr"]


def test_missing_position_ids_are_optional_and_the_component_stays_complete(demo_dir):
    ident = arch.identify(read_header(demo_dir / "sdxl-pruned.safetensors").shapes)
    te0 = ident.components["te0"]
    assert te0.status == "complete" and te0.missing_optional == [arch.POSITION_IDS["sdxl"]]


@pytest.mark.parametrize("key,sd1,sdxl", [
    ("model.diffusion_model.time_embed.0.weight", "BASE", "BASE"),
    ("model.diffusion_model.label_emb.0.0.weight", "BASE", "BASE"),
    ("model.diffusion_model.input_blocks.0.0.weight", "IN00", "IN00"),
    ("model.diffusion_model.input_blocks.11.0.in_layers.2.weight", "IN11", "IN11"),
    ("model.diffusion_model.middle_block.1.proj_in.weight", "M00", "M00"),
    ("model.diffusion_model.output_blocks.8.0.skip_connection.weight", "OUT08", "OUT08"),
    ("model.diffusion_model.out.2.weight", "OUT11", "OUT08"),
    ("first_stage_model.decoder.conv_in.weight", "BASE", "VAE"),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "BASE", "BASE"),
])
def test_mbw_block_mapping_follows_the_supermerger_convention(key, sd1, sdxl):
    assert arch.block_of(key, "sd1") == sd1
    assert arch.block_of(key, "sdxl") == sdxl


def test_block_names_have_26_slots_for_sd1_and_20_plus_vae_for_sdxl():
    assert len(arch.block_names("sd1")) == 26
    assert arch.block_names("sdxl")[:-1] == ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]


def test_nai_style_text_encoder_keys_are_normalised():
    key = "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"
    assert arch.normalize_key(key) == ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "insert-text_model")


def test_lora_and_diffusers_files_are_refused_with_a_reason():
    lora = arch.identify({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4)})
    assert lora.arch is None and "LoRA" in lora.refusal
    diffusers = arch.identify({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3), "conv_in.weight": (320, 4, 3, 3)})
    assert diffusers.arch is None and "diffusers" in diffusers.refusal
