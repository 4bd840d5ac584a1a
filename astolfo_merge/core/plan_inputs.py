"""A plan's input files: found by name, identified, checked to merge together (architecture, shapes,
components, prediction type) before any tensor is read; the output path, never one of them.
"""
from __future__ import annotations

import os

from ..errors import ArchitectureError, CheckpointError, RecipeError
from ..io import arch as archmod
from ..io.header import check_file, read_header
from .lora import find_lora
from .plan_data import Plan, Source
from .recipe import ComponentRule, Recipe


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


def input_files(plan: Plan, models_dir=None) -> list:
    """(field, path) of every file the plan reads: pool, base, component files and LoRA files."""
    files = [(field_of(plan.recipe, s.name), s.path) for s in plan.sources]
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
    for where, path in plan.inputs or input_files(plan):
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


def field_of(recipe: Recipe, name: str) -> str:
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


def output_path(recipe, models_dir, output):
    if output:
        return os.path.abspath(output)
    if recipe.output:
        return os.path.join(models_dir or os.getcwd(), recipe.output)
    return None


def check_compatible(recipe, sources, index):
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
    for comp, rule in component_rules(recipe).items():
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


def component_rules(recipe: Recipe) -> dict:
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


def log_quantized(plan: Plan):
    """fp8_scaled inputs: their weights are read as weight x scale; scale and marker keys are not written."""
    for src in plan.sources:
        if src.header.quantization:
            plan.log.append(f"{src.name}: {src.header.quantization}, read as weight x scale; its "
                            f"{len(src.header.aux)} scale / marker key(s) are not written")
