"""scripts/astolfo_merge_tab.py against a fake `modules` package shaped like A1111 v1.10.1's.

The fakes implement only what A1111.md documents and the glue uses: script_callbacks registration,
shared.opts/OptionInfo, sd_models (model_path, checkpoints_list, list_models), cache("hashes"),
call_queue.queue_lock, paths.data_path, and an xyz_grid module in scripts.scripts_data. The script
is executed the way the WebUI does it (spec_from_file_location with the bare file name).
"""
from __future__ import annotations

import configparser
import importlib.util
import json
import os
import pathlib
import re
import runpy
import sys
import threading
import types

import gradio as gr
import pytest
import torch

from astolfo_merge import jobs, trials, ui_catalog
from astolfo_merge.checkpoint import read_header
from conftest import load

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "astolfo_merge_tab.py"


class FakeCheckpointInfo:
    def __init__(self, filename, name, sha256):
        self.filename, self.name, self.sha256 = filename, name, sha256
        self.title = f"{name} [{sha256[:10]}]" if sha256 else name


class FakeCache:
    """diskcache.Cache-like: item access, not a dict."""

    def __init__(self):
        self.data = {}

    def __setitem__(self, key, value):
        self.data[key] = value

    def __getitem__(self, key):
        return self.data[key]

    def __contains__(self, key):
        return key in self.data


class FakeOpts:
    def __init__(self):
        self.added = {}

    def add_option(self, key, info):
        self.added[key] = info
        setattr(self, key, info.default)


class FakeOptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, **kw):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = self.category_id = None


def options_section(identifier, infos):
    for info in infos.values():
        info.section, info.category_id = identifier[:2], identifier[2] if len(identifier) > 2 else None
    return infos


class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.choices = confirm, cost, choices


@pytest.fixture
def webui(models, tmp_path, monkeypatch):
    """A fake WebUI whose checkpoint folder is the tests' `models` folder; returns (namespace, glue module)."""
    hashes, callbacks, listed = FakeCache(), {}, []
    data_path = tmp_path / "webui-data"

    def list_models():
        listed.append(1)
        sd.checkpoints_list.clear()
        for root, dirs, files in os.walk(sd.model_path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for f in sorted(files):
                if f.endswith(".safetensors"):
                    path = os.path.join(root, f)
                    name = os.path.relpath(path, sd.model_path)
                    entry = hashes.data.get(f"checkpoint/{name}", {})
                    info = FakeCheckpointInfo(path, name, entry.get("sha256"))
                    sd.checkpoints_list[info.title] = info

    sd = types.SimpleNamespace(model_path=str(models), checkpoints_list={}, list_models=list_models)
    xyz = types.ModuleType("xyz_grid.py")
    xyz.AxisOption, xyz.axis_options = AxisOption, [AxisOption("Checkpoint name", str, None)]
    xyz.format_value = lambda p, opt, x: x
    xyz.format_value_add_label = lambda p, opt, x: f"{opt.label}: {x}"

    def apply_checkpoint(p, x, xs):
        p.override_settings["sd_model_checkpoint"] = x
    xyz.apply_checkpoint = apply_checkpoint
    xyz_class = type("Script", (), {"__module__": "xyz_grid.py"})
    modules = {
        "modules": types.ModuleType("modules"),
        "modules.script_callbacks": types.SimpleNamespace(**{
            f"on_{event}": (lambda event: lambda fn, name=None: callbacks.setdefault(event, []).append(fn))(event)
            for event in ("ui_tabs", "ui_settings", "before_ui", "app_started", "script_unloaded")}),
        "modules.scripts": types.SimpleNamespace(basedir=lambda: str(ROOT), scripts_data=[
            types.SimpleNamespace(script_class=xyz_class, module=xyz)]),
        "modules.shared": types.SimpleNamespace(opts=FakeOpts(), cmd_opts=types.SimpleNamespace(ckpt_dir=None),
                                                OptionInfo=FakeOptionInfo, options_section=options_section),
        "modules.sd_models": sd,
        "modules.cache": types.SimpleNamespace(cache=lambda name: hashes),
        "modules.call_queue": types.SimpleNamespace(queue_lock=threading.Lock()),
        "modules.paths": types.SimpleNamespace(data_path=str(data_path)),
    }
    for name, module in modules.items():
        if name != "modules":
            setattr(modules["modules"], name.split(".")[1], module)
        monkeypatch.setitem(sys.modules, name, module)
    list_models()
    listed.clear()
    monkeypatch.setattr(ui_catalog, "_DEFAULT", ui_catalog.Catalog(None))   # no cache file in the real home
    spec = importlib.util.spec_from_file_location(SCRIPT.name, SCRIPT)
    glue = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(glue)
    ns = types.SimpleNamespace(callbacks=callbacks, hashes=hashes, sd=sd, xyz=xyz, listed=listed, models=models,
                               shared=modules["modules.shared"], call_queue=modules["modules.call_queue"],
                               data_path=data_path)
    yield ns, glue
    manager = jobs.manager(glue.HOST.key)
    manager.cancel()
    for job in manager.jobs():
        job.done_event.wait(10)


def p_object():
    return types.SimpleNamespace(override_settings={})


def test_the_script_registers_the_tab_the_settings_and_the_xyz_hook(webui):
    ns, glue = webui
    assert set(ns.callbacks) == {"ui_tabs", "ui_settings", "before_ui"}
    ((blocks, title, elem_id),) = ns.callbacks["ui_tabs"][0]()
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("Merger", "astolfo_merge")


def test_settings_cover_output_folder_threads_memory_device_and_precision(webui):
    ns, glue = webui
    ns.callbacks["ui_settings"][0]()
    added = ns.shared.opts.added
    assert set(added) == {"astolfo_merge_output_dir", "astolfo_merge_threads", "astolfo_merge_memory_gb",
                          "astolfo_merge_device", "astolfo_merge_precision"}
    assert all(info.section == ("astolfo_merge", "AstolfoMerge") for info in added.values())
    ns.shared.opts.astolfo_merge_memory_gb = 3.0
    ns.shared.opts.astolfo_merge_threads = 4
    assert glue.HOST.settings().memory_gb == 3.0 and glue.HOST.run_options().threads == 4


def test_merges_go_to_the_webui_checkpoint_folder_or_ckpt_dir(webui, tmp_path):
    ns, glue = webui
    assert glue.HOST.models_dir() == str(ns.models)
    ns.shared.cmd_opts.ckpt_dir = str(tmp_path)
    assert glue.HOST.models_dir() == str(tmp_path)


def test_a_finished_merge_is_hashed_for_the_webui_and_listed(webui):
    ns, glue = webui
    out = ns.models / "sub" / "new.safetensors"
    out.parent.mkdir()
    out.write_bytes((ns.models / "sd1-a.safetensors").read_bytes())
    result = types.SimpleNamespace(path=str(out), sha256="ab" * 32)
    assert "refreshed" in glue.HOST.after_merge(result)
    assert ns.hashes["checkpoint/sub/new.safetensors"] == {"mtime": os.path.getmtime(out), "sha256": "ab" * 32}
    info = glue.find_checkpoint(str(out))
    assert info is not None and info.title == "sub/new.safetensors [abababab" + "ab]"
    assert glue.HOST.load_model(str(out)) == (f"Loading {info.title} …", info.title)


def test_the_refresh_waits_for_a_running_generation_instead_of_blocking_the_merge(webui):
    ns, glue = webui
    out = ns.models / "late.safetensors"
    out.write_bytes(b"x")
    with ns.call_queue.queue_lock:
        message = glue.HOST.after_merge(types.SimpleNamespace(path=str(out), sha256="cd" * 32))
        assert "refreshes right after" in message and glue.find_checkpoint(str(out)) is None
    for _ in range(200):
        if glue.find_checkpoint(str(out)) is not None:
            break
        threading.Event().wait(0.01)
    assert glue.find_checkpoint(str(out)) is not None


def test_xyz_axes_are_added_once_with_the_merger_prefix(webui):
    ns, glue = webui
    ns.callbacks["before_ui"][0]()
    ns.callbacks["before_ui"][0]()     # every Reload UI runs it again
    labels = [o.label for o in ns.xyz.axis_options]
    assert labels == ["Checkpoint name", "[Merger] alpha", "[Merger] LoRA strength", "[Merger] recipe"]
    assert all(o.cost > 1.0 for o in ns.xyz.axis_options[1:]), "merging axes iterate outermost"


def test_the_alpha_axis_merges_each_value_once_and_switches_the_cell_to_it(webui):
    ns, glue = webui
    glue.add_xyz_axes()
    axis = next(o for o in ns.xyz.axis_options if o.label == "[Merger] alpha")
    trials.save_template(glue.HOST, {"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "weighted_sum"})
    axis.confirm(p_object(), [0.25, 0.75])
    first = p_object()
    axis.apply(first, 0.25, [0.25, 0.75])
    name = first.override_settings["sd_model_checkpoint"]
    path = ns.models / name
    assert name.startswith("_merger_trials/weighted_sum-") and path.is_file()
    assert ns.hashes[f"checkpoint/{name}"]["sha256"] == glue.find_checkpoint(str(path)).sha256
    mtime = os.path.getmtime(path)
    again = p_object()
    axis.apply(again, 0.25, [0.25, 0.75])
    assert again.override_settings["sd_model_checkpoint"] == name and os.path.getmtime(path) == mtime
    other = p_object()
    axis.apply(other, 0.75, [0.25, 0.75])
    assert other.override_settings["sd_model_checkpoint"] != name
    metadata = read_header(ns.models / other.override_settings["sd_model_checkpoint"]).metadata
    assert json.loads(metadata["astolfo_merge_recipe"])["params"]["alpha"] == 0.75


def test_the_lora_strength_axis_merges_each_strength_into_its_own_cached_file(webui):
    from astolfo_merge.lora_synth import write_synthetic_lora
    ns, glue = webui
    glue.add_xyz_axes()
    axis = next(o for o in ns.xyz.axis_options if o.label == "[Merger] LoRA strength")
    webui_models = ns.models / "webui-models"     # models/Stable-diffusion and models/Lora side by side
    sd_dir, lora_dir = webui_models / "Stable-diffusion", webui_models / "Lora"
    sd_dir.mkdir(parents=True)
    lora_dir.mkdir()
    os.symlink(ns.models / "sd1-a.safetensors", sd_dir / "sd1-a.safetensors")
    ns.sd.model_path = str(sd_dir)
    ns.sd.list_models()
    write_synthetic_lora(lora_dir / "style.safetensors", "sd1", 64, algo="lora", rank=2)
    assert [name for name, _ in glue.HOST.lora_files()] == ["style.safetensors"]
    trials.save_template(glue.HOST, {"pool": ["sd1-a.safetensors"], "method": "n_average",
                                     "loras": [{"file": "style.safetensors", "strength": 1.0}]})
    axis.confirm(p_object(), [0.0, 1.0])
    cells = [p_object(), p_object(), p_object()]
    for cell, x in zip(cells, (0.0, 1.0, 0.0)):
        axis.apply(cell, x, [0.0, 1.0])
    names = [c.override_settings["sd_model_checkpoint"] for c in cells]
    assert names[0] == names[2] != names[1] and all((sd_dir / n).is_file() for n in names)
    strengths = [json.loads(read_header(sd_dir / n).metadata["astolfo_merge_recipe"])["loras"][0]["strength"]
                 for n in names[:2]]
    assert strengths == [0.0, 1.0]
    weights = [load(sd_dir / n)["model.diffusion_model.input_blocks.1.1.proj_in.weight"] for n in names[:2]]
    assert not torch.equal(weights[0], weights[1])


def test_the_lora_strength_axis_refuses_a_template_without_loras(webui):
    ns, glue = webui
    glue.add_xyz_axes()
    axis = next(o for o in ns.xyz.axis_options if o.label == "[Merger] LoRA strength")
    trials.save_template(glue.HOST, {"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "weighted_sum"})
    with pytest.raises(Exception, match="bakes no LoRA"):
        axis.confirm(p_object(), [0.5])


def test_the_recipe_axis_merges_saved_recipe_files(webui):
    ns, glue = webui
    glue.add_xyz_axes()
    axis = next(o for o in ns.xyz.axis_options if o.label == "[Merger] recipe")
    folder = pathlib.Path(glue.HOST.recipes_dir())
    folder.mkdir(parents=True)
    (folder / "soup.json").write_text(json.dumps({"pool": ["sd1-a.safetensors", "sd1-c.safetensors"], "method": "n_average"}))
    assert axis.choices() == ["soup.json"]
    axis.confirm(p_object(), ["soup.json"])
    with pytest.raises(Exception, match="not found"):
        axis.confirm(p_object(), ["missing.json"])
    cell = p_object()
    axis.apply(cell, "soup", ["soup"])
    assert (ns.models / cell.override_settings["sd_model_checkpoint"]).is_file()


def test_the_alpha_axis_without_a_template_says_how_to_make_one(webui):
    ns, glue = webui
    glue.add_xyz_axes()
    axis = next(o for o in ns.xyz.axis_options if o.label == "[Merger] alpha")
    with pytest.raises(Exception, match="Use as XYZ template"):
        axis.confirm(p_object(), [0.5])


def test_the_backend_never_imports_the_webui():
    pattern = re.compile(r"^\s*(import modules|from modules\b)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "astolfo_merge").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_install_only_installs_what_the_webui_lacks(monkeypatch):
    calls = []
    launch = types.SimpleNamespace(is_installed=lambda name: name != "scipy",
                                   run_pip=lambda command, desc=None: calls.append(command))
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(ROOT / "install.py"))
    assert calls == ['install "scipy>=1.11"']


def test_metadata_ini_and_page_assets_are_where_the_webui_looks():
    ini = configparser.ConfigParser()
    ini.read(ROOT / "metadata.ini")
    assert ini["Extension"]["Name"] == "astolfo-merge"
    js = (ROOT / "javascript" / "astolfo_merge.js").read_text()
    for fn in ("astolfoMergeAfterPoll", "astolfoMergeSelectCheckpoint", "astolfoMergeStart", "onUiLoaded"):
        assert fn in js
    assert ".astolfo-hidden" in (ROOT / "style.css").read_text()
