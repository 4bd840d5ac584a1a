"""scripts/astolfo_merge_tab.py against a fake `modules` package shaped like A1111 v1.10.1's.

The fake (tests/webui_fakes.py, shared with test_hosts.py, which runs the glue on Forge Classic and
Forge Neo as well) implements what A1111.md documents and the glue uses: script_callbacks
registration, shared.opts/OptionInfo, sd_models (model_path, checkpoints_list, list_models),
cache("hashes"), call_queue.queue_lock, paths.data_path, and an xyz_grid module in
scripts.scripts_data. The script is executed the way the WebUI does it.
"""
from __future__ import annotations

import configparser
import json
import os
import pathlib
import re
import threading
import types

import gradio as gr
import pytest
import torch

from astolfo_merge.features import trials
from astolfo_merge.io.header import read_header

from conftest import load
from webui_fakes import ROOT, installed, p_object


@pytest.fixture
def webui(models, tmp_path, monkeypatch):
    """A fake A1111 whose checkpoint folder is the tests' `models` folder; returns (fake host, glue module)."""
    yield from installed("a1111", models, tmp_path, monkeypatch)


def test_the_script_registers_the_tab_the_settings_and_the_xyz_hook(webui):
    ns, glue = webui
    assert set(ns.callbacks) == {"ui_tabs", "ui_settings", "before_ui", "app_started"}   # + the loaded-model route
    ((blocks, title, elem_id),) = ns.callbacks["ui_tabs"][0]()
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("AstolfoMerge", "astolfo_merge")


def test_settings_cover_output_folder_threads_memory_device_and_precision(webui):
    ns, glue = webui
    ns.callbacks["ui_settings"][0]()
    added = ns.shared.opts.added
    assert set(added) == {"astolfo_merge_output_dir", "astolfo_merge_threads", "astolfo_merge_workers", "astolfo_merge_memory_gb",
                          "astolfo_merge_device", "astolfo_merge_precision", "astolfo_merge_xyz_target"}
    assert added["astolfo_merge_xyz_target"].default == "loaded model"
    assert all(info.section == ("astolfo_merge", "AstolfoMerge") for info in added.values())
    ns.shared.opts.astolfo_merge_memory_gb = 3.0
    ns.shared.opts.astolfo_merge_threads = 4
    assert glue.HOST.settings().memory_gb == 3.0 and glue.HOST.run_options().threads == 4
    assert added["astolfo_merge_workers"].default == 0 and glue.HOST.run_options().workers == 0     # auto
    ns.shared.opts.astolfo_merge_workers = 2
    assert glue.HOST.run_options().workers == 2


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
    message, title = glue.HOST.load_model(str(out))
    assert (message.split(" (")[0], title) == (f"Loaded {info.title}", info.title)     # over when it answers
    assert ns.loads == [str(out)] and ns.opts.sd_model_checkpoint == info.title        # via the host's own setting


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
    from astolfo_merge.features.lora_synth import write_synthetic_lora
    ns, glue = webui
    glue.add_xyz_axes()
    axis = next(o for o in ns.xyz.axis_options if o.label == "[Merger] LoRA strength")
    webui_models = ns.models / "webui-models"     # models/Stable-diffusion and models/Lora side by side
    sd_dir, lora_dir = webui_models / "Stable-diffusion", webui_models / "Lora"
    sd_dir.mkdir(parents=True)
    lora_dir.mkdir()
    os.symlink(ns.models / "sd1-a.safetensors", sd_dir / "sd1-a.safetensors")
    ns.sd.model_path = str(sd_dir)
    ns.cmd_opts.lora_dir = str(lora_dir)          # --lora-dir's default: <models>/Lora
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


def test_metadata_ini_and_page_assets_are_where_the_webui_looks():
    ini = configparser.ConfigParser()
    ini.read(ROOT / "metadata.ini")
    assert ini["Extension"]["Name"] == "astolfo-merge"
    js = (ROOT / "javascript" / "astolfo_merge.js").read_text()
    for fn in ("astolfoMergeAfterPoll", "astolfoMergeSelectCheckpoint", "astolfoMergeRefreshCheckpoints",
               "astolfoMergeStart", "onUiLoaded"):
        assert fn in js
    assert ".astolfo-hidden" in (ROOT / "style.css").read_text()
