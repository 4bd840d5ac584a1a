"""Event handlers of the Merger tab (the layout is in tab.py).

Handlers are plain methods over widget values: they read the form, by field name, into a
`Recipe` (state.py maps rows to rules), call the backend (plan, jobs, recipe) and return
updates. They never wait for a merge: Merge submits a job, the page's poll reads snapshots.
"""
from __future__ import annotations

import html
import os
import re
import time

import gradio as gr

from ..core import jobs
from ..core.plan import GIB
from ..core.recipe import Recipe, load_recipe, parse_recipe, recipe_from_metadata
from ..errors import AstolfoError, MemoryBudgetError, OutputExistsError, RecipeError
from ..features import trials
from ..io.header import read_header
from ..io.paths import check_recipe_size, confine_recipe, recipe_path
from .catalog import format_size, guess_base, pool_arch, pool_scale
from .compat import file_value_bytes
from .forms import preset_values
from .state import (
    BASE,
    MAIN,
    MODE_OF_LABEL,
    MODES,
    OWN,
    TAKE,
    arch_components,
    auto_output_name,
    carried_dtype,
    carried_extra,
    clean_params,
    component_carry,
    component_mode,
    component_rule,
    components_of,
    form_carry,
    lora_rows,
    loras_from_rows,
    merge_selection,
    slot_values,
)
from .words import plain, tab_words

NONE = "(none)"
LOG_TAIL = 40
PLAN_NOTES = 8
LOCKED_NOTE = ("**Every component is taken from a file** (see Components): the method, its parameters and the "
               "block weights are not used. Set a component back to *Main method* to use them.")
# plan notes (plan.Notes) about keys the output would lack or merge from fewer inputs: shown first
PLAN_WARNINGS = ("left out (repair the inputs first)", "merged from the inputs that have them")
POOL_SUMMARY_NAMES = 12


def fill(outputs: list, updates: dict) -> list:
    """A value per output, in order: those in `updates`, "no change" for the rest."""
    return [updates[c] if c in updates else gr.update() for c in outputs]


def fmt_seconds(seconds) -> str:
    seconds = float(seconds or 0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


class TabHandlers:
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

    # -- plan, merge, cancel ----------------------------------------------------------------------
    def plan_blockers(self, plan, options) -> list:
        """What would stop Merge with this plan and these run options (shown before the plan)."""
        out = []
        if plan.output and os.path.exists(plan.output) and not options.overwrite:
            out.append(f"`{os.path.basename(plan.output)}` exists: tick **Overwrite an existing file** or change "
                       "the **File name**")
        try:
            plan.check_budget(options.memory_gb)
        except MemoryBudgetError as exc:
            out.append(tab_words(str(exc)))
        return out

    def plan_text(self, plan, options) -> str:
        """Blocking problems first, then notes that need the user (keys left out), then the plan."""
        merged = sum(1 for k in plan.keys if k.action == "merge")
        peak = plan.peak_bytes(int(options.memory_gb * GIB))
        lines = [f"**Merge would stop:** {b}" for b in self.plan_blockers(plan, options)]
        urgent = [n for n in plan.log if n.endswith(PLAN_WARNINGS)]
        advice = "pick a complete **Base model**" if plan.recipe.base else "pick a **Base model** to fill them"
        lines += [f"⚠ {tab_words(n)} — {advice}" for n in urgent]
        lines += [f"**Plan:** {plan.arch.upper()} · {len(plan.sources)} input file(s) · {len(plan.keys)} keys "
                  f"({merged} merged, {len(plan.keys) - merged} copied) · output {format_size(plan.output_bytes)}",
                  f"Predicted peak memory: **{peak / GIB:.2f} GiB** (budget {options.memory_gb:g} GB) · "
                  f"device {options.device} · threads {options.threads or 'auto'}",
                  "Components: " + "; ".join(f"{k}: {v}" for k, v in plan.component_summary.items())]
        notes = [n for n in plan.log if n not in urgent]
        lines += [f"note: {tab_words(line)}" for line in notes[:PLAN_NOTES]]
        if len(notes) > PLAN_NOTES:
            lines.append(f"… {len(notes) - PLAN_NOTES} more notes (in the log once the merge runs)")
        if plan.output and os.path.exists(plan.output) and options.overwrite:
            lines.append(f"⚠ `{os.path.basename(plan.output)}` exists and will be replaced")
        return "  \n".join(lines)

    def prepare(self, values):
        form = self.named(values)
        recipe = self.recipe_of(form)
        confine_recipe(self.host, recipe)   # names from the page: only files inside the host's folders
        plan = self.host.plan(recipe)
        options = self.host.run_options(**self.run_of(form))
        return recipe, plan, options

    def on_check(self, *values):
        try:
            recipe, plan, options = self.prepare(values)
        except AstolfoError as exc:
            return self.error_text(exc), gr.update()
        return self.plan_text(plan, options), recipe.to_json()

    def on_merge(self, *values):
        try:
            recipe, plan, options = self.prepare(values)
            if os.path.exists(plan.output) and not options.overwrite:
                raise OutputExistsError(plan.output)
            plan.check_budget(options.memory_gb)
            job = self.jobs.submit(plan, options, title=recipe.output, on_done=self.host.after_merge)
        except AstolfoError as exc:
            return self.error_text(exc), gr.update(), gr.update()
        # the progress shows the new job at once (and tells the page script to poll fast)
        return f"Started {job.title}.  \n{self.plan_text(plan, options)}", recipe.to_json(), self.progress_html(job.snapshot())

    def on_cancel(self):
        if self.jobs.cancel():
            return "Cancelling … the partial file is removed."
        return "No merge is running."

    # -- polling ----------------------------------------------------------------------------------
    def on_poll(self, seen, filter_text, selection):
        outputs = [self.progress, self.log, self.summary, self.load, self.seen, self.event, *self.list_outputs()]
        seen = seen or {}
        job = self.jobs.current()
        if job is None:
            if seen.get("idle"):
                return fill(outputs, {})
            return fill(outputs, {self.progress: self.progress_html(None), self.seen: {"idle": True}})
        snap = job.snapshot()
        if seen.get("job") == snap.id and seen.get("version") == snap.version:
            return fill(outputs, {})
        updates = {self.progress: self.progress_html(snap), self.log: "\n".join(snap.log[-LOG_TAIL:]),
                   self.seen: {"job": snap.id, "version": snap.version, "finished": snap.finished}}
        same_job = seen.get("job") == snap.id
        if snap.finished and not (same_job and seen.get("finished")):
            updates[self.summary] = self.summary_text(snap)
            updates[self.load] = gr.update(visible=snap.status == jobs.DONE and self.host.can_load_model)
            if snap.status == jobs.DONE:
                self.reload_models()
                updates.update(self.list_updates(filter_text, selection))
                updates[self.event] = f"done:{snap.id}"
        elif not same_job:
            updates[self.summary] = ""
            updates[self.load] = gr.update(visible=False)
        return fill(outputs, updates)

    def progress_html(self, snap) -> str:
        if snap is None:
            return ('<div class="astolfo-progress" data-status="idle" data-active="0">'
                    '<div class="astolfo-progress-text">No merge yet.</div></div>')
        pct = 100 * snap.fraction
        if snap.stage:   # before the first key (hashing the inputs): no key count, no ETA
            text = f"{snap.status} · {snap.stage} · {fmt_seconds(snap.elapsed)}"
        else:
            text = f"{snap.status} · {snap.keys_done}/{snap.keys_total} keys · {pct:.0f}% · {fmt_seconds(snap.elapsed)}"
        if snap.status == jobs.RUNNING and snap.eta is not None and not snap.stage:
            text += f" · ETA {fmt_seconds(snap.eta)}"
        if snap.error:
            text += f" — {plain(tab_words(snap.error))}"
        return (f'<div class="astolfo-progress" data-status="{snap.status}" data-active="{int(snap.active)}" '
                f'data-done="{snap.keys_done}" data-total="{snap.keys_total}" data-job="{snap.id}">'
                f'<div class="astolfo-progress-track"><div class="astolfo-progress-fill astolfo-{snap.status}" '
                f'style="width:{pct:.1f}%"></div></div>'
                f'<div class="astolfo-progress-text">{html.escape(snap.title)} — {html.escape(text)}</div></div>')

    def summary_text(self, snap) -> str:
        if snap.status != jobs.DONE or snap.result is None:
            return f"**{snap.status.capitalize()}:** {tab_words(snap.error or '')}"
        r = snap.result
        comps = "  \n".join(f"- {k}: {v}" for k, v in r.components.items())
        return (f"**Done** in {fmt_seconds(r.seconds)} · {format_size(r.size)} · {r.keys} keys  \n"
                f"`{r.path}`  \nsha256 `{r.sha256}`  \n{comps}")

    def on_load(self, seen):
        job = self.jobs.current()
        if job is None or job.status != jobs.DONE or job.result is None:
            return "Nothing to load: no finished merge.", ""
        try:
            message, name = self.host.load_model(job.result.path)
        except Exception as exc:  # noqa: BLE001 - show the host's failure on the page
            return f"**Could not load:** {exc}", ""
        return message, name or ""

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
