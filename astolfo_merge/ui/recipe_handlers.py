"""Handlers of the Merger tab's recipes: the XYZ template, saving a recipe, and loading one (saved,
uploaded or embedded in a checkpoint) back into every widget of the form.
"""
from __future__ import annotations

import os
import re

import gradio as gr

from ..core.recipe import load_recipe, parse_recipe, recipe_from_metadata
from ..errors import AstolfoError, RecipeError
from ..features import trials
from ..io.header import read_header
from ..io.paths import check_recipe_size, recipe_path
from .catalog import pool_arch
from .compat import file_value_bytes
from .form_handlers import NONE, fill
from .state import BASE, MODES, OWN, TAKE, component_carry, component_mode, form_carry, lora_rows


class RecipeHandlers:
    """Mixed into ui.MergerTab: reads the form through its FormHandlers, fills it from a recipe."""

    # -- recipes ----------------------------------------------------------------------------------
    def on_xyz_template(self, *values):
        try:
            recipe = self.form_recipe(values)
            path = trials.save_template(self.host, recipe.to_dict())
        except AstolfoError as exc:
            return self.error_text(exc), gr.update()
        return (f"XYZ template saved (`{path}`). In txt2img → Script → X/Y/Z plot pick **[Merger] alpha** "
                f"(values like `0.2, 0.4, 0.6`), **[Merger] LoRA strength** (the first LoRA row) or **[Merger] recipe**."), recipe.to_json()

    def on_save_recipe(self, name, *values):
        outputs_unchanged = (gr.update(), gr.update(), gr.update())
        try:
            recipe = self.form_recipe(values)
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", (name or "").strip()).strip("._") or \
                re.sub(r"\.safetensors$", "", recipe.output or "recipe")
            path = recipe_path(self.host, stem if stem.lower().endswith(".json") else f"{stem}.json", "Save as")
        except AstolfoError as exc:
            return (self.error_text(exc),) + outputs_unchanged
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(recipe.to_json())
        return (f"Recipe saved: `{path}`", recipe.to_json(), path,
                gr.update(choices=self.saved_recipe_choices(), value=os.path.basename(path)))

    def on_load_saved(self, name, filter_text):
        if not name:
            return self.load_failed(RecipeError("(recipe)", "pick a saved recipe first"))
        try:
            recipe = load_recipe(recipe_path(self.host, name))
        except AstolfoError as exc:
            return self.load_failed(exc)
        return self.apply_recipe(recipe, filter_text, f"Loaded recipe `{name}`.")

    def on_upload(self, data, filter_text):
        raw = file_value_bytes(data)
        if raw is None:
            return fill(self.load_recipe_outputs(), {})
        try:
            check_recipe_size(len(raw), "the uploaded recipe")
            recipe = parse_recipe(raw.decode("utf-8", errors="replace"))
        except AstolfoError as exc:
            return self.load_failed(exc)
        return self.apply_recipe(recipe, filter_text, "Loaded the uploaded recipe.")

    def on_load_embedded(self, name, filter_text):
        info = self.by_name.get(name)
        if info is None:
            return self.load_failed(RecipeError("(checkpoint)", f"pick a merged checkpoint first (got {name!r})"))
        try:
            recipe = recipe_from_metadata(read_header(info.path).metadata)
        except AstolfoError as exc:
            return self.load_failed(exc)
        return self.apply_recipe(recipe, filter_text, f"Loaded the recipe embedded in `{name}`.")

    def load_failed(self, exc):
        return fill(self.load_recipe_outputs(), {self.message: self.error_text(exc)})

    def apply_recipe(self, recipe, filter_text, message) -> list:
        """Fill every widget from `recipe` (the form's one shape of a recipe)."""
        output = recipe.output or ""
        updates = self.pool_changed(list(recipe.pool), filter_text, recipe.base or NONE, recipe.method, output, "",
                                    as_dict=True)
        arch = pool_arch(self.by_name, list(recipe.pool))
        updates[self.base] = gr.update(value=recipe.base or NONE)
        updates[self.output_name] = output or updates.get(self.output_name, "")
        updates[self.method] = gr.update(value=recipe.method)
        updates.update(zip(self.main_form.components, self.main_form.updates(recipe.method, dict(recipe.params))))
        updates[self.method_help] = self.method_help_text(recipe.method)
        updates[self.mbw.enabled] = gr.update(value=bool(recipe.blocks))
        updates.update(self.mbw.set_updates(arch, dict(recipe.blocks)))
        for name, row in self.comp.items():
            updates.update(self.component_updates(row, recipe.components.get(name)))
        updates.update({self.dtype: recipe.dtype_of("default"), self.precision: recipe.precision,
                        self.seed: recipe.seed,
                        self.allow_mixed: recipe.allow_mixed_prediction, self.nonfinite: recipe.nonfinite,
                        self.position_ids: recipe.position_ids, self.extra: form_carry(recipe),
                        self.component_extra: component_carry(recipe),
                        self.message: message, self.recipe_json: recipe.to_json()})
        loras = recipe.extra.get("loras") or []
        rows, carry = lora_rows(loras, len(self.lora_rows))
        for widgets, (file, strength, when) in zip(self.lora_rows, rows):
            updates.update(zip(widgets, (gr.update(value=file or NONE), strength, when)))
        updates[self.lora_carry] = carry
        if loras:
            updates[self.lora_box] = gr.update(visible=True, open=True)
        if component_mode(recipe.components.get("unet")) == BASE and not recipe.base:
            updates[self.message] = message + " (note: 'keep base' needs a base model)"
        return fill(self.load_recipe_outputs(), updates)

    def component_updates(self, row, rule) -> dict:
        """A component row showing `rule` (None: main method)."""
        mode = component_mode(rule)
        own = rule if mode == OWN else None
        own_method = (own and own.method) or self.default_method
        updates = {row["mode"]: MODES[mode],
                   row["take"]: gr.update(value=rule.take if mode == TAKE else None, visible=mode == TAKE),
                   row["own"]: gr.update(visible=mode == OWN), row["method"]: gr.update(value=own_method),
                   row["pool"]: gr.update(value=list((own and own.pool) or []))}
        updates.update(zip(row["form"].components, row["form"].updates(own_method, dict((own and own.params) or {}))))
        return updates
