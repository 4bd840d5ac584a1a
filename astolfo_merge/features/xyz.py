"""The `[Merger]` X/Y/Z plot axes (alpha, LoRA strength, recipe): each cell merges the tab's XYZ
template, changed by the axis value, into the loaded model (only the keys the cell changes; the
model is brought back after the grid) or into a trial file cached by recipe hash (trials.py), which
the cell then switches to like the stock checkpoint axis (A1111.md §6.2, §6.4).

Host-agnostic: the WebUI glue (scripts/astolfo_merge_tab.py) passes the host's X/Y/Z script module
and its WebuiHost, which answers what only the WebUI knows: whether cells go to the loaded model
(`xyz_cells_live`), the loaded model itself (`live_target(load=True)`), a trial file's checkpoint
name (`trial_checkpoint`) and its hash-cache entry (`after_trial`). Every host helper is taken from
the X/Y/Z module, else from Forge Classic's `lib_xyz`, else a local one that does the same.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

from ..errors import RecipeError
from . import trials
from .live_state import LiveError

AXIS_PREFIX = "[Merger]"
GRID = trials.GRID     # in the package: the X/Y/Z run wrapper outlives a Reload UI of the glue


def format_value(p, opt, x):
    return round(x, 8) if isinstance(x, float) else x


def format_value_add_label(p, opt, x):
    return f"{opt.label}: {format_value(p, opt, x)}"


# Where hosts keep each helper besides the X/Y/Z script module itself (Forge Classic: extensions-builtin/xyz/lib_xyz).
HELPER_MODULES = {"format_value": "lib_xyz.axis_format", "format_value_add_label": "lib_xyz.axis_format",
                  "apply_checkpoint": "lib_xyz.axis_application"}


def xyz_helper(name: str, xyz, fallback):
    """The host's X/Y/Z helper `name` wherever it has it (the script module, then Classic's lib_xyz),
    else `fallback`."""
    found = getattr(xyz, name, None)
    if callable(found):
        return found
    module_name = HELPER_MODULES[name]
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
    found = getattr(module, name, None)
    return found if callable(found) else fallback


def has_axes_api(xyz) -> bool:
    return xyz is not None and hasattr(xyz, "AxisOption") and hasattr(xyz, "axis_options")


class Axes:
    """Our axes on one host's X/Y/Z script: `apply_checkpoint(p, name, xs)` is the host's fallback
    for switching a cell to a checkpoint; `tab` names the tab in messages."""

    def __init__(self, host, xyz, apply_checkpoint, tab: str):
        self.host, self.xyz, self.tab = host, xyz, tab
        self.apply_checkpoint = xyz_helper("apply_checkpoint", xyz, apply_checkpoint)

    # -- where a cell merges -------------------------------------------------------------------------
    def cells_go_live(self) -> bool:
        """Cells merge into the loaded model unless the setting says file, or the host cannot (said once)."""
        if not self.host.xyz_cells_live():
            return False
        try:
            self.host.live_target(load=True)
        except LiveError as exc:
            if not GRID.get("said"):
                print(f"AstolfoMerge: {AXIS_PREFIX} cells merge to files: {exc}", file=sys.stderr)
                GRID["said"] = True
            return False
        return True

    def live_cell(self, recipe):
        """Merge `recipe` into the loaded model (only keys whose recipe changed since the last cell)."""
        host = self.host
        target = host.live_target(load=True)
        if not GRID.get("live"):
            state = target.state
            GRID.update(live=True, before=state.plan if state is not None and state.merged and state.complete else None)
        plan = trials.live_plan(host, recipe)
        if not GRID.get("workers_started"):     # once per grid, before its first cell: no cell waits for them
            GRID["workers_started"] = True
            started = time.monotonic()
            count = host.start_live_workers(plan, host.run_options())
            if count:
                print(f"AstolfoMerge: {AXIS_PREFIX} grid: {count} worker processes ready in "
                      f"{time.monotonic() - started:.2f} s")
        result = host.merge_live(plan, host.run_options(), locked=False)   # the generation holds the host's lock
        print(f"AstolfoMerge: {AXIS_PREFIX} cell merged into the loaded model in {result.seconds:.2f} s "
              f"({result.keys} keys merged, {result.restored} restored, {result.kept} unchanged) {result.label}")

    def after_grid(self):
        """Bring back what the model held before the grid: its checkpoint, or the live merge loaded then."""
        host, before = self.host, GRID.get("before")
        GRID.clear()
        if before is not None:
            result = host.merge_live(before, host.run_options(), locked=False)
            what = f"the live merge loaded before the grid ({result.keys} keys re-merged)"
        else:
            result = host.restore_live(locked=False)
            what = f"its checkpoint ({result.restored} keys restored)"
        host.end_live_workers()
        print(f"AstolfoMerge: {AXIS_PREFIX} grid done; the loaded model holds {what} in {result.seconds:.2f} s")

    def use_recipe(self, p, recipe, xs):
        """Merge `recipe` into the loaded model (default), or into a file (reused when merged before)
        that this cell switches to. This runs inside the generation, which holds the host's lock."""
        if self.cells_go_live():
            self.live_cell(recipe)
            return
        started = time.monotonic()
        path, merged = trials.run_trial(self.host, recipe, on_done=self.host.after_trial)
        print(f"AstolfoMerge: {AXIS_PREFIX} cell {'merged' if merged else 'reused'} {os.path.basename(path)} "
              f"in {time.monotonic() - started:.2f} s")
        self.apply_checkpoint(p, self.host.trial_checkpoint(path, merged), xs)   # the stock axis' own switch

    # -- the axes ------------------------------------------------------------------------------------
    def apply_alpha(self, p, x, xs):
        self.use_recipe(p, trials.with_alpha(trials.load_template(self.host), x), xs)

    def confirm_alpha(self, p, xs):
        template = trials.load_template(self.host)
        for x in xs:
            trials.check(self.host, trials.with_alpha(template, x))

    def apply_lora_strength(self, p, x, xs):
        self.use_recipe(p, trials.with_lora_strength(trials.load_template(self.host), x), xs)

    def confirm_lora_strength(self, p, xs):
        template = trials.load_template(self.host)
        if not template.extra.get("loras"):
            raise RecipeError("loras", f"the XYZ template bakes no LoRA: pick one in the {self.tab} tab's LoRA "
                                       "rows, then press 'Use as XYZ template' again")
        for x in xs:
            trials.check(self.host, trials.with_lora_strength(template, x))

    def apply_recipe(self, p, x, xs):
        self.use_recipe(p, trials.load_named_recipe(self.host, x), xs)

    def confirm_recipe(self, p, xs):
        for x in xs:
            trials.check(self.host, trials.load_named_recipe(self.host, x))

    def add(self, scripts_data):
        """Append our axes to the X/Y/Z script's list, each on its own (a helper the host lacks is
        replaced, one axis the host refuses never takes the others); `scripts_data` (the host's
        loaded scripts) is where the X/Y/Z script's run is wrapped to end a live grid."""
        xyz = self.xyz
        wrap_run(xyz, scripts_data, self.after_grid)
        if any(str(getattr(opt, "label", "")).startswith(AXIS_PREFIX) for opt in xyz.axis_options):
            return
        label = xyz_helper("format_value_add_label", xyz, format_value_add_label)
        plain = xyz_helper("format_value", xyz, format_value)
        axes = [
            (f"{AXIS_PREFIX} alpha", float, self.apply_alpha, label, self.confirm_alpha, None),
            (f"{AXIS_PREFIX} LoRA strength", float, self.apply_lora_strength, label, self.confirm_lora_strength, None),
            (f"{AXIS_PREFIX} recipe", str, self.apply_recipe, plain, self.confirm_recipe,
             lambda: trials.recipe_files(self.host)),
        ]
        for title, kind, apply, fmt, confirm, choices in axes:
            try:
                options = {"format_value": fmt, "confirm": confirm, "cost": 1.1}
                if choices is not None:
                    options["choices"] = choices
                xyz.axis_options.append(xyz.AxisOption(title, kind, apply, **options))
            except Exception as exc:  # noqa: BLE001 - one axis the host refuses must not take the others
                print(f"AstolfoMerge: X/Y/Z axis {title!r} not added: {exc}", file=sys.stderr)


def wrap_run(xyz, scripts_data, after_grid):
    """Run `after_grid` when the X/Y/Z script's run ends (done, failed or interrupted), if a cell went live."""
    for data in scripts_data:
        cls = data.script_class
        if data.module is not xyz or not hasattr(cls, "run") or getattr(cls.run, "astolfo_merge", False):
            continue
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            GRID.clear()
            try:
                return _original(self, *args, **kwargs)
            finally:
                if GRID.get("live"):
                    after_grid()
        run.astolfo_merge = True
        cls.run = run
