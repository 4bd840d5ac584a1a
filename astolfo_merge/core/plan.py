"""From a recipe to a plan: resolve files, identify every input, choose per key what to do.

Everything that can be wrong with the inputs is found here, before any tensor is read: missing
files, mixed architectures or prediction types, mis-shaped keys. The plan lists every output key
with its source(s), so its header (and the output size) is known up front.

A plan is plain data (`Plan.to_data()`): per key its dtype, shape, byte range, sources, method,
resolved params, block weight and seed, and the pipeline of stages the merge runs (stages.py) —
no closures or open files, so it pickles to worker processes, and the same recipe and models
folder rebuild the same plan.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import torch

from ..errors import ArchitectureError, CheckpointError, MemoryBudgetError, RecipeError
from ..io import arch as archmod
from ..io.header import NAME_OF, OUTPUT_DTYPES, Header, check_file, read_header
from ..io.reader import ensure_open_files
from ..methods import get_method
from ..methods.shapes import key_peak_bytes
from .fermat import fermat_stages
from .lora import attach_loras, find_lora
from .recipe import ComponentRule, Recipe, check_block_names
from .stages import LORAS, Stage, prepare_result

GIB = 1024 ** 3
OVERHEAD_BYTES = 256 * 1024 ** 2     # interpreter, torch, buffers of the writer
MAX_MARKER_BYTES = 1024 ** 2         # v_pred / ztsnr markers and schedule buffers are a few KiB at most


@dataclass
class Source:
    """One input file: header + identification. `keys` maps canonical key -> stored key."""
    name: str
    path: str
    header: Header
    identity: archmod.Identity
    keys: dict = field(default_factory=dict)

    def has(self, key) -> bool:
        return key in self.keys

    def shape(self, key):
        stored = self.keys[key]
        return self.header.tensors[stored].shape


@dataclass
class KeyPlan:
    key: str
    shape: tuple
    dtype: torch.dtype            # output dtype
    action: str                   # merge | copy | position_ids | zeros
    component: str = archmod.OTHER
    block: str | None = None
    method: str | None = None
    params: dict = field(default_factory=dict)
    pool: list = field(default_factory=list)     # source indices contributing
    base: int | None = None
    source: int | None = None    # for copy
    reshape_from: tuple | None = None
    note: str = ""
    # Steps (stages.Step, data) applied to every produced chunk, in order, in the compute dtype
    # before the cast to `dtype` (e.g. a LoRA bake-in adds its delta here, Fermat writes c).
    post: list = field(default_factory=list)
    # Steps applied to the inputs: source index -> [Step], applied to what the method reads of that
    # source as a pool member (compute dtype; never to base reads), e.g. a LoRA baked into it first.
    pre: dict = field(default_factory=dict)
    seed: int | None = None               # key_seed(recipe seed, key): the seeded methods' RNG for this key
    block_weight: float | None = None     # the MBW block value that set params[method.block_param], if any
    span: tuple | None = None             # (begin, end) byte offsets in the output's data section

    def to_data(self) -> dict:
        """The key as JSON-able data (see Plan.to_data)."""
        out = {"key": self.key, "shape": list(self.shape), "dtype": NAME_OF[self.dtype], "action": self.action,
               "component": self.component, "span": list(self.span) if self.span else None, "seed": self.seed}
        for name in ("block", "method", "base", "source", "note", "block_weight"):
            value = getattr(self, name)
            if value not in (None, ""):
                out[name] = value
        if self.params:
            out["params"] = dict(self.params)
        if self.pool:
            out["pool"] = list(self.pool)
        if self.reshape_from:
            out["reshape_from"] = list(self.reshape_from)
        if self.post:
            out["post"] = [step.to_data() for step in self.post]
        if self.pre:
            out["pre"] = {str(src): [step.to_data() for step in steps] for src, steps in self.pre.items()}
        return out


def key_seed(seed: int, key: str) -> int:
    """Per-key seed: independent of key order and of what runs the key."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def assign_spans(keys) -> int:
    """Give each key its byte range in the data section, in key order (as the writer lays them out);
    returns the data size."""
    at = 0
    for kp in keys:
        size = math.prod(kp.shape) * kp.dtype.itemsize
        kp.span = (at, at + size)
        at += size
    return at


@dataclass
class Plan:
    recipe: Recipe
    arch: str
    scale: int
    prediction: str
    sources: list
    keys: list
    output: str | None
    log: list = field(default_factory=list)
    component_summary: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)    # (recipe field, path) of every file read, LoRAs included
    stages: list = field(default_factory=list)    # the pipeline (stages.Stage), in order

    def pipeline(self) -> list:
        """The stages to run: the declared ones, or (a plan put together by hand) its keys into its output."""
        return self.stages or [Stage("keys", "output")]

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.recipe.precision == "fp64" else torch.float32

    def to_data(self) -> dict:
        """The whole plan as JSON-able data: what a merge will do, key by key and stage by stage."""
        keys = [kp.to_data() for kp in self.keys]
        return {"recipe": self.recipe.to_dict(), "arch": self.arch, "scale": self.scale, "prediction": self.prediction,
                "output": self.output, "sources": [{"name": s.name, "path": s.path} for s in self.sources],
                "keys": keys, "stages": [st.to_data(lambda ks: [kp.to_data() for kp in ks]) for st in self.stages],
                "log": list(self.log)}

    @property
    def output_bytes(self) -> int:
        return sum(math.prod(k.shape) * k.dtype.itemsize for k in self.keys)

    def peak_bytes(self, budget_bytes: int) -> int:
        """Predicted peak private memory with this budget (chunked methods fill at most the budget)."""
        need = 0
        for kp in self.keys:
            if kp.action != "merge":
                continue
            need = max(need, key_peak_bytes(get_method(kp.method).shape, kp.shape, len(kp.pool), kp.params,
                                             min(budget_bytes, self._chunk_floor())))
        return OVERHEAD_BYTES + max(min(budget_bytes, self._chunk_floor()), need)

    def _chunk_floor(self) -> int:
        return 64 * 1024 ** 2

    def check_budget(self, memory_gb: float):
        budget = int(memory_gb * GIB)
        peak = self.peak_bytes(budget)
        if peak > budget + OVERHEAD_BYTES:
            raise MemoryBudgetError(f"this merge needs about {peak / GIB:.2f} GiB but the budget is "
                                    f"{memory_gb:.2f} GiB; raise --memory-gb to at least {math.ceil(peak / GIB * 10) / 10}")
        return peak


def resolve_file(name: str, models_dir: str | None, field_name: str) -> str:
    candidates = []
    if os.path.isabs(name):
        candidates.append(name)
    else:
        if models_dir:
            candidates.append(os.path.join(models_dir, name))
        candidates.append(os.path.abspath(name))
    for path in candidates:
        if os.path.isfile(path):
            return path
    if any(os.path.isdir(p) for p in candidates):
        raise RecipeError(field_name, f"{name!r} is a directory, not a checkpoint file")
    for path in candidates:   # a FIFO, a device, a socket: it exists, say what it is
        if os.path.exists(path):
            check_file(path)
    where = f" in {models_dir}" if models_dir else ""
    raise RecipeError(field_name, f"model file {name!r} not found{where}")


def load_source(name, path) -> Source:
    header = read_header(path)
    ident = archmod.identify(header.shapes, header.metadata)
    if ident.refusal:
        raise CheckpointError(path, ident.refusal)
    keys = {ident.canonical(k): k for k in header.tensors}
    return Source(name, path, header, ident, keys)


def build_plan(recipe: Recipe, models_dir: str | None = None, output: str | None = None) -> Plan:
    names = recipe.files()
    sources, index = [], {}
    for name in names:
        path = resolve_file(name, models_dir, _field_of(recipe, name))
        index[name] = len(sources)
        sources.append(load_source(name, path))
    ensure_open_files(len(sources))   # before any work: the merge holds every input open at once
    _check_compatible(recipe, sources, index)
    first = sources[index[recipe.pool[0]]]
    plan = Plan(recipe, first.identity.arch, first.identity.scale, first.identity.prediction, sources, [],
                _output_path(recipe, models_dir, output))
    check_block_names(recipe, plan.arch)
    rules = _component_rules(recipe)
    _log_quantized(plan)
    _plan_keys(plan, rules, index)
    loras = attach_loras(plan, models_dir) if recipe.extra.get("loras") else []
    for kp in plan.keys:
        kp.seed = key_seed(recipe.seed, kp.key)
    assign_spans(plan.keys)
    plan.stages = _stages(plan, loras)
    plan.inputs = _input_files(plan, models_dir)
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


def _input_files(plan: Plan, models_dir=None) -> list:
    """(field, path) of every file the plan reads: pool, base, component files and LoRA files."""
    files = [(_field_of(plan.recipe, s.name), s.path) for s in plan.sources]
    loras = plan.recipe.extra.get("loras") or []
    if loras:
        for i, entry in enumerate(loras):
            if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                try:
                    files.append((f"loras[{i}].file", find_lora(entry["file"], models_dir, f"loras[{i}].file")))
                except (RecipeError, CheckpointError, OSError):
                    continue
    return files


def refuse_input_as_output(plan: Plan, output):
    """An output that is one of the plan's inputs (same real path, or the same file through a hard
    link) is refused, whatever the overwrite flag: a merge never replaces what it reads."""
    if not output:
        return
    real = os.path.realpath(output)
    try:
        st = os.stat(real)
        ident = (st.st_dev, st.st_ino)
    except OSError:
        ident = None
    for where, path in plan.inputs or _input_files(plan):
        same = os.path.realpath(path) == real
        if not same and ident is not None:
            try:
                st = os.stat(path)
                same = (st.st_dev, st.st_ino) == ident
            except OSError:
                pass
        if same:
            raise RecipeError("output", f"{output} is also an input ({where}: {os.path.basename(path)}); "
                                        "a merge never replaces its own input: choose another output name")


def _field_of(recipe: Recipe, name: str) -> str:
    if name in recipe.pool:
        return f"pool[{recipe.pool.index(name)}]"
    if name == recipe.base:
        return "base"
    for comp, rule in recipe.components.items():
        if name == rule.take:
            return f"components.{comp}.take"
        if rule.pool and name in rule.pool:
            return f"components.{comp}.pool"
        if name == rule.base:
            return f"components.{comp}.base"
    return "(file)"


def _output_path(recipe, models_dir, output):
    if output:
        return os.path.abspath(output)
    if recipe.output:
        return os.path.join(models_dir or os.getcwd(), recipe.output)
    return None


def _check_compatible(recipe, sources, index):
    ref = sources[index[recipe.pool[0]]]
    for src in sources:
        ident = src.identity
        if ident.scale != ref.identity.scale or (ident.arch != ref.identity.arch
                                                 and ref.identity.arch not in ident.candidates):
            raise ArchitectureError(
                f"cannot merge {ref.name} ({ref.identity.title}) with {src.name} ({ident.title}): "
                "all inputs must have the same architecture")
        for key, stored in src.keys.items():
            spec = archmod.layout(ident.arch, ident.scale).get(key)
            shape = src.header.tensors[stored].shape
            if spec and shape != spec.shape and key not in ident.reshapes:
                raise ArchitectureError(f"{src.name}: key '{key}' has shape {list(shape)}, expected "
                                        f"{list(spec.shape)} for {ident.title} (inpainting or another variant?)")
    for comp, rule in _component_rules(recipe).items():
        base = sources[index[rule.base]] if rule.base else None
        for name in rule.pool or []:
            status = sources[index[name]].identity.components.get(comp)
            if status is None or status.status != "absent":
                continue
            if comp == archmod.UNET:
                raise ArchitectureError(f"{name} has no UNET (a component-only file?); it cannot be a pool member: "
                                        "use it as components.<vae|te0|te1>.take instead")
            if base is None or base.identity.components.get(comp).status == "absent":
                raise ArchitectureError(f"{name} has no {comp.upper()} and there is no base to fill it from: add a "
                                        f"base, or set components.{comp}.take / components.{comp}.pool")
    preds = {(s.identity.prediction, s.identity.ztsnr) for s in sources if s.name in recipe.pool or s.name == recipe.base}
    if len(preds) > 1 and not recipe.allow_mixed_prediction:
        detail = ", ".join(f"{s.name}: {s.identity.prediction}{'+ztsnr' if s.identity.ztsnr else ''}" for s in sources)
        raise ArchitectureError(f"inputs disagree on the prediction type ({detail}); set "
                                "'allow_mixed_prediction': true to merge them anyway")


def _component_rules(recipe: Recipe) -> dict:
    rules = {}
    for comp in archmod.COMPONENTS:
        rule = recipe.components.get(comp) or ComponentRule()
        if rule.take:
            rules[comp] = rule
            continue
        method = rule.method or recipe.method
        rules[comp] = ComponentRule(
            method=method, params=rule.params if rule.params is not None else recipe.params,
            pool=rule.pool or recipe.pool, base=rule.base or recipe.base,
            blocks=rule.blocks if rule.blocks is not None else (recipe.blocks if method == recipe.method else {}))
    return rules


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


def _log_quantized(plan: Plan):
    """fp8_scaled inputs: their weights are read as weight x scale; scale and marker keys are not written."""
    for src in plan.sources:
        if src.header.quantization:
            plan.log.append(f"{src.name}: {src.header.quantization}, read as weight x scale; its "
                            f"{len(src.header.aux)} scale / marker key(s) are not written")
