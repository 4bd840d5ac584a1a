"""The seeds' a → b → c post-process, "permutation from the Fermat point" (ALGORITHMS.md §14.3).

For a recipe with a base R whose merge result is a, `"fermat": true` writes c instead of a:

    b = Rebasin(R, amp(a, R, 2), 0.5) = 0.5·R + 0.5·π(R + 2·(a − R))
    c = 0.5·a + 0.5·b

π aligns amp(a, R, 2) to R by weight matching over the UNet (function-preserving spec). Text
encoders and VAE have π = id, so there b = c = a exactly.

How it runs: as stages of the plan's pipeline (stages.py), declared here by `fermat_stages` and run
by the engine like any other plan, so every key stage runs as tasks on any executor (the pool is
read once, nothing whole-model is held in memory):
1. "fermat a" (a key stage): a's UNet merge keys — only those — written once by the recipe's own
   method, in the compute precision (fp64 by default: no rounding between stages, §0.2), to a
   hidden temp file in the output folder. Matching needs a several times per sweep, and a may be a
   250-model TIES; that is why a is stored rather than recomputed. Disk: 8 bytes per UNet weight
   (SDXL ≈ 21 GB, SD1 ≈ 7 GB; `"precision": "fp32"` halves it).
2. "fermat match" (whole-plan): weight matching between R and amp, amp computed per key on the fly
   from the temp a and R; its result (key -> per-axis indices) goes to the next stages as data.
3. "output" (a key stage): the recipe's keys with each UNet merge key turned into "copy R, then the
   step ("fermat", "c")" (a read from the temp file); every other key is produced by the recipe's
   method as usual. The temp file is removed on success, error and cancel.
"""
from __future__ import annotations

import dataclasses
import os

from ..errors import RecipeError
from ..io import arch as archmod
from ..methods.rebasin.matching import weight_matching
from ..methods.rebasin.permutation import apply_index
from ..methods.rebasin.spec import build_spec
from .stages import FERMAT_A, FERMAT_MATCH, TEMP, Stage, Step, fermat_options


def base_source(plan) -> int:
    """Index of R: the UNet component's base, else the recipe's base."""
    rule = plan.recipe.components.get(archmod.UNET)
    name = (rule.base if rule is not None and rule.base else None) or plan.recipe.base
    if not name:
        raise RecipeError("fermat", "needs a base model R ('base'): b = Rebasin(R, amp(a, R, 2), 0.5)")
    return [s.name for s in plan.sources].index(name)


def side_path(output: str, tag: str) -> str:
    stem, ext = os.path.splitext(output)
    return f"{stem}-{tag}{ext or '.safetensors'}"


def fermat_stages(plan, compute) -> list:
    """The stages that write c for `plan` (and a / b if asked): see the module docstring. `compute`:
    the compute dtype (the temp a is stored in it)."""
    opts = fermat_options(plan.recipe.extra.get("fermat"))
    r_index = base_source(plan)
    unet = [kp for kp in plan.keys if kp.action == "merge" and kp.component == archmod.UNET]
    if not unet:
        raise RecipeError("fermat", "the recipe merges no UNet key (is components.unet a 'take'?)")
    stages = [Stage("keys", FERMAT_A, result=FERMAT_A, output=TEMP, label="Fermat 1/3, a (UNet)",
                    keys=[dataclasses.replace(kp, dtype=compute) for kp in unet]),
              Stage("match", FERMAT_MATCH, result=FERMAT_MATCH, label="Fermat 2/3, matching", source=FERMAT_A),
              Stage("keys", "output", label="Fermat 3/3, c", keys=_output_keys(plan, unet, r_index, "c"))]
    for tag, keep in (("a", opts.keep_a), ("b", opts.keep_b)):
        if keep and plan.output:
            stages.append(Stage("keys", f"fermat {tag}", output=side_path(plan.output, tag), label=f"Fermat extra, {tag}",
                                keys=_output_keys(plan, unet, r_index, tag),
                                note=f"Fermat intermediate {tag} of the recipe's merge (ALGORITHMS.md §14.3)"))
    return stages


def _output_keys(plan, unet, r_index, what) -> list:
    """The plan's keys with its UNet merge keys written as `what` (a, b or c) from (a, R, π): a copy
    of R (or, where R lacks the key, of the first pool model: then π = id and the key is a)."""
    r_src = plan.sources[r_index]
    replaced = {}
    for kp in unet:
        has_r = r_src.has(kp.key)
        replaced[kp.key] = dataclasses.replace(
            kp, action="copy", method=None, params={}, pool=[], base=None, reshape_from=None, pre={},
            source=r_index if has_r else kp.pool[0], note=f"fermat {what}", block_weight=None,
            post=[Step("fermat", what if has_r else "a", whole=True)])
    return [replaced.get(kp.key, kp) if kp.action == "merge" else kp for kp in plan.keys]


def match(plan, a_reader, r_reader, report, cancel, log) -> dict:
    """π aligning amp(a, R, 2) to R over the UNet keys in the temp a; returns key -> per-axis
    indices (keys without one: absent)."""
    opts = fermat_options(plan.recipe.extra.get("fermat"))
    r_src = plan.sources[base_source(plan)]
    spec = build_spec(plan.arch, plan.scale)
    unet = [kp for kp in plan.keys if kp.action == "merge" and kp.component == archmod.UNET]
    shapes = {kp.key: kp.shape for kp in unet if kp.key in spec.axes and r_src.has(kp.key)}

    def read_r(key):                                      # stored dtype: matching upcasts in chunks
        return r_reader.read(r_src.keys[key]).reshape(shapes[key])

    def read_amp(key):                                    # amp(a, R, 2) = R + 2·(a − R), in a's precision
        a = a_reader.read(key).reshape(shapes[key])
        r = read_r(key).to(a.dtype)
        return a.sub_(r).mul_(2.0).add_(r)

    result = weight_matching(spec, read_r, read_amp, seed=plan.recipe.seed, sweeps=opts.sweeps, keys=set(shapes),
                             report=report, cancel=cancel, start=opts.start)
    log.append("fermat: " + result.summary(spec))
    return {key: idx for key in shapes if (idx := spec.index(key, result.perms)) is not None}


def combine(a, r, index, what):
    """a, b or c of one UNet key from its a and R (whole tensors, compute dtype) and π's indices."""
    if what == "a" or index is None:       # π = id: b = c = a exactly
        return a
    amp = (a - r).mul_(2.0).add_(r)                     # amp(a, R, 2) = R + 2·(a − R)
    b = apply_index(amp, index).mul_(0.5).add_(r, alpha=0.5)   # Rebasin(R, amp, 0.5)
    del amp
    return b if what == "b" else b.mul_(0.5).add_(a, alpha=0.5)
