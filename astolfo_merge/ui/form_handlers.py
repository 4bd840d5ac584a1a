"""Handlers of the Merger tab's form: the model lists, the pool, the method and its forms, and
reading the form into a `Recipe` (the layout is in tab.py).

Handlers are plain methods over widget values: they read the form, by field name, into a
`Recipe` (state.py maps rows to rules) and return updates. Running the plan is in run_handlers.py,
saving and loading recipes in recipe_handlers.py.
"""
from __future__ import annotations

import time

import gradio as gr

from ..core.recipe import Recipe, parse_recipe
from ..errors import RecipeError
from .catalog import guess_base, pool_arch, pool_scale
from .forms import preset_values
from .state import (
    BASE,
    MAIN,
    MODE_OF_LABEL,
    OWN,
    TAKE,
    arch_components,
    auto_output_name,
    carried_dtype,
    carried_extra,
    clean_params,
    component_rule,
    components_of,
    loras_from_rows,
    merge_selection,
    slot_values,
)

NONE = "(none)"
LOCKED_NOTE = ("**Every component is taken from a file** (see Components): the method, its parameters and the "
               "block weights are not used. Set a component back to *Main method* to use them.")
POOL_SUMMARY_NAMES = 12


def fill(outputs: list, updates: dict) -> list:
    """A value per output, in order: those in `updates`, "no change" for the rest."""
    return [updates[c] if c in updates else gr.update() for c in outputs]


class FormHandlers:
    """Mixed into ui.MergerTab, which defines the widgets these handlers read and update."""

    # -- model listing ----------------------------------------------------------------------------
    def reload_models(self):
        self.infos = self.catalog.list(self.host.named_checkpoints())
        self.by_name = {i.name: i for i in self.infos}

    def shown(self, filter_text: str) -> list:
        words = (filter_text or "").lower().split()
        return [i for i in self.infos if all(w in i.label.lower() for w in words)]

    def pool_choices(self, filter_text: str) -> list:
        return [(i.label, i.name) for i in self.shown(filter_text)]

    def pool_label(self, filter_text: str) -> str:
        return f"Models ({len(self.shown(filter_text))} shown of {len(self.infos)} in {self.host.models_dir()})"

    def model_choices(self, with_none=False) -> list:
        return ([NONE] if with_none else []) + [i.name for i in self.infos if i.mergeable]

    def lora_choices(self) -> list:
        """(none) + the recipe names of the host's LoRA files."""
        try:
            return [NONE] + [name for name, _entry in self.host.lora_files()]
        except OSError:
            return [NONE]

    def recipe_checkpoint_choices(self) -> list:
        return [i.name for i in self.infos if i.has_recipe]

    def list_updates(self, filter_text: str, selection: list) -> dict:
        shown = {i.name for i in self.shown(filter_text)}
        updates = {
            self.pool: gr.update(choices=self.pool_choices(filter_text), label=self.pool_label(filter_text),
                                 value=[n for n in selection or [] if n in shown]),
            self.base: gr.update(choices=self.model_choices(with_none=True)),
            self.recipe_source: gr.update(choices=self.recipe_checkpoint_choices()),
            self.saved_recipes: gr.update(choices=self.saved_recipe_choices()),
        }
        for row in self.comp.values():
            updates[row["take"]] = gr.update(choices=self.model_choices())
            updates[row["pool"]] = gr.update(choices=self.model_choices())
        loras = self.lora_choices()
        updates[self.lora_box] = gr.update(visible=len(loras) > 1)
        for row in self.lora_rows:
            updates[row[0]] = gr.update(choices=loras)
        for panel in self.list_panels():
            updates.update(panel.list_updates())
        return updates

    # -- pool -------------------------------------------------------------------------------------
    def on_filter(self, filter_text, selection):
        shown = {i.name for i in self.shown(filter_text)}
        return gr.update(choices=self.pool_choices(filter_text), label=self.pool_label(filter_text),
                         value=[n for n in selection or [] if n in shown])

    def on_pool_input(self, checked, filter_text, selection, base, method, output_name, auto_name):
        shown = [i.name for i in self.shown(filter_text)]
        pool = merge_selection(selection or [], shown, checked or [])
        # The checkboxes already show the click; echoing them back could undo a faster second click.
        return self.pool_changed(pool, filter_text, base, method, output_name, auto_name, echo_pool=False)

    def on_select_shown(self, filter_text, selection, base, method, output_name, auto_name):
        shown = [i.name for i in self.shown(filter_text) if i.mergeable]
        pool = list(selection or []) + [n for n in shown if n not in set(selection or [])]
        return self.pool_changed(pool, filter_text, base, method, output_name, auto_name)

    def on_select_none(self, filter_text, selection, base, method, output_name, auto_name):
        return self.pool_changed([], filter_text, base, method, output_name, auto_name)

    def on_lists_changed(self, filter_text, selection):
        """After a file was written elsewhere in the tab (a repair): every list shows it, and the page
        script refreshes the WebUI's checkpoint list (a new value of the event box, as after a merge)."""
        self.reload_models()
        updates = self.list_updates(filter_text, selection)
        updates[self.event] = f"files:{time.time_ns()}"
        return fill([*self.list_outputs(), self.event], updates)

    def on_refresh(self, filter_text, selection):
        self.host.refresh()
        self.reload_models()
        return fill(self.list_outputs(), self.list_updates(filter_text, selection))

    def pool_changed(self, pool, filter_text, base, method, output_name, auto_name, as_dict=False, echo_pool=True):
        """Everything that follows the pool: summary, base guess, output name, layouts by architecture."""
        arch = pool_arch(self.by_name, pool)
        shown = {i.name for i in self.shown(filter_text)}
        updates = {self.selection: list(pool)}
        if echo_pool:
            updates[self.pool] = gr.update(value=[n for n in pool if n in shown])
        base_info, scale = self.by_name.get(base), pool_scale(self.by_name, pool)
        mismatch = base_info and arch and (base_info.arch != arch or base_info.scale != scale)
        if pool and (base in (None, "", NONE) or mismatch):
            base = guess_base(self.infos, arch, scale) or NONE
            updates[self.base] = gr.update(value=base)
        updates[self.pool_summary] = self.pool_summary_text(pool, arch, base)
        auto = auto_output_name(pool, method) or ""
        if not output_name or output_name == auto_name:
            updates[self.output_name] = auto
        updates[self.auto_name] = auto
        updates.update(self.arch_updates(arch))
        return updates if as_dict else fill(self.pool_change_outputs(), updates)

    def arch_updates(self, arch) -> dict:
        updates = dict(self.mbw.show_updates(arch))
        present = components_of(arch or "sd1") if arch else components_of("sd1") + ("te1",)
        for name, row in self.comp.items():
            updates[row["box"]] = gr.update(visible=name in present)
        return updates

    def pool_summary_text(self, pool, arch, base=None) -> str:
        if not pool:
            return "No model selected yet."
        names = " · ".join(f"{n + 1}. `{name}`" for n, name in enumerate(pool[:POOL_SUMMARY_NAMES]))
        more = f" … and {len(pool) - POOL_SUMMARY_NAMES} more" if len(pool) > POOL_SUMMARY_NAMES else ""
        infos = [self.by_name.get(n) for n in pool]
        first = next((i for i in infos if i and i.arch), None)
        lines = [f"**Pool ({len(pool)}, in order):** {names}{more}"]
        if first:
            lines.append(f"Architecture: {first.title}, {first.prediction}")
        titles = {i.title for i in infos if i and i.arch}
        if len(titles) > 1:
            lines.append(f"⚠ mixed architectures in the pool: {', '.join(sorted(titles))}")
        base_info = self.by_name.get(base) if base not in (None, "", NONE) else None
        for name, info in zip(pool, infos):
            if info is None:
                lines.append(f"⚠ `{name}` is not in the models folder")
            elif not info.mergeable:
                lines.append(f"⚠ `{name}`: {info.status}")
            elif info.status.startswith("partial"):
                lines.append(self.partial_line(name, info, base_info))
        return "  \n".join(lines)

    @staticmethod
    def partial_line(name, info, base_info) -> str:
        """A pool member that lacks keys: filled from the chosen base when it can, else what to do."""
        comps = ", ".join(c.upper() for c in info.partial) or info.status
        fills = base_info is not None and base_info.arch == info.arch and base_info.mergeable and \
            not set(info.partial) & set(base_info.partial)
        if fills:
            return f"`{name}`: incomplete {comps} — filled from the base `{base_info.name}` for this merge"
        if base_info is not None and base_info.arch == info.arch:
            return f"⚠ `{name}`: incomplete {comps}, and the base `{base_info.name}` lacks it too — pick a complete base"
        return f"⚠ `{name}`: incomplete {comps} — pick a **Base model** to fill it (or repair it in the Repair tab)"

    def on_base_change(self, selection, base):
        pool = list(selection or [])
        return self.pool_summary_text(pool, pool_arch(self.by_name, pool), base)

    # -- method and forms -------------------------------------------------------------------------
    def method_help_text(self, name) -> str:
        m = self.methods.get(name)
        if m is None:
            return f"Unknown method {name!r}."
        arity = f"{m.min_models}" + ("+" if m.max_models is None else ("" if m.max_models == m.min_models else f"–{m.max_models}"))
        facts = [f"{arity} model(s)"] + (["needs a base"] if m.needs_base else []) + \
            ([f"block weights set `{m.block_param}`"] if m.block_param else ["no block weights"]) + \
            (["random (uses the seed)"] if m.random else [])
        return f"**{m.title}** — {m.help}  \n<small>{' · '.join(facts)}</small>"

    def on_method(self, method, selection, output_name, auto_name):
        updates = dict(zip(self.main_form.components, self.main_form.updates(method)))
        updates[self.method_help] = self.method_help_text(method)
        m = self.methods.get(method)
        has_blocks = bool(m and m.block_param)
        updates[self.mbw.enabled] = gr.update(interactive=has_blocks, **({} if has_blocks else {"value": False}))
        auto = auto_output_name(selection or [], method) or ""
        if not output_name or output_name == auto_name:
            updates[self.output_name] = auto
        updates[self.auto_name] = auto
        return fill([*self.main_form.components, self.method_help, self.mbw.enabled, self.output_name, self.auto_name],
                    updates)

    def on_preset(self, preset, selection):
        if not preset:
            return fill(self.mbw.components, {})
        arch = pool_arch(self.by_name, selection or []) or "sd1"
        return fill(self.mbw.components, self.mbw.set_updates(arch, preset_values(preset, arch)))

    def method_controls(self) -> list:
        """The widgets that only matter while some component is merged (locked when none is)."""
        return [self.method, self.method_help, *self.main_form.components, self.mbw.enabled]

    def all_taken(self, selection, mode_labels) -> bool:
        """Every component the pool's architecture has is taken whole from a file (or kept from the base)."""
        arch = pool_arch(self.by_name, selection or [])
        present = components_of(arch) if arch else tuple(self.comp)
        modes = dict(zip(self.comp, mode_labels))
        return all(MODE_OF_LABEL.get(modes.get(name), MAIN) in (TAKE, BASE) for name in present)

    def on_method_lock(self, method, selection, *mode_labels):
        """Grey out the method, its parameters and MBW while no component uses them (with a note)."""
        locked = self.all_taken(selection, mode_labels)
        m = self.methods.get(method)
        help_text = (LOCKED_NOTE if locked else self.method_help_text(method))
        updates = {self.method: gr.update(interactive=not locked), self.method_help: help_text,
                   self.mbw.enabled: gr.update(interactive=not locked and bool(m and m.block_param))}
        for slot in self.main_form.components:
            updates[slot] = gr.update(interactive=not locked)
        return fill(self.method_controls(), updates)

    def on_component_mode(self, mode_label):
        mode = MODE_OF_LABEL.get(mode_label, MAIN)
        return [gr.update(visible=mode == TAKE), gr.update(visible=mode == OWN)]

    def component_method_handler(self, row):
        return lambda method: row["form"].updates(method)

    # -- reading the form -------------------------------------------------------------------------
    def named(self, values) -> dict:
        """The values gradio sends for `form_inputs()` (+ `run_inputs()`), by field name."""
        return dict(zip([*self.form_fields(), *self.run_fields()], values))

    def read_form(self, form: dict) -> tuple:
        """(the Recipe the form describes, not yet validated; the pool's architecture) from the form's
        values by field name (`named`)."""
        # The checkboxes are the truth for the models they show (events may answer out of order);
        # the remembered selection adds the filtered-out ones and the click order.
        pool = merge_selection(form["selection"] or [], [i.name for i in self.shown(form["filter"])],
                               form["checked"] or [])
        arch = pool_arch(self.by_name, pool)
        method, carry = form["method"], form["extra"] or {}
        params = self.main_form.params(method, slot_values(form, "params", len(self.main_form.components)))
        blocks = slot_values(form, "blocks", len(self.mbw.components)) if form["blocks_enabled"] else None
        loras = [[form[f"loras.{i}.{k}"] for k in ("file", "strength", "when")] for i in range(len(self.lora_rows))]
        recipe = Recipe(
            pool=pool, method=method,
            params=clean_params(method, params),
            base=None if form["base"] in (None, "", NONE) else form["base"],
            blocks=dict(self.mbw.values(arch, blocks)) if blocks is not None else {},
            components=arch_components({name: self.read_component(form, name) for name in self.comp}, arch),
            seed=int(form["seed"] or 0), precision=form["precision"], dtype=carried_dtype(form["dtype"], carry),
            output=(form["output"] or "").strip() or auto_output_name(pool, method),
            allow_mixed_prediction=bool(form["allow_mixed_prediction"]), nonfinite=form["nonfinite"],
            position_ids=form["position_ids"], extra=carried_extra(carry, loras_from_rows(loras, form["lora_carry"])))
        return recipe, arch

    def read_component(self, form: dict, name: str):
        """The rule of one component row (None: main method), read by field name."""
        at = f"components.{name}"
        mode = MODE_OF_LABEL.get(form[f"{at}.mode"], MAIN)
        take_from, own_method = form[f"{at}.take"], form[f"{at}.method"]
        if mode == TAKE and not take_from:
            raise RecipeError(f"{at}.take", "pick the model to take it from")
        params = None
        if mode == OWN:
            row = self.comp[name]
            params = row["form"].params(own_method, slot_values(form, f"{at}.params", len(row["form"].components)),
                                        f"{at}.params")
        return component_rule(mode, take_from or None, own_method, params, form[f"{at}.pool"],
                              (form["component_extra"] or {}).get(name))

    def recipe_of(self, form: dict):
        """The validated Recipe of the form (by field name): its `to_dict` is the recipe JSON."""
        recipe, _arch = self.read_form(form)
        if not recipe.pool:
            raise RecipeError("pool", "select at least one model")
        return parse_recipe(recipe.to_dict())

    def form_recipe(self, values):
        """The validated Recipe of the values gradio sends for `form_inputs()`."""
        return self.recipe_of(self.named(values))

    @staticmethod
    def run_of(form: dict) -> dict:
        return dict(device=form["device"], threads=int(form["threads"] or 0), memory_gb=form["memory_gb"] or 1.5,
                    overwrite=bool(form["overwrite"]))
