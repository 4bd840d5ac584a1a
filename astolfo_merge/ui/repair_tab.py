"""The Merger tab's "Repair" sub-tab: inspect a checkpoint, plan its repair, write the repaired copy.

A thin client of repair.py (REPAIR.md): the report is `inspection.format_report` (with
`repair.diagnose` merged in), "Dry run" shows `RepairPlan.lines()`, "Repair to new file" runs
`repair.run_repair` on a worker thread into a new file of the host's output folder (never over an
existing file), then tells the host (`after_merge`: hash cache and checkpoint list).
"""
from __future__ import annotations

import os

import gradio as gr

from ..core.recipe import check_output_name
from ..errors import AstolfoError, OutputExistsError, RecipeError
from ..features.inspection import format_report, inspect_file
from ..features.repair_plan import plan_repair
from ..features.repair_write import default_output, run_repair
from ..io.hashes import HashCache
from ..io.header import read_header
from .catalog import default_catalog, guess_base
from .compat import listen, make
from .tasks import NONE, run_in_thread
from .words import error_text as _error_text, plain, tab_words

ELEM = "astolfo_merge_repair"

def error_text(exc) -> str:
    """An error in the tab's words, for the sub-tab's text boxes."""
    return _error_text(exc, markdown=False)


class RepairPanel:
    """Handlers over widget values (names as the host lists them); `build` lays the widgets out."""

    def __init__(self, host, catalog=None):
        self.host = host
        self.catalog = catalog or default_catalog()

    # -- model names ----------------------------------------------------------------------------
    def names(self, with_none=False) -> list:
        return ([NONE] if with_none else []) + [name for name, _path in self.host.named_checkpoints()]

    def path_of(self, name, field="checkpoint") -> str:
        path = dict(self.host.named_checkpoints()).get(name)
        if path is None:
            raise RecipeError(field, f"pick a model from the list (got {name!r})")
        return path

    def base_path(self, base):
        return None if base in (None, "", NONE) else self.path_of(base, "base")

    def output_path(self, name, output) -> str:
        """The output in the host's output folder; default `<stem>-repaired.safetensors`."""
        output = (output or "").strip() or os.path.basename(default_output(name))
        return os.path.join(self.host.output_dir(), check_output_name(output))

    def likely_base(self, name, base):
        """The Merge sub-tab's base guess for the picked file's architecture, unless a fitting base is picked."""
        infos = self.catalog.list(self.host.named_checkpoints())
        by_name = {i.name: i for i in infos}
        info = by_name.get(name)
        if info is None or not info.arch:
            return base
        current = by_name.get(base)
        if current is not None and current.arch == info.arch and current.name != name:
            return base
        guess = guess_base([i for i in infos if i.name != name], info.arch)
        return guess or NONE

    # -- handlers -------------------------------------------------------------------------------
    def on_inspect(self, name, base=NONE):
        """(report text, default output name, base preset) of the picked file."""
        try:
            report = format_report(inspect_file(self.path_of(name)))
        except AstolfoError as exc:
            return error_text(exc), gr.update(), gr.update()
        return plain(tab_words(report)), os.path.basename(default_output(name)), \
            gr.update(value=self.likely_base(name, base))

    def plan(self, name, base):
        path, base_path = self.path_of(name), self.base_path(base)
        return plan_repair(read_header(path), read_header(base_path) if base_path else None)

    def on_dry_run(self, name, base, output, overwrite=False):
        """The plan, its blocking problem (a base is needed, the output exists) first."""
        try:
            plan = self.plan(name, base)
            target = self.output_path(name, output)
        except AstolfoError as exc:
            return error_text(exc)
        lines = plan.lines(full=False)      # a missing base comes first ("NOT READY — needs a base model …")
        if os.path.exists(target) and not overwrite:
            lines.insert(0, f"NOT READY — {os.path.basename(target)} exists: tick Overwrite an existing file, "
                            "or change the output file name")
        lines.append(f"dry run: nothing written (would write {target})")
        return plain(tab_words("\n".join(lines)))

    def repair(self, name, base, output, overwrite=False):
        """Write the repaired copy (blocking); returns (message, checkpoint dropdown update)."""
        try:
            target = self.output_path(name, output)
            if os.path.exists(target) and not overwrite:
                raise OutputExistsError(target)
            plan = self.plan(name, base)
            if plan.needs_base:
                raise AstolfoError(plan.blocker())
            base_path = self.base_path(base)
            sha = HashCache().sha256(base_path)[:10] if base_path and plan.filled else None
            os.makedirs(os.path.dirname(target), exist_ok=True)
            result = run_repair(plan, target, overwrite=bool(overwrite), base_sha256=sha)
        except AstolfoError as exc:
            return error_text(exc), gr.update()
        note = self.host.after_merge(result)
        text = plain(tab_words(result.summary())) + (f"\n  {note}" if note else "")
        return text, gr.update(choices=self.names())

    def on_repair(self, name, base, output, overwrite=False):
        """Generator event: progress lines while `repair` runs on a worker thread."""
        yield from run_in_thread(lambda: self.repair(name, base, output, overwrite),
                                 lambda s: (f"repairing {name} … {s:.0f} s", gr.update()))

    def on_refresh(self):
        self.host.refresh()
        return gr.update(choices=self.names()), gr.update(choices=self.names(with_none=True))

    def list_outputs(self) -> list:
        """The widgets listing models (the Merge sub-tab refreshes them after a merge)."""
        return [self.model, self.base]

    def list_updates(self) -> dict:
        return {self.model: gr.update(choices=self.names()), self.base: gr.update(choices=self.names(with_none=True))}

    # -- layout ---------------------------------------------------------------------------------
    def build(self):
        gr.Markdown("Inspect a checkpoint; fill what a pruned or broken file lacks from a complete base of the "
                    "same architecture. The file's own tensors are copied bit for bit into a **new** file.")
        with gr.Row():
            self.model = make(gr.Dropdown, choices=self.names(), value=None, label="Checkpoint",
                              elem_id=f"{ELEM}_model", allow_custom_value=True, scale=3)
            self.base = make(gr.Dropdown, choices=self.names(with_none=True), value=NONE,
                             label="Base (fills missing keys)", elem_id=f"{ELEM}_base", allow_custom_value=True, scale=3)
            self.refresh = gr.Button("↻ Refresh", elem_id=f"{ELEM}_refresh", scale=1, min_width=90)
        self.report = gr.Textbox(label="Report", lines=12, max_lines=30, interactive=False, elem_id=f"{ELEM}_report")
        with gr.Row():
            self.output = gr.Textbox(label="Output file name", placeholder="<stem>-repaired.safetensors",
                                     info=f"written to {self.host.output_dir()}; never the checkpoint itself",
                                     elem_id=f"{ELEM}_output", lines=1, max_lines=1, scale=3)
            self.overwrite = gr.Checkbox(value=False, label="Overwrite an existing file", elem_id=f"{ELEM}_overwrite",
                                         scale=1)
            self.dry_run = gr.Button("Dry run", elem_id=f"{ELEM}_dry_run", scale=1, min_width=90)
            self.run = gr.Button("Repair to new file", variant="primary", elem_id=f"{ELEM}_run", scale=1, min_width=90)
        self.result = gr.Textbox(label="Plan / result", lines=10, max_lines=30, interactive=False, elem_id=f"{ELEM}_result")
        for widget in (self.model, self.base, self.output, self.overwrite):
            widget.do_not_save_to_config = True
        listen(self.model.change, self.on_inspect, [self.model, self.base], [self.report, self.output, self.base])
        listen(self.refresh.click, self.on_refresh, [], [self.model, self.base])
        listen(self.dry_run.click, self.on_dry_run, [self.model, self.base, self.output, self.overwrite], [self.result])
        self.run_event = listen(self.run.click, self.on_repair, [self.model, self.base, self.output, self.overwrite],
                                [self.result, self.model])
        return self


def build_ui(host):
    """Render the Repair sub-tab into the current gradio context (ui.add_feature_tabs)."""
    return RepairPanel(host).build()
