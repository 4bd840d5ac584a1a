"""The Merger tab's Repair and Analysis sub-tabs and its LoRA rows, through their handlers (no browser)."""
from __future__ import annotations

import gradio as gr
import pytest
import torch

from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.features.lora_synth import write_synthetic_lora
from astolfo_merge.io import arch
from astolfo_merge.ui.analysis_tab import AnalysisPanel
from astolfo_merge.ui.catalog import Catalog
from astolfo_merge.ui.host import StandaloneHost
from astolfo_merge.ui.repair_tab import RepairPanel
from astolfo_merge.ui.state import LORA_ROWS, lora_rows, loras_from_rows
from astolfo_merge.ui.tab import MergerTab, add_feature_tabs
from astolfo_merge.ui.tasks import last

from conftest import TEST_SCALE, load

SD1_VAE = [k for k, s in arch.layout("sd1", TEST_SCALE).items() if s.component == "vae"]
CATALOG = Catalog(None)


@pytest.fixture
def host(models):
    return StandaloneHost(str(models))


@pytest.fixture
def lora_host(models):
    """A models folder with a `Lora` subfolder holding one SD1 LoRA."""
    (models / "Lora").mkdir()
    write_synthetic_lora(models / "Lora" / "style.safetensors", "sd1", TEST_SCALE, algo="lora", rank=2)
    return StandaloneHost(str(models))


def page_value(update, old):
    """What a widget holds after a handler returned `update` for it (a value or a gr.update payload)."""
    if isinstance(update, dict) and "__type__" in update:
        return update.get("value", old)
    return update


def test_the_tab_has_repair_and_analysis_sub_tabs(host):
    with gr.Blocks():
        assert add_feature_tabs(host) == ["Repair", "Analysis"]
    tab = MergerTab(host, CATALOG)
    config = tab.build().get_config_file()
    elem_ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"astolfo_merge_tab_repair", "astolfo_merge_tab_analysis", "astolfo_merge_repair_run",
            "astolfo_merge_analysis_run"} <= elem_ids


def test_repair_fills_a_pruned_model_from_the_base_into_a_new_file_and_lists_it(host, models, make_checkpoint):
    make_checkpoint("novae.safetensors", "sd1", variant=5, drop=SD1_VAE, folder=models)
    panel = RepairPanel(host, CATALOG)
    report, default_name, _base = panel.on_inspect("novae.safetensors")
    assert "VAE" in report and default_name == "novae-repaired.safetensors"
    plan_text = panel.on_dry_run("novae.safetensors", "sd1-base.safetensors", "")
    assert "fill from base" in plan_text and not (models / default_name).exists()
    text, listing = last(panel.on_repair("novae.safetensors", "sd1-base.safetensors", ""))
    out = models / default_name
    assert "wrote" in text and out.is_file()
    repaired, base = load(out), load(models / "sd1-base.safetensors")
    assert set(SD1_VAE) <= set(repaired)
    assert all(torch.equal(repaired[k], base[k].to(repaired[k].dtype)) for k in SD1_VAE)
    assert default_name in listing["choices"]


def test_repair_never_replaces_an_existing_file(host, models, make_checkpoint):
    make_checkpoint("novae.safetensors", "sd1", variant=5, drop=SD1_VAE, folder=models)
    (models / "taken.safetensors").write_bytes(b"keep me")
    text, _ = RepairPanel(host, CATALOG).repair("novae.safetensors", "sd1-base.safetensors", "taken.safetensors")
    assert "exists" in text and (models / "taken.safetensors").read_bytes() == b"keep me"


def test_repair_without_a_base_says_one_is_needed_and_writes_nothing(host, models, make_checkpoint):
    make_checkpoint("novae.safetensors", "sd1", variant=5, drop=SD1_VAE, folder=models)
    text, _ = RepairPanel(host, CATALOG).repair("novae.safetensors", "(none)", "")
    assert "base" in text.lower() and not (models / "novae-repaired.safetensors").exists()


def test_analysis_returns_a_png_and_the_numbers_per_component(host):
    panel = AnalysisPanel(host)
    status, png, numbers, summary = last(panel.on_analyze(["sd1-a.safetensors", "sd1-b.safetensors"],
                                                          "sd1-base.safetensors", 0.5))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "base sd1-base" in status and set(numbers["components"]) == {"unet", "te0", "vae"}
    assert all(d > 0 for d in numbers["components"]["unet"]["l2_to_reference"]) and "L2" in summary


def test_analysis_of_mixed_architectures_is_an_error_not_a_crash(host):
    status, png, numbers, _ = AnalysisPanel(host).analyze(["sd1-a.safetensors", "sdxl-a.safetensors"], None, 0.5)
    assert status.startswith("**Error:**") and png is None and numbers == {}


def test_lora_files_are_offered_by_a_name_the_recipe_resolves_and_are_not_pool_models(lora_host):
    names = [name for name, _entry in lora_host.lora_files()]
    assert names == ["Lora/style.safetensors"]
    assert not any("Lora/" in name for name, _path in lora_host.named_checkpoints())


def test_lora_rows_round_trip_with_carried_block_weights_and_extra_entries():
    loras = [{"file": "a.safetensors", "strength": 0.5, "when": "before", "models": ["x.safetensors"]},
             {"file": "b.safetensors", "strength": -1.0, "when": "after", "blocks": {"IN04": 0.5}}] + \
            [{"file": f"more{i}.safetensors", "strength": 1.0, "when": "after"} for i in range(LORA_ROWS)]
    rows, carry = lora_rows(loras)
    assert len(rows) == LORA_ROWS and rows[1] == ("b.safetensors", -1.0, "after")
    assert loras_from_rows(rows, carry) == loras
    rows[0] = ("a.safetensors", 0.5, "after")                   # "models" only applies before the merge
    assert "models" not in loras_from_rows(rows, carry)[0]


def test_lora_rows_of_the_form_become_the_recipe_loras_and_a_loaded_recipe_fills_them(lora_host):
    tab = MergerTab(lora_host, CATALOG)
    tab.build()
    assert tab.lora_choices() == ["(none)", "Lora/style.safetensors"]
    comps = tab.form_inputs()
    values = [c.value for c in comps]
    values[comps.index(tab.selection)] = values[comps.index(tab.pool)] = ["sd1-a.safetensors", "sd1-b.safetensors"]
    file, strength, when = tab.lora_rows[0]
    values[comps.index(file)], values[comps.index(strength)], values[comps.index(when)] = \
        "Lora/style.safetensors", 0.7, "before"
    recipe = tab.form_recipe(values)
    assert recipe.extra["loras"] == [{"file": "Lora/style.safetensors", "strength": 0.7, "when": "before"}]
    tab.host.plan(recipe)                                        # the name resolves and the LoRA fits SD1
    doc = {**recipe.to_dict(), "loras": [{"file": "Lora/style.safetensors", "strength": 0.25, "blocks": {"OUT02": 0.5}}]}
    updates = dict(zip(tab.load_recipe_outputs(), tab.apply_recipe(parse_recipe(doc), "", "loaded")))
    assert updates[file]["value"] == "Lora/style.safetensors" and updates[strength] == 0.25 and updates[when] == "after"
    assert updates[tab.lora_rows[1][0]]["value"] == "(none)"
    loaded = [page_value(updates[c], v) if c in updates else v for c, v in zip(comps, values)]
    again = tab.form_recipe(loaded)
    assert again.extra["loras"] == [{"file": "Lora/style.safetensors", "strength": 0.25, "when": "after",
                                     "blocks": {"OUT02": 0.5}}]


def test_the_lora_rows_are_hidden_while_there_is_no_lora(host):
    tab = MergerTab(host, CATALOG)
    tab.build()
    assert tab.lora_choices() == ["(none)"] and tab.lora_box.visible is False


# --- the Repair sub-tab and the report as a user met them in Forge Classic (HOSTS.md) -------------

SDXL_VAE = [k for k, s in arch.layout("sdxl", TEST_SCALE).items() if s.component == "vae"]


@pytest.fixture
def novae_xl(models, make_checkpoint):
    """An SDXL file pruned of its whole VAE, in the models folder."""
    make_checkpoint("sdxl-novae.safetensors", "sdxl", variant=5, drop=SDXL_VAE, folder=models)
    return "sdxl-novae.safetensors"


def test_repair_presets_a_likely_base_like_the_merge_sub_tab(host, novae_xl):
    panel = RepairPanel(host, CATALOG)
    _report, _name, base = panel.on_inspect(novae_xl, "(none)")
    assert base["value"] == "sdxl-base.safetensors"
    assert panel.on_inspect("sd1-a.safetensors", "sdxl-base.safetensors")[2]["value"] == "sd1-base.safetensors"
    assert panel.on_inspect("sd1-a.safetensors", "sd1-c.safetensors")[2]["value"] == "sd1-c.safetensors", \
        "a base the user picked for the same architecture stays"


def test_repair_dry_run_says_first_that_a_base_is_needed_in_the_tabs_words(host, novae_xl):
    lines = RepairPanel(host, CATALOG).on_dry_run(novae_xl, "(none)", "").splitlines()
    assert lines[0].startswith("NOT READY — needs a base model: 248 key(s) are missing (VAE 248: ")
    assert "; pick a Base (a complete SDXL" in lines[0] and lines[0].endswith("model) to fill them")
    assert len(lines) < 20 and not any("--" in line for line in lines), "one line per component, no CLI flags"
    text, _ = RepairPanel(host, CATALOG).repair(novae_xl, "(none)", "")
    assert text.startswith("Error: needs a base model") and "pick a Base" in text and "--base" not in text


def test_repair_overwrites_only_with_the_checkbox(host, models, novae_xl):
    panel = RepairPanel(host, CATALOG)
    (models / "taken.safetensors").write_bytes(b"keep me")
    assert "exists: tick Overwrite" in panel.on_dry_run(novae_xl, "sdxl-base.safetensors", "taken").splitlines()[0]
    text, _ = panel.repair(novae_xl, "sdxl-base.safetensors", "taken.safetensors")
    assert "tick Overwrite an existing file" in text and "--overwrite" not in text
    assert (models / "taken.safetensors").read_bytes() == b"keep me"
    text, _ = panel.repair(novae_xl, "sdxl-base.safetensors", "taken.safetensors", True)
    assert text.startswith("wrote") and load(models / "taken.safetensors").keys() >= set(SDXL_VAE)


def test_correct_position_ids_are_not_reset_and_an_unused_base_is_not_recorded(host, models):
    import json

    from astolfo_merge.io.header import read_header
    panel = RepairPanel(host, CATALOG)
    plan = panel.plan("sdxl-a.safetensors", "sdxl-base.safetensors")
    assert plan.position_ids == "kept" and "reset" not in plan.summary() and "already 0..76" in plan.summary()
    text, _ = panel.repair("sdxl-a.safetensors", "sdxl-base.safetensors", "")
    record = json.loads(read_header(models / "sdxl-a-repaired.safetensors").metadata["astolfo_merge_repair"])
    assert (record["base"], record["base_sha256"], record["filled"]) == (None, None, 0)
    assert panel.plan("sdxl-pruned.safetensors", None).position_ids == "added"


def test_a_repair_refreshes_the_merge_sub_tabs_lists(host, novae_xl):
    tab = MergerTab(host, CATALOG)
    tab.build()
    panel = tab.panels["Repair"]
    assert panel.run_event is not None
    panel.repair(novae_xl, "sdxl-base.safetensors", "")
    updates = dict(zip([*tab.list_outputs(), tab.event], tab.on_lists_changed("", [])))
    assert updates[tab.event].startswith("files:"), "the page script refreshes the WebUI's checkpoint list"
    assert "sdxl-novae-repaired.safetensors" in [name for _label, name in updates[tab.pool]["choices"]]
    assert "sdxl-novae-repaired.safetensors" in updates[panel.model]["choices"]


def test_the_report_quotes_what_the_toolkit_would_print_for_both_pruned_sdxl_files(host, novae_xl):
    panel = RepairPanel(host, CATALOG)
    no_ids = panel.on_inspect("sdxl-pruned.safetensors")[0]
    assert 'its report: "Model type identified as VAE-v1-BROKEN."' in no_ids
    assert "CLIP-XL-AUX-SD: Missing required keys (1 of 197)" in no_ids and '"BROKEN ARCHITECTURE"' in no_ids
    no_vae = panel.on_inspect(novae_xl)[0]
    assert 'its report: "Model type could not be identified." (SD-XL: Missing required classes' in no_vae
    assert "no -BROKEN type for an SDXL UNET or text encoder" in no_vae and '"UNKNOWN ARCHITECTURE"' in no_vae
    assert "'Missing VAE keys'" in no_vae and "black" in no_vae
    assert "--" not in no_vae.replace("—", "")
