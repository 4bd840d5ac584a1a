"""Which LDM checkpoint key a LoRA / LyCORIS module name changes.

Trainers name a module after its path in the *diffusers / transformers* model with '.' replaced by
'_' and a prefix: `lora_unet_` (UNET), `lora_te_` (SD1/SD2 text encoder), `lora_te1_` / `lora_te2_`
(SDXL CLIP-L / OpenCLIP-bigG). Some SDXL trainers name UNET modules after the LDM (sgm) path
instead (`lora_unet_input_blocks_4_1_...`); both spellings are accepted. LyCORIS' own prefix
`lycoris_` is read as `lora_`.

The table is built programmatically from the LDM key layouts (arch.layout): every LDM weight/bias
key is translated to its diffusers path by the structural rules below (no hard-coded block counts),
so SD1 (4 levels) and SDXL (3 levels, depths 2/10) come out of the same code.

A `Target` says where a module's delta lands: the LDM weight and bias keys, which third of a fused
OpenCLIP `in_proj_weight` (q, k, v stacked along dim 0) it owns, and whether it is stored
transposed (OpenCLIP `text_projection` is used as `x @ P`, the transformers Linear as `x @ W.T`).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ..io import arch as archmod

PREFIX_ALIASES = (("lycoris_", "lora_"),)


@dataclass(frozen=True)
class Target:
    weight: str | None           # LDM key of the weight (None: the module has no weight, e.g. logit_scale)
    bias: str | None             # LDM key of the bias, if the module has one
    component: str               # unet | te0 | te1
    part: int = 0                # fused q/k/v: which third of dim 0 (0, 1, 2)
    parts: int = 1               # 3 for a fused in_proj, else 1
    transpose: bool = False      # the LDM tensor is the transpose of the trained Linear weight

    def rows(self, key_shape) -> tuple:
        """(first row, row count) of `key_shape` this module owns."""
        total = key_shape[0] if key_shape else 1
        step = total // self.parts
        return self.part * step, step


# ---------------------------------------------------------------------------------------------
# UNET: LDM (sgm) module path -> diffusers module path

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_UNET_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks|middle_block)\.(?:(\d+)\.)?(\d+)\.(.+)$")


def _resnet_child(rest: str) -> str | None:
    for ldm, hf in _RESNET.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return hf + rest[len(ldm):]
    return None


def unet_diffusers_path(path: str) -> str | None:
    """diffusers path of an LDM UNET module path (without `model.diffusion_model.`), or None.

    Rules (the same for every SD1/SD2/SDXL UNET; 3 input blocks per level, 3 output blocks per level):
    input_blocks.N.0 (N = 3i+j+1, j < 2) -> down_blocks.i.resnets.j; input_blocks.N.1 -> down_blocks.i.attentions.j;
    input_blocks.3(i+1).0.op -> down_blocks.i.downsamplers.0.conv; middle_block.0/1/2 -> mid_block.resnets.0 /
    attentions.0 / resnets.1; output_blocks.N.0 -> up_blocks.(N//3).resnets.(N%3); output_blocks.N.1 ->
    up_blocks.(N//3).attentions.(N%3) unless it is the upsampler (a bare `conv`), which is
    up_blocks.(N//3).upsamplers.0.conv like output_blocks.N.2.
    """
    if path in _UNET_FIXED:
        return _UNET_FIXED[path]
    m = _LDM_BLOCK.match(path)
    if not m:
        return None
    kind, n, sub, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    if kind == "middle_block":
        if n is not None:
            return None
        if sub == 1:
            return f"mid_block.attentions.0.{rest}"
        child = _resnet_child(rest)
        return f"mid_block.resnets.{sub // 2}.{child}" if child and sub in (0, 2) else None
    n = int(n)
    if kind == "input_blocks":
        level, j = (n - 1) // 3, (n - 1) % 3
        if j == 2:
            return f"down_blocks.{level}.downsamplers.0.conv{rest[2:]}" if sub == 0 and (rest == "op" or rest.startswith("op.")) else None
        if sub == 0:
            child = _resnet_child(rest)
            return f"down_blocks.{level}.resnets.{j}.{child}" if child else None
        return f"down_blocks.{level}.attentions.{j}.{rest}" if sub == 1 else None
    level, j = n // 3, n % 3
    if sub == 0:
        child = _resnet_child(rest)
        return f"up_blocks.{level}.resnets.{j}.{child}" if child else None
    if rest == "conv" or rest.startswith("conv."):
        return f"up_blocks.{level}.upsamplers.0.{rest}"
    return f"up_blocks.{level}.attentions.{j}.{rest}" if sub == 1 else None


# ---------------------------------------------------------------------------------------------
# Text encoders: LDM path -> transformers (CLIPTextModel) path

_OPENCLIP = [  # (LDM OpenCLIP fragment, transformers fragment), applied in order
    ("transformer.resblocks.", "text_model.encoder.layers."), (".attn.out_proj", ".self_attn.out_proj"),
    (".ln_1", ".layer_norm1"), (".ln_2", ".layer_norm2"), (".mlp.c_fc", ".mlp.fc1"), (".mlp.c_proj", ".mlp.fc2"),
]
_OPENCLIP_FIXED = {"ln_final": "text_model.final_layer_norm", "token_embedding": "text_model.embeddings.token_embedding",
                   "positional_embedding": "text_model.embeddings.position_embedding", "text_projection": "text_projection"}


def openclip_hf_path(path: str) -> str:
    if path in _OPENCLIP_FIXED:
        return _OPENCLIP_FIXED[path]
    for ldm, hf in _OPENCLIP:
        path = path.replace(ldm, hf)
    return path


# (LDM prefix, LoRA prefix, OpenCLIP form?) per architecture; SD1's and SDXL-CLIP-L's LDM keys already use
# the transformers names under `text_model.`.
_TE_PREFIXES = {
    "sd1": [("cond_stage_model.transformer.", "lora_te_", False)],
    "sd2": [("cond_stage_model.model.", "lora_te_", True)],
    "sdxl": [("conditioner.embedders.0.transformer.", "lora_te1_", False), ("conditioner.embedders.1.model.", "lora_te2_", True)],
}


def _split_param(key: str):
    """(module path, parameter kind) of an LDM key: kind is weight | bias | in_proj_weight | in_proj_bias."""
    for suffix in (".in_proj_weight", ".in_proj_bias"):
        if key.endswith(suffix):
            return key[:-len(suffix)], suffix[1:]
    for suffix in (".weight", ".bias"):
        if key.endswith(suffix):
            return key[:-len(suffix)], suffix[1:]
    return key, "weight"          # bare parameters: positional_embedding, text_projection, logit_scale


def underscore(path: str) -> str:
    return path.replace(".", "_")


def canonical_module_name(name: str) -> str:
    for old, new in PREFIX_ALIASES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


@functools.lru_cache(maxsize=None)
def module_table(arch: str) -> dict:
    """LoRA module name -> Target for every trainable LDM module of `arch` (UNET and text encoders)."""
    builders = {}      # name -> {"weight": key, "bias": key, "component", "part", "parts", "transpose"}

    def add(name, kind, key, component, part=0, parts=1, transpose=False):
        entry = builders.setdefault(name, {"component": component, "part": part, "parts": parts, "transpose": transpose})
        if entry.get(kind) not in (None, key):
            raise AssertionError(f"LoRA name {name} maps to both {entry[kind]} and {key}")
        entry[kind] = key

    for key, spec in archmod.layout(arch).items():
        if spec.component == archmod.UNET:
            path, kind = _split_param(key[len(archmod.UNET_PREFIX):])
            diffusers = unet_diffusers_path(path)
            add("lora_unet_" + underscore(path), kind, key, spec.component)
            if diffusers:
                add("lora_unet_" + underscore(diffusers), kind, key, spec.component)
            continue
        for ldm_prefix, lora_prefix, openclip in _TE_PREFIXES.get(arch, []):
            if not key.startswith(ldm_prefix) or key.endswith(("position_ids", "logit_scale")):
                continue
            path, kind = _split_param(key[len(ldm_prefix):])
            if not openclip:
                add(lora_prefix + underscore(path), kind, key, spec.component)
                continue
            if kind.startswith("in_proj_"):    # path ends in `.attn`: one fused tensor, three trained Linears
                layer = openclip_hf_path(path[:-len(".attn")])
                for part, letter in enumerate("qkv"):
                    add(f"{lora_prefix}{underscore(layer)}_self_attn_{letter}_proj", kind[len("in_proj_"):], key,
                        spec.component, part, 3)
            else:
                add(lora_prefix + underscore(openclip_hf_path(path)), kind, key, spec.component,
                    transpose=path == "text_projection")
    return {name: Target(b.get("weight"), b.get("bias"), b["component"], b["part"], b["parts"], b["transpose"])
            for name, b in builders.items()}


def target_of(name: str, arch: str) -> Target | None:
    return module_table(arch).get(canonical_module_name(name))
