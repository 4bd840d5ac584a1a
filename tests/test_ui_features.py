"""The Merger tab's Repair and Analysis sub-tabs and its LoRA rows, through their handlers (no browser)."""
from __future__ import annotations

import gradio as gr
import pytest
import torch

from astolfo_merge import arch
from astolfo_merge.analysis_ui import AnalysisPanel
from astolfo_merge.host import StandaloneHost
from astolfo_merge.lora_synth import write_synthetic_lora
from astolfo_merge.recipe import parse_recipe
from astolfo_merge.repair_ui import RepairPanel
from astolfo_merge.ui import MergerTab, add_feature_tabs
from astolfo_merge.ui_catalog import Catalog
from astolfo_merge.ui_state import LORA_ROWS, lora_rows, loras_from_rows
from astolfo_merge.ui_tasks import last
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
    panel = RepairPanel(host)
    report, default_name = panel.on_inspect("novae.safetensors")
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
    text, _ = RepairPanel(host).repair("novae.safetensors", "sd1-base.safetensors", "taken.safetensors")
    assert "exists" in text and (models / "taken.safetensors").read_bytes() == b"keep me"


def test_repair_without_a_base_says_one_is_needed_and_writes_nothing(host, models, make_checkpoint):
    make_checkpoint("novae.safetensors", "sd1", variant=5, drop=SD1_VAE, folder=models)
    text, _ = RepairPanel(host).repair("novae.safetensors", "(none)", "")
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
