"""The WebUI glue on each host it must live in: A1111 1.10.1, Forge Classic (1f95d71), Forge Neo (7f6b98f).

The fakes (tests/webui_fakes.py) define only names the real hosts define, checked here against the
lists read from their sources; on each host: the tab builds, the checkpoint folders are the host's,
the `[Merger]` axes are registered, "Load the merged model" goes through the host's own loader (or
says it is not supported), the list refresh keeps other tabs' titles valid; plus install.py and the
models-folder walk.
"""
from __future__ import annotations

import os
import runpy
import sys
import types
from importlib import metadata

import gradio as gr
import pytest
import torch

from astolfo_merge.features import trials, xyz as xyz_axes
from astolfo_merge.ui.host import StandaloneHost, scan_checkpoints

from webui_fakes import KINDS, REAL, ROOT, FakeWebui, installed, p_object


@pytest.fixture(params=KINDS)
def host(request, models, tmp_path, monkeypatch):
    yield from installed(request.param, models, tmp_path, monkeypatch)


@pytest.fixture
def webui_classic(models, tmp_path, monkeypatch):
    yield from installed("classic", models, tmp_path, monkeypatch)


def public(obj) -> set:
    return {n for n in vars(obj) if not n.startswith("_")}


@pytest.mark.parametrize("kind", KINDS)
def test_each_fake_defines_only_names_its_real_host_defines(kind, models, tmp_path, monkeypatch):
    fake = FakeWebui(kind, models, tmp_path, monkeypatch)
    assert public(fake.sd) <= REAL[kind]["modules.sd_models"], public(fake.sd) - REAL[kind]["modules.sd_models"]
    assert public(fake.cmd_opts) <= REAL[kind]["cmd_opts"]
    assert public(fake.xyz) <= REAL[kind]["xyz_grid.py"]
    for name, module in fake.extra_modules.items():
        if name in REAL[kind]:
            assert public(module) <= REAL[kind][name]
    if fake.main_entry is not None:
        assert public(fake.main_entry) <= REAL[kind]["modules_forge.main_entry"]
    # the differences the glue has to live with (HOSTS.md "Host APIs that differ")
    gone_on_neo = {"load_model", "reload_model_weights", "read_state_dict", "checkpoints_loaded"}
    assert gone_on_neo <= REAL["a1111"]["modules.sd_models"] and gone_on_neo <= REAL["classic"]["modules.sd_models"]
    assert not gone_on_neo & REAL["neo"]["modules.sd_models"] and "modules.sd_hijack" not in REAL["neo"]
    assert "ckpt_dir" not in REAL["neo"]["cmd_opts"] and "ckpt_dirs" in REAL["neo"]["cmd_opts"]
    assert not {"format_value", "format_value_add_label", "apply_checkpoint"} & REAL["classic"]["xyz_grid.py"]


def test_the_tab_builds_and_the_axes_are_registered_on_each_host(host):
    fake, glue = host
    assert set(fake.callbacks) == {"ui_tabs", "ui_settings", "before_ui", "app_started"}
    ((blocks, title, elem_id),) = fake.callbacks["ui_tabs"][0]()
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("AstolfoMerge", "astolfo_merge")
    assert glue.HOST.can_load_model and glue.HOST.has_xyz
    fake.callbacks["ui_settings"][0]()
    fake.callbacks["before_ui"][0]()
    fake.callbacks["before_ui"][0]()
    labels = [o.label for o in fake.xyz.axis_options]
    assert labels == ["Checkpoint name", "[Merger] alpha", "[Merger] LoRA strength", "[Merger] recipe"]
    alpha = fake.xyz.axis_options[1]
    assert alpha.format_value(None, alpha, 0.30000000001) == "[Merger] alpha: 0.3"
    if fake.kind == "neo":
        assert "modules.sd_hijack" not in sys.modules


def test_a_cell_merges_and_switches_through_the_hosts_own_checkpoint_helper(host):
    fake, glue = host
    glue.add_xyz_axes()
    axis = next(o for o in fake.xyz.axis_options if o.label == "[Merger] alpha")
    trials.save_template(glue.HOST, {"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "weighted_sum"})
    axis.confirm(p_object(), [0.5])
    cell = p_object()
    axis.apply(cell, 0.5, [0.5])
    name = cell.override_settings["sd_model_checkpoint"]
    assert name.startswith("_merger_trials/weighted_sum-") and (fake.models / name).is_file()
    assert fake.sd.checkpoint_aliases[name].sha256 == fake.hashes[f"checkpoint/{name}"]["sha256"]


def test_axes_are_added_with_local_helpers_where_the_host_has_none(models, tmp_path, monkeypatch):
    fake = FakeWebui("classic", models, tmp_path, monkeypatch)
    fake.extra_modules = {}                           # an X/Y/Z with AxisOption and axis_options only
    glue = fake.install()
    monkeypatch.setitem(sys.modules, "lib_xyz", None)  # and no lib_xyz to import either
    glue.add_xyz_axes()
    labels = [o.label for o in fake.xyz.axis_options]
    assert labels[1:] == ["[Merger] alpha", "[Merger] LoRA strength", "[Merger] recipe"]
    assert fake.xyz.axis_options[1].format_value is xyz_axes.format_value_add_label
    assert fake.xyz.axis_options[3].format_value is xyz_axes.format_value
    assert fake.xyz.axis_options[1].apply.__self__.apply_checkpoint is glue.fallback_apply_checkpoint
    cell = p_object()
    glue.fallback_apply_checkpoint(cell, "sd1-a.safetensors", [])
    assert cell.override_settings == {"sd_model_checkpoint": "sd1-a.safetensors"}
    fake.close()


def test_one_axis_the_host_refuses_does_not_stop_the_others(webui_classic):
    fake, glue = webui_classic

    class PickyAxisOption(fake.xyz.AxisOption):
        def __init__(self, *args, choices=None, **kw):
            if choices is not None:
                raise TypeError("choices not supported")
            super().__init__(*args, **kw)
    fake.xyz.AxisOption = PickyAxisOption
    glue.add_xyz_axes()
    assert [o.label for o in fake.xyz.axis_options][1:] == ["[Merger] alpha", "[Merger] LoRA strength"]


def test_the_checkpoint_folders_are_the_hosts_own(host, tmp_path_factory, make_checkpoint):
    fake, glue = host
    assert glue.HOST.models_dir() == str(fake.models)
    extra = tmp_path_factory.mktemp("extra-models")
    (extra / "sub").mkdir(parents=True)
    outside = make_checkpoint("sub/outside.safetensors", "sd1", variant=5, folder=extra)
    if fake.kind == "neo":                           # --ckpt-dirs: more folders; merges still go to model_path
        fake.cmd_opts.ckpt_dirs.append(str(extra))
        assert glue.HOST.models_dir() == str(fake.models)
    else:                                            # --ckpt-dir: the folder merges go to
        fake.cmd_opts.ckpt_dir = str(extra)
        assert glue.HOST.models_dir() == str(extra)
    glue.HOST.refresh()
    assert str(outside) in glue.HOST.checkpoint_paths()
    # a pool member under a short name ("<folder>/<path inside>"), which plans and XYZ cells resolve
    label = extra.name if fake.kind == "neo" else fake.models.name
    named = dict(glue.HOST.named_checkpoints())
    member = str(outside) if fake.kind == "neo" else str(fake.models / "sd1-a.safetensors")
    short = next(n for n, p in named.items() if p == member)
    assert short.startswith(f"{label}/") and not os.path.isabs(short) and glue.HOST.path_of(short) == member
    partner = next(n for n, p in named.items() if p.endswith("sd1-b.safetensors"))
    recipe = trials.with_alpha(trials.parse_recipe({"pool": [short, partner], "method": "weighted_sum"}), 0.5)
    trials.check(glue.HOST, recipe)
    recipe.output = "mix.safetensors"
    assert [s.path for s in glue.HOST.plan(recipe).sources][0] == member
    info = glue.find_checkpoint(str(outside))
    assert glue.checkpoint_name(str(outside)) == info.name == os.path.join("sub", "outside.safetensors")
    glue.write_hash(str(outside), "ef" * 32)         # the key the host's own CheckpointInfo reads
    fake.list_models()
    assert glue.find_checkpoint(str(outside)).title == f"{info.name} [{'ef' * 5}]"


def test_a_file_linked_twice_is_one_pool_member(webui_classic):
    fake, glue = webui_classic
    os.symlink(fake.models / "sd1-a.safetensors", fake.models / "again.safetensors")
    glue.HOST.refresh()
    paths = glue.HOST.checkpoint_paths()
    assert len(fake.sd.checkpoints_list) == len(paths) + 1
    assert len({os.path.realpath(p) for p in paths}) == len(paths)


def test_load_goes_through_the_hosts_loader_and_says_when_it_is_over(host):
    fake, glue = host
    path = str(fake.models / "sd1-b.safetensors")
    message, title = glue.HOST.load_model(path)
    info = glue.find_checkpoint(path)
    assert message.startswith(f"Loaded {info.title} (") and title == info.title
    assert fake.loads == [path]
    assert fake.opts.sd_model_checkpoint in (info.title, info.name)
    again, _ = glue.HOST.load_model(path)            # loaded already: nothing reloads
    assert again.startswith("Loaded") and fake.loads == [path]


def test_a_failed_load_says_so(host, monkeypatch):
    fake, glue = host

    def broken(info):
        raise MemoryError("out of memory")
    monkeypatch.setattr(fake, "_load", broken)
    message, title = glue.HOST.load_model(str(fake.models / "sd1-c.safetensors"))
    assert title is None and "sd1-c.safetensors" in message
    assert "could not load" in message or "did not load" in message


def test_without_a_loader_the_tab_says_not_supported(host, monkeypatch):
    fake, glue = host
    for name in ("forge_model_reload", "reload_model_weights"):
        monkeypatch.delattr(fake.sd, name, raising=False)
    assert not glue.HOST.can_load_model
    message, title = glue.HOST.load_model(str(fake.models / "sd1-a.safetensors"))
    assert "not supported on this host" in message and title is None and fake.loads == []


def test_a_refresh_keeps_every_title_another_tab_holds(host):
    """The built-in Checkpoint Merger reads `checkpoints_list[<dropdown title>]`: after our merge's
    refresh, the titles it was built with must still be keys (A1111.md §4 item 9)."""
    fake, glue = host
    path = fake.models / "sd1-a.safetensors"
    held = glue.find_checkpoint(str(path)).title          # what the other tab's dropdown shows
    assert held == "sd1-a.safetensors"
    # the file gets hashed by someone who does not re-title the list (a plain list_models would now)
    fake.hashes["checkpoint/sd1-a.safetensors"] = {"mtime": os.path.getmtime(path), "sha256": "12" * 32}
    out = fake.models / "merged.safetensors"
    out.write_bytes((fake.models / "sd1-b.safetensors").read_bytes())
    assert "refreshed" in glue.HOST.after_merge(types.SimpleNamespace(path=str(out), sha256="34" * 32))
    assert fake.sd.checkpoints_list[held].filename == str(path)
    assert fake.sd.checkpoint_aliases[held].filename == str(path)
    assert glue.find_checkpoint(str(out)).title == f"merged.safetensors [{'34' * 5}]"
    assert len({os.path.abspath(i.filename) for i in fake.sd.checkpoints_list.values()}) == \
        len(fake.sd.checkpoints_list)                    # no file listed twice
    out.unlink()                                         # a vanished file leaves the list
    glue.HOST.refresh()
    assert glue.find_checkpoint(str(out)) is None and held in fake.sd.checkpoints_list
    fake.list_models()                                   # the host's own refresh re-titles, as it always did
    assert held not in fake.sd.checkpoints_list


def test_the_device_setting_offers_only_what_this_machine_has(host, monkeypatch):
    fake, glue = host
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake.callbacks["ui_settings"][0]()
    args = fake.opts.added["astolfo_merge_device"].component_args
    assert (args() if callable(args) else args)["choices"] == ["cpu"]
    fake.opts.astolfo_merge_device = "cuda"              # saved on another machine
    assert glue.HOST.settings().device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert args()["choices"] == ["cpu", "cuda"] and glue.HOST.settings().device == "cuda"


# -- install.py -------------------------------------------------------------------------------------

def run_install(monkeypatch, tmp_path, present, requirements=None):
    """Run install.py under a fake `launch` module in a fake host root; returns [(command, constraints text)]."""
    calls = []

    def run_pip(command, desc=None):
        path = command.split('-c "', 1)[1].rstrip('"') if '-c "' in command else None
        calls.append((command, open(path, encoding="utf-8").read() if path else None))
    root = tmp_path / "host"
    root.mkdir(exist_ok=True)
    if requirements is not None:
        (root / "requirements_versions.txt").write_text(requirements)
    launch = types.ModuleType("launch")
    launch.__file__ = str(root / "launch.py")
    launch.is_installed, launch.run_pip = (lambda name: name in present), run_pip
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.delenv("REQS_FILE", raising=False)
    runpy.run_path(str(ROOT / "install.py"))
    return calls


def test_install_leaves_an_installed_package_alone_whatever_its_version(monkeypatch, tmp_path):
    assert run_install(monkeypatch, tmp_path, present={"scipy", "matplotlib"}) == []


def test_install_adds_a_missing_package_unpinned_and_moves_nothing_installed(monkeypatch, tmp_path):
    ((command, constraints),) = run_install(monkeypatch, tmp_path, present={"matplotlib"})
    assert command.startswith('install "scipy" -c "')
    lines = constraints.split()
    assert f"torch=={torch.__version__}" in lines and f"numpy=={metadata.version('numpy')}" in lines
    assert all("==" in line for line in lines)


def test_install_uses_the_hosts_own_pin_for_a_package_it_pins(monkeypatch, tmp_path):
    calls = run_install(monkeypatch, tmp_path, present=set(),
                        requirements="numpy==1.26.2\nSciPy==1.11.4  # the host's\n")
    assert [c.split(" -c ")[0] for c, _ in calls] == ['install "SciPy==1.11.4"', 'install "matplotlib"']


# -- the models folder walk -------------------------------------------------------------------------

def test_link_loops_in_the_models_folder_list_each_model_once_and_end(models, tmp_path):
    root = tmp_path / "looped"
    (root / "a" / "b").mkdir(parents=True)
    os.symlink(models / "sd1-a.safetensors", root / "a" / "one.safetensors")
    os.symlink(models / "sd1-b.safetensors", root / "a" / "b" / "two.safetensors")
    os.symlink(root, root / "a" / "b" / "up")         # two loops: back to the top …
    os.symlink(root / "a", root / "a" / "b" / "again")   # … and to the middle
    os.symlink(root / "a" / "one.safetensors", root / "link-to-one.safetensors")   # one file, two names
    found = scan_checkpoints(str(root))
    assert sorted(os.path.relpath(p, root) for p in found) == ["a/b/two.safetensors", "link-to-one.safetensors"]
    assert [name for name, _ in StandaloneHost(str(root)).named_checkpoints()] == \
        ["a/b/two.safetensors", "link-to-one.safetensors"]
