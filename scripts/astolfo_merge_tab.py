"""AstolfoMerge in the WebUI: the "Merger" tab, its settings and "[Merger] …" XYZ axes.

Glue only (ARCHITECTURE.md): the WebUI host below translates between `modules.*` and the
backend's host interface (astolfo_merge/host.py); the tab, the jobs and the merges are the
backend's. Contract followed: shared/design/A1111.md (v1.10.1; Forge on gradio 4.40 alike):
- the package and every submodule used later are imported here, at module level (§1.2);
- merges land in `cmd_opts.ckpt_dir or sd_models.model_path`, their sha256 is written into the
  WebUI's hash cache and `list_models()` runs, so the stock "Checkpoint name" axis sees them (§3.4, §3.6);
- the merge thread and its state live in the package, so "Reload UI" does not orphan them (§1.2, §5.5);
- XYZ axes are added in `on_before_ui` with a prefix check, files merged per cell and cached by
  recipe hash (§6.2, §6.4).
"""
from __future__ import annotations

import os
import threading

import gradio as gr

from modules import cache, call_queue, paths, script_callbacks, scripts, sd_models, shared

# Imported now, at load time: the extension folder is on sys.path only while this file executes.
import astolfo_merge.lora as merger_lora
import astolfo_merge.trials as trials
import astolfo_merge.ui as merger_ui
from astolfo_merge.errors import RecipeError
from astolfo_merge.host import Host, HostSettings

TAB_TITLE, TAB_ID = "Merger", "astolfo_merge"
AXIS_PREFIX = "[Merger]"
SECTION = ("astolfo_merge", "AstolfoMerge", "system")
OPTIONS = {  # key -> (default, label, component, component args)
    "astolfo_merge_output_dir": ("", "Merger: output folder (empty: the checkpoint folder)", None, None),
    "astolfo_merge_threads": (0, "Merger: CPU threads (0: torch's default)", gr.Slider, {"minimum": 0, "maximum": 64, "step": 1}),
    "astolfo_merge_memory_gb": (1.5, "Merger: memory budget in GB", gr.Number, None),
    "astolfo_merge_device": ("cpu", "Merger: device", gr.Radio, {"choices": ["cpu", "cuda"]}),
    "astolfo_merge_precision": ("fp64", "Merger: compute precision", gr.Radio, {"choices": ["fp64", "fp32"]}),
}


def option(key):
    """A setting, or its default before on_ui_settings registered it (A1111.md §2.1)."""
    return getattr(shared.opts, key, OPTIONS[key][0])


def checkpoint_name(path: str) -> str:
    """`CheckpointInfo.name` of a file: relative to --ckpt-dir, else to the models folder, else the basename."""
    abspath = os.path.abspath(path)
    for root in (shared.cmd_opts.ckpt_dir, sd_models.model_path):
        if root and abspath.startswith(os.path.abspath(root) + os.sep):
            return os.path.relpath(abspath, os.path.abspath(root))
    return os.path.basename(abspath)


def find_checkpoint(path: str):
    abspath = os.path.abspath(path)
    return next((info for info in list(sd_models.checkpoints_list.values())
                 if os.path.abspath(info.filename) == abspath), None)


class WebuiHost(Host):
    """The WebUI's checkpoint folders, settings, hash cache and model loading."""

    key = "webui"
    title = "AstolfoMerge (WebUI)"
    can_load_model = True
    has_xyz = True

    def models_dir(self) -> str:
        return shared.cmd_opts.ckpt_dir or sd_models.model_path

    def checkpoint_paths(self) -> list:
        return list(dict.fromkeys(info.filename for info in list(sd_models.checkpoints_list.values())))

    def refresh(self) -> None:
        sd_models.list_models()

    def settings(self) -> HostSettings:
        return HostSettings(output_dir=option("astolfo_merge_output_dir") or "",
                            threads=int(option("astolfo_merge_threads") or 0),
                            memory_gb=float(option("astolfo_merge_memory_gb") or 1.5),
                            device=option("astolfo_merge_device") or "cpu",
                            precision=option("astolfo_merge_precision") or "fp64")

    def recipes_dir(self) -> str:
        return os.path.join(paths.data_path, "astolfo_merge", "recipes")

    def lora_dirs(self) -> list:
        """The WebUI's LoRA folders: --lora-dir (default models/Lora), models/LyCORIS, $ASTOLFO_LORA_DIR."""
        models = os.path.dirname(os.path.abspath(sd_models.model_path))
        dirs = [getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(models, "Lora"),
                getattr(shared.cmd_opts, "lyco_dir_backcompat", None) or os.path.join(models, "LyCORIS")]
        if os.environ.get("ASTOLFO_LORA_DIR"):
            dirs.append(os.environ["ASTOLFO_LORA_DIR"])
        return list(dict.fromkeys(os.path.abspath(d) for d in dirs))

    def after_merge(self, result) -> str | None:
        """Hash cache entry, then the checkpoint list; never waits for a running generation."""
        write_hash(result.path, result.sha256)
        if call_queue.queue_lock.acquire(blocking=False):
            try:
                sd_models.list_models()
            finally:
                call_queue.queue_lock.release()
            return "the WebUI's checkpoint list is refreshed"
        threading.Thread(target=refresh_when_idle, name="astolfo-merge-refresh", daemon=True).start()
        return "the WebUI is generating; its checkpoint list refreshes right after"

    def load_model(self, path: str) -> tuple:
        """The page selects the title through the WebUI's own checkpoint setting (works on A1111 and Forge)."""
        info = find_checkpoint(path)
        if info is None:
            self.refresh()
            info = find_checkpoint(path)
        if info is None:
            return (f"{path} is not in the WebUI's checkpoint list (is the output folder outside it?)", None)
        return (f"Loading {info.title} …", info.title)


def write_hash(path: str, sha256: str):
    """The WebUI's own cache entry, so it never re-hashes our output (A1111.md §3.4)."""
    hashes = cache.cache("hashes")
    hashes[f"checkpoint/{checkpoint_name(path)}"] = {"mtime": os.path.getmtime(path), "sha256": sha256}
    if isinstance(hashes, dict) and hasattr(cache, "dump_cache"):   # WebUIs before the diskcache switch
        cache.dump_cache()


def refresh_when_idle():
    with call_queue.queue_lock:
        sd_models.list_models()


HOST = WebuiHost()


# -- tab and settings -------------------------------------------------------------------------------

def on_ui_tabs():
    return [(merger_ui.build_tab(HOST), TAB_TITLE, TAB_ID)]


def on_ui_settings():
    infos = {}
    for key, (default, label, component, args) in OPTIONS.items():
        infos[key] = shared.OptionInfo(default, label, component, args)
    section = getattr(shared, "options_section", None)
    if section is not None:
        section(SECTION, infos)
    else:
        for info in infos.values():
            info.section = SECTION[:2]
    for key, info in infos.items():
        shared.opts.add_option(key, info)


# -- XYZ plot: merge per cell, then switch checkpoints like the stock axis ---------------------------

def xyz_module():
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "xyz_grid"):
            return data.module
    return None


def use_recipe(p, recipe, xs):
    """Merge `recipe` (or reuse its file) and make this cell use it. We run inside the generation,
    which holds queue_lock already: list the checkpoints directly, never take the lock."""
    path, merged = trials.run_trial(HOST, recipe, on_done=lambda result: write_hash(result.path, result.sha256))
    info = find_checkpoint(path)
    if merged or info is None:
        sd_models.list_models()
        info = find_checkpoint(path)
    if info is None:
        raise RuntimeError(f"{AXIS_PREFIX} merged {path}, but the WebUI does not list it")
    xyz = xyz_module()
    if xyz is not None and hasattr(xyz, "apply_checkpoint"):
        xyz.apply_checkpoint(p, info.name, xs)      # the stock axis' own switch (Forge adds steps to it)
    else:
        p.override_settings["sd_model_checkpoint"] = info.name


def apply_alpha(p, x, xs):
    use_recipe(p, trials.with_alpha(trials.load_template(HOST), x), xs)


def confirm_alpha(p, xs):
    template = trials.load_template(HOST)
    for x in xs:
        trials.check(HOST, trials.with_alpha(template, x))


def apply_lora_strength(p, x, xs):
    use_recipe(p, merger_lora.with_lora_strength(trials.load_template(HOST), x), xs)


def confirm_lora_strength(p, xs):
    template = trials.load_template(HOST)
    if not template.extra.get("loras"):
        raise RecipeError("loras", "the XYZ template bakes no LoRA: pick one in the Merger tab's LoRA rows, "
                                   "then press 'Use as XYZ template' again")
    for x in xs:
        trials.check(HOST, merger_lora.with_lora_strength(template, x))


def apply_recipe(p, x, xs):
    use_recipe(p, trials.load_named_recipe(HOST, x), xs)


def confirm_recipe(p, xs):
    for x in xs:
        trials.check(HOST, trials.load_named_recipe(HOST, x))


def add_xyz_axes():
    xyz = xyz_module()
    if xyz is None or any(opt.label.startswith(AXIS_PREFIX) for opt in xyz.axis_options):
        return
    xyz.axis_options.extend([
        xyz.AxisOption(f"{AXIS_PREFIX} alpha", float, apply_alpha, format_value=xyz.format_value_add_label,
                       confirm=confirm_alpha, cost=1.1),
        xyz.AxisOption(f"{AXIS_PREFIX} LoRA strength", float, apply_lora_strength,
                       format_value=xyz.format_value_add_label, confirm=confirm_lora_strength, cost=1.1),
        xyz.AxisOption(f"{AXIS_PREFIX} recipe", str, apply_recipe, format_value=xyz.format_value,
                       confirm=confirm_recipe, cost=1.1, choices=lambda: trials.recipe_files(HOST)),
    ])


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_before_ui(add_xyz_axes)
