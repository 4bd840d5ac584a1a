"""Handlers of the Merger tab's run: the plan shown before a merge, Merge and Cancel, the poll that
shows the running job's progress, and loading the finished file into the host.

They never wait for a merge: Merge submits a job, the page's poll reads snapshots.
"""
from __future__ import annotations

import html
import os

import gradio as gr

from ..core import jobs
from ..core.plan_data import GIB
from ..errors import AstolfoError, MemoryBudgetError, OutputExistsError
from ..io.paths import confine_recipe
from .catalog import format_size
from .form_handlers import fill
from .words import plain, tab_words

LOG_TAIL = 40
PLAN_NOTES = 8
# plan notes (plan.Notes) about keys the output would lack or merge from fewer inputs: shown first
PLAN_WARNINGS = ("left out (repair the inputs first)", "merged from the inputs that have them")


def fmt_seconds(seconds) -> str:
    seconds = float(seconds or 0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


class RunHandlers:
    """Mixed into ui.MergerTab: reads the form through its FormHandlers, updates its run widgets."""

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
