"""The Merger tab: one gradio builder for the WebUI and the standalone app.

`build_tab(host)` returns a `gr.Blocks` built outside any context; the WebUI renders it as a tab
(`on_ui_tabs`), the standalone app renders it into its own page. Everything host-specific goes
through `host` (host.py); forms come from the method declarations (forms.py); merges run as
background jobs (core/jobs.py) that the page polls through a hidden button clicked by
javascript/astolfo_merge.js, so a reloaded page re-attaches to a running merge.

The Repair and Analysis sub-tabs are built by their own modules (repair_tab.py, analysis_tab.py);
`add_feature_tabs` places them.
"""
from __future__ import annotations

import os

import gradio as gr
import torch

from ..core import jobs
from ..core.recipe import OUTPUT_DTYPES
from ..methods import METHODS
from . import analysis_tab, repair_tab
from .catalog import default_catalog
from .compat import listen, make, poll_options
from .form_handlers import FormHandlers
from .forms import BlockWeights, ParamForm
from .live import LiveHandlers
from .recipe_handlers import RecipeHandlers
from .run_handlers import RunHandlers
from .state import COMPONENT_TITLES, LORA_ROWS, LORA_WHEN, MODES, components_of, slots
from .words import error_text

ELEM = "astolfo_merge"
NONE = "(none)"
def build_tab(host, catalog=None) -> gr.Blocks:
    """The whole tab for `host` (WebUI or standalone), ready to be rendered."""
    return MergerTab(host, catalog).build()


def add_feature_tabs(host, panels: dict | None = None) -> list:
    """Render the Repair and Analysis sub-tabs; their builders' return values (the panels) go into
    `panels` by title when it is given. Returns the titles added."""
    added = []
    for title, module in (("Repair", repair_tab), ("Analysis", analysis_tab)):
        with gr.Tab(title, elem_id=f"{ELEM}_tab_{title.lower()}"):
            panel = module.build_ui(host)
        added.append(title)
        if panels is not None:
            panels[title] = panel
    return added


def device_choices() -> list:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class MergerTab(LiveHandlers, FormHandlers, RunHandlers, RecipeHandlers):
    """Layout of the tab; the event handlers live in form_handlers.FormHandlers (pool, method, reading
    the form), run_handlers.RunHandlers (plan, merge, poll), recipe_handlers.RecipeHandlers (saving and
    loading recipes) and live.LiveHandlers (merging into the WebUI's loaded model)."""

    def __init__(self, host, catalog=None):
        self.host = host
        self.catalog = catalog or default_catalog()
        self.jobs = jobs.manager(host.key)
        self.methods = dict(METHODS)
        self.default_method = "weighted_sum" if "weighted_sum" in self.methods else next(iter(self.methods))
        self.infos = []
        self.panels = {}      # feature sub-tabs (Repair, Analysis) by title, once built
        self.reload_models()

    # -- layout -------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        with gr.Blocks(analytics_enabled=False, title="AstolfoMerge") as blocks:
            with gr.Tabs(elem_id=f"{ELEM}_tabs"):
                with gr.Tab("Merge", elem_id=f"{ELEM}_tab_merge"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=3, min_width=420):
                            self._pool_section()
                            self._lora_section()
                            self._method_section()
                            self._blocks_section()
                            self._components_section()
                        with gr.Column(scale=2, min_width=360):
                            self._output_section()
                            self._run_section()
                            self._recipe_section()
                add_feature_tabs(self.host, self.panels)
            self._wire()
        self._not_persisted()
        return blocks

    def _not_persisted(self):
        """Widgets whose value only makes sense with the event that sets it (a method with its parameter
        slots, a component mode with its visible fields): the WebUI must not restore them from
        ui-config.json on its own (A1111.md §2.2)."""
        widgets = [self.method, self.mbw.preset, self.pool, self.base, self.output_name]
        widgets += [row[k] for row in self.comp.values() for k in ("mode", "take", "method", "pool")]
        for widget in widgets:
            widget.do_not_save_to_config = True

    def _pool_section(self):
        with gr.Group(elem_id=f"{ELEM}_pool_box"):
            gr.Markdown("### Pool", elem_classes=["astolfo-heading"])
            with gr.Row():
                self.filter = gr.Textbox(label="Filter", placeholder="words of a name, or sdxl / v-pred / partial …",
                                         elem_id=f"{ELEM}_filter", scale=4, lines=1, max_lines=1)
                self.select_shown = gr.Button("Select all shown", elem_id=f"{ELEM}_select_shown", scale=1, min_width=90)
                self.select_none = gr.Button("Select none", elem_id=f"{ELEM}_select_none", scale=1, min_width=90)
                self.refresh = gr.Button("↻ Refresh", elem_id=f"{ELEM}_refresh", scale=1, min_width=90)
            self.pool = gr.CheckboxGroup(choices=self.pool_choices(""), value=[], label=self.pool_label(""),
                                         elem_id=f"{ELEM}_pool", elem_classes=["astolfo-pool"])
            self.selection = gr.State([])
            self.pool_summary = gr.Markdown("No model selected yet.", elem_id=f"{ELEM}_pool_summary")
            self.base = make(gr.Dropdown, choices=self.model_choices(with_none=True), value=NONE, label="Base model",
                             info="needed by methods that subtract a base (add_difference, TIES, DARE …); also fills "
                                  "keys that pruned inputs lack", elem_id=f"{ELEM}_base", allow_custom_value=True)

    def _lora_section(self):
        """Up to LORA_ROWS LoRA / LyCORIS files baked into the merge (recipe `loras`); hidden while the
        host's LoRA folders hold none."""
        choices = self.lora_choices()
        self.lora_rows = []
        with gr.Accordion("LoRA (baked into the merge)", open=False, visible=len(choices) > 1,
                          elem_id=f"{ELEM}_loras") as self.lora_box:
            for i in range(LORA_ROWS):
                with gr.Row():
                    row = (make(gr.Dropdown, choices=choices, value=NONE, label=f"LoRA {i + 1}", scale=3,
                                elem_id=f"{ELEM}_lora_{i}_file", allow_custom_value=True),
                           gr.Slider(minimum=-4, maximum=4, step=0.05, value=1.0, label="Strength", scale=2,
                                     elem_id=f"{ELEM}_lora_{i}_strength"),
                           gr.Radio(choices=list(LORA_WHEN), value="after", label="When", scale=1,
                                    elem_id=f"{ELEM}_lora_{i}_when"))
                self.lora_rows.append(row)
                row[0].do_not_save_to_config = True
        self.lora_carry = gr.State({})   # per-block strengths / models / extra entries of a loaded recipe

    def _method_section(self):
        with gr.Group(elem_id=f"{ELEM}_method_box"):
            self.method = gr.Dropdown(choices=list(self.methods), value=self.default_method, label="Method",
                                      elem_id=f"{ELEM}_method")
            self.method_help = gr.Markdown(self.method_help_text(self.default_method), elem_id=f"{ELEM}_method_help")
            self.main_form = ParamForm(self.methods, self.default_method, f"{ELEM}_param")

    def _blocks_section(self):
        with gr.Accordion("Block weights (MBW)", open=False, elem_id=f"{ELEM}_mbw"):
            self.mbw = BlockWeights(elem_prefix=f"{ELEM}_mbw")

    def _components_section(self):
        self.comp = {}
        with gr.Accordion("Components", open=False, elem_id=f"{ELEM}_components"):
            gr.Markdown("Per component: merge with the main method, with its own method / parameters / pool, "
                        "copy it from one model, or keep the base model's.")
            for name in components_of(None):
                self.comp[name] = self._component_row(name)

    def _component_row(self, name):
        row = {}
        with gr.Group(visible=name in components_of("sd1"), elem_id=f"{ELEM}_comp_{name}") as box:
            row["box"] = box
            row["mode"] = gr.Radio(choices=list(MODES.values()), value=MODES["main"], label=COMPONENT_TITLES[name],
                                   elem_id=f"{ELEM}_comp_{name}_mode")
            row["take"] = make(gr.Dropdown, choices=self.model_choices(), value=None, label=f"{COMPONENT_TITLES[name]} from",
                               visible=False, elem_id=f"{ELEM}_comp_{name}_take", allow_custom_value=True)
            with gr.Column(visible=False) as own:
                row["own"] = own
                with gr.Row():
                    row["method"] = gr.Dropdown(choices=list(self.methods), value=self.default_method,
                                                label=f"{COMPONENT_TITLES[name]} method", elem_id=f"{ELEM}_comp_{name}_method")
                    row["pool"] = gr.Dropdown(choices=self.model_choices(), value=[], multiselect=True,
                                              label=f"{COMPONENT_TITLES[name]} pool (empty: the main pool)",
                                              elem_id=f"{ELEM}_comp_{name}_pool")
                row["form"] = ParamForm(self.methods, self.default_method, f"{ELEM}_comp_{name}_param")
        return row

    def _output_section(self):
        s = self.host.settings()
        with gr.Group(elem_id=f"{ELEM}_output_box"):
            gr.Markdown("### Output", elem_classes=["astolfo-heading"])
            self.output_name = gr.Textbox(label="File name", placeholder="filled from pool, method and date", lines=1, max_lines=1,
                                          elem_id=f"{ELEM}_output_name",
                                          info=f"written to {self.host.output_dir()}")
            self.auto_name = gr.State("")
            with gr.Row():
                self.dtype = gr.Radio(choices=list(OUTPUT_DTYPES), value="fp16", label="Saved dtype", elem_id=f"{ELEM}_dtype")
                self.precision = gr.Radio(choices=["fp64", "fp32"], value=s.precision if s.precision in ("fp32", "fp64") else "fp64",
                                          label="Compute precision", elem_id=f"{ELEM}_precision")
            with gr.Row():
                devices = device_choices()
                self.device = gr.Dropdown(choices=devices, value=s.device if s.device in devices else "cpu",
                                          label="Device", elem_id=f"{ELEM}_device")
                self.threads = gr.Number(value=s.threads, precision=0, label="Threads (0 = auto)", elem_id=f"{ELEM}_threads")
                self.memory = gr.Number(value=s.memory_gb, label="Memory budget (GB)", elem_id=f"{ELEM}_memory")
            self.overwrite = gr.Checkbox(value=False, label="Overwrite an existing file", elem_id=f"{ELEM}_overwrite")
            with gr.Accordion("Advanced", open=False):
                self.seed = gr.Number(value=0, precision=0, label="Seed (random methods)", elem_id=f"{ELEM}_seed")
                self.allow_mixed = gr.Checkbox(value=False, label="Allow mixed prediction types (eps + v-pred)",
                                               elem_id=f"{ELEM}_allow_mixed")
                self.nonfinite = gr.Radio(choices=["fail", "skip", "keep"], value="fail", label="NaN / Inf in a result",
                                          elem_id=f"{ELEM}_nonfinite")
                self.position_ids = gr.Radio(choices=["reset", "omit"], value="reset", label="CLIP position ids",
                                             elem_id=f"{ELEM}_position_ids")
            self.extra = gr.State({})             # recipe fields the form does not show (loras, note …)
            self.component_extra = gr.State({})   # per component: base / blocks of a loaded recipe

    def _run_section(self):
        with gr.Group(elem_id=f"{ELEM}_run_box"):
            self._live_target()
            with gr.Row():
                self.check = gr.Button("Check plan", elem_id=f"{ELEM}_check", min_width=80)
                self.merge = gr.Button("Merge", variant="primary", elem_id=f"{ELEM}_merge", min_width=80)
                self.cancel = gr.Button("Cancel", variant="stop", elem_id=f"{ELEM}_cancel", min_width=80)
            self.message = gr.Markdown("", elem_id=f"{ELEM}_message")
            self.progress = gr.HTML(self.progress_html(None), elem_id=f"{ELEM}_progress")
            self.log = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, elem_id=f"{ELEM}_log")
            self.summary = gr.Markdown("", elem_id=f"{ELEM}_summary")
            with gr.Row():
                self.load = gr.Button("Load the merged model", visible=False, elem_id=f"{ELEM}_load")
                self.xyz = gr.Button("Use as XYZ template", visible=self.host.has_xyz, elem_id=f"{ELEM}_xyz")
            self._live_section()
            # Page plumbing: a poll button clicked by javascript/astolfo_merge.js (hidden by CSS, kept in
            # the DOM), what this page last saw of the job, and a name the page should select.
            self.poll = gr.Button("poll", elem_id=f"{ELEM}_poll", elem_classes=["astolfo-hidden"])
            self.seen = gr.State({})
            self.select_name = gr.Textbox(value="", elem_id=f"{ELEM}_select_name", elem_classes=["astolfo-hidden"],
                                          show_label=False, container=False)
            self.event = gr.Textbox(value="", elem_id=f"{ELEM}_event", elem_classes=["astolfo-hidden"],
                                    show_label=False, container=False)
            for comp in (self.select_name, self.event):
                comp.do_not_save_to_config = True

    def _recipe_section(self):
        with gr.Accordion("Recipe", open=False, elem_id=f"{ELEM}_recipe"):
            self.recipe_json = gr.Code(value="", language="json", label="Recipe of the form", elem_id=f"{ELEM}_recipe_json")
            with gr.Row():
                self.recipe_name = gr.Textbox(label="Save as", placeholder="my-recipe", elem_id=f"{ELEM}_recipe_name", scale=3)
                self.save_recipe = gr.Button("Save recipe", elem_id=f"{ELEM}_save_recipe", scale=1)
            self.recipe_file = gr.File(label="Recipe file", interactive=False, elem_id=f"{ELEM}_recipe_file")
            with gr.Row():
                self.saved_recipes = make(gr.Dropdown, choices=self.saved_recipe_choices(), value=None,
                                          label="Saved recipes", elem_id=f"{ELEM}_saved_recipes", scale=3,
                                          allow_custom_value=True)
                self.load_saved = gr.Button("Load", elem_id=f"{ELEM}_load_saved", scale=1)
            self.upload = gr.File(label="Load a recipe file (.json)", type="binary", file_types=[".json"],
                                  elem_id=f"{ELEM}_upload")
            with gr.Row():
                self.recipe_source = make(gr.Dropdown, choices=self.recipe_checkpoint_choices(), value=None,
                                          label="Recipe embedded in a merged checkpoint",
                                          elem_id=f"{ELEM}_recipe_source", scale=3, allow_custom_value=True)
                self.load_embedded = gr.Button("Load", elem_id=f"{ELEM}_load_embedded", scale=1)

    # -- the form's widgets by field name ----------------------------------------------------------
    def form_fields(self) -> dict:
        """The form's widgets by field name, in the order gradio sends their values. Handlers read
        the values by these names (`named`), never by position."""
        fields = {"selection": self.selection, "checked": self.pool, "filter": self.filter, "base": self.base,
                  "method": self.method, **slots("params", self.main_form.components),
                  "blocks_enabled": self.mbw.enabled, **slots("blocks", self.mbw.components)}
        for name, row in self.comp.items():
            at = f"components.{name}"
            fields.update({f"{at}.mode": row["mode"], f"{at}.take": row["take"], f"{at}.method": row["method"],
                           f"{at}.pool": row["pool"], **slots(f"{at}.params", row["form"].components)})
        fields.update({"output": self.output_name, "dtype": self.dtype, "precision": self.precision, "seed": self.seed,
                       "allow_mixed_prediction": self.allow_mixed, "nonfinite": self.nonfinite,
                       "position_ids": self.position_ids, "extra": self.extra, "component_extra": self.component_extra})
        for i, row in enumerate(self.lora_rows):
            fields.update(zip((f"loras.{i}.file", f"loras.{i}.strength", f"loras.{i}.when"), row))
        fields["lora_carry"] = self.lora_carry
        return fields

    def run_fields(self) -> dict:
        """The run options' widgets by field name (after the form's in Check / Merge)."""
        return {"device": self.device, "threads": self.threads, "memory_gb": self.memory, "overwrite": self.overwrite}

    def form_inputs(self) -> list:
        return list(self.form_fields().values())

    def run_inputs(self) -> list:
        return list(self.run_fields().values())

    def list_outputs(self) -> list:
        """Every widget that lists models (refreshed after a merge or a folder change), the feature
        sub-tabs' lists included."""
        return [self.pool, self.base, self.recipe_source, self.saved_recipes, self.lora_box] + \
            [row[k] for row in self.comp.values() for k in ("take", "pool")] + [row[0] for row in self.lora_rows] + \
            [w for panel in self.list_panels() for w in panel.list_outputs()]

    def list_panels(self) -> list:
        return [p for p in self.panels.values() if hasattr(p, "list_outputs") and hasattr(p, "list_updates")]

    def _wire(self):
        pool_out = self.pool_change_outputs()
        lock_inputs = [self.method, self.selection, *[row["mode"] for row in self.comp.values()]]

        def then_lock(dep):
            """After an event that changes the pool: which method controls count (not on the pool
            summary's own change: gradio 4 fires a Markdown's change on every re-render, looping)."""
            listen(dep.then, self.on_method_lock, lock_inputs, self.method_controls(), show_progress="hidden")

        listen(self.filter.change, self.on_filter, [self.filter, self.selection], [self.pool])
        then_lock(listen(self.pool.input, self.on_pool_input, [self.pool, self.filter, *self.pool_context()], pool_out))
        then_lock(listen(self.select_shown.click, self.on_select_shown, [self.filter, *self.pool_context()], pool_out))
        then_lock(listen(self.select_none.click, self.on_select_none, [self.filter, *self.pool_context()], pool_out))
        then_lock(listen(self.base.change, self.on_base_change, [self.selection, self.base], [self.pool_summary]))
        listen(self.refresh.click, self.on_refresh, [self.filter, self.selection], self.list_outputs())
        # `.input` (user edits only): loading a recipe sets the method *and* its parameters.
        listen(self.method.input, self.on_method, [self.method, self.selection, self.output_name, self.auto_name],
               [*self.main_form.components, self.method_help, self.mbw.enabled, self.output_name, self.auto_name])
        listen(self.mbw.preset.change, self.on_preset, [self.mbw.preset, self.selection], self.mbw.components)
        for row in self.comp.values():
            listen(row["mode"].change, self.on_component_mode, [row["mode"]], [row["take"], row["own"]])
            listen(row["mode"].change, self.on_method_lock, lock_inputs, self.method_controls(), show_progress="hidden")
            listen(row["method"].input, self.component_method_handler(row), [row["method"]], row["form"].components)
        form, run = self.form_inputs(), self.run_inputs()
        listen(self.check.click, self.on_check, form + run, [self.message, self.recipe_json])
        listen(self.merge.click, self.on_merge_to, self.merge_inputs(), [self.message, self.recipe_json, self.progress])
        listen(self.cancel.click, self.on_cancel, [], [self.message])
        poll_out = [self.progress, self.log, self.summary, self.load, self.seen, self.event, *self.list_outputs()]
        dep = listen(self.poll.click, self.on_poll, [self.seen, self.filter, self.selection], poll_out, **poll_options())
        listen(dep.then, None, [self.event], [], js="(event) => { astolfoMergeAfterPoll(event); return []; }",
               **poll_options())
        load_dep = listen(self.load.click, self.on_load, [self.seen], [self.message, self.select_name])
        listen(load_dep.then, None, [self.select_name], [], js="(name) => { astolfoMergeSelectCheckpoint(name); return []; }")
        listen(self.xyz.click, self.on_xyz_template, form, [self.message, self.recipe_json])
        self._wire_live()
        listen(self.save_recipe.click, self.on_save_recipe, [self.recipe_name] + form,
               [self.message, self.recipe_json, self.recipe_file, self.saved_recipes])
        load_out = self.load_recipe_outputs()
        then_lock(listen(self.load_saved.click, self.on_load_saved, [self.saved_recipes, self.filter], load_out))
        then_lock(listen(self.upload.upload if hasattr(self.upload, "upload") else self.upload.change,
                         self.on_upload, [self.upload, self.filter], load_out))
        then_lock(listen(self.load_embedded.click, self.on_load_embedded, [self.recipe_source, self.filter], load_out))
        for panel in self.panels.values():     # a repaired file joins every list of the tab and the WebUI's
            done = getattr(panel, "run_event", None)
            if done is not None and hasattr(done, "then"):
                dep = listen(done.then, self.on_lists_changed, [self.filter, self.selection],
                             [*self.list_outputs(), self.event])
                listen(dep.then, None, [self.event], [],
                       js="(event) => { if (window.astolfoMergeAfterPoll) astolfoMergeAfterPoll(event); return []; }")

    def pool_context(self) -> list:
        return [self.selection, self.base, self.method, self.output_name, self.auto_name]

    def pool_change_outputs(self) -> list:
        return [self.pool, self.selection, self.pool_summary, self.base, self.output_name, self.auto_name,
                *self.mbw.groups.values(), *[row["box"] for row in self.comp.values()]]

    def load_recipe_outputs(self) -> list:
        return list(dict.fromkeys(self.pool_change_outputs() + self.form_inputs()[1:] +
                                  [row[k] for row in self.comp.values() for k in ("own",)] +
                                  [self.lora_box, self.method_help, self.message, self.recipe_json]))

    def error_text(self, exc: Exception) -> str:
        return error_text(exc)

    def recipes_dir(self) -> str:
        return self.host.recipes_dir()

    def saved_recipe_choices(self) -> list:
        folder = self.recipes_dir()
        if not os.path.isdir(folder):
            return []
        return sorted(n for n in os.listdir(folder) if n.lower().endswith(".json"))
