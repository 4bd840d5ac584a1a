"""One key's output chunks, computed in this process: the method's rows (or a copy), post-processing,
the cast to the output dtype and the nonfinite policy (NaN/Inf: fail, skip the input, keep or zero).

The pipeline streams these chunks into the output file (stream.write_file), worker processes into
their range writers (`write_key`), live merges into a loaded model's tensors.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import Cancelled, MergeKeyError, RecipeError
from ..io.header import FP8_DTYPES, OUTPUT_DTYPES
from ..io.writer import cast_output, fp8_out_of_range
from ..methods import get_method
from .key_inputs import HALF_DTYPES, FileKeyInputs, NonFiniteInput, all_finite
from .plan_data import KeyPlan
from .stream import REWIND, arange_ids, stored_chunks, write_chunks


def write_key(plan, kp, writer, readers, dtype, device, chunk_bytes, log, cancel, bound, pool=None):
    """Write one key into `writer` (a worker process's range writer; this process streams
    `key_chunks` into its output file: pipeline.py)."""
    write_chunks(writer, kp.key, key_chunks(plan, kp, readers, dtype, device, chunk_bytes, log, cancel, bound, pool))


def key_chunks(plan, kp, readers, dtype, device, chunk_bytes, log, cancel, bound, pool=None):
    """One key's output chunks; with nonfinite = "skip", an input with NaN/Inf is left out and the
    key starts over (`REWIND`). The key's mapped input pages are released once it is done."""
    first = kp
    try:
        while True:
            try:
                yield from _produce(plan, kp, readers, dtype, device, chunk_bytes, log, cancel, bound, pool)
                return
            except NonFiniteInput as bad:
                name = plan.sources[bad.source].name
                if plan.recipe.nonfinite != "skip" or kp.action != "merge" or bad.source == kp.base:
                    raise MergeKeyError(kp.key, f"{name} has NaN/Inf values here (set 'nonfinite' to 'skip' to leave "
                                        "such inputs out of such keys, or to 'keep')", [name]) from None
                yield REWIND
                kp = _without(kp, bad.source)
                log.append(f"{kp.key}: {name} has NaN/Inf values here; left out ({len(kp.pool) or 1} input(s) remain)")
    finally:
        for source in {*first.pool, first.base, first.source} - {None}:
            if first.key in plan.sources[source].keys:
                readers[source].release(plan.sources[source].keys[first.key])


def _without(kp: KeyPlan, source: int) -> KeyPlan:
    pool = [i for i in kp.pool if i != source]
    method = get_method(kp.method)
    if not pool:
        raise MergeKeyError(kp.key, "every input has NaN/Inf values here")
    if len(pool) < method.min_models or (method.max_models is not None and len(pool) != len(kp.pool)):
        return dataclasses.replace(kp, action="copy", source=pool[0], pool=pool)
    return dataclasses.replace(kp, pool=pool)


def _produce(plan, kp: KeyPlan, readers, dtype, device, chunk_bytes, log, cancel, bound, pool=None):
    posts = bound.post(kp) if kp.post else ()
    for start, stop, chunk in _raw_chunks(plan, kp, readers, dtype, device, chunk_bytes, log, cancel, bound, pool):
        for post in posts:
            chunk = post(chunk, start, stop)
        written = _to_output(plan, kp, chunk, log)   # fp8: range policy, rounded once
        if written.is_floating_point() and kp.action in ("merge", "copy"):   # the values as written: after the cast
            written = _check_finite(plan, kp, written, log, lambda: _nonfinite_input(plan, kp, readers, start, stop),
                                    chunk)
        yield written


def _to_output(plan, kp: KeyPlan, chunk, log):
    """The chunk in the key's output dtype. fp8 is rounded once (`cast_output`), and values beyond its
    range count as non-finite outputs: 'fail' / 'skip' stop with an error, 'keep' writes torch's cast
    (e4m3fn saturates to +-448, e5m2 overflows to +-inf), 'zero' writes 0."""
    if kp.dtype not in FP8_DTYPES or not chunk.is_floating_point():
        return chunk.to(device="cpu", dtype=kp.dtype)
    beyond = fp8_out_of_range(chunk, kp.dtype)
    if bool(beyond.any()):
        name = next(n for n, d in OUTPUT_DTYPES.items() if d == kp.dtype)
        count, policy = int(beyond.sum()), plan.recipe.nonfinite
        if policy in ("fail", "skip"):
            files = [plan.sources[i].name for i in (kp.pool or [kp.source])]
            raise MergeKeyError(kp.key, f"{count} value(s) lie beyond the range of {name} (largest "
                                f"{torch.finfo(kp.dtype).max:g}); save this component in a wider dtype, or set "
                                "'nonfinite' to 'keep' (saturate / inf) or 'zero'", files)
        log.append(f"{kp.key}: {count} value(s) beyond the {name} range "
                   f"{'written as torch casts them' if policy == 'keep' else 'replaced by 0'}")
        if policy == "zero":
            chunk = chunk.masked_fill(beyond, 0.0)
    return cast_output(chunk, kp.dtype)


def written_finite(t: torch.Tensor) -> bool:
    """NaN/Inf check of an output chunk in its output dtype. 16-bit: one sum (fast, ~5x cheaper than
    the compute-dtype sum), and only when that sum is not finite (a NaN/Inf, or a large finite sum
    overflowing the 16-bit result) one min/max pass, which propagates NaN and shows Inf. fp8 (no sum on
    CPU) is widened first."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype.itemsize == 1:
        t = t.to(torch.float32)
    if t.dtype in HALF_DTYPES:
        if math.isfinite(float(t.sum())):
            return True
        low, high = torch.aminmax(t)
        return math.isfinite(float(low)) and math.isfinite(float(high))
    return all_finite(t)


def _zeroed(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.itemsize == 1:      # nan_to_num has no fp8 kernel
        return torch.nan_to_num(t.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0).to(t.dtype)
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def _check_finite(plan, kp, chunk, log, find_culprit, computed=None):
    """`chunk` is what will be written (output dtype); `computed` the same values before the cast."""
    saturated = chunk.dtype == torch.float8_e4m3fn and computed is not None and not all_finite(computed)
    if written_finite(chunk) and not saturated:   # e4m3fn has no Inf: the cast saturates an Inf to 448
        return chunk
    policy = plan.recipe.nonfinite
    files = [plan.sources[i].name for i in (kp.pool if kp.action == "merge" else [kp.source])]
    overflow = computed is not None and computed.dtype != chunk.dtype and all_finite(computed)
    if policy in ("fail", "skip"):
        culprit = find_culprit() if kp.action == "merge" and not overflow else None
        if culprit is not None:      # methods that propagate NaN/Inf leave the input scan to here
            raise NonFiniteInput(culprit)
        if overflow:
            name = {v: k for k, v in OUTPUT_DTYPES.items()}.get(chunk.dtype, str(chunk.dtype).replace("torch.", ""))
            biggest = float(computed.abs().max())
            raise MergeKeyError(kp.key, f"values up to {biggest:.4g} do not fit {name} (largest finite "
                                f"{torch.finfo(chunk.dtype).max:.4g}) and would be written as Inf/NaN: lower the weights "
                                "or strengths, write 'dtype': 'fp32', or set 'nonfinite' to 'zero' or 'keep'", files)
        raise MergeKeyError(kp.key, "the merge produced NaN/Inf values from finite inputs (set 'nonfinite' to "
                            "'keep' to write them, or 'zero' for the seed author's zeroing)", files)
    log.append(f"{kp.key}: non-finite values {'kept' if policy == 'keep' else 'replaced by 0'}")
    return chunk if policy == "keep" else _zeroed(chunk)


def _nonfinite_input(plan, kp: KeyPlan, readers, start, stop):
    """The first input (pool order, then the base) with NaN/Inf in rows [start, stop), or None."""
    for source in list(kp.pool) + ([kp.base] if kp.base is not None else []):
        t = readers[source].read_rows(plan.sources[source].keys[kp.key], start, stop)
        if t.is_floating_point() and not all_finite(t):
            return source
    return None


def _copy_chunks(plan, kp: KeyPlan, readers, dtype, device, chunk_bytes):
    """A copied key in row chunks that fit the chunk budget (stored, output and, with post-processing,
    compute-dtype copies of a chunk are alive at once), so a large copied key stays within the budget;
    in one chunk when a step needs the whole tensor (Fermat's permutations move rows)."""
    reader, stored = readers[kp.source], plan.sources[kp.source].keys[kp.key]
    per_element = reader.info(stored).dtype.itemsize + kp.dtype.itemsize + (dtype.itemsize if kp.post else 0)
    whole = any(s.whole for s in kp.post)     # one chunk: the whole tensor
    budget = chunk_bytes // 4 if not whole else math.prod(kp.shape or (1,)) * per_element
    for start, stop, t in stored_chunks(reader, stored, kp.shape, budget, per_element):
        if t.is_floating_point() and plan.recipe.nonfinite in ("fail", "skip") and not all_finite(t):
            raise NonFiniteInput(kp.source)
        if kp.post and t.is_floating_point():
            t = t.to(device=device, dtype=dtype)
        yield start, stop, t


def _raw_chunks(plan, kp: KeyPlan, readers, dtype, device, chunk_bytes, log, cancel, bound, pool=None):
    """(start_row, stop_row, chunk) in row order; chunks of merges are in the compute dtype."""
    rows = kp.shape[0] if kp.shape else 1
    if kp.action == "position_ids":
        yield 0, rows, arange_ids(kp.shape)
        return
    if kp.action == "copy":
        yield from _copy_chunks(plan, kp, readers, dtype, device, chunk_bytes)
        return
    method = get_method(kp.method)
    inputs = FileKeyInputs(plan, kp, readers, dtype, device, chunk_bytes, log, bound.state(kp.method), pool,
                           check_inputs=not method.propagates_nonfinite, bound=bound)
    files = [plan.sources[i].name for i in kp.pool]
    start = 0
    try:
        for chunk in method.run(inputs, kp.params):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            n = chunk.shape[0] if kp.shape and chunk.dim() == len(kp.shape) else rows
            yield start, start + n, chunk
            start += n
    except (MergeKeyError, Cancelled, RecipeError, NonFiniteInput):
        raise
    except Exception as exc:  # noqa: BLE001 - any method failure is reported with the key and files
        raise MergeKeyError(kp.key, f"{method.name} failed: {exc.__class__.__name__}: {exc}", files) from exc
