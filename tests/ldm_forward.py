"""A compact functional forward pass of the LDM UNet (SD1 / SD2 / SDXL) on an LDM-keyed state dict.

Written from the reference model (CompVis/Stability `openaimodel.py` UNetModel + `attention.py`
SpatialTransformer), independently of the Re-Basin spec: it discovers the modules from the key
names and runs them, so a spec that breaks the function shows up as a different output here.

* ResBlock: GroupNorm → SiLU → conv3×3, + Linear(SiLU(emb)) broadcast over H×W, GroupNorm → SiLU →
  conv3×3, plus the input (or its 1×1 `skip_connection`).
* SpatialTransformer: GroupNorm(eps 1e-6) → proj_in (1×1 conv in SD1, Linear in SD2/SDXL) → blocks
  of [LayerNorm → self-attention, LayerNorm → cross-attention on the context, LayerNorm → GEGLU
  feed-forward], each residual → proj_out, + input.
* Downsample: conv3×3 stride 2; Upsample: nearest ×2 then conv3×3; input blocks push their
  output, output blocks concatenate [h, popped skip] on channels.
* Embedding: sinusoidal timestep (cos | sin) → time_embed MLP; SDXL adds label_emb(y).

`groups` (GroupNorm) and `heads(width)` are the network's hyper-parameters, which a state dict does
not carry. For scaled-down layouts the tests pass the conventions of `rebasin.spec`
(groupnorm_groups / attention_heads): at 1/8 scale that is 4 GroupNorm groups and 8 (SD1) or 5–20
(SDXL) heads, a genuinely grouped, multi-head network, so a permutation that mixes groups or heads
changes the output (tests check that too).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

PREFIX = "model.diffusion_model."


class LDMUNet:
    def __init__(self, state: dict, groups: int, heads):
        self.w = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        self.groups, self.heads = groups, heads

    # -- building blocks -----------------------------------------------------------------------
    def linear(self, x, p):
        return F.linear(x, self.w[f"{p}.weight"], self.w.get(f"{p}.bias"))

    def conv(self, x, p, stride=1):
        w = self.w[f"{p}.weight"]
        return F.conv2d(x, w, self.w.get(f"{p}.bias"), stride=stride, padding=w.shape[-1] // 2)

    def group_norm(self, x, p, eps=1e-5):
        return F.group_norm(x, self.groups, self.w[f"{p}.weight"], self.w[f"{p}.bias"], eps)

    def layer_norm(self, x, p):
        return F.layer_norm(x, x.shape[-1:], self.w[f"{p}.weight"], self.w[f"{p}.bias"], 1e-5)

    def has(self, key) -> bool:
        return key in self.w

    # -- modules -------------------------------------------------------------------------------
    def resblock(self, x, emb, p):
        h = self.conv(F.silu(self.group_norm(x, f"{p}.in_layers.0")), f"{p}.in_layers.2")
        h = h + self.linear(F.silu(emb), f"{p}.emb_layers.1")[:, :, None, None]
        h = self.conv(F.silu(self.group_norm(h, f"{p}.out_layers.0")), f"{p}.out_layers.3")
        skip = self.conv(x, f"{p}.skip_connection") if self.has(f"{p}.skip_connection.weight") else x
        return skip + h

    def attention(self, x, context, p):
        q = self.linear(x, f"{p}.to_q")
        k, v = self.linear(context, f"{p}.to_k"), self.linear(context, f"{p}.to_v")
        b, n, width = q.shape
        h = self.heads(width)
        q, k, v = (t.reshape(b, -1, h, width // h).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // h), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, n, width)
        return self.linear(out, f"{p}.to_out.0")

    def geglu(self, x, p):
        value, gate = self.linear(x, f"{p}.net.0.proj").chunk(2, dim=-1)
        return self.linear(value * F.gelu(gate), f"{p}.net.2")

    def transformer(self, x, context, p):
        b, c, hh, ww = x.shape
        h = self.group_norm(x, f"{p}.norm", eps=1e-6)
        conv_proj = self.w[f"{p}.proj_in.weight"].dim() == 4
        if conv_proj:
            h = self.conv(h, f"{p}.proj_in")
        h = h.reshape(b, h.shape[1], hh * ww).transpose(1, 2)
        if not conv_proj:
            h = self.linear(h, f"{p}.proj_in")
        for n in range(_count(self.w, f"{p}.transformer_blocks")):
            q = f"{p}.transformer_blocks.{n}"
            a = self.layer_norm(h, f"{q}.norm1")
            h = self.attention(a, a, f"{q}.attn1") + h
            h = self.attention(self.layer_norm(h, f"{q}.norm2"), context, f"{q}.attn2") + h
            h = self.geglu(self.layer_norm(h, f"{q}.norm3"), f"{q}.ff") + h
        if not conv_proj:
            h = self.linear(h, f"{p}.proj_out")
        h = h.transpose(1, 2).reshape(b, h.shape[-1], hh, ww)
        if conv_proj:
            h = self.conv(h, f"{p}.proj_out")
        return h + x

    def module(self, x, emb, context, p):
        if self.has(f"{p}.in_layers.0.weight"):
            return self.resblock(x, emb, p)
        if self.has(f"{p}.proj_in.weight"):
            return self.transformer(x, context, p)
        if self.has(f"{p}.op.weight"):
            return self.conv(x, f"{p}.op", stride=2)
        if self.has(f"{p}.conv.weight"):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), f"{p}.conv")
        if p == "input_blocks.0.0":
            return self.conv(x, p)
        raise KeyError(f"unknown module {p}")

    # -- the network ---------------------------------------------------------------------------
    def __call__(self, x, t, context, y=None):
        t_emb = timestep_embedding(t, self.w["time_embed.0.weight"].shape[1]).to(x.dtype)
        emb = self.linear(F.silu(self.linear(t_emb, "time_embed.0")), "time_embed.2")
        if self.has("label_emb.0.0.weight"):
            emb = emb + self.linear(F.silu(self.linear(y, "label_emb.0.0")), "label_emb.0.2")
        h, skips = x, []
        for i in range(_count(self.w, "input_blocks")):
            for j in _children(self.w, f"input_blocks.{i}"):
                h = self.module(h, emb, context, f"input_blocks.{i}.{j}")
            skips.append(h)
        for j in _children(self.w, "middle_block"):
            h = self.module(h, emb, context, f"middle_block.{j}")
        for i in range(_count(self.w, "output_blocks")):
            h = torch.cat([h, skips.pop()], dim=1)
            for j in _children(self.w, f"output_blocks.{i}"):
                h = self.module(h, emb, context, f"output_blocks.{i}.{j}")
        return self.conv(F.silu(self.group_norm(h, "out.0")), "out.2")


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None].double() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb   # as LDM pads odd dims


def _children(w, block) -> list:
    pattern = re.compile(rf"^{re.escape(block)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in w if (m := pattern.match(k))})


def _count(w, name) -> int:
    found = _children(w, name)
    return max(found) + 1 if found else 0


def random_unet(arch: str, scale: int, seed: int = 0, dtype=torch.float64) -> dict:
    """A random LDM UNet state dict at `scale` (real key names): weights ~ N(0, 1/fan_in), norm
    scales 1 ± 0.1, biases ±0.1 — non-trivial everywhere, so every permuted bias matters."""
    from astolfo_merge.io import arch as archmod
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, spec in archmod.layout(arch, scale).items():
        if spec.component != "unet":
            continue
        shape = spec.shape
        noise = torch.randn(shape, generator=g).to(dtype)     # fp32 draws: fp64 randn is ~7x slower
        if len(shape) == 1:
            out[key] = (1.0 if key.endswith(".weight") else 0.0) + 0.1 * noise
        else:
            out[key] = noise / math.sqrt(math.prod(shape[1:]))
    return out


def sample_inputs(state: dict, seed: int = 1, batch: int = 2, size: int = 8, tokens: int = 5):
    """(x, t, context, y) shaped for `state`: latent batch×C×size×size, context batch×tokens×ctx."""
    g = torch.Generator().manual_seed(seed)
    w = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    latent = w["input_blocks.0.0.weight"].shape[1]
    ctx = next(v.shape[1] for k, v in w.items() if k.endswith("attn2.to_k.weight"))
    dtype = w["input_blocks.0.0.weight"].dtype
    x = torch.randn(batch, latent, size, size, generator=g, dtype=dtype)
    t = torch.tensor([10.0, 700.0][:batch])
    context = torch.randn(batch, tokens, ctx, generator=g, dtype=dtype)
    y = torch.randn(batch, w["label_emb.0.0.weight"].shape[1], generator=g, dtype=dtype) if "label_emb.0.0.weight" in w else None
    return x, t, context, y
