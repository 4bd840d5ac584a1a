"""Architecture and component identification by (key, shape), REPAIR.md §2–§6.

Layouts are data (`layouts.json`, built from ../shared/data/keys by tools/build_layouts.py).
A layout can be matched at a *scale* f: every dimension divisible by f is divided by f (latent
channels, RGB, kernel sizes and the 77-token axis are not), which is how the demo and test
checkpoints are scaled down consistently. Identification scores every (architecture, scale) and
keeps the one that explains the most (key, shape) pairs.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field

UNET, TE0, TE1, VAE, OTHER = "unet", "te0", "te1", "vae", "other"
COMPONENTS = (UNET, TE0, TE1, VAE)
ARCH_TITLES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
SCALES = (1, 2, 4, 8, 16, 32, 64)
MARKERS = ("v_pred", "ztsnr", "edm_vpred.sigma_min", "edm_vpred.sigma_max", "edm_mean", "edm_std")
POSITION_IDS = {
    "sd1": "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "sdxl": "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
}
UNET_PREFIX = "model.diffusion_model."


@functools.lru_cache(maxsize=None)
def _layouts():
    with open(os.path.join(os.path.dirname(__file__), "layouts.json")) as f:
        return json.load(f)


@dataclass(frozen=True)
class KeySpec:
    shape: tuple
    component: str
    optional: bool


@functools.lru_cache(maxsize=None)
def layout(arch: str, scale: int = 1) -> dict:
    """Canonical weight keys of `arch` at `scale`: key -> KeySpec (file order of the source)."""
    return {k: KeySpec(scale_shape(s, scale), c, bool(o)) for k, (s, c, o) in _layouts()[arch]["keys"].items()}


def schedule_buffers() -> list:
    return list(_layouts()["schedule_buffers"])


def scale_shape(shape, scale: int) -> tuple:
    return tuple(d // scale if scale > 1 and d % scale == 0 else d for d in shape)


def component_of(key: str) -> str:
    """Component by key prefix alone (works for every SD1/SD2/SDXL layout)."""
    if key.startswith(UNET_PREFIX):
        return UNET
    if key.startswith("first_stage_model."):
        return VAE
    if key.startswith("conditioner.embedders.0.") or key.startswith("cond_stage_model.transformer."):
        return TE0
    if key.startswith("conditioner.embedders.1.") or key.startswith("cond_stage_model.model."):
        return TE1
    return OTHER


# ---------------------------------------------------------------------------------------------
# MBW blocks (ALGORITHMS.md §15, SuperMerger-compatible names)

def block_names(arch: str) -> list:
    n = 9 if arch == "sdxl" else 12
    names = ["BASE"] + [f"IN{i:02d}" for i in range(n)] + ["M00"] + [f"OUT{i:02d}" for i in range(n)]
    return names + (["VAE"] if arch == "sdxl" else [])


_BLOCK_RE = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")


def block_of(key: str, arch: str) -> str:
    """The MBW slot a key belongs to: BASE, IN00.., M00, OUT00.., VAE (SDXL only)."""
    last_out = "OUT08" if arch == "sdxl" else "OUT11"
    comp = component_of(key)
    if comp == VAE:
        return "VAE" if arch == "sdxl" else "BASE"
    if comp != UNET:
        return "BASE"
    rest = key[len(UNET_PREFIX):]
    if rest.startswith("time_embed.") or rest.startswith("label_emb."):
        return "BASE"
    if rest.startswith("out."):
        return last_out
    m = _BLOCK_RE.match(rest)
    if m:
        return ("IN" if m.group(1) == "input_blocks" else "OUT") + f"{int(m.group(2)):02d}"
    if rest.startswith("middle_block."):
        return "M00"
    return last_out


# ---------------------------------------------------------------------------------------------
# Normalisation of legacy spellings (REPAIR.md §5)

_NAI_TE = re.compile(r"^(cond_stage_model\.transformer\.|conditioner\.embedders\.0\.transformer\.)(embeddings|encoder|final_layer_norm)\.")
_VAE_ATTN = re.compile(r"^first_stage_model\.(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def normalize_key(key: str):
    """Canonical spelling of `key` and the name of the rule applied (or None)."""
    for prefix in ("state_dict.", "module."):
        if key.startswith(prefix):
            return normalize_key(key[len(prefix):])[0], "strip-prefix"
    m = _NAI_TE.match(key)
    if m:
        return f"{m.group(1)}text_model.{key[len(m.group(1)):]}", "insert-text_model"
    return key, None


# ---------------------------------------------------------------------------------------------
# Identification

@dataclass
class ComponentStatus:
    name: str
    expected: int
    present: int
    status: str                  # complete | partial | absent
    missing: list = field(default_factory=list)
    missing_optional: list = field(default_factory=list)
    wrong_shape: list = field(default_factory=list)   # (key, found, expected)

    def to_dict(self):
        return {"expected": self.expected, "present": self.present, "status": self.status,
                "missing": self.missing, "missing_optional": self.missing_optional,
                "wrong_shape": [list(map(list, w[1:])) and [w[0], list(w[1]), list(w[2])] for w in self.wrong_shape]}


@dataclass
class Identity:
    arch: str | None                 # sd1 | sd2 | sdxl | None
    scale: int = 1
    prediction: str = "epsilon"      # epsilon | v | edm-v | edm
    ztsnr: bool = False
    markers: list = field(default_factory=list)
    components: dict = field(default_factory=dict)   # name -> ComponentStatus
    renames: dict = field(default_factory=dict)      # stored key -> canonical key
    reshapes: list = field(default_factory=list)     # canonical keys stored with a convertible shape
    unknown: list = field(default_factory=list)
    ema: list = field(default_factory=list)
    schedule: list = field(default_factory=list)
    junk: list = field(default_factory=list)         # known-junk keys (e.g. TE1 position ids)
    evidence: list = field(default_factory=list)
    runner_up: list = field(default_factory=list)
    refusal: str | None = None       # why this is not a mergeable SD checkpoint
    candidates: list = field(default_factory=list)   # every architecture that explains the file equally well

    @property
    def title(self) -> str:
        if not self.arch:
            return "unknown"
        scale = f" (1/{self.scale} scale)" if self.scale > 1 else ""
        return ARCH_TITLES[self.arch] + scale

    @property
    def is_full(self) -> bool:
        return self.arch is not None and all(c.status == "complete" for c in self.components.values())

    @property
    def partial_components(self) -> list:
        return [n for n, c in self.components.items() if c.status != "complete"]

    def canonical(self, stored_key: str) -> str:
        return self.renames.get(stored_key, stored_key)

    def to_dict(self):
        return {"arch": self.arch, "title": self.title, "scale": self.scale, "prediction": self.prediction,
                "ztsnr": self.ztsnr, "markers": self.markers, "full": self.is_full,
                "components": {k: v.to_dict() for k, v in self.components.items()},
                "renames": self.renames, "reshapes": self.reshapes, "unknown": self.unknown,
                "ema_keys": len(self.ema), "schedule_buffers": self.schedule, "junk": self.junk,
                "evidence": self.evidence, "runner_up": self.runner_up, "refusal": self.refusal}


_FOREIGN = [
    (re.compile(r"^(lora_unet_|lora_te\d?_)|\.(lora_up|lora_down|hada_w1_a|lokr_w1|lora_A|lora_B)\."), "a LoRA / LyCORIS file, not a checkpoint: list it under \"loras\" in the recipe (file + strength) to bake it into the merge, or run `bake`"),
    (re.compile(r"^(down_blocks|up_blocks|mid_block|time_embedding|add_embedding)\.|^(unet|text_encoder|text_encoder_2|vae)\."), "a diffusers-layout model: convert it to the single-file (LDM) layout first"),
    (re.compile(r"^(te1|te2)\."), "a kohya intermediate layout: convert it to the single-file (LDM) layout first"),
    (re.compile(r"x_embedder\.proj\.weight$|^text_encoders\.(clip_l|clip_g|t5xxl)\."), "an SD3 model: not supported"),
    (re.compile(r"(^|\.)(double_blocks|single_blocks)\."), "a FLUX model: not supported"),
    (re.compile(r"^(encoder|decoder)\.(conv_in|down|up|mid)\.|^(quant_conv|post_quant_conv)\."), "a stand-alone VAE file, not a full checkpoint"),
    (re.compile(r"^(input_blocks|middle_block|output_blocks)\."), "a bare UNET without the LDM prefix, not a full checkpoint"),
    (re.compile(r"^(text_model\.|transformer\.resblocks\.)"), "a stand-alone text encoder, not a full checkpoint"),
]

_SIGNATURES = {  # (key, full-size dim 0) pairs used to guess the scale
    "model.diffusion_model.input_blocks.0.0.weight": 320,
    "first_stage_model.encoder.conv_in.weight": 128,
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": 49408,
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": 49408,
    "conditioner.embedders.1.model.token_embedding.weight": 49408,
    "cond_stage_model.model.token_embedding.weight": 49408,
}


def _candidate_scales(shapes) -> list:
    found = set()
    for key, full in _SIGNATURES.items():
        shape = shapes.get(key)
        if shape:
            for s in SCALES:
                if scale_shape((full,), s)[0] == shape[0]:
                    found.add(s)
    return sorted(found) or [1]


def identify(shapes: dict, metadata: dict | None = None) -> Identity:
    """Identify a checkpoint from its key -> shape map (no tensor data needed)."""
    renames, normalized = {}, {}
    for key, shape in shapes.items():
        canon, rule = normalize_key(key)
        if rule:
            renames[key] = canon
        normalized[canon] = tuple(shape)
    for pattern, why in _FOREIGN:
        hits = [k for k in normalized if pattern.search(k)]
        if hits and len(hits) * 4 >= len(normalized) or (hits and not any(k.startswith(UNET_PREFIX) for k in normalized)):
            return Identity(None, refusal=f"this is {why} (e.g. key '{hits[0]}')", renames=renames)
    scores = []
    for arch in ("sd1", "sd2", "sdxl"):
        for scale in _candidate_scales(normalized):
            lay = layout(arch, scale)
            hit = sum(1 for k, spec in lay.items() if normalized.get(k) == spec.shape)
            penalty = sum(1 for k, spec in lay.items() if k in normalized and normalized[k] != spec.shape)
            scores.append((hit - penalty, arch, scale, hit))
    scores.sort(reverse=True)
    score, arch, scale, hit = scores[0]
    if hit == 0:
        return Identity(None, refusal="no Stable Diffusion (SD1/SD2/SDXL) keys found", renames=renames)
    ident = Identity(arch, scale, renames=renames)
    # a file holding only shared parts (e.g. just a VAE) fits several architectures equally well
    ident.candidates = [a for sc, a, s, _h in scores if sc == score and s == scale]
    ident.runner_up = [f"{ARCH_TITLES[a]}@1/{s}: {sc}" for sc, a, s, _h in scores[1:3]]
    ident.evidence = _evidence(normalized, arch, scale)
    _fill_components(ident, normalized)
    _classify_extras(ident, normalized)
    _prediction(ident, normalized, metadata or {})
    return ident


def _evidence(shapes, arch, scale):
    probes = {
        "sd1": ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                "model.diffusion_model.input_blocks.1.1.proj_in.weight"],
        "sd2": ["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
                "model.diffusion_model.input_blocks.1.1.proj_in.weight"],
        "sdxl": ["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                 "model.diffusion_model.label_emb.0.0.weight"],
    }[arch] + ["model.diffusion_model.input_blocks.0.0.weight"]
    return [f"{k} {list(shapes[k])}" for k in probes if k in shapes]


def _fill_components(ident: Identity, shapes: dict):
    per = {}
    for key, spec in layout(ident.arch, ident.scale).items():
        st = per.setdefault(spec.component, ComponentStatus(spec.component, 0, 0, "complete"))
        st.expected += 1
        found = shapes.get(key)
        if found is None:
            (st.missing_optional if spec.optional else st.missing).append(key)
        elif found != spec.shape:
            if _VAE_ATTN.match(key) and found + (1, 1) == spec.shape:
                ident.reshapes.append(key)
                st.present += 1
            else:
                st.wrong_shape.append((key, found, spec.shape))
        else:
            st.present += 1
    for st in per.values():
        mandatory_ok = not st.missing and not st.wrong_shape
        st.status = "complete" if mandatory_ok else ("absent" if st.present == 0 else "partial")
    ident.components = {c: per[c] for c in COMPONENTS if c in per}


def _classify_extras(ident: Identity, shapes: dict):
    known = layout(ident.arch, ident.scale)
    sched = set(schedule_buffers()) | {"logvar"}
    for key in shapes:
        if key in known:
            continue
        if key in MARKERS:
            ident.markers.append(key)
        elif key.startswith("model_ema."):
            ident.ema.append(key)
        elif key in sched:
            ident.schedule.append(key)
        elif key == "conditioner.embedders.1.model.transformer.text_model.embeddings.position_ids":
            ident.junk.append(key)
        else:
            ident.unknown.append(key)


def _prediction(ident: Identity, shapes: dict, metadata: dict):
    if "edm_vpred.sigma_min" in shapes or "edm_vpred.sigma_max" in shapes:
        ident.prediction = "edm-v"
    elif "edm_mean" in shapes or "edm_std" in shapes:
        ident.prediction = "edm"
    elif "v_pred" in shapes:
        ident.prediction = "v"
    elif str(metadata.get("modelspec.prediction_type", "")).lower() in ("v", "v_prediction", "v-prediction"):
        ident.prediction = "v"
        ident.evidence.append("metadata modelspec.prediction_type = v (no v_pred marker key)")
    ident.ztsnr = "ztsnr" in shapes
