"""The original model-toolkit's view of a checkpoint (REPAIR.md §8), reproduced on the header map.

`toolkit_view(shapes, scale)` applies arenasys' model-toolkit detection rules to key -> shape, so
the report can say "the toolkit will call this VAE-v1-BROKEN" and why (users search its words).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..io import arch as archmod
from ..io.arch import TE0, TE1, UNET, VAE

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
