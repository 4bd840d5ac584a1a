"""Diagnosis and repair of pruned / "BROKEN" checkpoints (REPAIR.md §6–§11).

Everything is planned from the header (key -> shape, dtype), so tests can feed synthetic maps:
- `diagnose(header, ident)`: the full report of §11 (severity, gaps in words, position ids,
  non-weight keys, metadata, how the model-toolkit and A1111 will see the file). Only the one
  small position-ids tensor is read.
- `toolkit_view(shapes, scale)`: the original model-toolkit's detection rules (§8), reproduced on
  the header map, so we can say "the toolkit will call this VAE-v1-BROKEN" and why.
- `plan_repair` / `run_repair`: fill, never strip (§10). Output key set = the canonical key set of
  the detected architecture + the file's markers; the file's own tensors are copied bit for bit,
  gaps come from a base (cast to the file's dominant float dtype), position ids are rewritten as
  int64 0..76. Written key by key through the atomic streaming writer.
"""
from __future__ import annotations

import collections
import functools
import json
import math
import os
from dataclasses import dataclass, field

import torch

from . import __version__
from . import arch as archmod
from .arch import POSITION_IDS, TE0, TE1, UNET, UNET_PREFIX, VAE
from .checkpoint import FLOAT_DTYPES, NAME_OF, CheckpointReader, HashCache, SafetensorsWriter, read_header
from .errors import ArchitectureError, AstolfoError, CheckpointError

OK, FIXABLE, NEEDS_BASE, NOT_REPAIRABLE, NOT_SD = (
    "OK", "fixable-without-base", "needs-base", "not-repairable", "not an SD checkpoint")
SEVERITIES = (OK, FIXABLE, NEEDS_BASE, NOT_REPAIRABLE, NOT_SD)
COMPONENT_NAMES = {UNET: "UNET", TE0: "TE0", TE1: "TE1", VAE: "VAE"}
CHUNK_BYTES = 64 * 1024 ** 2          # one read/write chunk of the repair (bounded memory)
FILLED_KEYS_IN_RECORD = 32            # the metadata lists the filled keys when there are at most this many
NOTABLE_METADATA = ("modelspec.architecture", "modelspec.prediction_type", "modelspec.title",
                    "ss_base_model_version", "ss_sd_model_name", "sd_merge_recipe", "sd_merge_models",
                    "mecha_recipe", "format", "astolfo_merge_recipe", "astolfo_merge_repair")
FAMILY_WORDS = {"pony": "Pony", "illustrious": "Illustrious", "noob": "NoobAI", "animagine": "Animagine",
                "juggernaut": "Juggernaut", "playground": "Playground"}


def nbytes(info) -> int:
    """Bytes of one tensor from its header entry (without allocating anything)."""
    return math.prod(info.shape) * info.dtype.itemsize


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return ""


def _short(key: str) -> str:
    """A key without its component prefix (for one-line reports)."""
    for prefix in (UNET_PREFIX, "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                   "conditioner.embedders.1.model.", "cond_stage_model.transformer.text_model.",
                   "cond_stage_model.model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _first(items, n=5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", … (+{len(items) - n})" if len(items) > n else "")


# =============================================================================================
# The original model-toolkit's view (REPAIR.md §8)

_TK_UNET = "model.diffusion_model."
_TK_PREFIX = {
    "sd1-te0": "cond_stage_model.transformer.text_model.", "nai-te0": "cond_stage_model.transformer.",
    "sd2-te": "cond_stage_model.model.", "xl-te0": "conditioner.embedders.0.transformer.text_model.",
    "xl-te1": "conditioner.embedders.1.model.", "refiner-te": "conditioner.embedders.0.model.",
    "vae": "first_stage_model.", "ema": "model_ema.diffusion_model",
}
# (name, classes, prefixed) in the toolkit's own order; max() ties resolve by this order, as there.
_TK_ARCHITECTURES = [
    ("UNET-v1", ("UNET-v1",), False), ("UNET-v1-Pix2Pix", ("UNET-v1-Pix2Pix",), False),
    ("UNET-v2", ("UNET-v2",), False), ("UNET-XL", ("UNET-XL",), False), ("VAE-v1", ("VAE-v1",), False),
    ("CLIP-v1", ("CLIP-v1",), False), ("CLIP-v2", ("CLIP-v2",), False), ("CLIP-XL", ("CLIP-XL",), False),
    ("CLIP-XL-AUX", ("CLIP-XL-AUX",), False),
    ("SD-v1", ("UNET-v1", "VAE-v1", "CLIP-v1"), True),
    ("SD-v1-Pix2Pix", ("UNET-v1-Pix2Pix", "VAE-v1", "CLIP-v1"), True),
    ("SD-v2", ("UNET-v2", "VAE-v1", "CLIP-v2"), True),
    ("SD-XL", ("UNET-XL", "VAE-v1", "CLIP-XL", "CLIP-XL-AUX"), True),
    ("EMA-v1", ("EMA-UNET-v1",), True),
    ("UNET-v1-BROKEN", ("UNET-v1",), True), ("UNET-v1-Pix2Pix-BROKEN", ("UNET-v1-Pix2Pix",), True),
    ("UNET-v2-BROKEN", ("UNET-v2",), True), ("VAE-v1-BROKEN", ("VAE-v1",), True),
    ("CLIP-v1-BROKEN", ("CLIP-v1",), True), ("CLIP-v2-BROKEN", ("CLIP-v2",), True),
]
_TK_FULL = {"sd1": "SD-v1", "sd2": "SD-v2", "sdxl": "SD-XL"}
_TK_PARTS = {"sd1": ("UNET-v1-SD", "VAE-v1-SD", "CLIP-v1-SD"), "sd2": ("UNET-v2-SD", "VAE-v1-SD", "CLIP-v2-SD"),
             "sdxl": ("UNET-XL-SD", "VAE-v1-SD", "CLIP-XL-SD", "CLIP-XL-AUX-SD")}


@dataclass(frozen=True)
class _TkComponent:
    cls: str
    prefix: str
    keys: frozenset          # (relative key, shape)


def _relative(arch, component, prefix, scale, keep=lambda key: True) -> frozenset:
    return frozenset((k[len(prefix):], spec.shape) for k, spec in archmod.layout(arch, scale).items()
                     if spec.component == component and k.startswith(prefix) and keep(k))


def _in_channels(keys: frozenset, channels: int) -> frozenset:
    """The same UNET with `channels` latent inputs (inpainting 9, instruct-pix2pix 8)."""
    out = set()
    for key, shape in keys:
        if key == "input_blocks.0.0.weight":
            shape = (shape[0], channels) + shape[2:]
        out.add((key, shape))
    return frozenset(out)


@functools.lru_cache(maxsize=None)
def _toolkit_components(scale: int) -> dict:
    """The toolkit's component lists, rebuilt from our layouts (its .txt files list the same pairs)."""
    p = _TK_PREFIX
    unet1 = _relative("sd1", UNET, _TK_UNET, scale)
    unet2 = _relative("sd2", UNET, _TK_UNET, scale)
    clip1 = _relative("sd1", TE0, p["sd1-te0"], scale)
    clip2 = _relative("sd2", TE1, p["sd2-te"], scale)
    sd2_optional = {k for k, s in archmod.layout("sd2", scale).items() if s.optional}
    xl_te1 = _relative("sdxl", TE1, p["xl-te1"], scale)
    return {
        "UNET-v1-SD": _TkComponent("UNET-v1", _TK_UNET, unet1),
        "UNET-v1-EMA": _TkComponent("EMA-UNET-v1", p["ema"], frozenset((k.replace(".", ""), s) for k, s in unet1)),
        "UNET-v1-Inpainting": _TkComponent("UNET-v1", _TK_UNET, _in_channels(unet1, 9)),
        "UNET-v1-Pix2Pix": _TkComponent("UNET-v1-Pix2Pix", _TK_UNET, _in_channels(unet1, 8)),
        "UNET-v2-SD": _TkComponent("UNET-v2", _TK_UNET, unet2),
        "UNET-v2-Inpainting": _TkComponent("UNET-v2", _TK_UNET, _in_channels(unet2, 9)),
        "UNET-XL-SD": _TkComponent("UNET-XL", _TK_UNET, _relative("sdxl", UNET, _TK_UNET, scale)),
        "VAE-v1-SD": _TkComponent("VAE-v1", p["vae"], _relative("sd1", VAE, p["vae"], scale)),
        "CLIP-v1-SD": _TkComponent("CLIP-v1", p["sd1-te0"], clip1),
        "CLIP-v1-NAI": _TkComponent("CLIP-v1", p["nai-te0"], clip1),
        "CLIP-v2-SD": _TkComponent("CLIP-v2", p["sd2-te"], clip2),
        "CLIP-v2-WD": _TkComponent("CLIP-v2", p["sd2-te"], _relative("sd2", TE1, p["sd2-te"], scale,
                                                                     lambda k: k not in sd2_optional)),
        "CLIP-XL-SD": _TkComponent("CLIP-XL", p["xl-te1"], xl_te1),
        "CLIP-XL-Refiner": _TkComponent("CLIP-XL", p["refiner-te"], xl_te1),
        "CLIP-XL-AUX-SD": _TkComponent("CLIP-XL-AUX", p["xl-te0"], clip1),
    }


@functools.lru_cache(maxsize=None)
def _toolkit_optional(scale: int) -> frozenset:
    """Keys every SD-*/EMA-* architecture allows besides its components (schedule, logvar, EMA counters)."""
    buffers = archmod.schedule_buffers() + ["logvar"]
    return frozenset([(b, archmod.scale_shape((1000,), scale)) for b in buffers]
                     + [("model_ema.decay", ()), ("model_ema.num_updates", ())])


@dataclass
class ToolkitView:
    """What arenasys' model-toolkit (original) would say about a file."""
    label: str | None                 # the resolved architecture, or None: "could not be identified"
    found: list                       # every architecture it found (after dropping -BROKEN ones)
    components: list                  # components of the resolved architecture
    rejected: dict                    # component / architecture -> [reason]
    junk: list                        # keys its prune deletes
    ema: list                         # model_ema.* keys outside the resolved architecture
    keys: int

    def to_dict(self):
        return {"label": self.label, "found": self.found, "components": self.components,
                "rejected": self.rejected, "junk_keys": len(self.junk), "junk_examples": self.junk[:5],
                "ema_keys": len(self.ema), "keys": self.keys}

    def line(self, arch: str | None) -> str:
        """What the toolkit would print (its own report words, which users search for) and why."""
        why = self._reasons(arch)
        if not self.label:
            text = ('model-toolkit (original) would name no type — its report: "Model type could not be identified."'
                    + (f" ({why})" if why else ""))
            if arch == "sdxl":
                text += ("; it has no -BROKEN type for an SDXL UNET or text encoder, so an SDXL file that lacks its VAE "
                         "gets no name where one that lacks only TE0 position ids is called VAE-v1-BROKEN")
            return text + '; its autoprune would move the file to Failed ("UNKNOWN ARCHITECTURE")'
        text = f'model-toolkit (original) would call this {self.label} — its report: "Model type identified as {self.label}."'
        if self.label.endswith("-BROKEN"):
            text += (f" ({why})" if why else "") + f"; its prune would keep {self.keys - len(self.junk) - len(self.ema)} " \
                                                   f"of {self.keys} keys"
        if self.junk:
            text += f"; {len(self.junk)} key(s) count as junk there (e.g. {self.junk[0]}), deleted on save"
        elif not self.label.endswith("-BROKEN"):
            text += ", no junk"
        if self.label.endswith("-BROKEN"):
            text += '; its autoprune would move the file to Failed ("BROKEN ARCHITECTURE")'
        return text

    def _reasons(self, arch) -> str:
        names = list(_TK_PARTS.get(arch, ())) + ([_TK_FULL[arch]] if arch in _TK_FULL else [])
        return "; ".join(f"{n}: {r}" for n in names for r in self.rejected.get(n, []))


def _toolkit_fix(shapes: dict) -> dict:
    """The toolkit's load-time fix: NAI-style SD1 CLIP keys get 'text_model.' (position ids are cast only)."""
    out = {}
    for key, shape in shapes.items():
        for old in ("embeddings.", "encoder.", "final_layer_norm."):
            if key.startswith(_TK_PREFIX["nai-te0"] + old):
                key = _TK_PREFIX["sd1-te0"] + key[len(_TK_PREFIX["nai-te0"]):]
                break
        out[key] = tuple(shape)
    return out


def toolkit_view(shapes: dict, scale: int = 1) -> ToolkitView:
    """Run the toolkit's detection (inspect_model + resolve_arch) on a key -> shape map.

    A component is found only if every (key, shape) pair is present, with its prefix or without;
    an architecture when all its classes are found in its prefixed/unprefixed form; -BROKEN ones
    are dropped once any SD-* is found; SD-v1/SD-v2 win, else the one with the most keys.
    `scale` matches our scaled-down test files against equally scaled lists.
    """
    shapes = _toolkit_fix(shapes)
    pairs = set(shapes.items())
    comps = _toolkit_components(scale)
    forms, classes, rejected = set(), {}, {}
    for name, comp in comps.items():
        prefixed = frozenset((comp.prefix + k, s) for k, s in comp.keys)
        miss_bare, miss_prefixed = comp.keys - pairs, prefixed - pairs
        if not miss_bare:
            forms.add((name, False))
        if not miss_prefixed:
            forms.add((name, True))
        if miss_bare and miss_prefixed:
            for missing, wanted in ((miss_prefixed, prefixed), (miss_bare, comp.keys)):
                if missing != wanted:
                    rejected.setdefault(name, []).append(f"Missing required keys ({len(missing)} of {len(wanted)})")
        else:
            classes.setdefault(comp.cls, []).insert(0, name)
    found = {}
    for arch, needed, prefixed in _TK_ARCHITECTURES:
        got = {c: [n for n in classes.get(c, []) if (n, prefixed) in forms] for c in needed}
        got = {c: names for c, names in got.items() if names}
        if len(got) < len(needed):
            if got:
                rejected.setdefault(arch, []).append(f"Missing required classes {sorted(set(needed) - set(got))}")
            continue
        found[arch] = (got, prefixed)
    if any(a.startswith("SD-") for a in found):
        found = {a: v for a, v in found.items() if not a.endswith("-BROKEN")}
    label, chosen = _toolkit_resolve(found, comps)
    allowed = set()
    if label:
        prefixed = found[label][1]
        for name in chosen:
            comp = comps[name]
            allowed |= {(comp.prefix + k if prefixed else k, s) for k, s in comp.keys}
        if prefixed and not label.endswith("-BROKEN"):
            allowed |= _toolkit_optional(scale)
    outside = [k for k, s in shapes.items() if (k, s) not in allowed]
    ema = [k for k in outside if k.startswith("model_ema.")]
    junk = [k for k in outside if not k.startswith("model_ema.")]
    return ToolkitView(label, list(found), chosen, rejected, junk, ema, len(shapes))


def _toolkit_resolve(found: dict, comps: dict):
    if not found:
        return None, []
    sizes, chosen = {}, {}
    for arch, (got, _prefixed) in found.items():
        picks = [_toolkit_pick(names, comps) for names in got.values()]
        chosen[arch] = picks
        sizes[arch] = sum(len(comps[p].keys) for p in picks)
    for normal in ("SD-v1", "SD-v2"):
        if normal in sizes:
            return normal, chosen[normal]
    best = max(sizes, key=sizes.get)
    return best, chosen[best]


def _toolkit_pick(names: list, comps: dict) -> str:
    """resolve_class: the single 'SD' component if there is exactly one, else the one with most keys."""
    sd = [n for n in names if "SD" in n]
    if len(names) > 1 and len(sd) == 1:
        return sd[0]
    return max(names, key=lambda n: len(comps[n].keys))


def a1111_view(shapes: dict, ident: archmod.Identity, position: dict) -> str:
    """How A1111 (modules/sd_models_config.py detection, strict=False loading) will treat the file."""
    canon = {ident.canonical(k): v for k, v in shapes.items()}
    if ident.arch == "sdxl" and "conditioner.embedders.1.model.ln_final.weight" not in canon:
        return ("A1111 will not detect SDXL (TE1 ln_final.weight missing, its detection key): it picks the "
                "SD1 config and fails to load")
    missing = sum(len(c.missing) for c in ident.components.values())
    vae = ident.components.get(VAE)
    if vae is not None and vae.status == "absent":
        return ("A1111 / Forge load it non-strictly with a 'Missing VAE keys' line: without a separate VAE selected "
                "the images come out black (NaN) — fill the VAE from a base")
    if missing:
        return (f"A1111 loads it non-strictly: the {missing} missing weight(s) keep random initial values "
                f"(broken images unless filled)")
    if position.get("status") == "wrong":
        return (f"A1111 (transformers 4.30) uses the stored position ids: {len(position['wrong_positions'])} "
                "wrong position(s) change outputs")
    return "A1111 loads it fine"


# =============================================================================================
# Diagnosis (REPAIR.md §11)

def position_ids_health(header, ident: archmod.Identity) -> dict:
    """Status of the TE0 position ids: missing / ok (int64 0..76) / float (right values) / wrong.

    Reads that one [1, 77] tensor. `wrong_positions` are the indices whose value, truncated to
    int64 the way a 4.30 transformers buffer load does, is not the index itself.
    """
    key = POSITION_IDS.get(ident.arch)
    if key is None:
        return {"status": "n/a", "key": None}
    stored = {ident.canonical(k): k for k in header.tensors}.get(key)
    spec = archmod.layout(ident.arch, ident.scale)[key]
    if stored is None:
        return {"status": "missing", "key": key}
    info = header.tensors[stored]
    out = {"status": "ok", "key": key, "dtype": NAME_OF[info.dtype], "shape": list(info.shape)}
    if info.shape != spec.shape:
        return {**out, "status": "wrong-shape"}
    try:
        with CheckpointReader(header.path, header) as reader:
            values = reader.read(stored).reshape(-1)
    except (OSError, CheckpointError) as exc:
        return {**out, "status": "unread", "problem": str(exc)}
    truncated = values.to(torch.float64).trunc() if values.is_floating_point() else values.to(torch.float64)
    expected = torch.arange(values.numel(), dtype=torch.float64)
    wrong = [int(i) for i in torch.nonzero(truncated != expected).reshape(-1)]
    inexact = int((values.to(torch.float64) != expected).sum())
    out.update(wrong_positions=wrong, inexact_values=inexact)
    if wrong:
        out["status"] = "wrong"
    elif values.is_floating_point():
        out["status"] = "float"
    return out


def _gap_meaning(key: str, arch: str) -> str:
    """What a missing TE/VAE/UNET key means for inference, in words (§4, §7)."""
    rest = _short(key)
    if key.endswith("position_ids"):
        return "constant buffer, harmless in A1111; breaks the model-toolkit's detection"
    comp = archmod.component_of(key)
    if comp == TE1 and rest == "logit_scale":
        return "training-only scalar, harmless; filled anyway"
    if comp == TE1 and (rest.startswith(("ln_final", "text_projection")) or ".resblocks.31." in f".{rest}"):
        return "produces the pooled text vector SDXL's label_emb consumes (ln_final is A1111's SDXL key) — must be filled"
    if comp == TE0 and arch == "sdxl" and (rest.startswith("encoder.layers.11.") or rest.startswith("final_layer_norm")):
        return "unused by SDXL's default penultimate-layer conditioning, read with 'clip skip 1' — fill from a base"
    if comp == VAE:
        return "decodes latents to images: without it an external VAE is needed — fill from a base"
    if comp == UNET:
        return "part of the denoiser: filling it from a base changes the model"
    return "text-encoder weight: filling it from a base changes how prompts are read"


def _component_details(header, ident) -> dict:
    per = {c: {"dtypes": collections.Counter(), "bytes": 0} for c in ident.components}
    for stored, info in header.tensors.items():
        comp = archmod.component_of(ident.canonical(stored))
        if comp in per and not stored.startswith("model_ema."):
            per[comp]["dtypes"][NAME_OF[info.dtype]] += 1
            per[comp]["bytes"] += nbytes(info)
    out = {}
    for comp, status in ident.components.items():
        gaps = [{"key": k, "problem": "missing", "meaning": _gap_meaning(k, ident.arch)}
                for k in status.missing + status.missing_optional]
        gaps += [{"key": k, "problem": f"shape {list(found)}, expected {list(want)}",
                  "meaning": "incompatible shape: another variant (inpainting?) — not a repair case"}
                 for k, found, want in status.wrong_shape]
        out[comp] = {"status": status.status, "present": status.present, "expected": status.expected,
                     "dtypes": dict(per[comp]["dtypes"]), "bytes": per[comp]["bytes"], "gaps": gaps}
    return out


def _prediction_source(ident, metadata) -> str:
    names = {"v": "v-prediction", "edm-v": "EDM v-prediction", "edm": "EDM", "epsilon": "epsilon"}
    markers = [m for m in ident.markers if m != "ztsnr"]
    text = names[ident.prediction]
    if markers:
        text += f" from marker key(s) {', '.join(markers)}"
    elif ident.prediction != "epsilon":
        text += " from metadata modelspec.prediction_type only (no marker key: A1111 will load it as epsilon)"
    else:
        hint = metadata.get("modelspec.prediction_type")
        text += " (no marker keys" + (f"; metadata says {hint!r}" if hint else "") + ")"
    if ident.ztsnr:
        text += " · ztSNR from marker key ztsnr"
    return text


def _family_hint(metadata) -> str | None:
    for field_name in ("modelspec.title", "ss_sd_model_name", "ss_base_model_version", "modelspec.architecture"):
        value = metadata.get(field_name)
        if isinstance(value, str):
            for word, family in FAMILY_WORDS.items():
                if word in value.lower():
                    return f"likely {family} (metadata {field_name} = {value[:60]!r}; not structural)"
    return None


def _metadata_problems(metadata) -> list:
    return [{"field": k, "type": type(v).__name__} for k, v in metadata.items() if not isinstance(v, str)]


def _extras(header, ident) -> dict:
    def sized(keys):
        return sum(nbytes(header.tensors[k]) for k in keys)
    unknown = sorted(ident.unknown, key=lambda k: -nbytes(header.tensors[k]))
    return {
        "markers": list(ident.markers),
        "ema": {"keys": len(ident.ema), "bytes": sized(ident.ema)},
        "schedule": {"keys": list(ident.schedule), "bytes": sized(ident.schedule)},
        "junk": [{"key": k, "bytes": nbytes(header.tensors[k])} for k in ident.junk],
        "unknown_keys": [{"key": k, "shape": list(header.tensors[k].shape), "dtype": NAME_OF[header.tensors[k].dtype],
                          "bytes": nbytes(header.tensors[k])} for k in unknown],
        "unknown_bytes": sized(ident.unknown),
    }


def _renames_by_rule(ident) -> dict:
    rules = collections.Counter(archmod.normalize_key(k)[1] for k in ident.renames)
    return dict(rules)


SSD_PROBE = UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn1.to_q.weight"


def distilled_sdxl(ident) -> str | None:
    """Why an SDXL-like file is a distilled variant (SSD-1B / Vega / KOALA), or None.

    Those have other transformer depths, i.e. their own key sets: "filling" them from an SDXL base
    would graft full-size blocks onto a different network. A1111 flags them by this probe key.
    """
    unet = ident.components.get(UNET)
    if ident.arch == "sdxl" and unet is not None and unet.present and SSD_PROBE in unet.missing:
        return (f"a distilled SDXL variant (SSD-1B / Vega / KOALA style: {len(unet.missing)} UNET transformer keys "
                "absent, including the middle block's) — its own architecture, not a pruned SDXL")
    return None


def _severity(ident, position, preview) -> tuple:
    """(severity, reasons): the worst problem decides."""
    distilled = distilled_sdxl(ident)
    if distilled:
        return NOT_REPAIRABLE, [distilled]
    wrong = [(c, k, f, w) for c, s in ident.components.items() for k, f, w in s.wrong_shape]
    if wrong:
        comp, key, found, want = wrong[0]
        return NOT_REPAIRABLE, [f"{len(wrong)} key(s) with an incompatible shape ({COMPONENT_NAMES[comp]} "
                                f"{_short(key)} {list(found)}, expected {list(want)}; inpainting or another variant?)"]
    if preview.filled:
        by_comp = collections.defaultdict(list)
        for key in preview.filled:
            by_comp[archmod.component_of(key)].append(_short(key))
        parts = [f"{COMPONENT_NAMES.get(c, c)} {len(ks)}: {_first(ks, 3)}" for c, ks in by_comp.items()]
        return NEEDS_BASE, [f"{len(preview.filled)} key(s) missing ({'; '.join(parts)})"]
    reasons = []
    if position["status"] == "missing":
        reasons.append("TE0 position ids missing")
    elif position["status"] == "wrong":
        reasons.append(f"TE0 position ids wrong at {len(position['wrong_positions'])} position(s)")
    elif position["status"] == "float":
        reasons.append(f"TE0 position ids stored as {position['dtype']} (should be int64)")
    if ident.reshapes:
        reasons.append(f"{len(ident.reshapes)} VAE attention weight(s) stored [512,512]")
    if ident.renames:
        reasons.append(f"{len(ident.renames)} legacy key name(s)")
    return (FIXABLE, reasons) if reasons else (OK, ["every component complete"])


def _verdict(ident, severity, reasons) -> str:
    pred = {"v": "v-prediction (v_pred)", "edm-v": "EDM v-prediction", "edm": "EDM", "epsilon": "epsilon"}[ident.prediction]
    if ident.prediction == "v" and "v_pred" not in ident.markers:
        pred = "v-prediction (metadata only)"
    if ident.ztsnr:
        pred += " · ztSNR (ztsnr)"
    head = {OK: "OK", FIXABLE: "FIXABLE without a base", NEEDS_BASE: "REPAIRABLE with a base model",
            NOT_REPAIRABLE: "NOT REPAIRABLE"}[severity]
    return f"{ident.title} · {pred} · {head}: {'; '.join(reasons)}"


def diagnose(header, ident: archmod.Identity) -> dict:
    """The full report of REPAIR.md §11 as a dict (merged into `inspection.inspect_file`)."""
    metadata = header.metadata
    tk = toolkit_view(header.shapes, ident.scale)
    if ident.arch is None:
        lines = [tk.line(None)]
        return {"severity": NOT_SD, "verdict_text": f"not an SD checkpoint: {ident.refusal or 'unknown layout'}",
                "toolkit": tk.to_dict(), "report_lines": lines}
    position = position_ids_health(header, ident)
    preview = plan_repair(header, None, ident=ident, check_shapes=False)
    severity, reasons = _severity(ident, position, preview)
    details = _component_details(header, ident)
    extras = _extras(header, ident)
    report = {
        "severity": severity, "severity_reasons": reasons, "verdict_text": _verdict(ident, severity, reasons),
        "prediction_source": _prediction_source(ident, metadata), "family_hint": _family_hint(metadata),
        "component_details": details, "position_ids": position, **extras,
        "renames_by_rule": _renames_by_rule(ident),
        "metadata_notable": {k: (metadata[k] if isinstance(metadata[k], str) and len(metadata[k]) <= 80 else "(present)")
                             for k in NOTABLE_METADATA if k in metadata},
        "metadata_problems": _metadata_problems(metadata),
        "toolkit": tk.to_dict(), "toolkit_line": tk.line(ident.arch),
        "a1111_line": a1111_view(header.shapes, ident, position),
        "repair_plan": {OK: "nothing to repair", NOT_REPAIRABLE: None}.get(severity, preview.summary()),
    }
    report["report_lines"] = _report_lines(ident, report, preview)
    return report


def _report_lines(ident, r, preview) -> list:
    lines = [f"Architecture: {ident.title} — evidence: {'; '.join(ident.evidence) or 'component key sets'}"
             + (f"; runner-up: {', '.join(ident.runner_up)}" if ident.runner_up else ""),
             f"Prediction: {r['prediction_source']}"]
    if r["family_hint"]:
        lines.append(f"Family: {r['family_hint']}")
    lines.append("Component details:")
    for comp, d in r["component_details"].items():
        dtypes = ", ".join(f"{k} x{v}" for k, v in d["dtypes"].items()) or "no tensors"
        lines.append(f"  {COMPONENT_NAMES[comp]:<4} {d['status']:<8} {d['present']}/{d['expected']}, {dtypes}, {human_size(d['bytes'])}")
        for gap in d["gaps"][:5]:
            lines.append(f"       {gap['problem']}: {_short(gap['key'])} — {gap['meaning']}")
        if len(d["gaps"]) > 5:
            lines.append(f"       … and {len(d['gaps']) - 5} more gap(s)")
    lines.append("Non-weight keys: " + _non_weight_line(ident, r))
    if r["unknown_keys"]:
        shown = ", ".join(f"{u['key']} {u['shape']} {u['dtype']} {human_size(u['bytes'])}" for u in r["unknown_keys"][:3])
        lines.append(f"Unknown keys: {len(r['unknown_keys'])}, {human_size(r['unknown_bytes'])} — {shown}")
    if r["renames_by_rule"] or ident.reshapes:
        parts = [f"{n} × {rule}" for rule, n in r["renames_by_rule"].items()]
        if ident.reshapes:
            parts.append(f"{len(ident.reshapes)} × VAE attention [512,512] → [512,512,1,1]")
        lines.append("Renames: " + ", ".join(parts))
    if r["metadata_notable"] or r["metadata_problems"]:
        text = "Metadata: " + (", ".join(f"{k}={v}" for k, v in r["metadata_notable"].items()) or "nothing notable")
        if r["metadata_problems"]:
            text += "; not strings (break saving elsewhere; repair JSON-encodes them): " + \
                    ", ".join(f"{p['field']} ({p['type']})" for p in r["metadata_problems"][:5])
        lines.append(text)
    lines.append(f"Seen by: {r['toolkit_line']}; {r['a1111_line']}")
    if r["repair_plan"]:
        lines.append("Plan: " + r["repair_plan"])
    return lines


def _non_weight_line(ident, r) -> str:
    pos = r["position_ids"]
    parts = []
    if pos["status"] != "n/a":
        text = {"missing": "position ids missing (repair adds int64 0..76)",
                "ok": "position ids int64 0..76 OK",
                "float": f"position ids {pos.get('dtype')} with correct values (repair rewrites int64)",
                "wrong": f"position ids {pos.get('dtype')}, {len(pos.get('wrong_positions', []))} wrong position(s): "
                         f"{_first([str(i) for i in pos.get('wrong_positions', [])], 12)} (repair resets)",
                "wrong-shape": f"position ids shaped {pos.get('shape')} (repair resets)",
                "unread": f"position ids unreadable ({pos.get('problem')})"}[pos["status"]]
        parts.append(text)
    parts.append(f"markers {', '.join(r['markers'])} (kept)" if r["markers"] else "no markers")
    ema = r["ema"]
    parts.append(f"EMA {ema['keys']} keys, {human_size(ema['bytes'])} (dropped unless --keep-ema)" if ema["keys"] else "no EMA")
    sched = r["schedule"]
    parts.append(f"{len(sched['keys'])} schedule buffers, {human_size(sched['bytes'])} (dropped)" if sched["keys"]
                 else "no schedule buffers")
    if r["junk"]:
        parts.append(f"{len(r['junk'])} junk key(s) (dropped)")
    return " · ".join(parts)


# =============================================================================================
# Repair (REPAIR.md §10)

@dataclass
class RepairStep:
    """One output key: where its value comes from. origin: file | reshape | base | position_ids."""
    key: str
    shape: tuple
    dtype: torch.dtype
    origin: str
    stored: str | None = None     # key inside the file the value is read from


@dataclass
class RepairPlan:
    path: str
    header: object
    identity: archmod.Identity
    dtype: torch.dtype                     # the file's dominant float dtype (filled keys are cast to it)
    base_path: str | None = None
    base_header: object = None
    steps: list = field(default_factory=list)
    filled: list = field(default_factory=list)        # canonical keys taken from the base
    reshaped: list = field(default_factory=list)
    renamed: dict = field(default_factory=dict)       # stored key -> canonical key
    position_ids: str | None = None                   # added | reset | omitted | None
    dropped: list = field(default_factory=list)       # (key, kind, bytes)
    kept: list = field(default_factory=list)          # markers (+ EMA with keep_ema)
    warnings: list = field(default_factory=list)

    @property
    def needs_base(self) -> bool:
        return bool(self.filled) and self.base_header is None

    @property
    def output_bytes(self) -> int:
        return sum(math.prod(s.shape) * s.dtype.itemsize for s in self.steps)

    def summary(self) -> str:
        """One line: what the repair would do (§11 item 9)."""
        parts = []
        if self.position_ids in ("added", "reset"):
            parts.append(f"{'add' if self.position_ids == 'added' else 'reset'} TE0 position_ids = 0..76 (int64)")
        elif self.position_ids == "kept":
            parts.append("TE0 position_ids already 0..76 (int64)")
        if self.filled:
            source = os.path.basename(self.base_path) if self.base_path else "a base model (--base)"
            parts.append(f"fill {len(self.filled)} key(s) from {source}: {_first([_short(k) for k in self.filled], 3)}")
        else:
            parts.append("no weights taken from a base")
        if self.reshaped:
            parts.append(f"reshape {len(self.reshaped)} VAE attention weight(s)")
        if self.renamed:
            parts.append(f"rename {len(self.renamed)} legacy key(s)")
        if self.dropped:
            parts.append(f"drop {len(self.dropped)} key(s) ({human_size(sum(b for _k, _t, b in self.dropped))})")
        if self.kept:
            parts.append(f"keep {', '.join(self.kept[:4])}" + ("…" if len(self.kept) > 4 else ""))
        parts.append(f"→ {len(self.steps)} keys, ~{human_size(self.output_bytes)}; metadata + repair record")
        return "; ".join(parts)

    def blocker(self) -> str | None:
        """Why this plan cannot be written as is (said first in a dry run), or None."""
        if not self.needs_base:
            return None
        return (f"needs a base model: {len(self.filled)} key(s) are missing ({self.filled_by_component()}); "
                f"pass --base BASE, a complete {self.identity.title} model, to fill them")

    def filled_by_component(self, examples: int = 3) -> str:
        by_comp = collections.defaultdict(list)
        for key in self.filled:
            by_comp[archmod.component_of(key)].append(_short(key))
        return "; ".join(f"{COMPONENT_NAMES.get(c, c)} {len(ks)}: {_first(ks, examples)}" for c, ks in by_comp.items())

    def lines(self, full: bool = True) -> list:
        """The dry-run listing: what blocks it first, then every decision; filled keys in full, or
        (`full=False`) one line per component."""
        ident = self.identity
        out = [f"NOT READY — {self.blocker()}"] if self.blocker() else []
        out.append(f"repair {os.path.basename(self.path)} ({ident.title}, {ident.prediction}"
                   f"{' + ztSNR' if ident.ztsnr else ''}): {self.summary()}")
        out += [f"  warning: {w}" for w in self.warnings]
        if full:
            out += [f"  fill from base: {k}" for k in self.filled]
        elif self.filled:
            out += [f"  fill from base: {part}" for part in self.filled_by_component(5).split("; ")]
        out += [f"  reshape: {k}" for k in self.reshaped]
        out += [f"  rename: {a} -> {b}" for a, b in list(self.renamed.items())[:10]]
        if len(self.renamed) > 10:
            out.append(f"  rename: … {len(self.renamed) - 10} more")
        if self.position_ids:
            out.append(f"  position ids: {self.position_ids}")
        out += [f"  drop ({kind}): {k} ({human_size(b)})" for k, kind, b in self.dropped[:20]]
        if len(self.dropped) > 20:
            out.append(f"  drop: … {len(self.dropped) - 20} more")
        out += [f"  keep: {k}" for k in self.kept[:20]]
        return out


def dominant_float_dtype(header) -> torch.dtype:
    """The float dtype holding most of the file's bytes (what filled keys are cast to)."""
    totals = collections.Counter()
    for info in header.tensors.values():
        if info.dtype in FLOAT_DTYPES:
            totals[info.dtype] += nbytes(info)
    return totals.most_common(1)[0][0] if totals else torch.float16


def _identify(header, what: str):
    ident = archmod.identify(header.shapes, header.metadata)
    if ident.refusal or ident.arch is None:
        raise CheckpointError(header.path, f"{what}: {ident.refusal or 'no Stable Diffusion keys'}; nothing to repair here")
    return ident


def plan_repair(header, base_header=None, keep_ema=False, position_ids="reset", ident=None,
                check_shapes=True) -> RepairPlan:
    """Decide every output key of the repaired file (no tensor data read).

    Without a base the plan still lists the keys that need one (`needs_base`), which is the
    dry-run / report preview. Raises on foreign layouts, incompatible shapes (not a repair case)
    and on a base of another architecture or lacking a key the file needs.
    """
    ident = ident or _identify(header, "damaged file")
    if check_shapes and distilled_sdxl(ident):
        raise CheckpointError(header.path, f"{distilled_sdxl(ident)}: not a repair case")
    if check_shapes:
        for comp, status in ident.components.items():
            for key, found, want in status.wrong_shape:
                raise CheckpointError(header.path, f"key '{key}' has shape {list(found)}, {ident.title} expects "
                                      f"{list(want)}: not a repair case (inpainting or another variant?)")
    plan = RepairPlan(header.path, header, ident, dominant_float_dtype(header))
    base, base_keys = None, {}
    if base_header is not None:
        base = _identify(base_header, "base model")
        if (base.arch, base.scale) != (ident.arch, ident.scale):
            raise ArchitectureError(f"base {os.path.basename(base_header.path)} is {base.title} but "
                                    f"{os.path.basename(header.path)} is {ident.title}: the base must have the same architecture")
        wrong = [(k, f, w) for c in base.components.values() for k, f, w in c.wrong_shape]
        if wrong:
            key, found, want = wrong[0]
            raise ArchitectureError(f"base {os.path.basename(base_header.path)}: key '{key}' has shape {list(found)}, "
                                    f"expected {list(want)}; the base must be a plain {ident.title} model")
        if (base.prediction, base.ztsnr) != (ident.prediction, ident.ztsnr):
            plan.warnings.append(f"the base is {base.prediction}{' + ztSNR' if base.ztsnr else ''}, the file is "
                                 f"{ident.prediction}{' + ztSNR' if ident.ztsnr else ''}; markers come from the file")
        plan.base_path, plan.base_header = base_header.path, base_header
        base_keys = {base.canonical(k): k for k in base_header.tensors}
    stored = {ident.canonical(k): k for k in header.tensors}
    for key, spec in archmod.layout(ident.arch, ident.scale).items():
        _plan_key(plan, key, spec, stored, base_header, base_keys, position_ids)
    _plan_extras(plan, keep_ema)
    planned = {s.key for s in plan.steps}
    plan.renamed = {k: v for k, v in ident.renames.items() if v in planned}
    return plan


def _plan_key(plan, key, spec, stored, base_header, base_keys, position_ids):
    header = plan.header
    if key == POSITION_IDS.get(plan.identity.arch):
        had = key in stored
        if position_ids == "omit":
            plan.position_ids = "omitted" if had else None
            return
        plan.position_ids = ("kept" if _position_ids_ok(header, plan.identity) else "reset") if had else "added"
        plan.steps.append(RepairStep(key, spec.shape, torch.int64, "position_ids"))
        return
    if key in stored:
        info = header.tensors[stored[key]]
        if info.shape == spec.shape:
            plan.steps.append(RepairStep(key, spec.shape, info.dtype, "file", stored[key]))
            return
        if key in plan.identity.reshapes:
            plan.reshaped.append(key)
            plan.steps.append(RepairStep(key, spec.shape, info.dtype, "reshape", stored[key]))
            return
        # a wrong shape only reaches here from a diagnosis preview (check_shapes=False): not planned
        return
    plan.filled.append(key)
    if base_header is None:
        plan.steps.append(RepairStep(key, spec.shape, plan.dtype, "base"))
        return
    source = base_keys.get(key)
    if source is None:
        raise ArchitectureError(f"base {os.path.basename(base_header.path)} lacks '{key}' too, which "
                                f"{os.path.basename(header.path)} needs: choose a complete base model")
    info = base_header.tensors[source]
    dtype = plan.dtype if info.is_float else info.dtype
    plan.steps.append(RepairStep(key, spec.shape, dtype, "base", source))


def _position_ids_ok(header, ident) -> bool:
    """The stored TE0 position ids are already int64 0..76 (rewriting them changes no byte)."""
    health = position_ids_health(header, ident)
    return health["status"] == "ok" and health.get("dtype") == NAME_OF[torch.int64]


def _plan_extras(plan, keep_ema):
    ident, header = plan.identity, plan.header
    by_canonical = {ident.canonical(k): k for k in header.tensors}
    for key in ident.markers:
        info = header.tensors[by_canonical[key]]
        plan.steps.append(RepairStep(key, info.shape, info.dtype, "file", by_canonical[key]))
        plan.kept.append(key)
    for key in sorted(header.aux):   # fp8_scaled scale / marker keys: carried with their (bit-for-bit) weights
        info = header.tensors[key]
        plan.steps.append(RepairStep(key, info.shape, info.dtype, "file", key))
    for kind, keys in (("EMA", ident.ema), ("schedule", ident.schedule), ("junk", ident.junk), ("unknown", ident.unknown)):
        for key in keys:
            info = header.tensors[by_canonical.get(key, key)]
            if kind == "EMA" and keep_ema:
                plan.steps.append(RepairStep(key, info.shape, info.dtype, "file", by_canonical.get(key, key)))
                plan.kept.append(key)
            else:
                plan.dropped.append((key, kind, nbytes(info)))


def _check_result(plan: RepairPlan):
    """§10.6: the planned key set must re-identify as the full architecture with the same markers."""
    shapes = {s.key: s.shape for s in plan.steps}
    again = archmod.identify(shapes, plan.header.metadata)
    ident = plan.identity
    problems = []
    if (again.arch, again.scale) != (ident.arch, ident.scale):
        problems.append(f"identifies as {again.title}, not {ident.title}")
    if not again.is_full or again.reshapes or again.renames:
        problems.append("not a full architecture: " + ", ".join(
            f"{c} {s.status}" for c, s in again.components.items() if s.status != "complete"))
    if sorted(again.markers) != sorted(ident.markers) or again.prediction != ident.prediction:
        problems.append(f"markers {again.markers} differ from the file's {ident.markers}")
    if problems:
        raise ArchitectureError(f"{plan.path}: the repaired key set fails re-identification ({'; '.join(problems)}); "
                                "nothing was written")


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
    """The step's value in row chunks, reshaped to the canonical shape and cast to the output dtype."""
    if step.origin == "position_ids":
        yield torch.arange(step.shape[-1], dtype=torch.int64).reshape(step.shape)
        return
    info = reader.info(step.stored)
    if not info.shape or info.numel == 0:
        yield reader.read(step.stored).reshape(step.shape).to(step.dtype)
        return
    rows = info.shape[0]
    per_chunk = max(1, chunk_bytes // max(1, nbytes(info) // rows))
    for a in range(0, rows, per_chunk):
        b = min(rows, a + per_chunk)
        yield reader.read_rows(step.stored, a, b).reshape((b - a,) + tuple(step.shape[1:])).to(step.dtype)


def run_repair(plan: RepairPlan, output, overwrite=False, base_sha256: str | None = None,
               chunk_bytes: int = CHUNK_BYTES) -> RepairResult:
    """Write the planned file: re-identify first, then stream key by key into an atomic temp file."""
    output = os.path.abspath(os.fspath(output))
    if plan.needs_base:
        raise AstolfoError(f"{plan.path}: {len(plan.filled)} key(s) are missing "
                           f"({_first([_short(k) for k in plan.filled], 3)}); pass --base BASE, a complete "
                           f"{plan.identity.title} model, to fill them")
    for source in (plan.path, plan.base_path):
        if source and os.path.exists(output) and os.path.samefile(source, output):
            raise AstolfoError(f"{output}: the repair reads this file; write it to a new file (-o)")
    _check_result(plan)
    entries = [(s.key, s.dtype, s.shape) for s in plan.steps]
    readers = {"file": CheckpointReader(plan.path, plan.header, dequantize=False)}   # bit for bit
    if plan.base_header is not None:
        readers["base"] = CheckpointReader(plan.base_path, plan.base_header)
    try:
        with SafetensorsWriter(output, entries, repair_metadata(plan, base_sha256), overwrite) as writer:
            for step in plan.steps:
                reader = readers["base" if step.origin == "base" else "file"]
                for chunk in _step_chunks(step, reader, chunk_bytes):
                    writer.write(step.key, chunk)
            sha = writer.commit()
    finally:
        for r in readers.values():
            r.close()
    return RepairResult(output, sha, os.path.getsize(output), len(plan.steps), plan)


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
