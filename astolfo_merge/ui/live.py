"""The tab's live-merge controls (live.py): "Merge into" a file or the loaded model, "Save loaded
merge", "Restore", and emptying the XYZ trials folder.

A mixin of the tab (ui.MergerTab): the layout pieces are called from its sections, the handlers
read the same form. Only hosts with a loaded model (the WebUI) show any of it; the standalone app
has none, so there the Merge button writes files as before.
"""
from __future__ import annotations

import gradio as gr

from ..core import jobs
from ..errors import AstolfoError
from ..features import trials
from ..features.live_state import LiveResult
from .compat import listen

ELEM = "astolfo_merge"
TO_FILE, TO_MODEL = "a file", "the loaded model"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


class LiveHandlers:
    """Layout and handlers of the live-merge controls (needs the tab's form, jobs and host)."""

    # -- layout ----------------------------------------------------------------------------------
    def _live_target(self):
        self.target = gr.Radio(choices=[TO_FILE, TO_MODEL], value=TO_FILE, label="Merge into",
                               visible=self.host.has_loaded_model, elem_id=f"{ELEM}_target",
                               info="the loaded model: no file; only keys whose recipe changed are merged again")
        self.target.do_not_save_to_config = True

    def _live_section(self):
        with gr.Accordion("Loaded model and XYZ trials", open=False, visible=self.host.has_loaded_model,
                          elem_id=f"{ELEM}_live_box"):
            gr.Markdown("**Save loaded merge** writes the merge held by the loaded model to the **File name** "
                        "above (with its recipe). **Restore** re-reads the changed weights from the checkpoint "
                        f"file. `[Merger]` XYZ cells merged to files are cached in `{trials.TRIALS_DIR}/`.")
            with gr.Row():
                self.save_live = gr.Button("Save loaded merge", elem_id=f"{ELEM}_save_live", min_width=80)
                self.restore_live = gr.Button("Restore", elem_id=f"{ELEM}_restore_live", min_width=80)
                self.empty_trials = gr.Button("Empty the trials folder", elem_id=f"{ELEM}_empty_trials", min_width=80)

    def _wire_live(self):
        lists = [self.filter, self.selection]
        listen(self.save_live.click, self.on_save_live, [self.output_name, self.overwrite, *lists],
               [self.message, *self.list_outputs()])
        listen(self.restore_live.click, self.on_restore_live, [], [self.message])
        listen(self.empty_trials.click, self.on_empty_trials, lists, [self.message, *self.list_outputs()])

    def merge_inputs(self) -> list:
        return [self.target, *self.form_inputs(), *self.run_inputs()]

    # -- handlers --------------------------------------------------------------------------------
    def on_merge_to(self, target, *values):
        """Merge: to a file (the tab's own handler), or into the loaded model as a background job."""
        if target != TO_MODEL:
            return self.on_merge(*values)
        try:
            why = self.host.live_unsupported()
            if why:
                raise AstolfoError(why)
            recipe, plan, options = self.prepare(values)
            plan.output = None
            plan.check_budget(options.memory_gb)
            job = self.jobs.submit(plan, options, title=f"{recipe.method} into the loaded model",
                                   runner=self.host.merge_live)
        except AstolfoError as exc:
            return self.error_text(exc), gr.update(), gr.update()
        return (f"Merging into the loaded model ({len(plan.keys)} keys planned; only changed ones are written).",
                recipe.to_json(), self.progress_html(job.snapshot()))

    def on_save_live(self, name, overwrite, filter_text="", selection=None):
        name = (name or "").strip()
        try:
            result = self.host.save_live(name, bool(overwrite))
        except AstolfoError as exc:
            return [self.error_text(exc)] + [gr.update() for _ in self.list_outputs()]
        self.reload_models()
        updates = self.list_updates(filter_text, selection or [])
        note = f"  \n{result.log[-1]}" if result.log else ""
        return [f"Saved the loaded merge to `{result.path}` ({_size(result.size)}, {result.seconds:.1f} s)  \n"
                f"sha256 `{result.sha256}`{note}"] + [updates.get(w, gr.update()) for w in self.list_outputs()]

    def on_restore_live(self):
        try:
            result = self.host.restore_live()
        except AstolfoError as exc:
            return self.error_text(exc)
        if not result.restored:
            return "The loaded model holds its checkpoint's own weights; nothing to restore."
        return (f"Restored {result.restored} keys from the checkpoint file in {result.seconds:.1f} s: the loaded "
                "model is its checkpoint again.")

    def on_empty_trials(self, filter_text="", selection=None):
        count, freed = trials.empty_trials(self.host, keep=self.loaded_files())
        self.reload_models()
        updates = self.list_updates(filter_text, selection or [])
        where = trials.trials_dir(self.host)
        text = (f"Deleted {count} cached XYZ cell file(s) from `{where}` ({_size(freed)} freed)." if count
                else f"The trials folder `{where}` holds no cell files.")
        return [text] + [updates.get(w, gr.update()) for w in self.list_outputs()]

    def loaded_files(self) -> list:
        """Files the host has loaded now (kept when the trials folder is emptied)."""
        try:
            return [self.host.live_target().checkpoint]
        except AstolfoError:
            return []

    # -- the tab's polling, aware of live results -------------------------------------------------
    def on_poll(self, seen, filter_text, selection):
        out = super().on_poll(seen, filter_text, selection)
        job = self.jobs.current()
        if job is not None and isinstance(job.result, LiveResult):
            out[3] = gr.update(visible=False)     # "Load the merged model": it is loaded already
        return out

    def summary_text(self, snap) -> str:
        r = snap.result
        if snap.status != jobs.DONE or not isinstance(r, LiveResult):
            return super().summary_text(snap)
        return (f"**Done** in {r.seconds:.1f} s · into the loaded model · {r.keys} keys merged, {r.restored} restored, "
                f"{r.kept} unchanged  \n`{r.path}`  \nImages now carry `{r.label}` in their infotext "
                f"(recipe sha256 `{r.sha256}`). **Save loaded merge** writes it; **Restore** undoes it.")
