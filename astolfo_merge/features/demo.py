"""Synthetic checkpoints with real key names (scaled-down or full-size) for demos, tests and benchmarks.

Each tensor is generated from its own seeded generator (seed, key), so a file is written key by
key through the streaming writer: a full-size checkpoint never sits in memory. A "fine-tune" is
the base plus a seeded delta, like real community models around one base.
"""
from __future__ import annotations

import hashlib
import math
import os

import torch

from ..io import arch as archmod
from ..io.writer import SafetensorsWriter

DEMO_SCALE = 32
DEMO_MODELS = [  # (file name, arch, variant seed or None for the base, options)
    ("demo-sd1-base.safetensors", "sd1", None, {}),
    ("demo-sd1-anime.safetensors", "sd1", 1, {}),
    ("demo-sd1-photo.safetensors", "sd1", 2, {}),
    ("demo-sd1-painted.safetensors", "sd1", 3, {}),
    ("demo-sdxl-base.safetensors", "sdxl", None, {}),
    ("demo-sdxl-anime.safetensors", "sdxl", 11, {}),
    ("demo-sdxl-photo.safetensors", "sdxl", 12, {}),
    ("demo-sdxl-pruned.safetensors", "sdxl", 13, {"drop": ["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]}),
    ("demo-sdxl-vpred.safetensors", "sdxl", 14, {"markers": ["v_pred", "ztsnr"]}),
]


def _gen(seed: int, key: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1))
    return g


def _is_norm(key: str) -> bool:
    return any(t in key for t in ("norm", "ln_", "layer_norm", ".in_layers.0.", ".out_layers.0.", "out.0.")) and key.endswith("weight")


def base_tensor(key: str, shape, seed: int = 0) -> torch.Tensor:
    """A plausible 'pretrained' value for one key (fp32)."""
    g = _gen(seed, key)
    if key.endswith("logit_scale"):
        return torch.tensor(math.log(100.0)).reshape(shape)
    if len(shape) == 0:
        return torch.randn((), generator=g)
    if _is_norm(key) and len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    if len(shape) == 1 or "embedding" in key:
        return 0.02 * torch.randn(shape, generator=g)
    fan_in = max(1, math.prod(shape[1:]))
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def model_tensor(key: str, shape, base_seed: int, variant: int | None, strength: float) -> torch.Tensor:
    t = base_tensor(key, shape, base_seed)
    if variant is not None and t.numel():
        d = torch.randn(t.shape, generator=_gen(10_000 + variant, key))
        t = t + strength * (t.std() if t.numel() > 1 else 1.0) * d
    return t


def write_synthetic(path, arch: str, scale: int = DEMO_SCALE, base_seed: int = 0, variant: int | None = None,
                    strength: float = 0.05, dtype=torch.float16, drop=(), markers=(), overwrite=False,
                    metadata=None) -> str:
    """Write one synthetic checkpoint key by key; returns its sha256."""
    lay = archmod.layout(arch, scale)
    entries = []
    for key, spec in lay.items():
        if key in drop:
            continue
        is_ids = key.endswith("position_ids")
        entries.append((key, torch.int64 if is_ids else dtype, spec.shape))
    entries += [(m, torch.int64, (0,)) for m in markers]
    meta = {"modelspec.title": os.path.basename(str(path)), "astolfo_merge_demo": f"{arch} 1/{scale} seed {base_seed} variant {variant}"}
    meta.update(metadata or {})
    with SafetensorsWriter(path, entries, meta, overwrite=overwrite) as w:
        for key, edtype, shape in entries:
            if key in markers:
                w.write(key, torch.zeros((0,), dtype=torch.int64))
            elif key.endswith("position_ids"):
                w.write(key, torch.arange(shape[-1], dtype=torch.int64).reshape(shape))
            else:
                w.write(key, model_tensor(key, shape, base_seed, variant, strength).to(edtype))
        return w.commit()


def write_demo_models(folder, scale: int = DEMO_SCALE, overwrite=False, log=print) -> list:
    """The demo set: SD1 and SDXL bases with a few 'fine-tunes', one pruned and one v-pred SDXL."""
    os.makedirs(folder, exist_ok=True)
    written = []
    for name, arch, variant, opts in DEMO_MODELS:
        path = os.path.join(folder, name)
        if os.path.exists(path) and not overwrite:
            continue
        write_synthetic(path, arch, scale, variant=variant, overwrite=overwrite, **opts)
        written.append(path)
        log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, {archmod.ARCH_TITLES[arch]} at 1/{scale} scale)")
    return written
