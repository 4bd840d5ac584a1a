"""Fake `modules.*` packages shaped like three real WebUIs, for the glue tests (test_webui_glue.py, test_hosts.py).

Each fake defines only names its real host defines (`REAL` below lists them; test_hosts.py checks
the fakes against it), and implements the ones the glue may touch the way the host's source does.
The names were read with `git show <commit>:<path>` from:
- "a1111":   AUTOMATIC1111 WebUI, github kklouzal/stable-diffusion-webui, tag v1.10.1;
- "classic": Forge Classic, github Haoming02/sd-webui-forge-classic, branch classic, commit 1f95d71;
- "neo":     Forge Neo, github exo101/sd-webui-forge-neo-v3, commit 7f6b98f (its webui/ folder).
The glue script is executed the way the WebUI does it (spec_from_file_location with the bare file name).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import threading
import types

from astolfo_merge.core import jobs
from astolfo_merge.ui import catalog as ui_catalog

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "astolfo_merge_tab.py"
KINDS = ("a1111", "classic", "neo")

# Public top-level names (functions, classes, globals; imports left out) of the modules the glue
# reads, per host. modules/sd_models.py:
REAL = {
    "a1111": {
        "modules.sd_models": set("""CheckpointInfo ModelType SdModelData SkipWritingToConfig apply_alpha_schedule_override
            apply_token_merging check_fp8 checkpoint_aliases checkpoint_alisases checkpoint_dict_replacements_sd1
            checkpoint_dict_replacements_sd2_turbo checkpoint_tiles checkpoints_list checkpoints_loaded
            enable_midas_autodownload get_checkpoint_state_dict get_closet_checkpoint_match get_empty_cond
            get_obj_from_str get_state_dict_from_checkpoint instantiate_from_config list_models load_model
            load_model_weights model_data model_dir model_hash model_path model_target_device patch_given_betas
            re_strip_checksum read_metadata_from_safetensors read_state_dict reload_model_weights repair_config
            replace_key rescale_zero_terminal_snr_abar reuse_model_from_already_loaded sd1_clip_weight
            sd2_clip_weight sdxl_clip_weight sdxl_refiner_clip_weight select_checkpoint send_model_to_cpu
            send_model_to_device send_model_to_trash set_model_fields set_model_type setup_model
            transform_checkpoint_dict_key unload_model_weights""".split()),
        # modules/cmd_args.py (--ckpt-dir) and extensions-builtin/Lora/preload.py (--lora-dir, --lyco-dir-backcompat)
        "cmd_opts": {"ckpt_dir", "lora_dir", "lyco_dir_backcompat"},
        # scripts/xyz_grid.py
        "xyz_grid.py": set("""AxisInfo AxisOption AxisOptionImg2Img AxisOptionTxt2Img Script SharedSettingsStackHelper
            apply_checkpoint apply_face_restore apply_field apply_order apply_override apply_prompt apply_size
            apply_styles apply_uni_pc_order apply_vae axis_options boolean_choice confirm_checkpoints
            confirm_checkpoints_or_none confirm_range confirm_samplers csv_string_to_list_strip do_nothing
            draw_xyz_grid fill_values_symbol find_vae format_nothing format_remove_path format_value
            format_value_add_label format_value_join_list list_to_csv_string re_range re_range_count
            re_range_count_float re_range_float str_permutations""".split()),
        "modules.sd_hijack": {"model_hijack"},
    },
    "classic": {
        "modules.sd_models": set("""CheckpointInfo SdModelData SkipWritingToConfig apply_token_merging checkpoint_aliases
            checkpoint_dict_replacements_sd1 checkpoint_dict_replacements_sd2_turbo checkpoint_tiles checkpoints_list
            checkpoints_loaded enable_midas_autodownload get_checkpoint_state_dict get_closet_checkpoint_match
            get_empty_cond get_state_dict_from_checkpoint list_loaded_weights list_models load_model load_model_weights
            model_data model_dir model_hash model_path model_target_device patch_given_betas re_strip_checksum
            read_metadata_from_safetensors read_state_dict reload_model_weights repair_config replace_key
            reuse_model_from_already_loaded sd1_clip_weight sd2_clip_weight sdxl_clip_weight sdxl_refiner_clip_weight
            select_checkpoint send_model_to_cpu send_model_to_device send_model_to_trash setup_model
            transform_checkpoint_dict_key unload_model_weights""".split()),
        # modules/cmd_args.py (--ckpt-dir), extensions-builtin/Lora/preload.py (--lora-dir)
        "cmd_opts": {"ckpt_dir", "lora_dir"},
        # extensions-builtin/xyz/scripts/xyz_grid.py: the helpers moved to lib_xyz
        "xyz_grid.py": set("""AxisInfo AxisOption SharedSettingsStackHelper XYZ axis_options builtins
            csv_string_to_list_strip draw_xyz_grid fill_values_symbol list_to_csv_string re_range re_range_count
            re_range_count_float re_range_float str_permutations""".split()),
        "lib_xyz.axis_format": {"format_nothing", "format_remove_path", "format_value", "format_value_add_label",
                                "format_value_join_list"},
        "lib_xyz.axis_application": set("""apply_checkpoint apply_clip_skip apply_face_restore apply_field apply_order
            apply_override apply_prompt apply_styles apply_uni_pc_order apply_upscale_latent_space apply_vae
            do_nothing""".split()),
        "modules.sd_hijack": {"model_hijack"},
    },
    "neo": {
        "modules.sd_models": set("""CheckpointInfo FakeInitialModel SdModelData apply_token_merging checkpoint_aliases
            checkpoint_tiles checkpoints_list forge_model_reload get_closet_checkpoint_match list_loaded_weights
            list_models match_checkpoint_to_name model_data model_dir model_hash model_path re_strip_checksum
            read_metadata_from_safetensors replace_key select_checkpoint setup_model unload_model_weights""".split()),
        # modules/cmd_args.py: --ckpt-dirs and --lora-dirs (lists); extensions-builtin/sd_forge_lora: --lora-dir
        "cmd_opts": {"ckpt_dirs", "lora_dir", "lora_dirs"},
        # scripts/xyz_grid.py (A1111's names)
        "xyz_grid.py": set("""AxisInfo AxisOption AxisOptionImg2Img AxisOptionTxt2Img Script SharedSettingsStackHelper
            apply_batch_prompts_from_file apply_checkpoint apply_face_restore apply_field apply_order apply_override
            apply_prompt apply_size apply_styles apply_uni_pc_order apply_vae axis_options boolean_choice
            confirm_checkpoints confirm_checkpoints_or_none confirm_range confirm_samplers csv_string_to_list_strip
            do_nothing draw_xyz_grid fill_values_symbol find_vae format_batch_prompts_value format_nothing
            format_remove_path format_value format_value_add_label format_value_join_list list_to_csv_string logger
            prepare_batch_prompts re_range re_range_count re_range_count_float re_range_float
            refresh_loading_params_for_xyz_grid reset_batch_prompt_state str_permutations""".split()),
        # modules_forge/main_entry.py
        "modules_forge.main_entry": set("""checkpoint_change dtype_change find_files_with_extensions forge_main_entry
            forge_unet_storage_dtype_options get_a1111_ui_component logger make_checkpoint_manager_ui module_list
            modules_change on_preset_change refresh_model_loading_parameters refresh_models ui_checkpoint
            ui_forge_preset ui_forge_unet_dtype ui_vae""".split()),
    },
}


class FakeCheckpointInfo:
    """modules/sd_models.py CheckpointInfo: name relative to the host's checkpoint roots, title with the
    cached sha256 (hash cache entry "checkpoint/<name>", valid while the file's mtime is not newer)."""

    def __init__(self, filename, webui):
        self.filename, self._webui = filename, webui
        abspath = os.path.abspath(filename)
        name = os.path.basename(filename)
        for root in webui.roots():
            root = os.path.abspath(root)
            if abspath.startswith(root):
                name = abspath.replace(root, "").strip("/").strip("\\")
                break
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        entry = webui.hashes.data.get(f"checkpoint/{name}")
        fresh = entry is not None and os.path.getmtime(filename) <= entry.get("mtime", 0)
        self.sha256 = entry["sha256"] if fresh else None
        self.shorthash = self.sha256[:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.ids = [self.title, name, self.name_for_extra] + ([self.shorthash, self.sha256] if self.sha256 else [])

    def register(self):
        sd = self._webui.sd
        sd.checkpoints_list[self.title] = self
        for alias in self.ids:
            sd.checkpoint_aliases[alias] = self

    def calculate_shorthash(self, sha256):
        """What the host does when it hashes a listed file (on load): cache entry, re-title in place."""
        self._webui.hashes[f"checkpoint/{self.name}"] = {"mtime": os.path.getmtime(self.filename), "sha256": sha256}
        old, self.sha256, self.shorthash = self.title, sha256, sha256[:10]
        self.title = f"{self.name} [{self.shorthash}]"
        items = [(self.title if t == old else t, i) for t, i in self._webui.sd.checkpoints_list.items()]
        self._webui.sd.checkpoints_list.clear()
        self._webui.sd.checkpoints_list.update(items)
        self.ids += [self.title, self.shorthash, sha256]
        self.register()


class FakeCache:
    """diskcache.Cache-like: item access, not a dict (A1111 1.10.1, Classic and Neo all use diskcache)."""

    def __init__(self):
        self.data = {}

    def __setitem__(self, key, value):
        self.data[key] = value

    def __getitem__(self, key):
        return self.data[key]

    def __contains__(self, key):
        return key in self.data


class FakeOpts:
    """modules/options.py Options: add_option, and set() that runs the option's onchange and reverts on error."""

    def __init__(self):
        self.added, self.onchange = {}, {}

    def add_option(self, key, info):
        self.added[key] = info
        setattr(self, key, info.default)

    def set(self, key, value, is_api=False, run_callbacks=True):
        old = getattr(self, key, None)
        if old == value:
            return False
        setattr(self, key, value)
        if run_callbacks and key in self.onchange:
            try:
                self.onchange[key]()
            except Exception:  # noqa: BLE001 - the host prints it and keeps the old value
                setattr(self, key, old)
                return False
        return True


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


def format_value(p, opt, x):
    return round(x, 8) if isinstance(x, float) else x


def format_value_add_label(p, opt, x):
    return f"{opt.label}: {format_value(p, opt, x)}"


class FakeWebui:
    """One fake host of `kind` whose checkpoint folder is `models`; `install()` puts it in sys.modules and
    runs the glue script, returning the glue module."""

    def __init__(self, kind, models, tmp_path, monkeypatch):
        assert kind in KINDS
        self.kind, self.models, self.monkeypatch = kind, models, monkeypatch
        self.hashes, self.callbacks, self.listed, self.loads = FakeCache(), {}, [], []
        self.data_path = tmp_path / "webui-data"
        webui_models = tmp_path / "webui-models-root"
        flags = {"ckpt_dir": None, "ckpt_dirs": [], "lora_dir": str(webui_models / "Lora"), "lora_dirs": [],
                 "lyco_dir_backcompat": str(webui_models / "LyCORIS")}
        self.cmd_opts = types.SimpleNamespace(**{k: v for k, v in flags.items() if k in REAL[kind]["cmd_opts"]})
        self.opts = FakeOpts()
        self.sd = self._sd_models()
        self.xyz, self.extra_modules = self._xyz()
        self.main_entry = self._main_entry() if kind == "neo" else None
        if kind == "neo":
            self.opts.forge_preset = "sd"                    # modules/shared_options.py "forge_preset"
        else:                                                # modules/initialize_util.py
            self.opts.onchange["sd_model_checkpoint"] = lambda: self.sd.reload_model_weights()

    # -- what the host's source does ---------------------------------------------------------------
    def roots(self):
        if self.kind == "neo":
            return [*self.cmd_opts.ckpt_dirs, self.sd.model_path]
        return [r for r in (self.cmd_opts.ckpt_dir, self.sd.model_path) if r]

    def list_models(self):
        self.listed.append(1)
        self.sd.checkpoints_list.clear()
        self.sd.checkpoint_aliases.clear()
        files = []
        for folder in self.roots():
            for root, dirs, names in os.walk(folder):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.join(root, f) for f in sorted(names) if f.endswith(".safetensors")]
        for path in dict.fromkeys(files):
            FakeCheckpointInfo(path, self).register()

    def get_closet_checkpoint_match(self, search):
        return self.sd.checkpoint_aliases.get(search) or next(
            (i for i in self.sd.checkpoints_list.values() if search and search in i.title), None)

    def _load(self, info):
        self.loads.append(info.filename)
        if self.kind == "a1111":      # ldm's LatentDiffusion: a torch module holding the checkpoint's tensors
            model = sd_model_from(info.filename)
            model.sd_checkpoint_info, model.sd_model_checkpoint = info, info.filename
        else:                         # Forge's ForgeDiffusionEngine: weights in model patchers
            model = types.SimpleNamespace(filename=info.filename, sd_checkpoint_info=info,
                                          forge_objects=types.SimpleNamespace(unet=None, clip=None, vae=None))
        self.sd.model_data.sd_model = model

    def _sd_models(self):
        sd = types.ModuleType("modules.sd_models")
        sd.model_path, sd.checkpoints_list, sd.checkpoint_aliases = str(self.models), {}, {}
        sd.model_dir = "Stable-diffusion"
        sd.list_models = self.list_models
        sd.CheckpointInfo = lambda filename: FakeCheckpointInfo(filename, self)
        sd.get_closet_checkpoint_match = self.get_closet_checkpoint_match
        sd.select_checkpoint = lambda: self.get_closet_checkpoint_match(getattr(self.opts, "sd_model_checkpoint", None))
        if self.kind == "neo":      # modules/sd_models.py: SdModelData with forge_loading_parameters; no load_model
            sd.model_data = types.SimpleNamespace(sd_model=types.SimpleNamespace(), forge_loading_parameters={},
                                                  forge_hash="")

            def forge_model_reload():
                params = sd.model_data.forge_loading_parameters
                if sd.model_data.forge_hash == str(params):
                    return sd.model_data.sd_model, False
                self._load(params["checkpoint_info"])
                sd.model_data.forge_hash = str(params)
                return sd.model_data.sd_model, True
            sd.forge_model_reload = forge_model_reload
        else:                       # A1111 / Classic: load_model, reload_model_weights, read_state_dict
            sd.model_data = types.SimpleNamespace(sd_model=None)
            sd.checkpoints_loaded = {}

            def load_model(checkpoint_info=None, already_loaded_state_dict=None):
                info = checkpoint_info or sd.select_checkpoint()
                if info is None:
                    raise FileNotFoundError("no checkpoint")
                self._load(info)
                return sd.model_data.sd_model
            sd.load_model = load_model
            sd.reload_model_weights = lambda sd_model=None, info=None, forced_reload=False: load_model(info)
            sd.read_state_dict = lambda checkpoint_file, print_global_state=False, map_location=None: {}
        return sd

    def _xyz(self):
        xyz = types.ModuleType("xyz_grid.py")
        xyz.AxisOption, xyz.axis_options = AxisOption, [AxisOption("Checkpoint name", str, None)]
        helpers = {"format_value": format_value, "format_value_add_label": format_value_add_label}

        def apply_checkpoint(p, x, xs):
            info = self.get_closet_checkpoint_match(x)
            if info is None:
                raise RuntimeError(f"Unknown checkpoint: {x}")
            p.override_settings["sd_model_checkpoint"] = info.name
        extra = {}
        if self.kind == "classic":      # lib_xyz/axis_format.py and lib_xyz/axis_application.py
            fmt, app = types.ModuleType("lib_xyz.axis_format"), types.ModuleType("lib_xyz.axis_application")
            for name, fn in helpers.items():
                setattr(fmt, name, fn)
            app.apply_checkpoint = apply_checkpoint
            package = types.ModuleType("lib_xyz")
            package.axis_format, package.axis_application = fmt, app
            extra = {"lib_xyz": package, "lib_xyz.axis_format": fmt, "lib_xyz.axis_application": app}
        else:
            for name, fn in helpers.items():
                setattr(xyz, name, fn)
            xyz.apply_checkpoint = apply_checkpoint
        return xyz, extra

    def _main_entry(self):
        """modules_forge/main_entry.py: checkpoint_change(ckpt_name, preset, save=True, refresh=True)."""
        main = types.ModuleType("modules_forge.main_entry")

        def refresh_model_loading_parameters(*, refresh=True):
            if refresh:
                self.sd.model_data.forge_loading_parameters = dict(checkpoint_info=self.sd.select_checkpoint())

        def checkpoint_change(ckpt_name, preset, save=True, refresh=True):
            new = self.get_closet_checkpoint_match(ckpt_name)
            if new == self.get_closet_checkpoint_match(getattr(self.opts, "sd_model_checkpoint", "")):
                return False
            self.opts.set("sd_model_checkpoint", ckpt_name)
            refresh_model_loading_parameters(refresh=refresh)
            return True
        main.checkpoint_change, main.refresh_model_loading_parameters = checkpoint_change, refresh_model_loading_parameters
        return main

    # -- installing it ------------------------------------------------------------------------------
    def modules(self) -> dict:
        events = ("ui_tabs", "ui_settings", "before_ui", "app_started", "script_unloaded")
        xyz_class = self.xyz_class = type("Script", (), {"__module__": "xyz_grid.py", "run": xyz_run})
        found = {
            "modules": types.ModuleType("modules"),
            "modules.script_callbacks": types.SimpleNamespace(**{
                f"on_{event}": (lambda event: lambda fn, name=None: self.callbacks.setdefault(event, []).append(fn))(event)
                for event in events}),
            "modules.scripts": types.SimpleNamespace(basedir=lambda: str(ROOT), scripts_data=[
                types.SimpleNamespace(script_class=xyz_class, module=self.xyz)]),
            "modules.shared": types.SimpleNamespace(opts=self.opts, cmd_opts=self.cmd_opts, OptionInfo=FakeOptionInfo,
                                                    options_section=options_section),
            "modules.sd_models": self.sd,
            "modules.cache": types.SimpleNamespace(cache=lambda name: self.hashes),
            "modules.call_queue": types.SimpleNamespace(queue_lock=threading.Lock()),
            "modules.paths": types.SimpleNamespace(data_path=str(self.data_path)),
            **self.extra_modules,
        }
        if "modules.sd_hijack" in REAL[self.kind]:
            found["modules.sd_hijack"] = types.SimpleNamespace(model_hijack=object())
        if self.main_entry is not None:
            forge = types.ModuleType("modules_forge")
            forge.main_entry = self.main_entry
            found.update({"modules_forge": forge, "modules_forge.main_entry": self.main_entry})
        elif self.kind == "classic":       # Classic has a modules_forge package, without main_entry
            found["modules_forge"] = types.ModuleType("modules_forge")
        return found

    def install(self):
        self.monkeypatch.delitem(sys.modules, "modules_forge", raising=False)
        self.monkeypatch.delitem(sys.modules, "modules_forge.main_entry", raising=False)
        found = self.modules()
        for name, module in found.items():
            if "." in name:      # `from modules import sd_models` reads the package's attribute
                setattr(found[name.rsplit(".", 1)[0]], name.rsplit(".", 1)[1], module)
            self.monkeypatch.setitem(sys.modules, name, module)
        self.shared, self.call_queue = found["modules.shared"], found["modules.call_queue"]
        self.list_models()
        self.listed.clear()
        self.monkeypatch.setattr(ui_catalog, "_DEFAULT", ui_catalog.Catalog(None))   # no cache file in the real home
        spec = importlib.util.spec_from_file_location(SCRIPT.name, SCRIPT)
        glue = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(glue)
        self.glue = glue
        return glue

    def close(self):
        manager = jobs.manager(self.glue.HOST.key)
        manager.cancel()
        for job in manager.jobs():
            job.done_event.wait(10)


def sd_model_from(path, dtype=None):
    """A torch module whose state_dict holds the checkpoint's tensors in fp32 (--no-half), named as the
    WebUI names them after its text-encoder hijack (modules/sd_hijack.py, sd_hijack_clip.py):
    `cond_stage_model.wrapped.…` and `token_embedding.wrapped.weight`."""
    import torch
    from safetensors.torch import load_file
    root = torch.nn.Module()
    for key, value in load_file(str(path)).items():
        name = key.replace("cond_stage_model.transformer.", "cond_stage_model.wrapped.transformer.", 1)
        name = name.replace(".token_embedding.weight", ".token_embedding.wrapped.weight")
        *path_parts, leaf = name.split(".")
        module = root
        for part in path_parts:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        if value.is_floating_point():
            module.register_parameter(leaf, torch.nn.Parameter(value.to(dtype or torch.float32), requires_grad=False))
        else:
            module.register_buffer(leaf, value)
    return root


def xyz_run(self, p, axis, values):
    """The X/Y/Z script's run, reduced to one axis: confirm, then per cell a copy of `p`, the axis'
    apply, and the "image" (what the model is named and holds then)."""
    import copy
    if axis.confirm:
        axis.confirm(p, values)
    cells = []
    for value in values:
        cell = copy.deepcopy(p)
        axis.apply(cell, value, values)
        cells.append(self.generate(cell))
    return cells


def p_object():
    """The `p` (processing) object an XYZ axis gets."""
    return types.SimpleNamespace(override_settings={})


def installed(kind, models, tmp_path, monkeypatch):
    """Fixture body: a fake `kind` host over `models` with the glue installed; yields (fake host, glue)."""
    fake = FakeWebui(kind, models, tmp_path, monkeypatch)
    glue = fake.install()
    try:
        yield fake, glue
    finally:
        fake.close()


# -- extensions-builtin/Lora/networks.py (A1111 v1.10.1): how the built-in LoRA patches a layer's weights --

def lora_network(name, updown, multiplier=1.0):
    """One loaded network as networks.py sees it for one layer: (name, multipliers, dim) and its delta."""
    return types.SimpleNamespace(name=name, te_multiplier=multiplier, unet_multiplier=multiplier, dyn_dim=None,
                                 updown=updown)


def network_apply_weights(layer, loaded_networks):
    """networks.network_apply_weights for a Linear/Conv layer (lines 411-475 at v1.10.1): back up the
    weights the first time any network is wanted, restore the backup whenever the wanted set differs
    from `network_current_names`, then add each network's delta."""
    import torch
    current = getattr(layer, "network_current_names", ())
    wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in loaded_networks)
    backup = getattr(layer, "network_weights_backup", None)
    if backup is None and wanted != ():
        if current != ():
            raise RuntimeError("no backup weights found and current weights are not unchanged")
        layer.network_weights_backup = layer.weight.to("cpu", copy=True)
    if getattr(layer, "network_bias_backup", None) is None and wanted != ():
        layer.network_bias_backup = None if layer.bias is None else layer.bias.to("cpu", copy=True)
    if current != wanted:
        with torch.no_grad():       # network_restore_weights_from_backup
            if getattr(layer, "network_weights_backup", None) is not None:
                layer.weight.copy_(layer.network_weights_backup)
            if getattr(layer, "network_bias_backup", None) is not None:
                layer.bias.copy_(layer.network_bias_backup)
            for net in loaded_networks:
                layer.weight.copy_((layer.weight.to(net.updown.dtype) + net.updown).to(layer.weight.dtype))
        layer.network_current_names = wanted
