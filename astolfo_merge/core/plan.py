"""From a recipe to a plan: resolve files, identify every input, choose per key what to do.

Everything that can be wrong with the inputs is found here, before any tensor is read: missing
files, mixed architectures or prediction types, mis-shaped keys (plan_inputs.py). The plan lists
every output key with its source(s), so its header (and the output size) is known up front.

The plan is plain data (plan_data.py): no closures or open files, so it pickles to worker
processes, and the same recipe and models folder rebuild the same plan.
"""
from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..io import arch as archmod
from ..io.header import OUTPUT_DTYPES
from ..io.reader import ensure_open_files
from ..methods import get_method
from .fermat import fermat_stages
from .lora import attach_loras
from .plan_data import KeyPlan, Plan, assign_spans, key_seed
from .plan_inputs import (
    check_compatible,
    component_rules,
    field_of,
    input_files,
    load_source,
    log_quantized,
    output_path,
    refuse_input_as_output,
    resolve_file,
)
from .recipe import Recipe, check_block_names
from .stages import LORAS, Stage, prepare_result

MAX_MARKER_BYTES = 1024 ** 2         # v_pred / ztsnr markers and schedule buffers are a few KiB at most


def build_plan(recipe: Recipe, models_dir: str | None = None, output: str | None = None) -> Plan:
    names = recipe.files()
    sources, index = [], {}
    for name in names:
        path = resolve_file(name, models_dir, field_of(recipe, name))
        index[name] = len(sources)
        sources.append(load_source(name, path))
    ensure_open_files(len(sources))   # before any work: the merge holds every input open at once
    check_compatible(recipe, sources, index)
    first = sources[index[recipe.pool[0]]]
    plan = Plan(recipe, first.identity.arch, first.identity.scale, first.identity.prediction, sources, [],
                output_path(recipe, models_dir, output))
    check_block_names(recipe, plan.arch)
    rules = component_rules(recipe)
    log_quantized(plan)
    _plan_keys(plan, rules, index)
    loras = attach_loras(plan, models_dir) if recipe.extra.get("loras") else []
    for kp in plan.keys:
        kp.seed = key_seed(recipe.seed, kp.key)
    assign_spans(plan.keys)
    plan.stages = _stages(plan, loras)
    plan.inputs = input_files(plan, models_dir)
    refuse_input_as_output(plan, plan.output)
    return plan


def _stages(plan: Plan, loras: list) -> list:
    """The pipeline: the LoRA files to bake (a prepare may read baked inputs), each used method's
    whole-plan prepare, then the key stages (the output's keys; with "fermat", the a -> b -> c
    stages instead)."""
    stages = [Stage("bake", LORAS, result=LORAS, loras=loras)] if loras else []
    stages += [Stage("prepare", prepare_result(name), result=prepare_result(name), method=name)
               for name in dict.fromkeys(kp.method for kp in plan.keys if kp.action == "merge")
               if get_method(name).prepare is not None]
    if plan.recipe.extra.get("fermat"):
        keyed = fermat_stages(plan, plan.compute_dtype)
        for stage in keyed:       # a stage's keys have their own layout (the temp a: compute dtype)
            if stage.keys is not None:
                assign_spans(stage.keys)
        return stages + keyed
    return stages + [Stage("keys", "output")]

def _out_dtype(recipe, info_dtype, is_float, component):
    return OUTPUT_DTYPES[recipe.dtype_of(component)] if is_float else info_dtype


def _plan_keys(plan: Plan, rules: dict, index: dict):
    recipe, arch, scale = plan.recipe, plan.arch, plan.scale
    lay = archmod.layout(arch, scale)
    position_key = archmod.POSITION_IDS.get(arch)
    involved = [plan.sources[i] for i in sorted({index[n] for n in recipe.files()})]
    notes = Notes()
    for key, spec in lay.items():
        comp = spec.component
        if key == position_key:
            if recipe.position_ids == "reset":
                plan.keys.append(KeyPlan(key, spec.shape, torch.int64, "position_ids", comp, note="int64 0..76"))
            continue
        holders = [i for i, s in enumerate(plan.sources) if s.has(key)]
        if not holders:
            if not spec.optional:
                notes.add(comp, key, "no input has them; left out (repair the inputs first)")
            continue
        rule = rules[comp]
        kp = _plan_one(plan, key, spec, comp, rule, index, notes)
        plan.keys.append(kp)
    _plan_extras(plan, involved)
    plan.log += notes.lines(lay)
    for comp in archmod.COMPONENTS:
        if comp in {s.component for s in lay.values()}:
            rule = rules[comp]
            plan.component_summary[comp] = (f"take from {rule.take}" if rule.take
                                            else f"{rule.method} over {len(rule.pool)} model(s)")


class Notes:
    """Plan notes about keys some input lacks, one line per component and situation (not per key:
    a file without its VAE would otherwise give 248 lines)."""

    EXAMPLES = 2

    def __init__(self):
        self._keys: dict = {}        # (component, what) -> [keys]

    def add(self, comp: str, key: str, what: str):
        self._keys.setdefault((comp, what), []).append(key)

    def lines(self, layout: dict) -> list:
        sizes = {}
        for spec in layout.values():
            sizes[spec.component] = sizes.get(spec.component, 0) + 1
        out = []
        for (comp, what), keys in self._keys.items():
            shown = ", ".join(keys[:self.EXAMPLES]) + (f", … (+{len(keys) - self.EXAMPLES})" if len(keys) > self.EXAMPLES else "")
            out.append(f"{comp.upper()}: {len(keys)} of {sizes.get(comp, len(keys))} key(s) ({shown}): {what}")
        return out


def _plan_one(plan, key, spec, comp, rule, index, notes) -> KeyPlan:
    recipe = plan.recipe
    sources = plan.sources

    def stored_info(i):
        return sources[i].header.tensors[sources[i].keys[key]]

    if rule.take:
        name = recipe.base if rule.take == "base" else rule.take
        i = index[name]
        if not sources[i].has(key):
            fallback = next((j for j, s in enumerate(sources) if s.has(key)), None)
            notes.add(comp, key, f"{name} lacks them; taken from {sources[fallback].name}")
            i = fallback
        info = stored_info(i)
        return KeyPlan(key, spec.shape, _out_dtype(recipe, info.dtype, info.is_float, comp), "copy", comp,
                       source=i, reshape_from=_reshape(sources[i], key, spec))
    method = get_method(rule.method)
    base = index[rule.base] if rule.base else None
    pool, stand_in, without = [], [], []
    for name in rule.pool:
        i = index[name]
        if sources[i].has(key):
            pool.append(i)
        elif base is not None and sources[base].has(key):
            pool.append(base)
            stand_in.append(name)
        else:
            without.append(name)
    _note_contributors(notes, comp, key, len(rule.pool), stand_in, without, sources[base].name if base is not None else None)
    first = pool[0] if pool else next(i for i, s in enumerate(sources) if s.has(key))
    info = stored_info(first)
    out_dtype = _out_dtype(recipe, info.dtype, info.is_float, comp)
    block = archmod.block_of(key, plan.arch)
    if not info.is_float:
        return KeyPlan(key, spec.shape, out_dtype, "copy", comp, source=first, note="integer tensor: never merged")
    base_ok = base is not None and sources[base].has(key)
    if len(pool) < method.min_models or (method.needs_base and not base_ok) or \
            (method.max_models is not None and len(pool) != len(rule.pool)):
        why = "the base lacks them" if method.needs_base and not base_ok else \
            f"only {len(pool)} of {len(rule.pool)} inputs have them"
        notes.add(comp, key, f"{why}; copied from {sources[first].name}")
        return KeyPlan(key, spec.shape, out_dtype, "copy", comp, source=first, reshape_from=_reshape(sources[first], key, spec))
    params, block_weight = dict(rule.params), None
    if rule.blocks and method.block_param and block in rule.blocks:
        params[method.block_param] = block_weight = rule.blocks[block]
    return KeyPlan(key, spec.shape, out_dtype, "merge", comp, block=block, method=rule.method, params=params,
                   pool=pool, base=base if method.needs_base else None, block_weight=block_weight)


def _note_contributors(notes, comp, key, n, stand_in, without, base_name):
    """Note a key that not every pool input has: who lacks it, and what stands in."""
    if stand_in:
        notes.add(comp, key, f"{', '.join(stand_in)} lack(s) them; filled from the base {base_name} "
                             f"({n - len(stand_in) - len(without)} of {n} inputs have their own)")
    if without:
        notes.add(comp, key, f"{', '.join(without)} lack(s) them and there is no base to fill from; "
                             "merged from the inputs that have them")


def _reshape(source, key, spec):
    shape = source.shape(key)
    return shape if shape != spec.shape else None


def _plan_extras(plan: Plan, involved):
    """Markers and schedule buffers are carried, never merged; EMA and unknown keys are dropped (logged)."""
    recipe = plan.recipe
    seen = set()
    pool_names = set(recipe.pool) | ({recipe.base} if recipe.base else set())
    ordered = [i for i, s in enumerate(plan.sources) if s.name in pool_names]
    for i in ordered:
        src = plan.sources[i]
        for key in src.identity.markers + src.identity.schedule:
            if key in seen:
                continue
            seen.add(key)
            info = src.header.tensors[src.keys[key]]
            if info.nbytes > MAX_MARKER_BYTES:
                raise CheckpointError(src.path, f"marker / schedule buffer '{src.keys[key]}' is {info.nbytes} bytes; such "
                                                f"keys are tiny (the limit is {MAX_MARKER_BYTES}): not a real checkpoint?")
            plan.keys.append(KeyPlan(key, info.shape, info.dtype, "copy", archmod.OTHER, source=i,
                                     note="marker / schedule buffer: copied, never merged"))
    dropped = {}
    for src in involved:
        for kind, keys in (("EMA", src.identity.ema), ("unknown", src.identity.unknown), ("junk", src.identity.junk)):
            if keys:
                dropped.setdefault(kind, []).append(f"{src.name}: {len(keys)}")
    for kind, items in dropped.items():
        plan.log.append(f"dropped {kind} keys ({'; '.join(items)})")
