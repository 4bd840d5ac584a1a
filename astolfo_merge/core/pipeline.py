"""One run of a plan's stages (plan.stages, stages.py): whole-plan stages here, key stages on the executor
the options pick (this process, worker processes or Ray), stage results handed on as data, progress.
"""
from __future__ import annotations

import dataclasses
import math
import os
import secrets
import time

from ..io.hashes import HashCache
from ..io.reader import CheckpointReader, ensure_open_files
from ..io.writer import SafetensorsWriter
from .devices import fp64_note, merge_torch_settings
from .executors import run_tasks
from .key_chunks import key_chunks
from .metadata import input_hashes, output_metadata
from .plan_data import GIB, Plan
from .ray_executor import ray_session, run_on_ray
from .run_options import MergeResult, Progress, RunOptions, merge_eta, process_count, stage_output
from .stage_run import Bindings, run_whole_stage
from .stages import OUTPUT, TEMP
from .stream import write_file
from .worker_process import Crew
from .workers import ChunkWorkers, auto_workers


class Pipeline:
    """One run of a plan's stages: the inputs' readers, the stage results handed on as data, the log
    and progress, and the temp files to remove whatever happens."""

    def __init__(self, plan: Plan, options: RunOptions, progress, cancel, device):
        self.plan, self.options, self.progress, self.cancel, self.device = plan, options, progress, cancel, device
        self.dtype = plan.compute_dtype
        self.log, self.results, self.temps = list(plan.log), {}, []
        note = fp64_note(options.device, self.dtype)
        if note:
            self.log.append(note)
        self.bound = Bindings(plan, self.results)
        self.start = time.monotonic()
        self.readers, self.pool = [], None
        self.chunk_bytes = options.chunk_bytes or max(16 * 1024 ** 2, int(options.memory_gb * GIB) // 2)
        first = next((s for s in plan.pipeline() if s.kind == "keys"), None)
        self.crew = self._crew(self._stage_plan(first)) if first is not None else None   # started early: see Crew

    def run(self) -> MergeResult:
        hashes = input_hashes(self.plan, self.options, self._reporter(""))
        ensure_open_files(len(self.plan.sources))
        self.readers = [CheckpointReader(s.path, s.header) for s in self.plan.sources]
        self.pool = ChunkWorkers(self.options.threads or auto_workers(self.device.type))
        result = None
        for stage in self.plan.pipeline():
            if stage.kind != "keys":
                with merge_torch_settings(self.device):    # the same arithmetic whichever executor runs the keys
                    found = run_whole_stage(stage, self.plan, self.readers, self.bound, self.log,
                                            self._reporter(stage.label), self.cancel)
                self.results[stage.result or stage.name] = found
                continue
            done = self._keys(stage, hashes)
            if stage.output == OUTPUT:
                result = done
            elif stage.output != TEMP:
                self.log.append(f"{stage.name}: wrote {done.path}")
        result.log, result.seconds = self.log, time.monotonic() - self.start
        return result

    def _stage_plan(self, stage) -> Plan:
        """The plan one key stage runs: its keys, its file, its recipe (a side output's note)."""
        recipe = self.plan.recipe
        if stage.output != OUTPUT:     # intermediate files describe the recipe without the stage that made them
            extra = {k: v for k, v in recipe.extra.items() if k != "fermat"}
            recipe = dataclasses.replace(recipe, extra=dict(extra, note=stage.note) if stage.note else extra)
        output = stage_output(self.plan, stage) or _temp_path(self.plan.output, stage.name)
        return dataclasses.replace(self.plan, keys=self.plan.keys if stage.keys is None else stage.keys,
                                   output=output, recipe=recipe, stages=[])

    def _crew(self, sub: Plan):
        if self.options.ray is not None:
            return None
        count = process_count(sub, self.options)
        return Crew(count) if count else None

    def _keys(self, stage, hashes) -> MergeResult:
        """One key stage through the streaming writer, here or as tasks on worker processes."""
        sub = self._stage_plan(stage)
        temp = stage.output == TEMP
        if temp:
            self.temps.append(sub.output)
        report = self._reporter(stage.label, sub)
        if stage.label and not temp:
            report(f"writing {sub.output}")
        began = time.monotonic()
        options = dataclasses.replace(self.options, overwrite=True) if temp else self.options
        meta = output_metadata(sub, {} if temp else hashes)
        crew, self.crew = (self.crew or self._crew(sub)), None
        tally = report.tally
        try:
            if options.ray is not None:
                setup = {"plan": sub, "results": self.results, "dtype": self.dtype, "device": options.device,
                         "chunk_bytes": self.chunk_bytes, "throttle": options.throttle}
                sha = _run_on_ray(sub, setup, meta, options, tally, self.cancel, self.log)
            elif crew is not None:
                setup = {"plan": sub, "results": self.results, "dtype": self.dtype, "device": options.device,
                         "chunk_bytes": max(16 << 20, self.chunk_bytes // len(crew.workers)), "throttle": options.throttle}
                sha = _run_in_workers(sub, crew, setup, meta, options, tally, self.cancel, self.log)
            else:
                with merge_torch_settings(self.device):
                    sha = _run_here(sub, self.readers, self.dtype, self.device, self.chunk_bytes, self.log, self.cancel,
                                    self.bound, self.pool, meta, options, tally)
        finally:
            if crew is not None:
                crew.close()
        if temp:
            self.results[stage.result or stage.name] = sub.output
        elif options.hash_inputs:
            (options.hash_cache or HashCache()).put(sub.output, sha)
        return MergeResult(sub.output, sha, os.path.getsize(sub.output), time.monotonic() - began, len(sub.keys),
                           self.log, dict(self.plan.component_summary))

    def _reporter(self, label: str, sub: Plan | None = None) -> "_Reporter":
        return _Reporter(self.progress, label, sub or self.plan, self.start, counting=sub is not None)

    def close(self):
        if self.crew is not None:
            self.crew.close()
        if self.pool is not None:
            self.pool.close()
        for r in self.readers:
            r.close()
        self.bound.close()
        for path in self.temps:
            if os.path.exists(path):
                os.remove(path)


class _Reporter:
    """Progress of one stage: report(message, key, keys_done, stage); `tally(kp, n)` counts a written
    key. Messages get the stage's label in front ("Fermat 3/3, c: ..."); the ETA counts from the
    stage's first key (hashing and whole-plan stages are not part of the rate, see merge_eta)."""

    def __init__(self, progress, label, plan: Plan, start: float, counting: bool):
        self.progress, self.label, self.start = progress, label, start
        self.keys_total, self.bytes_total, self.done_bytes = len(plan.keys), plan.output_bytes, 0
        self.began = time.monotonic() if counting else None

    def __call__(self, message="", key="", keys_done=0, stage=""):
        if not self.progress:
            return
        now = time.monotonic()
        eta = merge_eta(now - self.began, self.done_bytes, self.bytes_total) if self.began else None
        if message and self.label:
            message = f"{self.label}: {message}"
        self.progress(Progress(keys_done, self.keys_total, self.done_bytes, self.bytes_total, now - self.start, eta,
                               key, message, stage))

    def tally(self, kp, keys_done):
        self.done_bytes += math.prod(kp.shape) * kp.dtype.itemsize
        self(key=kp.key, keys_done=keys_done)


def _temp_path(output: str, name: str) -> str:
    """A hidden temp file next to the output for stage `name` (removed after the merge)."""
    stem = os.path.splitext(os.path.basename(output))[0]
    tag = name.replace(" ", "-")
    return os.path.join(os.path.dirname(output), f".{stem}.{tag}-{secrets.token_hex(4)}.safetensors")


def _run_here(plan, readers, dtype, device, chunk_bytes, log, cancel, bound, pool, meta, options, tally) -> str:
    """Every key in this process, in order, through the one streaming loop; returns the sha256.
    `bound`: the run's stage results and the keys' steps bound to them (stage_run.Bindings)."""
    def chunks_of(index):
        return key_chunks(plan, plan.keys[index], readers, dtype, device, chunk_bytes, log, cancel, bound, pool)

    def after_key(index):
        tally(plan.keys[index], index + 1)
        if options.throttle:
            time.sleep(options.throttle)

    return write_file(plan.output, [(k.key, k.dtype, k.shape) for k in plan.keys], meta, options.overwrite,
                      chunks_of, after_key, cancel)


def _run_in_workers(plan, crew, setup, meta, options, tally, cancel, log) -> str:
    """The keys as tasks on worker processes writing into the preallocated temp output (executors.py)."""
    done = 0

    def on_key(index):
        nonlocal done
        done += 1
        tally(plan.keys[index], done)

    with SafetensorsWriter(plan.output, [(k.key, k.dtype, k.shape) for k in plan.keys], meta, options.overwrite,
                           positioned=True) as writer:
        sha, key_log = run_tasks(plan, writer, setup, crew, on_key, cancel)
        writer.commit(sha)
    log.extend(key_log)
    return sha


def _run_on_ray(plan, setup, meta, options, tally, cancel, log) -> str:
    """The keys as Ray tasks writing into the preallocated temp output (ray_executor.py)."""
    done = 0

    def on_key(index):
        nonlocal done
        done += 1
        tally(plan.keys[index], done)

    with ray_session(options.ray) as ray, SafetensorsWriter(
            plan.output, [(k.key, k.dtype, k.shape) for k in plan.keys], meta, options.overwrite,
            positioned=True) as writer:
        sha, key_log = run_on_ray(ray, plan, writer, setup, on_key, cancel)
        writer.commit(sha)
    log.extend(key_log)
    return sha
