"""The Merger tab's "Analysis" sub-tab: per-component L2 distances and delta cosines of picked models.

A thin client of analysis.py: `analyze` streams the files within the memory budget on a worker
thread (ui_tasks.run_in_thread) while the event reports which component it reads; the result is
`analysis.plot`'s PNG, the text summary and the numbers as JSON.
"""
from __future__ import annotations

import os
import tempfile
import time

import gradio as gr

from ..errors import AstolfoError, RecipeError
from ..features.analysis import COMPONENT_LABELS, analyze, plot
from ..io.paths import app_files_dir
from .compat import listen, make
from .tasks import NONE, run_in_thread
from .words import error_text

ELEM = "astolfo_merge_analysis"

class AnalysisPanel:
    """Handlers over widget values (model names as the host lists them); `build` lays the widgets out."""

    def __init__(self, host):
        self.host = host
        self.plot_dir = tempfile.mkdtemp(prefix="analysis-", dir=app_files_dir())   # the app serves files only from there

    def names(self, with_none=False) -> list:
        return ([NONE] if with_none else []) + [name for name, _path in self.host.named_checkpoints()]

    def paths_of(self, names, field) -> list:
        known = dict(self.host.named_checkpoints())
        missing = [n for n in names if n not in known]
        if missing:
            raise RecipeError(field, f"{missing[0]!r} is not in the models folder (press Refresh)")
        return [known[n] for n in names]

    def analyze(self, names, base, memory_gb, progress=None):
        """(status, PNG path or None, numbers as a dict, text summary) — blocking."""
        try:
            paths = self.paths_of(list(names or []), "models")
            base_paths = [] if base in (None, "", NONE) else self.paths_of([base], "base")
            result = analyze(paths, base=base_paths[0] if base_paths else None,
                             memory_gb=memory_gb or 1.0, progress=progress)
            png = plot(result, os.path.join(self.plot_dir, f"analysis-{time.time_ns()}.png"))
        except AstolfoError as exc:
            return error_text(exc), None, {}, ""
        return f"Analyzed {len(paths)} model(s) against the {result.reference}.", png, result.to_dict(), \
            "\n".join(result.lines())

    def on_analyze(self, names, base, memory_gb):
        """Generator event: which component is being read, then the results."""
        seen = {"component": None}

        def progress(component, _key):
            seen["component"] = component

        def waiting(seconds):
            comp = COMPONENT_LABELS.get(seen["component"], "headers")
            return f"analyzing … reading {comp} ({seconds:.0f} s)", gr.update(), gr.update(), gr.update()

        yield from run_in_thread(lambda: self.analyze(names, base, memory_gb, progress), waiting)

    def on_refresh(self):
        self.host.refresh()
        return gr.update(choices=self.names()), gr.update(choices=self.names(with_none=True))

    def list_outputs(self) -> list:
        """The widgets listing models (the Merge sub-tab refreshes them after a merge or repair)."""
        return [self.models, self.base]

    def list_updates(self) -> dict:
        return {self.models: gr.update(choices=self.names()), self.base: gr.update(choices=self.names(with_none=True))}

    def build(self):
        gr.Markdown("Distance of each model to a base (or to the mean of the picked models) per component, "
                    "and the cosine similarity of their deltas — which models really differ, and where.")
        with gr.Row():
            self.models = make(gr.Dropdown, choices=self.names(), value=[], multiselect=True, label="Models",
                               elem_id=f"{ELEM}_models", scale=4)
            self.base = make(gr.Dropdown, choices=self.names(with_none=True), value=NONE,
                             label="Base (empty: the models' mean)", elem_id=f"{ELEM}_base",
                             allow_custom_value=True, scale=2)
        with gr.Row():
            self.memory = gr.Number(value=self.host.settings().memory_gb, label="Memory budget (GB)",
                                    elem_id=f"{ELEM}_memory", scale=1)
            self.refresh = gr.Button("↻ Refresh", elem_id=f"{ELEM}_refresh", scale=1, min_width=90)
            self.run = gr.Button("Analyze", variant="primary", elem_id=f"{ELEM}_run", scale=1, min_width=90)
        self.status = gr.Markdown("", elem_id=f"{ELEM}_status")
        self.image = make(gr.Image, value=None, type="filepath", label="L2 distances and delta cosines",
                          interactive=False, elem_id=f"{ELEM}_image")
        self.text = gr.Textbox(label="Summary", lines=8, max_lines=30, interactive=False, elem_id=f"{ELEM}_text")
        self.numbers = gr.JSON(label="Numbers", elem_id=f"{ELEM}_numbers")
        for widget in (self.models, self.base):
            widget.do_not_save_to_config = True
        listen(self.refresh.click, self.on_refresh, [], [self.models, self.base])
        listen(self.run.click, self.on_analyze, [self.models, self.base, self.memory],
               [self.status, self.image, self.numbers, self.text])
        return self


def build_ui(host):
    """Render the Analysis sub-tab into the current gradio context (ui.add_feature_tabs)."""
    return AnalysisPanel(host).build()
