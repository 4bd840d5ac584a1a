"""Writing a planned repair (REPAIR.md §10): re-identify, then stream key by key into the atomic writer.

The file's own tensors are read bit for bit (no fp8 dequantization), the base's gaps cast to the
file's dominant float dtype; chunks come from, and go to, the one streaming loop (stream).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .. import __version__
from ..core.stream import arange_ids, stored_chunks, write_file
from ..errors import AstolfoError
from ..io.hashes import HashCache
from ..io.header import read_header
from ..io.reader import CheckpointReader
from .repair_plan import RepairPlan, RepairStep, check_result, first_few, plan_repair, short_key

CHUNK_BYTES = 64 * 1024 ** 2          # one read/write chunk of the repair (bounded memory)
FILLED_KEYS_IN_RECORD = 32            # the metadata lists the filled keys when there are at most this many


def repair_metadata(plan: RepairPlan, base_sha256: str | None = None) -> dict:
    """The file's metadata with every value a string, plus the repair record (§10.5)."""
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in plan.header.metadata.items()}
    record = {
        "tool": f"astolfo_merge {__version__}", "source": os.path.basename(plan.path),
        "base": os.path.basename(plan.base_path) if plan.base_path and plan.filled else None,
        "base_sha256": base_sha256[:10] if base_sha256 else None,
        "filled": len(plan.filled), "renamed": len(plan.renamed), "reshaped": len(plan.reshaped),
        "position_ids": plan.position_ids, "dropped": len(plan.dropped),
        "dropped_bytes": sum(b for _k, _t, b in plan.dropped), "markers": list(plan.identity.markers),
    }
    if plan.filled and len(plan.filled) <= FILLED_KEYS_IN_RECORD:
        record["filled_keys"] = list(plan.filled)
    meta["astolfo_merge_repair"] = json.dumps(record)
    if "modelspec.architecture" not in meta:
        meta["modelspec.architecture"] = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2",
                                          "sdxl": "stable-diffusion-xl-v1-base"}[plan.identity.arch]
    return meta


@dataclass
class RepairResult:
    path: str
    sha256: str
    size: int
    keys: int
    plan: RepairPlan

    def summary(self) -> str:
        return f"wrote {self.path}\n  {self.keys} keys, {self.size / 1e6:.1f} MB\n  {self.plan.summary()}\n  sha256 {self.sha256}"


def _step_chunks(step: RepairStep, reader: CheckpointReader, chunk_bytes: int):
    """The step's value in row chunks of `chunk_bytes` stored bytes, in the canonical shape and output dtype."""
    if step.origin == "position_ids":
        yield arange_ids(step.shape)
        return
    for _start, _stop, chunk in stored_chunks(reader, step.stored, step.shape, chunk_bytes):
        yield chunk.to(step.dtype)


def run_repair(plan: RepairPlan, output, overwrite=False, base_sha256: str | None = None,
               chunk_bytes: int = CHUNK_BYTES) -> RepairResult:
    """Write the planned file: re-identify first, then stream key by key into an atomic temp file."""
    output = os.path.abspath(os.fspath(output))
    if plan.needs_base:
        raise AstolfoError(f"{plan.path}: {len(plan.filled)} key(s) are missing "
                           f"({first_few([short_key(k) for k in plan.filled], 3)}); pass --base BASE, a complete "
                           f"{plan.identity.title} model, to fill them")
    for source in (plan.path, plan.base_path):
        if source and os.path.exists(output) and os.path.samefile(source, output):
            raise AstolfoError(f"{output}: the repair reads this file; write it to a new file (-o)")
    check_result(plan)
    entries = [(s.key, s.dtype, s.shape) for s in plan.steps]
    readers = {"file": CheckpointReader(plan.path, plan.header, dequantize=False)}   # bit for bit
    if plan.base_header is not None:
        readers["base"] = CheckpointReader(plan.base_path, plan.base_header)
    try:
        sha = write_file(output, entries, repair_metadata(plan, base_sha256), overwrite,
                         lambda i: _step_chunks(plan.steps[i], readers[_reader_of(plan.steps[i])], chunk_bytes))
    finally:
        for r in readers.values():
            r.close()
    return RepairResult(output, sha, os.path.getsize(output), len(plan.steps), plan)


def _reader_of(step: RepairStep) -> str:
    return "base" if step.origin == "base" else "file"


def repair_file(path, base=None, output=None, keep_ema=False, position_ids="reset", overwrite=False,
                hash_base=True, dry_run=False):
    """The CLI's repair: plan (and with `dry_run`, stop there), else write. Returns the plan or result."""
    header = read_header(path)
    base_header = read_header(base) if base else None
    plan = plan_repair(header, base_header, keep_ema=keep_ema, position_ids=position_ids)
    if dry_run:
        return plan
    sha = HashCache().sha256(base)[:10] if base and hash_base and plan.filled else None
    return run_repair(plan, output or default_output(path), overwrite=overwrite, base_sha256=sha)


def default_output(path) -> str:
    stem, _ext = os.path.splitext(os.fspath(path))
    return f"{stem}-repaired.safetensors"
