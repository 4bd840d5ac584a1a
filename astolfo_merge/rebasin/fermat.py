"""The seeds' a → b → c post-process, "permutation from the Fermat point" (ALGORITHMS.md §14.3).

For a recipe with a base R whose merge result is a, `"fermat": true` writes c instead of a:

    b = Rebasin(R, amp(a, R, 2), 0.5) = 0.5·R + 0.5·π(R + 2·(a − R))
    c = 0.5·a + 0.5·b

π aligns amp(a, R, 2) to R by weight matching over the UNet (function-preserving spec). Text
encoders and VAE have π = id, so there b = c = a exactly.

How it composes with the engine (the pool is read once, nothing whole-model is held in memory):
1. a's UNet merge keys — only those — are written once by the recipe's own method, in the compute
   precision (fp64 by default: no rounding between stages, §0.2), to a hidden temp file in the
   output folder. Matching needs a several times per sweep, and a may be a 250-model TIES; that is
   why a is stored rather than recomputed. Disk: 8 bytes per UNet weight (SDXL ≈ 21 GB, SD1 ≈ 7 GB;
   `"precision": "fp32"` halves it).
2. Weight matching between R and amp, amp computed per key on the fly from the temp a and R.
3. The output plan is the recipe's plan with each UNet merge key turned into "copy R, then
   post(R) → c" (a read from the temp file); every other key is produced by the recipe's method as
   usual. The temp file is removed on success, error and cancel.
`"fermat": {"keep_a": true, "keep_b": true}` also writes a and b next to the output
(<stem>-a.safetensors, <stem>-b.safetensors), after c; `sweeps` / `start` tune the matching.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import time

import torch

from .. import arch as archmod
from ..checkpoint import CheckpointReader
from ..engine import MergeResult, Progress, RunOptions, run_merge
from ..errors import OutputExistsError, RecipeError
from ..plan import KeyPlan, Plan, refuse_input_as_output
from .matching import weight_matching
from .spec import apply_index, build_spec

OPTION_FIELDS = {"keep_a": bool, "keep_b": bool, "sweeps": int, "start": str}


@dataclasses.dataclass(frozen=True)
class FermatOptions:
    keep_a: bool = False
    keep_b: bool = False
    sweeps: int = 10
    start: str = "propagate"


def fermat_options(value) -> FermatOptions:
    """The recipe's `fermat` field: true, or an object with keep_a / keep_b / sweeps / start."""
    if value is True:
        return FermatOptions()
    if not isinstance(value, dict):
        raise RecipeError("fermat", f"must be true or an object with {', '.join(OPTION_FIELDS)}; got {value!r}")
    for name, given in value.items():
        kind = OPTION_FIELDS.get(name)
        if kind is None:
            raise RecipeError(f"fermat.{name}", f"unknown field (known: {', '.join(OPTION_FIELDS)})")
        if not isinstance(given, kind) or (kind is int and isinstance(given, bool)):
            raise RecipeError(f"fermat.{name}", f"must be {kind.__name__}, got {given!r}")
    opts = FermatOptions(**value)
    if not 1 <= opts.sweeps <= 100:
        raise RecipeError("fermat.sweeps", f"must be between 1 and 100, got {opts.sweeps}")
    if opts.start not in ("propagate", "identity"):
        raise RecipeError("fermat.start", f"must be 'propagate' or 'identity', got {opts.start!r}")
    return opts


def base_source(plan: Plan) -> int:
    """Index of R: the UNet component's base, else the recipe's base."""
    rule = plan.recipe.components.get(archmod.UNET)
    name = (rule.base if rule is not None and rule.base else None) or plan.recipe.base
    if not name:
        raise RecipeError("fermat", "needs a base model R ('base'): b = Rebasin(R, amp(a, R, 2), 0.5)")
    return [s.name for s in plan.sources].index(name)


def side_path(output: str, tag: str) -> str:
    stem, ext = os.path.splitext(output)
    return f"{stem}-{tag}{ext or '.safetensors'}"


def run_fermat(plan: Plan, options: RunOptions, progress=None, cancel=None) -> MergeResult:
    """Write c for `plan` (and a / b if asked); see the module docstring."""
    began = time.monotonic()
    opts = fermat_options(plan.recipe.extra.get("fermat"))
    r_index = base_source(plan)
    unet = [kp for kp in plan.keys if kp.action == "merge" and kp.component == archmod.UNET]
    if not unet:
        raise RecipeError("fermat", "the recipe merges no UNet key (is components.unet a 'take'?)")
    outputs = [plan.output] + [side_path(plan.output, t) for t, keep in (("a", opts.keep_a), ("b", opts.keep_b)) if keep]
    for path in outputs:
        refuse_input_as_output(plan, path)
        if os.path.exists(path) and not options.overwrite:
            raise OutputExistsError(path)
    plain = dataclasses.replace(plan.recipe, extra={k: v for k, v in plan.recipe.extra.items() if k != "fermat"})
    stem = os.path.splitext(os.path.basename(plan.output))[0]
    temp = os.path.join(os.path.dirname(plan.output), f".{stem}.fermat-a-{secrets.token_hex(4)}.safetensors")
    log = list(plan.log)
    readers = []
    try:
        compute = torch.float64 if plan.recipe.precision == "fp64" else torch.float32
        stage_a = dataclasses.replace(plan, recipe=plain, output=temp,
                                      keys=[dataclasses.replace(kp, dtype=compute) for kp in unet])
        done = run_merge(stage_a, dataclasses.replace(options, overwrite=True, hash_inputs=False),
                         _staged(progress, "Fermat 1/3, a (UNet)"), cancel, post_process=False)
        log += done.log[len(plan.log):]
        a_reader = CheckpointReader(temp)
        readers.append(a_reader)
        r_src = plan.sources[r_index]
        r_reader = CheckpointReader(r_src.path, r_src.header)
        readers.append(r_reader)
        index = _match(plan, unet, a_reader, r_reader, r_src, opts, progress, cancel, log)
        result = _write(plan, plan.output, plan.recipe, unet, r_index, a_reader, index, "c", options, progress, cancel, log)
        for tag, keep in (("a", opts.keep_a), ("b", opts.keep_b)):
            if keep:
                note = dict(plain.extra, note=f"Fermat intermediate {tag} of the recipe's merge (ALGORITHMS.md §14.3)")
                side = _write(plan, side_path(plan.output, tag), dataclasses.replace(plain, extra=note), unet, r_index,
                              a_reader, index, tag, options, progress, cancel, log)
                log.append(f"fermat: wrote {tag} to {side.path}")
    finally:
        for r in readers:
            r.close()
        if os.path.exists(temp):
            os.remove(temp)
    result.log, result.seconds = log, time.monotonic() - began
    return result


def _match(plan, unet, a_reader, r_reader, r_src, opts, progress, cancel, log) -> dict:
    """π aligning amp(a, R, 2) to R; returns key -> per-axis indices (keys without one: absent)."""
    spec = build_spec(plan.arch, plan.scale)
    shapes = {kp.key: kp.shape for kp in unet if kp.key in spec.axes and r_src.has(kp.key)}

    def read_r(key):                                      # stored dtype: matching upcasts in chunks
        return r_reader.read(r_src.keys[key]).reshape(shapes[key])

    def read_amp(key):                                    # amp(a, R, 2) = R + 2·(a − R), in a's precision
        a = a_reader.read(key).reshape(shapes[key])
        r = read_r(key).to(a.dtype)
        return a.sub_(r).mul_(2.0).add_(r)

    report = _staged_messages(plan, progress, "Fermat 2/3, matching")
    result = weight_matching(spec, read_r, read_amp, seed=plan.recipe.seed, sweeps=opts.sweeps, keys=set(shapes),
                             report=report, cancel=cancel, start=opts.start)
    log.append("fermat: " + result.summary(spec))
    return {key: idx for key in shapes if (idx := spec.index(key, result.perms)) is not None}


def _write(plan, output, recipe, unet, r_index, a_reader, index, what, options, progress, cancel, log) -> MergeResult:
    """One output plan: UNet merge keys from (a, R, π) as `what` (a, b or c), the rest as the recipe says."""
    r_src = plan.sources[r_index]
    replaced = {}
    for kp in unet:
        has_r = r_src.has(kp.key)
        replaced[kp.key] = KeyPlan(kp.key, kp.shape, kp.dtype, "copy", kp.component, block=kp.block,
                                   source=r_index if has_r else kp.pool[0], note=f"fermat {what}",
                                   post=[_Combine(kp.key, kp.shape, a_reader, index.get(kp.key) if has_r else None, what)])
    keys = [replaced.get(kp.key, kp) if kp.action == "merge" else kp for kp in plan.keys]
    stage = dataclasses.replace(plan, recipe=recipe, output=output, keys=keys)
    step = {"c": "3/3, c", "a": "extra, a", "b": "extra, b"}[what]
    announce = _staged_messages(plan, progress, f"Fermat {step}")
    if announce:
        announce(f"writing {output}")
    done = run_merge(stage, options, _staged(progress, f"Fermat {step}"), cancel, post_process=False)
    log += done.log[len(plan.log):]
    return done


class _Combine:
    """post(R, 0, rows) -> a, b or c for one UNet key (R: its whole tensor, compute dtype)."""

    def __init__(self, key, shape, a_reader, index, what):
        self.key, self.shape, self.a_reader, self.index, self.what = key, shape, a_reader, index, what

    def __call__(self, r, start, stop):
        a = self.a_reader.read(self.key).reshape(self.shape).to(device=r.device, dtype=r.dtype)
        if self.what == "a" or self.index is None:       # π = id: b = c = a exactly
            return a
        amp = (a - r).mul_(2.0).add_(r)                     # amp(a, R, 2) = R + 2·(a − R)
        b = apply_index(amp, self.index).mul_(0.5).add_(r, alpha=0.5)   # Rebasin(R, amp, 0.5)
        del amp
        return b if self.what == "b" else b.mul_(0.5).add_(a, alpha=0.5)


def _staged(progress, stage):
    """Prefix a stage name to the engine's progress messages."""
    if progress is None:
        return None

    def forward(p: Progress):
        progress(dataclasses.replace(p, message=f"{stage}: {p.message}") if p.message else p)
    return forward


def _staged_messages(plan, progress, stage):
    if progress is None:
        return None
    began = time.monotonic()

    def forward(message):
        progress(Progress(0, len(plan.keys), 0, plan.output_bytes, time.monotonic() - began, None, "", f"{stage}: {message}"))
    return forward
