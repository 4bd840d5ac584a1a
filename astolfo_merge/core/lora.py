"""LoRA / LyCORIS files as merge inputs: baked into a checkpoint at a strength, per block.

Recipe field (validated here, stored by the recipe module in `recipe.extra["loras"]`):

    "loras": [{"file": "x.safetensors", "strength": 0.85, "blocks": {"IN04": 0.5}, "when": "after"},
              {"file": "y.safetensors", "strength": 0.5, "when": "before", "models": ["a.safetensors"]}]

* `strength` (default 1): multiplier of the LoRA's own `alpha / rank`-scaled delta.
* `blocks`: per-block multipliers of `strength` (MBW names of arch.block_of; text encoders are BASE);
  blocks not listed keep 1.
* `when`: "after" (default) adds the delta to the merged result; "before" adds it to every pool member
  (or only to `models`) as the method reads it, so the merge sees the baked models.

Per key: W' = W + strength · block · (alpha / rank) · ΔW, computed in the compute dtype (fp64 by
default) row chunk by row chunk, never a whole delta in memory. Everything that can be wrong
(missing file, wrong architecture detected by shapes, unsupported LyCORIS type, unknown block) is
refused when the plan is built; module names that match no key are reported by name in the log.

Modules: lora_names (module name -> LDM key), lora_math (factors, delta rows, the per-key adders),
lora_synth (synthetic files), lora_cli (`bake`). For the tab: `list_loras(folder)`, `describe(header)`,
`validate_loras(doc["loras"])`; the XYZ axis `trials.with_lora_strength(recipe, value, index)`.
"""
from __future__ import annotations

import collections
import math
import os
from dataclasses import dataclass, field

from ..errors import ArchitectureError, CheckpointError, RecipeError
from ..io import arch as archmod
from ..io.header import check_file, read_header
from ..io.paths import lora_search_dirs
from ..io.reader import CheckpointReader
from .lora_math import TITLES, LoraBake, Module, group_modules
from .lora_names import Target, canonical_module_name, module_table
from .stages import LoraUse, Step, validate_loras

ARCHES = ("sd1", "sd2", "sdxl")
TRUE = ("true", "1", "yes")


# ---------------------------------------------------------------------------------------------
# Reading a LoRA file

@dataclass
class Fit:
    """How a LoRA's modules land on one (arch, scale) layout."""
    arch: str
    scale: int
    targets: dict = field(default_factory=dict)     # module name -> Target (names that fit)
    unmatched: list = field(default_factory=list)   # names that are no module of this architecture
    misfit: list = field(default_factory=list)      # (name, LDM key, delta shape, key shape)

    @property
    def title(self) -> str:
        return archmod.ARCH_TITLES[self.arch] + (f" (1/{self.scale} scale)" if self.scale > 1 else "")


class LoraFile:
    """A LoRA / LyCORIS file's header, grouped into modules (no tensor data read)."""

    def __init__(self, header):
        self.header = header
        self.path = header.path
        self.modules, self.unsupported, self.stray = group_modules(header.shapes)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def check(self):
        if self.unsupported:
            key, why = self.unsupported[0]
            raise CheckpointError(self.path, f"holds {why} tensors (e.g. '{key}'), which cannot be baked yet")
        for module in self.modules.values():
            module.check(self.path)

    def fit(self, arch: str, scale: int) -> Fit:
        table, lay = module_table(arch), archmod.layout(arch, scale)
        result = Fit(arch, scale)
        for name, module in self.modules.items():
            target = table.get(canonical_module_name(name))
            if target is None:
                result.unmatched.append(name)
                continue
            problem = _misfit(module, target, lay)
            if problem:
                result.misfit.append((name,) + problem)
            else:
                result.targets[name] = target
        return result

    def best_fit(self, prefer: str | None = None) -> Fit:
        """The (architecture, scale) most modules fit (ties: `prefer`, then the larger model)."""
        fits = [self.fit(a, s) for a in ARCHES for s in self.candidate_scales(a)]
        return max(fits, key=lambda f: (len(f.targets) - len(f.misfit), f.arch == prefer, -f.scale))

    def candidate_scales(self, arch: str, probes: int = 8) -> list:
        """Scales at which this LoRA's first module rows match `arch` (cheap: a few modules, full-size layout)."""
        table, full = module_table(arch), archmod.layout(arch)
        found = set()
        for name, module in self.modules.items():
            target = table.get(canonical_module_name(name))
            if target is None or target.weight is None or not module.delta_shape:
                continue
            shape = full[target.weight].shape
            rows = shape[1] if target.transpose else target.rows(shape)[1]
            found |= {s for s in archmod.SCALES if archmod.scale_shape((rows,), s)[0] == module.delta_shape[0]}
            probes -= 1
            if probes == 0:
                break
        return sorted(found) or [1]


def _misfit(module: Module, target: Target, lay: dict):
    """None if the module's delta fits its LDM key(s); else (key, delta shape, key shape)."""
    checks = []
    if module.has_weight:
        checks.append((target.weight, module.delta_shape, False))
    if module.bias_key:
        checks.append((target.bias, module.shapes["diff_b" if "diff_b" in module.keys else "b_norm"], True))
    for key, shape, is_bias in checks:
        if key is None or key not in lay:
            return (key or "(none)", tuple(shape or ()), ())
        key_shape = tuple(lay[key].shape)
        if not _fits(tuple(shape or ()), key_shape, target, is_bias):
            return (key, tuple(shape or ()), key_shape)
    return None


def _fits(shape, key_shape, target: Target, is_bias: bool) -> bool:
    if not shape or not key_shape:
        return False
    if target.transpose:
        return len(key_shape) == 2 and shape[0] == key_shape[1] and math.prod(shape[1:]) == key_shape[0]
    _first, rows = target.rows(key_shape)
    if shape[0] != rows or math.prod(shape[1:]) != math.prod(key_shape[1:]):
        return False
    if len(shape) > 2 and len(key_shape) > 2 and shape[2:] != key_shape[2:]:
        return False      # same element count but another kernel size
    return not is_bias or len(shape) == 1


def is_lora(shapes: dict) -> bool:
    modules, unsupported, _stray = group_modules(shapes)
    return bool(modules or unsupported)


def open_lora(path) -> LoraFile:
    """Read a LoRA file's header; refuses a file that holds no LoRA / LyCORIS tensors."""
    lora = LoraFile(read_header(path))
    if not lora.modules and not lora.unsupported:
        raise CheckpointError(lora.path, "is not a LoRA / LyCORIS file (no lora_up/lora_down, hada_, lokr_ or diff "
                                         "tensors); if it is a full checkpoint, put it in the pool instead")
    return lora


# ---------------------------------------------------------------------------------------------
# Describing a LoRA (inspect, the tab's list)

def _prediction(meta: dict):
    evidence = []
    pred = None
    if str(meta.get("ss_v_parameterization", "")).lower() in TRUE:
        pred, evidence = "v", ["ss_v_parameterization = True"]
    spec = str(meta.get("modelspec.prediction_type", "")).lower()
    if spec:
        evidence.append(f"modelspec.prediction_type = {spec}")
        pred = pred or ("v" if spec in ("v", "v_prediction", "v-prediction") else "epsilon")
    ztsnr = str(meta.get("ss_zero_terminal_snr", "")).lower() in TRUE
    if ztsnr:
        evidence.append("ss_zero_terminal_snr = True")
    return pred, ztsnr, evidence


def _kind(modules) -> str:
    algos = collections.Counter(m.algorithm for m in modules)
    if not algos:
        return "unsupported"
    if len(algos) > 1:
        return "mixed (" + ", ".join(f"{TITLES.get(a, a)} x{n}" for a, n in algos.most_common()) + ")"
    algo = next(iter(algos))
    if algo == "lora" and any(m.is_conv for m in modules):
        algo = "locon"
    return TITLES.get(algo, algo)


def describe(header, read_values: bool = True) -> dict | None:
    """What a LoRA / LyCORIS file is (None if it is not one): kind, ranks, components, architecture by
    shapes, prediction type from the training metadata, modules that match nothing."""
    if not is_lora(header.shapes):
        return None
    lora = LoraFile(header)
    modules, unsupported, stray = lora.modules, lora.unsupported, lora.stray
    meta = header.metadata or {}
    fit = lora.best_fit() if modules else None
    ranks = collections.Counter(m.rank for m in modules.values() if m.rank is not None and not m.is_conv)
    conv_ranks = collections.Counter(m.rank for m in modules.values() if m.rank is not None and m.is_conv)
    components = collections.Counter(t.component for t in (fit.targets.values() if fit else []))
    alphas = _alphas(header, modules) if read_values else []
    pred, ztsnr, evidence = _prediction(meta)
    info = {
        "kind": _kind(modules.values()), "modules": len(modules),
        "algorithms": dict(collections.Counter(m.algorithm for m in modules.values())),
        "ranks": sorted(ranks), "conv_ranks": sorted(conv_ranks), "alphas": alphas,
        "components": {c: components[c] for c in archmod.COMPONENTS if components[c]},
        "arch": fit.arch if fit and fit.targets else None, "title": fit.title if fit and fit.targets else "unknown",
        "scale": fit.scale if fit else None, "matched": len(fit.targets) if fit else 0,
        "unmatched": sorted((fit.unmatched + [m[0] for m in fit.misfit]) if fit else []),
        "unsupported": [f"{k} ({why})" for k, why in unsupported], "other_keys": stray,
        "prediction": pred, "ztsnr": ztsnr, "prediction_evidence": evidence,
        "base_model": meta.get("ss_base_model_version") or meta.get("ss_sd_model_name"),
        "network": meta.get("ss_network_module"), "name": meta.get("ss_output_name") or meta.get("modelspec.title"),
    }
    info["verdict"] = _verdict(info)
    info["lines"] = _lines(info)
    return info


def _alphas(header, modules) -> list:
    keys = [m.keys["alpha"] for m in modules.values() if "alpha" in m.keys]
    if not keys or header.format != "safetensors":
        return []
    with CheckpointReader(header.path, header) as reader:
        values = {round(float(reader.read(k).double().reshape(-1)[0]), 6) for k in keys if math.prod(header.tensors[k].shape) == 1}
    return sorted(values)


def _verdict(info) -> str:
    rank = f", rank {'/'.join(map(str, info['ranks']))}" if info["ranks"] else ""
    conv = f", conv rank {'/'.join(map(str, info['conv_ranks']))}" if info["conv_ranks"] else ""
    pred = ""
    if info["prediction"]:
        pred = f" · {info['prediction']}-prediction{' + ztSNR' if info['ztsnr'] else ''} (training metadata)"
    return (f"LoRA / LyCORIS file ({info['kind']}{rank}{conv}) for {info['title']}{pred}: not a checkpoint; "
            "bake it in with \"loras\" in a recipe or `bake`")


def _lines(info) -> list:
    comps = ", ".join(f"{c} {n}" for c, n in info["components"].items()) or "none"
    lines = [f"LoRA: {info['modules']} module(s), {info['matched']} match {info['title']} keys ({comps})"]
    if info["alphas"]:
        lines.append(f"LoRA alpha: {', '.join(f'{a:g}' for a in info['alphas'][:6])}")
    for label, key in (("base model", "base_model"), ("network", "network"), ("name", "name")):
        if info[key]:
            lines.append(f"LoRA {label}: {info[key]}")
    if info["prediction_evidence"]:
        lines.append("LoRA prediction: " + "; ".join(info["prediction_evidence"]))
    if info["unmatched"]:
        lines.append(f"LoRA modules matching no key ({len(info['unmatched'])}): " + ", ".join(info["unmatched"][:8]))
    if info["unsupported"]:
        lines.append(f"Unsupported tensors ({len(info['unsupported'])}): " + ", ".join(info["unsupported"][:3]))
    return lines


def list_loras(folder, recursive: bool = True) -> list:
    """The LoRA / LyCORIS files under `folder` for the tab's picker: [{name, path, size, kind, arch, title,
    ranks, prediction, error}], sorted by name; headers only (cheap for hundreds of files)."""
    found = []
    if not folder or not os.path.isdir(folder):
        return found
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            if not f.lower().endswith(".safetensors"):
                continue
            path = os.path.join(root, f)
            entry = {"name": os.path.relpath(path, folder).replace(os.sep, "/"), "path": path, "size": os.path.getsize(path)}
            try:
                info = describe(read_header(path), read_values=False)
            except CheckpointError as exc:
                entry["error"] = exc.problem
                found.append(entry)
                continue
            if info is None:
                continue
            entry.update({k: info[k] for k in ("kind", "arch", "title", "ranks", "conv_ranks", "prediction", "ztsnr")})
            found.append(entry)
        if not recursive:
            break
    return found


# ---------------------------------------------------------------------------------------------
# Baking: per-key adders attached to the plan

def find_lora(name, models_dir, where) -> str:
    """A LoRA file by name: absolute, in the models folder, in the WebUI's Lora / LyCORIS folders next to
    it, in $ASTOLFO_LORA_DIR, or relative to the working directory."""
    candidates = [name] if os.path.isabs(name) else [os.path.join(d, name) for d in lora_search_dirs(models_dir)] + [os.path.abspath(name)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    for path in candidates:   # a FIFO, a device, a socket: it exists, say what it is
        if os.path.exists(path) and not os.path.isdir(path):
            check_file(path)
    looked = ", ".join(dict.fromkeys(os.path.dirname(c) for c in candidates))
    raise RecipeError(where, f"LoRA file {name!r} not found (looked in {looked})")


def check_lora_arch(lora: LoraFile, arch: str, scale: int, where: str) -> Fit:
    """The LoRA's fit on the plan's architecture; refuses a LoRA made for another one (by shapes)."""
    fit = lora.fit(arch, scale)
    best = lora.best_fit(prefer=arch)
    if not fit.targets or (best.arch, best.scale) != (arch, scale) and len(best.targets) > len(fit.targets):
        made_for = best.title if best.targets else "no known architecture"
        raise ArchitectureError(f"{where}: {lora.name} is a LoRA for {made_for} ({len(best.targets)} of "
                                f"{len(lora.modules)} modules fit it, {len(fit.targets)} fit {fit.title}); "
                                f"the models are {fit.title}")
    if fit.misfit:
        name, key, got, want = fit.misfit[0]
        raise ArchitectureError(f"{where}: {lora.name} module '{name}' gives a delta of shape {list(got)} for "
                                f"'{key}' of shape {list(want)} ({len(fit.misfit)} module(s) do not fit {fit.title})")
    seen = {}
    for name, target in fit.targets.items():    # e.g. one layer spelled the diffusers and the LDM way
        other = seen.setdefault((target.weight, target.bias, target.part), name)
        if other != name:
            raise CheckpointError(lora.path, f"modules '{other}' and '{name}' both change '{target.weight or target.bias}'")
    return fit


def attach_loras(plan, models_dir=None) -> list:
    """Validate the recipe's `loras`, check each file against the plan's architecture and add the
    per-key steps to the plan's keys (`post` for "after", `pre` of the pool members for "before");
    returns the files as data (stages.LoraUse), which the plan's "bake" stage declares."""
    specs = validate_loras(plan.recipe.extra.get("loras"))
    by_key = {kp.key: kp for kp in plan.keys}
    names = [s.name for s in plan.sources]
    blocks_ok = set(archmod.block_names(plan.arch))
    uses = []
    for i, spec in enumerate(specs):
        where = f"loras[{i}]"
        bad = sorted(set(spec["blocks"]) - blocks_ok)
        if bad:
            raise RecipeError(f"{where}.blocks.{bad[0]}", f"{archmod.ARCH_TITLES[plan.arch]} has no block {bad[0]} "
                                                          f"(blocks: {', '.join(archmod.block_names(plan.arch))})")
        members = _members(spec, plan, names, where)
        lora = open_lora(find_lora(spec["file"], models_dir, f"{where}.file"))
        lora.check()
        fit = check_lora_arch(lora, plan.arch, plan.scale, where)
        bake = LoraBake(lora, fit.targets)
        changed, absent = 0, []
        for key in bake.by_key:
            kp = by_key.get(key)
            if kp is None:
                absent.append(key)
                continue
            multiplier = spec["strength"] * spec["blocks"].get(archmod.block_of(key, plan.arch), 1.0)
            if multiplier == 0.0:
                continue
            changed += _hang(kp, Step("lora", i, multiplier), spec["when"], members, plan)
        uses.append(LoraUse(where, lora.path, spec["when"], dict(fit.targets)))
        _log(plan, lora, fit, spec, where, changed, absent)
    return uses


def lora_bake(use: LoraUse) -> LoraBake:
    """The delta adder of a planned LoRA file, in the process that runs the keys."""
    return LoraBake(LoraFile(read_header(use.path)), use.targets)


def _members(spec, plan, names, where):
    if spec["when"] != "before":
        return None
    members = spec["models"] or None
    for m in members or []:
        if m not in names:
            raise RecipeError(f"{where}.models", f"{m!r} is not one of the recipe's models ({', '.join(names)})")
    return set(members) if members else None


def _hang(kp, step, when, members, plan) -> int:
    if when == "after":
        kp.post.append(step)
        return 1
    if kp.action == "copy":
        if members is None or plan.sources[kp.source].name in members:
            kp.post.append(step)
            return 1
        return 0
    hung = 0
    for source in dict.fromkeys(kp.pool):     # pool reads only: the base (kp.base) is never changed
        if members is None or plan.sources[source].name in members:
            kp.pre.setdefault(source, []).append(step)
            hung = 1
    return hung


def _log(plan, lora, fit, spec, where, changed, absent):
    info = f"{spec['strength']:g}" + (f", blocks {spec['blocks']}" if spec["blocks"] else "")
    when = "into the merged result" if spec["when"] == "after" else \
        "into " + (", ".join(spec["models"]) if spec["models"] else "each pool member") + " before the merge"
    plan.log.append(f"{where} {lora.name}: {_kind(lora.modules.values())}, {len(fit.targets)} module(s) baked at "
                    f"strength {info} {when}; {changed} key(s) changed")
    if fit.unmatched:
        plan.log.append(f"{where} {lora.name}: {len(fit.unmatched)} module(s) match no {fit.title} key and are NOT "
                        f"baked: {', '.join(sorted(fit.unmatched))}")
    if lora.stray:
        plan.log.append(f"{where} {lora.name}: {len(lora.stray)} tensor(s) that are no LoRA factor are ignored: "
                        f"{', '.join(lora.stray)}")
    if absent:
        plan.log.append(f"{where} {lora.name}: {len(absent)} key(s) it changes are in no input and are skipped: "
                        f"{', '.join(absent)}")
    pred, ztsnr, _evidence = _prediction(lora.header.metadata or {})
    if pred and pred != {"edm-v": "v", "edm": "epsilon"}.get(plan.prediction, plan.prediction):
        plan.log.append(f"{where} {lora.name}: trained for {pred}-prediction, the models are {plan.prediction}")
