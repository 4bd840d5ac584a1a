"""AstolfoMerge in the WebUI: the "AstolfoMerge" tab, its settings and "[Merger] …" XYZ axes.

Glue only (ARCHITECTURE.md): the WebUI host below translates between `modules.*` and the
backend's host interface (astolfo_merge/ui/host.py); the tab, the jobs and the merges are the
backend's. Contract followed: shared/design/A1111.md (v1.10.1) and HOSTS.md (Forge Classic, Forge Neo):
- every host API is feature-detected by trying the attribute, never by the version string: the
  checkpoint folders (`--ckpt-dir` on A1111/Classic, the `--ckpt-dirs` list on Neo), the loader
  (the `sd_model_checkpoint` setting's own reload on A1111/Classic, `checkpoint_change` +
  `forge_model_reload` on Neo, else "not supported on this host"), the X/Y/Z helpers (Classic keeps
  them in `lib_xyz`) with local fallbacks;
- the package and every submodule used later are imported here, at module level (A1111.md §1.2);
- merges land in `cmd_opts.ckpt_dir or sd_models.model_path`, their sha256 is written into the
  WebUI's hash cache and the checkpoint list is refreshed so that every title another tab holds
  stays valid (§3.4, §3.6, §4 item 9);
- the merge thread and its state live in the package, so "Reload UI" does not orphan them (§1.2, §5.5);
- XYZ axes are added in `on_before_ui` with a prefix check; what a cell does (merge into the loaded
  model, or a file cached by recipe hash) is features/xyz.py's, with this host's answers (§6.2, §6.4).
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading
import time

import gradio as gr
from modules import cache, call_queue, paths, script_callbacks, scripts, sd_models, shared

# Imported now, at load time: the extension folder is on sys.path only while this file executes.
import astolfo_merge.features.live as merger_live
import astolfo_merge.features.live_state as live_state
import astolfo_merge.features.live_webui as live_webui
import astolfo_merge.features.xyz as xyz_axes
import astolfo_merge.ui.tab as merger_ui
from astolfo_merge.ui.host import Host, HostSettings

# Not "Merger": A1111 and Forge Neo have a built-in "Checkpoint Merger" tab beside it.
TAB_TITLE, TAB_ID = "AstolfoMerge", "astolfo_merge"
SECTION = ("astolfo_merge", "AstolfoMerge", "system")
OPTIONS = {  # key -> (default, label, component, component args)
    "astolfo_merge_output_dir": ("", "AstolfoMerge: output folder (empty: the checkpoint folder)", None, None),
    "astolfo_merge_threads": (0, "AstolfoMerge: CPU threads (0: torch's default)", gr.Slider,
                              {"minimum": 0, "maximum": 64, "step": 1}),
    "astolfo_merge_workers": (0, "AstolfoMerge: worker processes (0: auto, as many as cores and the memory budget allow)",
                              gr.Slider, {"minimum": 0, "maximum": 64, "step": 1}),
    "astolfo_merge_memory_gb": (1.5, "AstolfoMerge: memory budget in GB", gr.Number, None),
    # a callable: the choices are what this machine has (no "cuda" without CUDA)
    "astolfo_merge_device": ("cpu", "AstolfoMerge: device", gr.Radio, lambda: {"choices": merger_ui.device_choices()}),
    "astolfo_merge_precision": ("fp64", "AstolfoMerge: compute precision", gr.Radio, {"choices": ["fp64", "fp32"]}),
    # where the [Merger] XYZ axes put each cell's merge (live.py; a file per cell where the host cannot)
    "astolfo_merge_xyz_target": ("loaded model", "AstolfoMerge: [Merger] XYZ cells merge into", gr.Radio,
                                 {"choices": ["loaded model", "file (cached in _merger_trials)"]}),
}
NOT_SUPPORTED = "not supported on this host"


def option(key):
    """A setting, or its default before on_ui_settings registered it (A1111.md §2.1)."""
    return getattr(shared.opts, key, OPTIONS[key][0])


# -- host APIs, feature-detected ---------------------------------------------------------------------

def checkpoint_roots() -> list:
    """The folders the host names checkpoints relative to, in its own order: `--ckpt-dir` (A1111,
    Classic) or the `--ckpt-dirs` list (Neo), then `sd_models.model_path`."""
    roots = [getattr(shared.cmd_opts, "ckpt_dir", None), *(getattr(shared.cmd_opts, "ckpt_dirs", None) or []),
             sd_models.model_path]
    return list(dict.fromkeys(os.path.abspath(r) for r in roots if r))


def checkpoint_name(path: str) -> str:
    """`CheckpointInfo.name` of a file: relative to the first checkpoint root holding it, else the basename."""
    abspath = os.path.abspath(path)
    for root in checkpoint_roots():
        if abspath.startswith(root + os.sep):
            return os.path.relpath(abspath, root)
    return os.path.basename(abspath)


def find_checkpoint(path: str):
    abspath = os.path.abspath(path)
    return next((info for info in list(sd_models.checkpoints_list.values())
                 if os.path.abspath(info.filename) == abspath), None)


def refresh_checkpoints():
    """The host's own `list_models()`, then every title another tab may hold stays a key.

    `list_models()` rebuilds `checkpoints_list` (title -> info) from the hash cache, so a file hashed
    since the last listing comes back under a new title "name [hash]". The built-in Checkpoint
    Merger reads its dropdowns with `checkpoints_list[title]` (modules/extras.py `run_modelmerger`)
    and would fail with KeyError until its own refresh buttons are pressed. So an entry whose file
    was listed before keeps its previous info object and title; new files are added, vanished
    files dropped, in the host's order. The host's own refresh buttons still re-title as before."""
    before = {os.path.abspath(info.filename): (title, info) for title, info in list(sd_models.checkpoints_list.items())}
    sd_models.list_models()
    listing = sd_models.checkpoints_list
    rebuilt, kept = {}, []
    for title, info in list(listing.items()):
        old_title, old_info = before.get(os.path.abspath(info.filename), (title, info))
        if old_title != title:
            kept.append(old_info)
        rebuilt[old_title] = old_info if old_title != title else info
    if kept:
        listing.clear()
        listing.update(rebuilt)
        for info in kept:     # its aliases too (get_closet_checkpoint_match), as list_models registered the new ones
            register = getattr(info, "register", None)
            if register is not None:
                register()


def forge_main_entry():
    """Forge's checkpoint selector module (Forge Neo: `modules_forge.main_entry`), or None."""
    try:
        module = importlib.import_module("modules_forge.main_entry")
    except ImportError:
        return None
    return module if hasattr(module, "checkpoint_change") else None


def model_loader():
    """How this host loads a checkpoint now, or None: "forge" (Neo: `main_entry.checkpoint_change`,
    then `sd_models.forge_model_reload`) or "settings" (A1111, Classic: setting `sd_model_checkpoint`
    runs the host's own `reload_model_weights`)."""
    if hasattr(sd_models, "forge_model_reload") and forge_main_entry() is not None:
        return "forge"
    if hasattr(sd_models, "reload_model_weights") and hasattr(shared.opts, "set"):
        return "settings"
    return None


def loaded_checkpoint_file():
    """The file of the model the host has loaded (never triggers a load), or None."""
    model = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
    info = getattr(model, "sd_checkpoint_info", None)
    filename = getattr(info, "filename", None) or getattr(model, "filename", None)
    return os.path.abspath(filename) if filename else None


def current_model(load: bool = False):
    """The host's loaded model; `load=True` (inside a generation) lets the host load it first."""
    if load:
        try:
            model = getattr(shared, "sd_model", None)
            if model is not None:
                return model
        except Exception:  # noqa: BLE001 - the host could not load one: say "no model" below
            pass
    return getattr(getattr(sd_models, "model_data", None), "sd_model", None)


def live_target(load: bool = False):
    """The loaded model as a live-merge target, or LiveError saying why not on this host."""
    forge = "modules_forge" in sys.modules or hasattr(sd_models, "forge_model_reload")   # Classic / Neo
    model = None if forge else current_model(load)
    reason = live_webui.unsupported_reason(model, forge)
    if reason is not None:
        raise live_state.LiveError(reason)
    info = live_webui._real_info(model)
    loaded = getattr(sd_models, "checkpoints_loaded", None)
    if isinstance(loaded, dict):      # the RAM checkpoint cache holds the model's own tensors: drop this file's
        loaded.pop(info, None)
    return live_webui.WebuiModelTarget(model)


def load_with_forge(info):
    main_entry = forge_main_entry()
    params = inspect.signature(main_entry.checkpoint_change).parameters
    args = (info.name, getattr(shared.opts, "forge_preset", None)) if "preset" in params else (info.name,)
    with call_queue.queue_lock:            # never while a generation runs
        if not main_entry.checkpoint_change(*args) and hasattr(main_entry, "refresh_model_loading_parameters"):
            main_entry.refresh_model_loading_parameters()
        sd_models.forge_model_reload()


def load_with_settings(info):
    """The setting's onchange (A1111: wrap_queued_call(reload_model_weights); Classic: on its main
    thread) loads the model; it takes the queue lock itself."""
    shared.opts.set("sd_model_checkpoint", info.title)


class WebuiHost(Host):
    """The WebUI's checkpoint folders, settings, hash cache and model loading."""

    key = "webui"
    title = "AstolfoMerge (WebUI)"
    has_loaded_model = True

    def live_target(self, load: bool = False):
        return live_target(load)

    def live_lock(self):
        return call_queue.queue_lock

    @property
    def can_load_model(self) -> bool:
        return model_loader() is not None

    @property
    def has_xyz(self) -> bool:
        return xyz_axes.has_axes_api(xyz_module())

    def xyz_cells_live(self) -> bool:
        """Whether [Merger] cells merge into the loaded model (the setting; features/xyz.py)."""
        return str(option("astolfo_merge_xyz_target")).startswith("loaded")

    def after_trial(self, result):
        """A cell's trial file is written: its hash goes into the WebUI's cache (no re-hash on load)."""
        write_hash(result.path, result.sha256)

    def trial_checkpoint(self, path: str, merged: bool) -> str:
        """The checkpoint name a cell switches to for the trial file `path`. Runs inside the
        generation, which holds queue_lock already: refresh the list directly, never take the lock."""
        info = find_checkpoint(path)
        if merged or info is None:
            refresh_checkpoints()
            info = find_checkpoint(path)
        if info is None:
            raise RuntimeError(f"{xyz_axes.AXIS_PREFIX} merged {path}, but the WebUI does not list it")
        return info.name

    def models_dir(self) -> str:
        return getattr(shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path

    def extra_model_dirs(self) -> list:
        """The host's other checkpoint folders (Neo's --ckpt-dirs; models/Stable-diffusion beside --ckpt-dir)."""
        main = os.path.abspath(self.models_dir())
        return [root for root in checkpoint_roots() if root != main]

    def checkpoint_paths(self) -> list:
        """Every listed file once (a link loop or two links to one file list it once)."""
        found = {}
        for info in list(sd_models.checkpoints_list.values()):
            found.setdefault(os.path.realpath(info.filename), info.filename)
        return list(found.values())

    def refresh(self) -> None:
        refresh_checkpoints()

    def settings(self) -> HostSettings:
        device = option("astolfo_merge_device") or "cpu"
        return HostSettings(output_dir=option("astolfo_merge_output_dir") or "",
                            threads=int(option("astolfo_merge_threads") or 0),
                            workers=int(option("astolfo_merge_workers") or 0),
                            memory_gb=float(option("astolfo_merge_memory_gb") or 1.5),
                            device=device if device in merger_ui.device_choices() else "cpu",
                            precision=option("astolfo_merge_precision") or "fp64")

    def recipes_dir(self) -> str:
        return os.path.join(paths.data_path, "astolfo_merge", "recipes")

    def lora_dirs(self) -> list:
        """The WebUI's LoRA folders: --lora-dir (default models/Lora), Neo's --lora-dirs, models/LyCORIS,
        $ASTOLFO_LORA_DIR."""
        models = os.path.dirname(os.path.abspath(sd_models.model_path))
        dirs = [getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(models, "Lora"),
                *(getattr(shared.cmd_opts, "lora_dirs", None) or []),
                getattr(shared.cmd_opts, "lyco_dir_backcompat", None) or os.path.join(models, "LyCORIS")]
        if os.environ.get("ASTOLFO_LORA_DIR"):
            dirs.append(os.environ["ASTOLFO_LORA_DIR"])
        return list(dict.fromkeys(os.path.abspath(d) for d in dirs))

    def after_merge(self, result) -> str | None:
        """Hash cache entry, then the checkpoint list; never waits for a running generation."""
        write_hash(result.path, result.sha256)
        if call_queue.queue_lock.acquire(blocking=False):
            try:
                refresh_checkpoints()
            finally:
                call_queue.queue_lock.release()
            return "the WebUI's checkpoint list is refreshed"
        threading.Thread(target=refresh_when_idle, name="astolfo-merge-refresh", daemon=True).start()
        return "the WebUI is generating; its checkpoint list refreshes right after"

    def load_model(self, path: str) -> tuple:
        """Load `path` through the host's own loader and say how it went once it is over; the page
        then shows the title in the WebUI's checkpoint picker (a no-op there: it is loaded)."""
        how = model_loader()
        if how is None:
            return (f"Loading a model from this tab is {NOT_SUPPORTED} (it has neither A1111's "
                    f"`reload_model_weights` nor Forge's `forge_model_reload`). The merge is at {path}: "
                    f"pick it in the WebUI's checkpoint list.", None)
        info = find_checkpoint(path)
        if info is None:
            self.refresh()
            info = find_checkpoint(path)
        if info is None:
            return (f"{path} is not in the WebUI's checkpoint list (is the output folder outside it?)", None)
        started = time.monotonic()
        try:
            (load_with_forge if how == "forge" else load_with_settings)(info)
        except Exception as exc:  # noqa: BLE001 - the host's own failure, shown on the page
            return (f"**The WebUI could not load {info.title}:** {exc}", None)
        seconds = time.monotonic() - started
        if loaded_checkpoint_file() == os.path.abspath(path):
            return (f"Loaded {info.title} ({seconds:.1f} s).", info.title)
        if how == "settings" and getattr(shared.opts, "sd_model_checkpoint", None) == info.title:
            return (f"{info.title} is selected; the WebUI loads it for the next image.", info.title)
        return (f"**The WebUI did not load {info.title}** (its console says why). The file is at {path}.", None)


def write_hash(path: str, sha256: str):
    """The WebUI's own cache entry, so it never re-hashes our output (A1111.md §3.4)."""
    hashes = cache.cache("hashes")
    hashes[f"checkpoint/{checkpoint_name(path)}"] = {"mtime": os.path.getmtime(path), "sha256": sha256}
    if isinstance(hashes, dict) and hasattr(cache, "dump_cache"):   # WebUIs before the diskcache switch
        cache.dump_cache()


def refresh_when_idle():
    with call_queue.queue_lock:
        refresh_checkpoints()


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


# -- XYZ plot: the axes are features/xyz.py's; the host's X/Y/Z script is found here ------------------

def xyz_module():
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "xyz_grid"):
            return data.module
    return None


def fallback_apply_checkpoint(p, x, xs):
    info = sd_models.get_closet_checkpoint_match(x) if hasattr(sd_models, "get_closet_checkpoint_match") else None
    p.override_settings["sd_model_checkpoint"] = info.name if info is not None else x


def add_xyz_axes():
    """Our axes on the host's X/Y/Z script, if it has one with the API they need."""
    xyz = xyz_module()
    if not xyz_axes.has_axes_api(xyz):
        if xyz is not None:
            print(f"AstolfoMerge: this X/Y/Z plot has no AxisOption/axis_options; {xyz_axes.AXIS_PREFIX} axes "
                  "not added", file=sys.stderr)
        return
    xyz_axes.Axes(HOST, xyz, fallback_apply_checkpoint, TAB_TITLE).add(getattr(scripts, "scripts_data", []))


# -- a read-only API route: what the loaded model holds (tests and tools check live merges with it) ---

LOADED_MODEL_ROUTE = "/astolfo-merge/v1/loaded-model"


def loaded_model_info(digests: bool = False) -> dict:
    try:
        target = live_target()
    except live_state.LiveError as exc:
        return {"supported": False, "reason": str(exc)}
    return {"supported": True, **merger_live.describe(target, digests)}


def on_app_started(demo, app):
    if app is not None and hasattr(app, "add_api_route"):
        app.add_api_route(LOADED_MODEL_ROUTE, loaded_model_info, methods=["GET"])


script_callbacks.on_ui_tabs(on_ui_tabs)
if hasattr(script_callbacks, "on_app_started"):
    script_callbacks.on_app_started(on_app_started)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_before_ui(add_xyz_axes)
