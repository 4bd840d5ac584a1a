"""The Merger tab's handlers on a standalone host, without a browser (tests/ui/test_browser.py drives the page)."""
from __future__ import annotations

import json

import gradio as gr
import pytest

from astolfo_merge.core import jobs
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.io.header import read_header
from astolfo_merge.ui import repair_tab
from astolfo_merge.ui.catalog import Catalog
from astolfo_merge.ui.host import StandaloneHost
from astolfo_merge.ui.state import MODES
from astolfo_merge.ui.tab import MergerTab

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
    monkeypatch.setattr(tab.host.settings(), "throttle", 0.01)   # RunOptions.throttle: seconds per key
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


def test_the_repair_and_analysis_subtabs_are_built_for_the_tabs_host(models, monkeypatch):
    built = []
    monkeypatch.setattr(repair_tab, "build_ui", lambda host: built.append(host) or gr.Markdown("repair goes here"))
    host = StandaloneHost(str(models))
    blocks = MergerTab(host, CATALOG).build()
    titles = [b.label for b in blocks.blocks.values() if isinstance(b, gr.Tab)]
    assert {"Repair", "Analysis"} <= set(titles) and built == [host]


def test_the_standalone_host_says_it_cannot_load_models(models):
    message, name = StandaloneHost(str(models)).load_model(str(models / "sd1-a.safetensors"))
    assert name is None and "WebUI" in message


def run_app_command(monkeypatch, argv):
    """`python -m astolfo_merge app ...` up to the point where it would serve (launch recorded, not run)."""
    from astolfo_merge.cli import commands as cli
    from astolfo_merge.features import demo
    served, demo_folders = [], []
    monkeypatch.setattr("astolfo_merge.ui.app_server.serve", lambda page, **options: served.append((page, options)))
    monkeypatch.setattr("astolfo_merge.ui.compat.enable_queue", lambda page, workers=8: page)
    monkeypatch.setattr(demo, "write_demo_models", lambda folder, **kw: demo_folders.append(folder) or [])
    monkeypatch.setattr("astolfo_merge.cli.app.signal.signal", lambda *a: None)
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
    monkeypatch.setattr("astolfo_merge.cli.app.DEFAULT_MODELS_DIR", str(tmp_path / "default"))
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


def test_the_form_is_read_by_field_name_not_by_position(tab):
    """Every input has one name; the recipe read from the named values does not depend on their order."""
    form = Form(tab).pool("sd1-a.safetensors", "sd1-b.safetensors").set(tab.seed, 9)
    names = [*tab.form_fields(), *tab.run_fields()]
    assert len(set(names)) == len(names) == len(form.components)
    named = tab.named(form.values)
    assert (named["selection"], named["seed"], named["memory_gb"]) == (["sd1-a.safetensors", "sd1-b.safetensors"], 9,
                                                                       form.value(tab.memory))
    backwards = dict(reversed(list(named.items())))
    assert tab.recipe_of(backwards).to_dict() == tab.form_recipe(form.values[:len(tab.form_inputs())]).to_dict()
    assert json.loads(tab.on_check(*form.values)[1]) == tab.recipe_of(named).to_dict()


# --- rough edges seen in a real WebUI (issue 16) -------------------------------------------------

SDXL_VAE = [k for k in __import__("astolfo_merge.io.arch", fromlist=["layout"]).layout("sdxl", 64)
            if k.startswith("first_stage_model.")]


def test_the_first_seconds_show_the_hashing_stage_and_no_eta(models, tmp_path):
    from astolfo_merge.core.engine import run_merge
    from astolfo_merge.core.plan import build_plan
    from astolfo_merge.core.run_options import RunOptions
    from astolfo_merge.io.hashes import HashCache
    plan = build_plan(parse_recipe({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "n_average"}),
                      str(models), str(tmp_path / "out.safetensors"))
    seen = []
    run_merge(plan, RunOptions(hash_cache=HashCache(str(tmp_path / "hashes.json"))), progress=seen.append)
    hashing = [p for p in seen if p.stage]
    assert [p.stage for p in hashing] == ["hashing inputs 1/2", "hashing inputs 2/2"]
    assert seen[:2] == hashing and all(p.keys_done == 0 and p.eta is None for p in hashing)
    assert all(not p.stage for p in seen[2:]), "the stage ends when the keys start"


def test_the_eta_waits_for_a_few_percent_and_seconds_of_merging():
    from astolfo_merge.core.run_options import merge_eta
    assert merge_eta(9.0, 1, 1000) is None, "hashing time never counts; 0.1 % says nothing yet"
    assert merge_eta(1.0, 500, 1000) is None, "under 2 s of merging"
    assert merge_eta(4.0, 100, 1000) == pytest.approx(36.0)


def test_the_progress_bar_names_the_hashing_stage_instead_of_zero_keys(tab):
    snap = jobs.Snapshot("job-1", "m.safetensors", jobs.RUNNING, keys_total=1143, elapsed=9.0, eta=156000.0,
                         stage="hashing inputs 2/5")
    text = tab.progress_html(snap)
    assert "hashing inputs 2/5" in text and "keys" not in text and "ETA" not in text
    snap.stage, snap.keys_done, snap.fraction, snap.eta = "", 300, 0.3, 20.0
    assert "300/1143 keys" in tab.progress_html(snap) and "ETA 20.0 s" in tab.progress_html(snap)


def test_errors_name_the_tabs_widgets_not_recipe_fields_or_cli_flags(tab, models):
    form = Form(tab).pool("sd1-a.safetensors", "sd1-b.safetensors").set(tab.output_name, "taken.safetensors")
    (models / "taken.safetensors").write_bytes(b"mine")
    message = tab.on_merge(*form.values)[0]
    assert "tick **Overwrite an existing file**" in message and "--overwrite" not in message
    form.set(tab.output_name, "").set(tab.comp["vae"]["mode"], MODES["take"])
    message = tab.on_check(*form.values)[0]
    assert message == "**Error:** **VAE from** (Components → VAE): pick the model to take it from"
    form.set(tab.comp["vae"]["mode"], MODES["main"]).set(tab.method, "add_difference").set(tab.base, "(none)")
    assert tab.on_check(*form.values)[0] == "**Error:** **Base model**: method 'add_difference' needs a base model"


def test_the_tab_words_cover_the_backends_cli_advice():
    from astolfo_merge.ui.words import field_label, tab_words
    assert field_label("components.te0.params.alpha") == "**alpha** (Components → TE0 (CLIP-L) → own method)"
    assert field_label("pool[1]") == "**Pool** (model 2)" and field_label("params.alpha") == "**alpha** (method parameter)"
    for text in ("x: output exists; pass --overwrite (or 'overwrite': true) to replace it",
                 "inputs disagree on the prediction type (…); set 'allow_mixed_prediction': true to merge them anyway",
                 "a has no VAE and there is no base to fill it from: add a base, or set components.vae.take / components.vae.pool",
                 "b has no UNET (a component-only file?); it cannot be a pool member: use it as components.<vae|te0|te1>.take instead",
                 "f: 3 key(s) are missing (…); pass --base BASE, a complete SDXL model, to fill them",
                 "this merge needs about 3.10 GiB but the budget is 1.00 GiB; raise --memory-gb to at least 3.1"):
        said = tab_words(text)
        assert "--" not in said and "components." not in said and "'allow_mixed_prediction'" not in said, said


def test_check_plan_without_a_base_says_so_first_and_sums_up_missing_keys_per_component(tab, models, make_checkpoint):
    make_checkpoint("sdxl-novae.safetensors", "sdxl", variant=5, drop=SDXL_VAE, folder=models)
    tab.reload_models()
    form = Form(tab).pool("sdxl-a.safetensors", "sdxl-novae.safetensors").set(tab.base, "(none)")
    message = tab.on_check(*form.values)[0]
    assert message.startswith("**Error:**") and "no base to fill it from" in message and "Plan" not in message
    (models / "out.safetensors").write_bytes(b"x")
    form.set(tab.base, "sdxl-base.safetensors").set(tab.output_name, "out.safetensors")
    lines = tab.on_check(*form.values)[0].split("  \n")
    assert lines[0].startswith("**Merge would stop:** `out.safetensors` exists: tick **Overwrite")
    vae = [line for line in lines if "VAE:" in line]
    assert vae == [f"note: VAE: 248 of 248 key(s) ({SDXL_VAE[0]}, {SDXL_VAE[1]}, … (+246)): sdxl-novae.safetensors "
                   "lack(s) them; filled from the base sdxl-base.safetensors (1 of 2 inputs have their own)"]


def test_the_pool_says_the_chosen_base_fills_a_partial_model(tab, models, make_checkpoint):
    make_checkpoint("sdxl-novae.safetensors", "sdxl", variant=5, drop=SDXL_VAE, folder=models)
    tab.reload_models()
    pool = ["sdxl-a.safetensors", "sdxl-novae.safetensors"]
    got = outputs(tab, tab.on_pool_input(pool, "", [], "(none)", "weighted_sum", "", ""), tab.pool_change_outputs())
    assert got[tab.base]["value"] == "sdxl-base.safetensors"
    assert "`sdxl-novae.safetensors`: incomplete VAE — filled from the base `sdxl-base.safetensors`" in got[tab.pool_summary]
    assert "repair first" not in got[tab.pool_summary]
    assert "pick a **Base model** to fill it" in tab.on_base_change(pool, "(none)")


def test_with_every_component_taken_the_method_controls_are_greyed_with_a_note(tab):
    names = list(tab.comp)
    taken = {name: MODES["take"] for name in names}
    got = outputs(tab, tab.on_method_lock("weighted_sum", ["sd1-a.safetensors"], *taken.values()), tab.method_controls())
    assert got[tab.method]["interactive"] is False and got[tab.mbw.enabled]["interactive"] is False
    assert all(got[c]["interactive"] is False for c in tab.main_form.components)
    assert "not used" in got[tab.method_help]
    sd1_all_taken = {**taken, "te1": MODES["main"], "vae": MODES["base"]}   # SD1 has no TE1
    got = outputs(tab, tab.on_method_lock("weighted_sum", ["sd1-a.safetensors"], *sd1_all_taken.values()),
                  tab.method_controls())
    assert got[tab.method]["interactive"] is False
    one_merged = {**taken, "unet": MODES["main"]}
    got = outputs(tab, tab.on_method_lock("weighted_sum", ["sd1-a.safetensors"], *one_merged.values()),
                  tab.method_controls())
    assert got[tab.method]["interactive"] is True and got[tab.mbw.enabled]["interactive"] is True
    assert got[tab.method_help].startswith("**Weighted sum")


def test_after_a_merge_the_repair_and_analysis_lists_show_the_new_file(tab):
    assert set(tab.panels) == {"Repair", "Analysis"}
    repair_model = tab.panels["Repair"].model
    assert repair_model in tab.list_outputs() and tab.panels["Analysis"].models in tab.list_outputs()
    tab.on_merge(*Form(tab).pool("sd1-a.safetensors", "sd1-b.safetensors").values)
    job = finish(tab)
    poll_out = [tab.progress, tab.log, tab.summary, tab.load, tab.seen, tab.event, *tab.list_outputs()]
    got = outputs(tab, tab.on_poll({}, "", []), poll_out)
    assert tab.host.name_of(job.result.path) in got[repair_model]["choices"]


def test_the_tab_answers_a_nan_budget_with_a_message_not_an_exception(models):
    """Issue 15 (tests/core/test_errors.py has the CLI and library side of a bad memory budget)."""
    tab = MergerTab(StandaloneHost(str(models)), CATALOG)
    tab.blocks = tab.build()
    form = Form(tab).pool("sd1-a.safetensors", "sd1-b.safetensors").set(tab.memory, float("nan"))
    message, _recipe = tab.on_check(*form.values)
    assert "memory budget" in message and "finite" in message


def test_each_component_rows_method_choice_updates_its_own_form(tab):
    for name, row in tab.comp.items():
        wired = [d for d in tab.blocks.dependencies      # gradio 3.41's shape: targets, trigger
                 if row["method"]._id in d["targets"] and d["trigger"] == "input"]
        assert len(wired) == 1, name
        assert wired[0]["outputs"] == [c._id for c in row["form"].components], name
