"""Synthetic LoRA / LyCORIS files for tests and demos: real module names (kohya's default sets),
factor shapes of a (scaled) layout, every algorithm the bake-in reads (LoRA, LoCon, Tucker LoCon,
LoHa (+Tucker), LoKr (+Tucker), full diffs).
"""
from __future__ import annotations

import math
import os
import re

import torch

from ..core.lora_names import canonical_module_name, module_table
from ..io import arch as archmod
from ..io.writer import save_file

SYNTHETIC_ALGOS = ("lora", "locon", "lora_tucker", "loha", "loha_tucker", "lokr", "lokr_tucker", "full")
_DIFFUSERS_UNET = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks|conv_in|conv_out|conv_norm_out|time_embedding|add_embedding)_")
_ATTENTION_KEY = re.compile(r"\.(transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))|proj_in|proj_out)\.weight$")
_LOCON_KEY = re.compile(r"\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|\d+\.conv)\.weight$")
_TE_KEY = re.compile(r"\.(self_attn\.(q|k|v|out)_proj\.weight|mlp\.(fc1|fc2|c_fc|c_proj)\.weight|attn\.(in_proj_weight|out_proj\.weight))$")


def default_modules(arch: str, convs: bool = True, unet_names: str = "diffusers") -> list:
    """The modules kohya's trainer targets: attention + feed-forward + text encoder, and with `convs` the
    LoCon set (resnet convs, time projections, shortcuts, down/upsamplers); UNET names spelled the
    diffusers way (`unet_names="diffusers"`) or the LDM/sgm way (anything else)."""
    names = []
    for name, target in module_table(arch).items():
        key = target.weight or ""
        if target.component != archmod.UNET:
            if _TE_KEY.search(key):
                names.append(name)
            continue
        if bool(_DIFFUSERS_UNET.match(name)) != (unet_names == "diffusers"):
            continue
        if _ATTENTION_KEY.search(key) or convs and _LOCON_KEY.search(key):
            names.append(name)
    return names


def _split(n: int) -> tuple:
    d = next((d for d in range(2, int(math.isqrt(n)) + 1) if n % d == 0), 1)
    return d, n // d


def synthetic_module(shape, algo: str, rank: int, alpha, gen) -> dict:
    """Factor tensors (suffix -> fp32 tensor) of one module whose delta has `shape` (out, in, *kernel)."""
    out, inn, kernel = shape[0], shape[1] if len(shape) > 1 else 1, tuple(shape[2:])
    kk = math.prod(kernel)

    def rnd(*s):
        return 0.2 * torch.randn(s, generator=gen)
    t = {}
    if algo in ("lora", "locon"):
        t["lora_down.weight"] = rnd(rank, inn, *kernel) if len(shape) > 1 else rnd(rank, 1)
        t["lora_up.weight"] = rnd(out, rank, *((1, 1) if kernel else ()))
    elif algo == "lora_tucker":
        t.update({"lora_down.weight": rnd(rank, inn, 1, 1), "lora_mid.weight": rnd(rank, rank, *(kernel or (1, 1))),
                  "lora_up.weight": rnd(out, rank, 1, 1)})
    elif algo == "loha":
        t.update({"hada_w1_a": rnd(out, rank), "hada_w1_b": rnd(rank, inn * kk), "hada_w2_a": rnd(out, rank),
                  "hada_w2_b": rnd(rank, inn * kk)})
    elif algo == "loha_tucker":
        for n in (1, 2):
            t.update({f"hada_w{n}_a": rnd(rank, out), f"hada_w{n}_b": rnd(rank, inn), f"hada_t{n}": rnd(rank, rank, *(kernel or (1, 1)))})
    elif algo in ("lokr", "lokr_tucker"):
        (o1, o2), (i1, i2) = _split(out), _split(inn)
        t["lokr_w1"] = rnd(o1, i1)
        if algo == "lokr_tucker":
            t.update({"lokr_w2_a": rnd(rank, o2), "lokr_w2_b": rnd(rank, i2), "lokr_t2": rnd(rank, rank, *(kernel or (1, 1)))})
        else:
            t.update({"lokr_w2_a": rnd(o2, rank), "lokr_w2_b": rnd(rank, i2 * kk)})
    elif algo == "full":
        t["diff"] = rnd(*shape)
        t["diff_b"] = rnd(out)
    else:
        raise ValueError(f"unknown synthetic algorithm {algo!r} (known: {', '.join(SYNTHETIC_ALGOS)})")
    if algo != "full" and alpha is not None:
        t["alpha"] = torch.tensor(float(alpha))
    return t


def write_synthetic_lora(path, arch: str, scale: int = 32, algo: str = "lora", rank: int = 4, alpha=2.0, seed: int = 0,
                         modules=None, unet_names: str = "diffusers", dtype=torch.float32, metadata=None) -> list:
    """Write a LoRA / LyCORIS file for `arch` at `scale`; returns the module names written. `modules`
    defaults to kohya's set (with convs unless algo is "lora"); full-diff modules also get a bias diff."""
    names = modules or default_modules(arch, convs=algo != "lora", unet_names=unet_names)
    lay, table = archmod.layout(arch, scale), module_table(arch)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        target = table[canonical_module_name(name)]
        shape = lay[target.weight].shape
        if target.transpose:
            shape = (shape[1], shape[0])
        else:
            shape = (target.rows(shape)[1],) + tuple(shape[1:])
        factors = synthetic_module(shape, algo, rank, alpha, gen)
        if target.bias is None:
            factors.pop("diff_b", None)
        for suffix, value in factors.items():
            tensors[f"{name}.{suffix}"] = value.to(dtype)
    meta = {"ss_network_module": "networks.lora" if algo in ("lora", "locon") else "lycoris.kohya",
            "ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "modelspec.title": os.path.basename(str(path))}
    meta.update(metadata or {})
    save_file(tensors, path, meta, overwrite=True)
    return list(names)
