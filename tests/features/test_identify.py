"""Identification, completeness and the diagnosis report (REPAIR.md §2–§8, §11, §12).

Most cases run on shape-only header maps built from the real key layouts in ../shared/data/keys
(full-size shapes, no tensor data); the position-id checks read one tensor of a tiny file.
"""
from __future__ import annotations

import json

import pytest
import torch

from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.errors import ArchitectureError, CheckpointError
from astolfo_merge.features import repair
from astolfo_merge.features.inspection import format_report, inspect_file
from astolfo_merge.io import arch
from astolfo_merge.io.header import Header, TensorInfo
from astolfo_merge.io.writer import save_file

from conftest import SHARED, load

KEYS = SHARED / "data" / "keys"
XL_TE0 = "conditioner.embedders.0.transformer.text_model."
XL_TE1 = "conditioner.embedders.1.model."
SD1_TE0 = "cond_stage_model.transformer.text_model."
XL_POS = XL_TE0 + "embeddings.position_ids"
SD1_POS = SD1_TE0 + "embeddings.position_ids"


def real_keys(name) -> dict:
    return json.loads((KEYS / f"{name}.json").read_text())["keys"]


def weights(name) -> dict:
    """key -> shape of every weight key (no EMA, schedule buffers or markers)."""
    return {k: tuple(v["shape"]) for k, v in real_keys(name).items() if v["component"] != "other"}


def without(shapes, predicate) -> dict:
    return {k: v for k, v in shapes.items() if not predicate(k)}


def header(shapes, metadata=None, path="/nonexistent/shape-only.safetensors") -> Header:
    tensors = {k: TensorInfo(torch.int64 if k.endswith("position_ids") or k in arch.MARKERS else torch.float16, tuple(s))
               for k, s in shapes.items()}
    return Header(path, tensors, metadata or {})


def diagnose(shapes, metadata=None) -> dict:
    h = header(shapes, metadata)
    return repair.diagnose(h, arch.identify(h.shapes, h.metadata))


def vae_attention_2d(shapes) -> dict:
    return {k: (s[:2] if arch._VAE_ATTN.match(k) else s) for k, s in shapes.items()}


# --- §2 canonical counts -----------------------------------------------------------------------

def test_full_sdxl_has_2515_keys_split_1680_197_390_248():
    shapes = weights("sdxl")
    ident = arch.identify(shapes)
    counts = {c: s.expected for c, s in ident.components.items()}
    assert (ident.arch, len(shapes), ident.is_full) == ("sdxl", 2515, True)
    assert counts == {"unet": 1680, "te0": 197, "te1": 390, "vae": 248}
    assert all(s.present == s.expected for s in ident.components.values())


def test_full_sd1_has_1131_keys_split_686_197_248():
    shapes = weights("sd1")
    ident = arch.identify(shapes)
    assert (ident.arch, len(shapes), ident.is_full) == ("sd1", 1131, True)
    assert {c: s.expected for c, s in ident.components.items()} == {"unet": 686, "te0": 197, "vae": 248}


def test_sd2_layout_has_686_unet_294_te_h_248_vae():
    counts = {}
    for spec in arch.layout("sd2").values():
        counts[spec.component] = counts.get(spec.component, 0) + 1
    assert counts == {"unet": 686, "te1": 294, "vae": 248}


# --- §12 cases ------------------------------------------------------------------------------

def test_sdxl_minus_te0_position_ids_is_complete_and_only_needs_no_base():
    shapes = without(weights("sdxl"), lambda k: k == XL_POS)
    ident = arch.identify(shapes)
    assert ident.is_full and ident.components["te0"].missing_optional == [XL_POS]
    report = diagnose(shapes)
    assert report["severity"] == repair.FIXABLE
    assert report["position_ids"]["status"] == "missing"
    assert "TE0 position ids missing" in report["verdict_text"]


def test_sdxl_minus_te1_logit_scale_needs_a_base_for_one_optional_key():
    shapes = without(weights("sdxl"), lambda k: k == XL_TE1 + "logit_scale")
    ident = arch.identify(shapes)
    assert ident.components["te1"].status == "complete"
    assert ident.components["te1"].missing_optional == [XL_TE1 + "logit_scale"]
    report = diagnose(shapes)
    assert report["severity"] == repair.NEEDS_BASE
    gap = report["component_details"]["te1"]["gaps"][0]
    assert gap["key"].endswith("logit_scale") and "harmless" in gap["meaning"]


def test_sdxl_minus_te0_last_layer_is_partial_18_of_197():
    last = (XL_TE0 + "encoder.layers.11.", XL_TE0 + "final_layer_norm.")
    ident = arch.identify(without(weights("sdxl"), lambda k: k.startswith(last)))
    te0 = ident.components["te0"]
    assert (te0.status, len(te0.missing), te0.present) == ("partial", 18, 179)
    report = diagnose(without(weights("sdxl"), lambda k: k.startswith(last)))
    assert report["severity"] == repair.NEEDS_BASE and "18 key(s) missing" in report["verdict_text"]
    assert "clip skip 1" in report["component_details"]["te0"]["gaps"][0]["meaning"]


def test_sdxl_minus_te1_ln_final_and_text_projection_is_partial_and_a1111_misdetects_it():
    gone = (XL_TE1 + "ln_final.", XL_TE1 + "text_projection")
    shapes = without(weights("sdxl"), lambda k: k.startswith(gone))
    te1 = arch.identify(shapes).components["te1"]
    assert (te1.status, sorted(te1.missing)) == ("partial", sorted(k for k in weights("sdxl") if k.startswith(gone)))
    report = diagnose(shapes)
    assert "must be filled" in report["component_details"]["te1"]["gaps"][0]["meaning"]
    assert "will not detect SDXL" in report["a1111_line"]


def test_vae_attention_stored_512x512_is_a_reshape_not_a_gap():
    ident = arch.identify(vae_attention_2d(weights("sdxl")))
    assert ident.components["vae"].status == "complete" and len(ident.reshapes) == 8
    report = diagnose(vae_attention_2d(weights("sdxl")))
    assert report["severity"] == repair.FIXABLE and "[512,512]" in report["verdict_text"]


def test_nai_style_sd1_keys_are_renamed_to_text_model():
    nai = {k.replace(SD1_TE0, "cond_stage_model.transformer."): s for k, s in weights("sd1").items()}
    ident = arch.identify(nai)
    assert ident.is_full and len(ident.renames) == 197
    assert set(ident.renames.values()) == {k for k in weights("sd1") if k.startswith(SD1_TE0)}
    assert diagnose(nai)["renames_by_rule"] == {"insert-text_model": 197}


def test_sd1_with_ema_and_schedule_buffers_lists_them_apart_from_weights():
    shapes = {k: tuple(v["shape"]) for k, v in real_keys("sd1").items()}
    ident = arch.identify(shapes)
    assert (ident.arch, ident.is_full, len(ident.ema), len(ident.schedule), ident.unknown) == ("sd1", True, 688, 12, [])
    report = diagnose(shapes)
    assert report["ema"]["keys"] == 688 and report["ema"]["bytes"] > 0
    assert report["severity"] == repair.OK


def test_v_pred_and_ztsnr_markers_set_the_prediction_type():
    shapes = {**weights("sdxl"), "v_pred": (0,), "ztsnr": (0,)}
    ident = arch.identify(shapes)
    assert (ident.prediction, ident.ztsnr, sorted(ident.markers)) == ("v", True, ["v_pred", "ztsnr"])
    assert "marker key(s) v_pred" in diagnose(shapes)["prediction_source"]


def test_sdxl_inpainting_unet_is_not_repairable():
    shapes = dict(weights("sdxl"))
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    report = diagnose(shapes)
    assert report["severity"] == repair.NOT_REPAIRABLE and "inpainting" in report["verdict_text"]


def test_ssd_style_sdxl_without_middle_transformer_is_not_repairable():
    shapes = without(weights("sdxl"), lambda k: k.startswith("model.diffusion_model.middle_block.1."))
    report = diagnose(shapes)
    assert report["severity"] == repair.NOT_REPAIRABLE and "distilled SDXL" in report["verdict_text"]
    with pytest.raises(CheckpointError, match="not a repair case"):
        repair.plan_repair(header(shapes))


def test_diffusers_layout_is_refused_with_a_clear_message(tmp_path):
    diffusers = {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3),
                 "text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(8, 4)}
    path = tmp_path / "diffusers.safetensors"
    save_file(diffusers, path)
    report = inspect_file(path)
    assert report["severity"] == repair.NOT_SD and "diffusers-layout" in report["verdict_text"]
    with pytest.raises(CheckpointError, match="convert it to the single-file"):
        repair.repair_file(path, dry_run=True)


def test_unknown_keys_are_listed_with_their_sizes():
    shapes = {**weights("sd1"), "control_model.zero_convs.0.0.weight": (320, 320, 1, 1)}
    unknown = diagnose(shapes)["unknown_keys"]
    assert unknown == [{"key": "control_model.zero_convs.0.0.weight", "shape": [320, 320, 1, 1], "dtype": "F16",
                        "bytes": 320 * 320 * 2}]


def test_metadata_values_that_are_not_strings_are_reported():
    report = diagnose(weights("sd1"), {"ss_tag_frequency": {"a": 1}, "epoch": 3, "format": "pt"})
    assert report["metadata_problems"] == [{"field": "ss_tag_frequency", "type": "dict"}, {"field": "epoch", "type": "int"}]


# --- position ids need their one tensor --------------------------------------------------------

def _with_position_ids(make_checkpoint, tmp_path, values):
    tensors = load(make_checkpoint("src.safetensors", "sd1", variant=1))
    tensors[SD1_POS] = values.reshape(1, 77)
    path = tmp_path / "ids.safetensors"
    save_file(tensors, path)
    return path


def test_float_position_ids_with_off_by_one_values_name_the_wrong_positions(make_checkpoint, tmp_path):
    values = torch.arange(77, dtype=torch.float32)
    values[[3, 40, 76]] -= 0.0025            # 75.9975 etc.: truncated to 75 when loaded as int64
    report = inspect_file(_with_position_ids(make_checkpoint, tmp_path, values))
    pos = report["position_ids"]
    assert (pos["status"], pos["dtype"], pos["wrong_positions"]) == ("wrong", "F32", [3, 40, 76])
    assert report["severity"] == repair.FIXABLE and "wrong at 3 position(s)" in report["verdict_text"]


def test_float_position_ids_with_exact_values_are_only_a_dtype_problem(make_checkpoint, tmp_path):
    report = inspect_file(_with_position_ids(make_checkpoint, tmp_path, torch.arange(77, dtype=torch.float16)))
    assert report["position_ids"]["status"] == "float" and report["position_ids"]["wrong_positions"] == []


def test_int64_position_ids_are_ok(models):
    assert inspect_file(models / "sd1-a.safetensors")["position_ids"]["status"] == "ok"


# --- §8: how the original model-toolkit labels a file ---------------------------------------------

SD1_TE_KEYS = lambda k: k.startswith("cond_stage_model.")  # noqa: E731
TOOLKIT_TABLE = [  # (case, shapes, label, other found architectures, junk keys)
    ("full SDXL", lambda: weights("sdxl"), "SD-XL", [], 0),
    ("SDXL minus TE0 position_ids", lambda: without(weights("sdxl"), lambda k: k == XL_POS), "VAE-v1-BROKEN", [], 2266),
    ("SDXL minus TE1 logit_scale", lambda: without(weights("sdxl"), lambda k: k == XL_TE1 + "logit_scale"),
     "VAE-v1-BROKEN", [], 2266),
    ("SDXL minus TE0 last layer + final norm",
     lambda: without(weights("sdxl"), lambda k: k.startswith((XL_TE0 + "encoder.layers.11.", XL_TE0 + "final_layer_norm."))),
     "VAE-v1-BROKEN", [], 2249),
    ("SDXL with VAE attention [512,512]", lambda: vae_attention_2d(weights("sdxl")), None, [], 2515),
    ("SDXL with v_pred + ztsnr", lambda: {**weights("sdxl"), "v_pred": (0,), "ztsnr": (0,)}, "SD-XL", [], 2),
    ("SD1 minus position_ids", lambda: without(weights("sd1"), lambda k: k == SD1_POS), "UNET-v1-BROKEN",
     ["VAE-v1-BROKEN"], 444),
    ("SD1 without TE", lambda: without(weights("sd1"), SD1_TE_KEYS), "UNET-v1-BROKEN", ["VAE-v1-BROKEN"], 248),
]


@pytest.mark.parametrize("case,shapes,label,also_found,junk", TOOLKIT_TABLE, ids=[row[0] for row in TOOLKIT_TABLE])
def test_toolkit_labels_reproduce_the_table_of_section_8(case, shapes, label, also_found, junk):
    view = repair.toolkit_view(shapes())
    assert view.label == label
    assert sorted(set(view.found) - {label}) == also_found
    assert len(view.junk) == junk


def test_toolkit_explains_vae_v1_broken_by_the_missing_te0_key():
    view = repair.toolkit_view(without(weights("sdxl"), lambda k: k == XL_POS))
    assert view.rejected["CLIP-XL-AUX-SD"] == ["Missing required keys (1 of 197)"]
    assert view.rejected["SD-XL"] == ["Missing required classes ['CLIP-XL-AUX']"]
    assert "VAE-v1-BROKEN" in view.line("sdxl") and "keep 248 of 2514 keys" in view.line("sdxl")


def test_toolkit_applies_its_nai_fix_before_matching():
    nai = {k.replace(SD1_TE0, "cond_stage_model.transformer."): s for k, s in weights("sd1").items()}
    assert repair.toolkit_view(nai).label == "SD-v1"


def test_toolkit_counts_ema_apart_from_junk_and_allows_schedule_buffers():
    view = repair.toolkit_view({k: tuple(v["shape"]) for k, v in real_keys("sd1").items()})
    assert (view.label, len(view.ema), len(view.junk)) == ("SD-v1", 686, 0)   # decay/num_updates are allowed


def test_toolkit_view_matches_scaled_test_files(models):
    report = inspect_file(models / "sdxl-pruned.safetensors")
    assert report["toolkit"]["label"] == "VAE-v1-BROKEN"
    assert inspect_file(models / "sdxl-a.safetensors")["toolkit"]["label"] == "SD-XL"


# --- the report as printed -------------------------------------------------------------------------

def test_inspect_prints_the_full_report(models):
    text = format_report(inspect_file(models / "sdxl-vpred.safetensors"))
    assert "v-prediction (v_pred) · ztSNR (ztsnr) · OK" in text
    for part in ("Architecture: SDXL", "evidence:", "Component details:", "Non-weight keys:", "markers v_pred, ztsnr",
                 "model-toolkit (original) would call this SD-XL", "A1111 loads it fine"):
        assert part in text


def test_inspect_json_lists_the_report_fields(models, capsys):
    from astolfo_merge.cli.commands import main
    assert main(["inspect", str(models / "sdxl-pruned.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["severity"] == repair.FIXABLE and report["toolkit"]["label"] == "VAE-v1-BROKEN"
    assert report["repair_plan"].startswith("add TE0 position_ids")


# --- merge input checks (plan_inputs.check_compatible) --------------------------------------------

def test_sd1_and_sdxl_in_one_pool_are_refused_before_any_work(models):
    recipe = parse_recipe({"pool": ["sd1-a.safetensors", "sdxl-a.safetensors"], "method": "n_average"})
    with pytest.raises(ArchitectureError, match="all inputs must have the same architecture"):
        build_plan(recipe, str(models), str(models / "out.safetensors"))
    assert not (models / "out.safetensors").exists()


def test_mixed_prediction_types_are_refused_unless_allowed(models):
    doc = {"pool": ["sdxl-a.safetensors", "sdxl-vpred.safetensors"], "method": "n_average"}
    with pytest.raises(ArchitectureError, match="disagree on the prediction type"):
        build_plan(parse_recipe(doc), str(models), str(models / "out.safetensors"))
    plan = build_plan(parse_recipe({**doc, "allow_mixed_prediction": True}), str(models), str(models / "out.safetensors"))
    assert plan.arch == "sdxl"

