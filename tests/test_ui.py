"""The Merger tab's handlers on a standalone host, without a browser (tests/test_browser.py drives the page)."""
from __future__ import annotations

import json
import sys
import types

import gradio as gr
import pytest

from astolfo_merge import jobs
from astolfo_merge.checkpoint import read_header
from astolfo_merge.host import StandaloneHost
from astolfo_merge.recipe import parse_recipe
from astolfo_merge.ui import MergerTab
from astolfo_merge.ui_catalog import Catalog
from astolfo_merge.ui_state import MODES


CATALOG = Catalog(None)   # shared: the tests' folders link the same files, so headers are read once


@pytest.fixture
def tab(models):
    t = MergerTab(StandaloneHost(str(models)), CATALOG)
    t.blocks = t.build()
    yield t
    t.jobs.cancel()
    for job in t.jobs.jobs():
        job.done_event.wait(10)


class Form:
    """The values `form_inputs() + run_inputs()` would send, starting from the widgets' defaults."""

    def __init__(self, tab):
        self.tab = tab
        self.components = tab.form_inputs() + tab.run_inputs()
        self.values = [c.value for c in self.components]

    def set(self, component, value):
        self.values[self.components.index(component)] = value
        return self

    def pool(self, *names):
        return self.set(self.tab.selection, list(names)).set(self.tab.pool, list(names))

    def param(self, form, method, name, value):
        updates = form.updates(method)
        slot = next(c for c, u in zip(form.components, updates) if u.get("label") == name)
        return self.set(slot, value)

    def apply(self, updates: dict):
        """What the page would hold after a handler returned `updates` (values and gr.update payloads)."""
        for component, update in updates.items():
            if component not in self.components:
                continue
            if isinstance(update, dict) and "__type__" in update:
                if "value" in update:
                    self.set(component, update["value"])
            else:
                self.set(component, update)
        return self

    def value(self, component):
        return self.values[self.components.index(component)]


def outputs(tab, result, components):
    return dict(zip(components, result))


def finish(tab, timeout=30):
    job = tab.jobs.current()
    job.done_event.wait(timeout)
    return job


def test_selecting_models_fills_the_summary_the_base_and_the_output_name(tab):
    got = outputs(tab, tab.on_pool_input(["sd1-b.safetensors", "sd1-a.safetensors"], "", [], "(none)", "weighted_sum", "", ""),
                  tab.pool_change_outputs())
    assert got[tab.selection] == ["sd1-b.safetensors", "sd1-a.safetensors"]
    assert "1. `sd1-b.safetensors` · 2. `sd1-a.safetensors`" in got[tab.pool_summary]
    assert got[tab.base]["value"] == "sd1-base.safetensors"
    assert got[tab.output_name].startswith("merge-2x-weighted_sum-sd1-b-")
    assert got[tab.comp["te1"]["box"]]["visible"] is False and got[tab.mbw.groups["sd1"]]["visible"] is True


def test_the_filter_narrows_the_list_but_keeps_the_selection(tab):
    upd = tab.on_filter("sdxl v-pred", ["sd1-a.safetensors"])
    assert [name for _label, name in upd["choices"]] == ["sdxl-vpred.safetensors"]
    assert upd["value"] == []
    got = outputs(tab, tab.on_select_shown("sdxl v-pred", ["sd1-a.safetensors"], "(none)", "weighted_sum", "", ""),
                  tab.pool_change_outputs())
    assert got[tab.selection] == ["sd1-a.safetensors", "sdxl-vpred.safetensors"]
    assert "mixed architectures" in got[tab.pool_summary]


def test_check_plan_shows_the_predicted_peak_before_starting(tab):
    form = Form(tab).pool("sd1-a.safetensors", "sd1-b.safetensors")
    message, recipe_json = tab.on_check(*form.values)
    assert "Predicted peak memory" in message and "1131 keys" in message
    assert json.loads(recipe_json)["pool"] == ["sd1-a.safetensors", "sd1-b.safetensors"]
    assert tab.jobs.current() is None


def test_merge_runs_in_the_background_and_the_poll_reports_it_once(tab, models):
    form = Form(tab).pool("sd1-a.safetensors", "sd1-b.safetensors").param(tab.main_form, "weighted_sum", "alpha", 0.3)
    message, recipe_json, _ = tab.on_merge(*form.values)
    assert message.startswith("Started"), message
    name = json.loads(recipe_json)["output"]
    job = finish(tab)
    assert job.status == jobs.DONE and (models / name).is_file()
    poll_out = [tab.progress, tab.log, tab.summary, tab.load, tab.seen, tab.event, *tab.list_outputs()]
    got = outputs(tab, tab.on_poll({}, "", []), poll_out)
    assert 'data-status="done"' in got[tab.progress] and "1131/1131 keys" in got[tab.progress]
    assert job.result.sha256 in got[tab.summary] and "weighted_sum over 2 model(s)" in got[tab.summary]
    assert name in [value for _label, value in got[tab.pool]["choices"]], "the new file is selectable at once"
    assert got[tab.load]["visible"] is False, "the standalone host cannot load models"
    assert got[tab.event] == f"done:{job.id}"
    again = tab.on_poll(got[tab.seen], "", [])
    assert all(u == gr.update() for u in again), "nothing new: the poll changes nothing"
    assert json.loads(read_header(models / name).metadata["astolfo_merge_recipe"])["params"]["alpha"] == 0.3


def test_merge_refuses_to_overwrite_an_existing_file(tab, models):
    form = Form(tab).pool("sd1-a.safetensors", "sd1-b.safetensors").set(tab.output_name, "taken.safetensors")
    (models / "taken.safetensors").write_bytes(b"mine")
    message, _, _ = tab.on_merge(*form.values)
    assert "exists" in message and tab.jobs.current() is None
    assert (models / "taken.safetensors").read_bytes() == b"mine"


def test_a_second_merge_while_one_runs_is_refused_with_a_message(tab, monkeypatch):
    monkeypatch.setenv("ASTOLFO_TEST_SLOW_KEYS", "0.01")   # engine.py's test-only per-key delay
    form = Form(tab).pool("sd1-a.safetensors", "sd1-b.safetensors")
    assert tab.on_merge(*form.set(tab.output_name, "one").values)[0].startswith("Started")
    message = tab.on_merge(*form.set(tab.output_name, "two").values)[0]
    assert "already running" in message
    assert tab.on_cancel().startswith("Cancelling")
    assert finish(tab).status == jobs.CANCELLED


def test_the_component_plan_reaches_the_recipe(tab):
    form = Form(tab).pool("sd1-a.safetensors", "sd1-b.safetensors").set(tab.base, "sd1-base.safetensors")
    form.set(tab.comp["te0"]["mode"], MODES["take"]).set(tab.comp["te0"]["take"], "sd1-c.safetensors")
    form.set(tab.comp["vae"]["mode"], MODES["base"])
    form.set(tab.comp["unet"]["mode"], MODES["own"]).set(tab.comp["unet"]["method"], "add_difference")
    form.param(tab.comp["unet"]["form"], "add_difference", "alpha", 0.7)
    form.set(tab.comp["te1"]["mode"], MODES["take"]).set(tab.comp["te1"]["take"], "sd1-c.safetensors")
    _message, recipe_json = tab.on_check(*form.values)
    comps = json.loads(recipe_json)["components"]
    assert comps == {"unet": {"method": "add_difference", "params": {"alpha": 0.7}},
                     "te0": {"take": "sd1-c.safetensors"}, "vae": {"take": "base"}}, "SD1 has no TE1"


def test_block_weights_reach_the_recipe_for_the_pools_architecture(tab):
    form = Form(tab).pool("sdxl-a.safetensors", "sdxl-b.safetensors").set(tab.mbw.enabled, True)
    form.set(tab.mbw.sliders["sdxl"]["IN03"], 0.9).set(tab.mbw.sliders["sdxl"]["VAE"], 0.0)
    _message, recipe_json = tab.on_check(*form.values)
    blocks = json.loads(recipe_json)["blocks"]
    assert len(blocks) == 21 and blocks["IN03"] == 0.9 and blocks["VAE"] == 0.0


def test_a_saved_recipe_loads_back_into_the_form(tab):
    form = Form(tab).pool("sd1-b.safetensors", "sd1-a.safetensors").param(tab.main_form, "weighted_sum", "alpha", 0.8)
    message, recipe_json, path, choices = tab.on_save_recipe("my recipe", *form.values)
    assert path.endswith("my_recipe.json") and "my_recipe.json" in choices["choices"]
    got = outputs(tab, tab.on_load_saved("my_recipe.json", ""), tab.load_recipe_outputs())
    assert got[tab.selection] == ["sd1-b.safetensors", "sd1-a.safetensors"]
    alpha = next(u for u in (got[c] for c in tab.main_form.components) if u.get("label") == "alpha")
    assert alpha["value"] == 0.8
    assert got[tab.method]["value"] == "weighted_sum" and got[tab.recipe_json] == recipe_json


def test_the_recipe_embedded_in_a_merged_checkpoint_loads_into_the_form(tab):
    form = Form(tab).pool("sd1-a.safetensors", "sd1-c.safetensors").set(tab.method, "n_average")
    tab.on_merge(*form.values)
    job = finish(tab)
    tab.reload_models()
    name = tab.host.name_of(job.result.path)
    assert name in tab.recipe_checkpoint_choices()
    got = outputs(tab, tab.on_load_embedded(name, ""), tab.load_recipe_outputs())
    assert got[tab.method]["value"] == "n_average" and got[tab.selection] == ["sd1-a.safetensors", "sd1-c.safetensors"]
    assert "Loaded the recipe embedded" in got[tab.message]


def test_a_broken_recipe_file_is_reported_not_raised(tab):
    got = outputs(tab, tab.on_upload(b'{"pool": [], "method": "weighted_sum"}', ""), tab.load_recipe_outputs())
    assert got[tab.message] == "**Error:** **Pool**: must be a non-empty list of file names"


def test_feature_subtabs_appear_when_their_module_exists(models, monkeypatch):
    built = []
    fake = types.ModuleType("astolfo_merge.repair_ui")
    fake.build_ui = lambda host: built.append(host) or gr.Markdown("repair goes here")
    monkeypatch.setitem(sys.modules, "astolfo_merge.repair_ui", fake)
    host = StandaloneHost(str(models))
    blocks = MergerTab(host, CATALOG).build()
    titles = [b.label for b in blocks.blocks.values() if isinstance(b, gr.Tab)]
    assert "Repair" in titles and built == [host]


def test_the_standalone_host_says_it_cannot_load_models(models):
    message, name = StandaloneHost(str(models)).load_model(str(models / "sd1-a.safetensors"))
    assert name is None and "WebUI" in message


def run_app_command(monkeypatch, argv):
    """`python -m astolfo_merge app ...` up to the point where it would serve (launch recorded, not run)."""
    from astolfo_merge import cli, demo
    served, demo_folders = [], []
    monkeypatch.setattr("astolfo_merge.ui_compat.launch", lambda page, **options: served.append((page, options)))
    monkeypatch.setattr("astolfo_merge.ui_compat.enable_queue", lambda page, workers=8: page)
    monkeypatch.setattr(demo, "write_demo_models", lambda folder, **kw: demo_folders.append(folder) or [])
    monkeypatch.setattr("astolfo_merge.app.signal.signal", lambda *a: None)
    assert cli.main(argv) == 0
    return served, demo_folders


def test_the_app_command_serves_the_tab_on_localhost(models, monkeypatch):
    served, demo_folders = run_app_command(monkeypatch, ["app", "--models-dir", str(models), "--port", "7999"])
    (page, options), = served
    assert isinstance(page, gr.Blocks) and options["server_name"] == "127.0.0.1" and options["server_port"] == 7999
    assert demo_folders == [], "a folder with models gets no demo models"


def test_the_app_writes_demo_models_with_demo_or_into_an_empty_default_folder(tmp_path, monkeypatch):
    _served, demo_folders = run_app_command(monkeypatch, ["app", "--models-dir", str(tmp_path), "--demo"])
    assert demo_folders == [str(tmp_path)]
    monkeypatch.setattr("astolfo_merge.app.DEFAULT_MODELS_DIR", str(tmp_path / "default"))
    _served, demo_folders = run_app_command(monkeypatch, ["app"])
    assert demo_folders == [str(tmp_path / "default")]
    _served, demo_folders = run_app_command(monkeypatch, ["app", "--models-dir", str(tmp_path / "empty")])
    assert demo_folders == [], "an explicitly named empty folder is left alone"


RECIPES = [
    {"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "weighted_sum", "params": {"alpha": 0.4},
     "base": "sd1-base.safetensors", "note": "keep me", "output": "kept.safetensors",
     "components": {"unet": {"pool": ["sd1-a.safetensors", "sd1-c.safetensors"], "base": "sd1-c.safetensors",
                             "blocks": {"IN01": 0.2}}}},
    {"pool": ["sdxl-a.safetensors", "sdxl-b.safetensors", "sdxl-c.safetensors"], "method": "n_average",
     "params": {"weights": [1, 2, 3]}, "base": "sdxl-base.safetensors", "dtype": "bf16", "precision": "fp32",
     "seed": 5, "nonfinite": "skip", "allow_mixed_prediction": True, "output": "soup.safetensors",
     "components": {"vae": {"take": "base"}, "te1": {"take": "sdxl-a.safetensors"},
                    "te0": {"method": "add_difference", "params": {"alpha": 0.5}, "pool": ["sdxl-a.safetensors", "sdxl-b.safetensors"]}}},
    {"pool": ["sdxl-a.safetensors", "sdxl-b.safetensors"], "method": "add_difference", "params": {"alpha": 0.7},
     "base": "sdxl-base.safetensors", "output": "mbw.safetensors", "blocks": {name: i / 20 for i, name in enumerate(
         ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)] + ["VAE"])}},
]


@pytest.mark.parametrize("doc", RECIPES, ids=["carried-fields", "components", "block-weights"])
def test_any_recipe_loaded_into_the_form_comes_back_unchanged(tab, doc):
    """Including fields the form has no widget for (a note, a component's own base and blocks)."""
    got = outputs(tab, tab.on_upload(json.dumps(doc).encode(), ""), tab.load_recipe_outputs())
    form = Form(tab).apply(got)
    _message, recipe_json = tab.on_check(*form.values)
    assert json.loads(recipe_json) == parse_recipe(doc).to_dict()
