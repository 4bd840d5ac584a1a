"""Which permutations of an LDM UNet leave its function unchanged, derived from the key layout.

A permutation *variable* renumbers one hidden *space*: a set of channels that several tensors index
on one axis (rows of the layer that produces it, columns of the layers that read it, the norms and
biases in between). Permuting every use of a space with the same permutation is an exact
reparametrisation, as long as nothing computes *across* the channels of that space except what the
rules below allow. Rules, each one a reason something is or is not permuted:

* Residual paths: a ResBlock without `skip_connection` and every SpatialTransformer add their output
  to their input, so both share one space; conv_in, a downsample / upsample conv and a ResBlock's
  `skip_connection` start a new one. Each input block pushes its output; each output block
  concatenates [h, popped skip] on the channel axis, so that axis of `in_layers.0/2` and
  `skip_connection` is split into segments, one per space (a space can appear twice).
* GroupNorm (ResBlock `in_layers.0` / `out_layers.0`, transformer `norm`, `out.0`) takes statistics
  over groups of consecutive channels: a permutation must map groups onto groups (moving whole
  groups, shuffling inside them). For a concatenation the groups are those of the concatenated
  axis; a group straddling two segments is pinned in place in both. Where several norms read one
  space, every one of their groupings is kept (`structure`).
* LayerNorm (transformer `norm1..3`) normalises over all channels: the transformer's inner space
  (proj_in rows .. proj_out columns) may be permuted freely.
* Attention: q and k rows share one permutation inside each head (their dot product), v rows and
  to_out's columns another; heads move as wholes, in the same order for q, k and v.
* GEGLU feed-forward: `ff.net.0.proj` rows are [value half; gate half]; one permutation of the
  hidden units acts on both halves and on `ff.net.2`'s columns.
* Time / label embedding: the hidden units of both MLPs and the embedding that every ResBlock's
  `emb_layers.1` reads (after SiLU, elementwise) are free.
* Never permuted: the latent channels (conv_in input, out.2 output), the text context (attn2 k/v
  input), the sinusoidal timestep input and SDXL's label vector. Text encoders and VAE are not
  part of the spec at all.

Every UNet key of the layout must be recognised: an unknown module raises ArchitectureError
rather than being left unpermuted next to permuted neighbours (which would break the function).
The spec as data (segments, trees, variables) and its use on tensors are in permutation.py.
"""
from __future__ import annotations

import functools
import re

from ...errors import ArchitectureError
from ...io import arch as archmod
from .permutation import Node, PermutationSpec, Segment, Variable

UNET = archmod.UNET_PREFIX
FULL_SIZE_GROUPS = 32


def groupnorm_groups(scale: int) -> int:
    """GroupNorm groups at `scale`: 32 at full size. Scaled-down layouts keep the group *size*
    (width/32 at full size), i.e. 32/scale groups and at least one; so the 1/8-scale network
    (widths 40/80/160) has 4 groups and stays a genuinely grouped network."""
    return max(1, FULL_SIZE_GROUPS // scale)


def attention_heads(arch: str, width: int, scale: int) -> int | None:
    """Heads of an attention `width` channels wide: SD1 has 8 heads, SD2/SDXL 64-channel heads.
    Scaled layouts keep the head count and shrink the head dim (64/scale). None when that does not
    divide the width: the heads are then unknown and the attention's internals stay unpermuted."""
    if arch == "sd1":
        heads = 8
    else:
        head_dim = max(1, 64 // scale)
        heads = width // head_dim if width % head_dim == 0 else None
    return heads if heads and width % heads == 0 else None


# ---------------------------------------------------------------------------------------------
# Groupings -> tree

def structure(size: int, partitions) -> Node:
    """The tree of permutations of [0, size) that map every block of every partition onto a block
    of the same partition. Partitions are tuples of (start, stop, pinned) intervals covering
    [0, size); a pinned block must stay where it is (it belongs to a group shared with another
    space). Where the partitions nest (the common case) the tree allows exactly those
    permutations; where two groupings cross (e.g. 40- and 60-channel groups on one space), the
    cells of their common refinement stay in place and are shuffled inside only — a safe subset."""
    return _build(0, size, [tuple(p) for p in partitions])


def _build(lo: int, hi: int, partitions) -> Node:
    parts = [p for p in partitions if len(p) > 1]
    if not parts:
        return Node(lo, hi)
    cuts = sorted(set.intersection(*({a for a, _b, _p in p} | {hi} for p in parts)))
    if len(cuts) > 2:                       # the join splits the range: recurse into its blocks
        children, signatures = [], []
        for a, b in zip(cuts, cuts[1:]):
            sub = [tuple(iv for iv in p if a <= iv[0] and iv[1] <= b) for p in parts]
            children.append(_build(a, b, sub))
            signatures.append(tuple(tuple((x - a, y - a, pin) for x, y, pin in p) for p in sub))
        return Node(lo, hi, tuple(children), _exchangeable(signatures))
    cells = sorted({a for p in parts for a, _b, _p in p} | {hi})
    return Node(lo, hi, tuple(Node(a, b) for a, b in zip(cells, cells[1:])), ())


def _exchangeable(signatures) -> tuple:
    by_shape = {}
    for i, sig in enumerate(signatures):
        if not any(pin for p in sig for _a, _b, pin in p):
            by_shape.setdefault(sig, []).append(i)
    return tuple(tuple(ix) for ix in by_shape.values() if len(ix) > 1)


def _heads_tree(width: int, heads: int) -> Node:
    d = width // heads
    return Node(0, width, tuple(Node(h * d, (h + 1) * d) for h in range(heads)), (tuple(range(heads)),))


# ---------------------------------------------------------------------------------------------
# Layout -> spec

@functools.lru_cache(maxsize=None)
def build_spec(arch: str, scale: int = 1) -> PermutationSpec:
    """The function-preserving permutation spec of `arch`'s UNet at `scale` (cached; read-only)."""
    return _Builder(arch, scale).build()


def _fixed(size: int) -> Segment:
    return Segment(None, 0, size)


class _Builder:
    """Walks the UNet in forward order (input blocks, middle, output blocks popping skips), creating
    a variable where a space starts and recording every axis that reads or writes it."""

    def __init__(self, arch: str, scale: int):
        lay = archmod.layout(arch, scale)
        self.shapes = {k[len(UNET):]: s.shape for k, s in lay.items() if k.startswith(UNET)}
        if not self.shapes:
            raise ArchitectureError(f"the {arch} layout has no UNet keys")
        self.arch, self.scale, self.groups = arch, scale, groupnorm_groups(scale)
        self.variables, self.axes = {}, {}

    # -- bookkeeping ---------------------------------------------------------------------------
    def has(self, key) -> bool:
        return key in self.shapes

    def width(self, key, axis=0) -> int:
        if key not in self.shapes:
            raise ArchitectureError(f"the {self.arch} UNet layout lacks '{UNET}{key}'")
        return self.shapes[key][axis]

    def new(self, name, size, kind, facets=("channels",), tree=None) -> str:
        self.variables[name] = Variable(name, size, kind, facets, tree)
        return name

    def seg(self, var, facet=0) -> Segment:
        return Segment(var, facet, self.variables[var].size)

    def use(self, key, axis, segments):
        shape = self.shapes.get(key)
        if shape is None:
            raise ArchitectureError(f"the {self.arch} UNet layout lacks '{UNET}{key}'")
        if sum(s.size for s in segments) != shape[axis]:
            raise ArchitectureError(f"'{UNET}{key}' axis {axis} has {shape[axis]} entries; the UNet structure "
                                    f"implies {[s.size for s in segments]}")
        axes = self.axes.setdefault(key, [None] * len(shape))
        axes[axis] = tuple(segments)
        offset = 0
        for s in segments:
            if s.var is not None:
                self.variables[s.var].members.append((UNET + key, axis, offset, s.facet))
            offset += s.size

    def layer(self, prefix, rows, cols):
        """Linear or conv weight [rows, cols, (kh, kw)] and its bias [rows]."""
        self.use(f"{prefix}.weight", 0, rows)
        self.use(f"{prefix}.weight", 1, cols)
        for axis, size in enumerate(self.shapes[f"{prefix}.weight"][2:], 2):   # conv kernel: never permuted
            self.use(f"{prefix}.weight", axis, [_fixed(size)])
        if self.has(f"{prefix}.bias"):
            self.use(f"{prefix}.bias", 0, rows)

    def layernorm(self, prefix, segments):
        self.use(f"{prefix}.weight", 0, segments)
        self.use(f"{prefix}.bias", 0, segments)

    def groupnorm(self, prefix, segments):
        width = sum(s.size for s in segments)
        if width % self.groups:
            raise ArchitectureError(f"'{UNET}{prefix}': {width} channels do not split into {self.groups} GroupNorm groups")
        size = width // self.groups
        self.layernorm(prefix, segments)
        offset = 0
        for s in segments:
            if s.var is not None:
                blocks = []
                for g in range(offset // size, (offset + s.size - 1) // size + 1):
                    a, b = max(g * size, offset), min((g + 1) * size, offset + s.size)
                    blocks.append((a - offset, b - offset, a != g * size or b != (g + 1) * size))
                self.variables[s.var].partitions.append(tuple(blocks))
            offset += s.size

    def modules(self, block) -> list:
        """Sub-module indices of one block, in forward order."""
        pattern = re.compile(rf"^{re.escape(block)}\.(\d+)\.")
        return sorted({int(m.group(1)) for k in self.shapes if (m := pattern.match(k))})

    def count(self, name) -> int:
        """How many numbered children `name.<i>.` has (0 if none)."""
        pattern = re.compile(rf"^{re.escape(name)}\.(\d+)\.")
        found = [int(m.group(1)) for k in self.shapes if (m := pattern.match(k))]
        return max(found) + 1 if found else 0

    # -- the walk ------------------------------------------------------------------------------
    def build(self) -> PermutationSpec:
        emb = self.embeddings()
        latent = self.width("input_blocks.0.0.weight", 1)
        h = self.new("input_blocks.0.0:stream", self.width("input_blocks.0.0.weight"), "stream")
        self.layer("input_blocks.0.0", [self.seg(h)], [_fixed(latent)])
        skips = [h]
        for i in range(1, self.count("input_blocks")):
            for j in self.modules(f"input_blocks.{i}"):
                h = self.module(f"input_blocks.{i}.{j}", [h], emb)
            skips.append(h)
        for j in self.modules("middle_block"):
            h = self.module(f"middle_block.{j}", [h], emb)
        for i in range(self.count("output_blocks")):
            inputs = [h, skips.pop()]
            for j in self.modules(f"output_blocks.{i}"):
                h = self.module(f"output_blocks.{i}.{j}", inputs, emb)
                inputs = [h]
        self.groupnorm("out.0", [self.seg(h)])
        self.layer("out.2", [_fixed(self.width("out.2.weight"))], [self.seg(h)])
        return self.finish()

    def embeddings(self) -> str:
        hidden = self.new("time_embed:hidden", self.width("time_embed.0.weight"), "embedding hidden")
        emb = self.new("time_embed:emb", self.width("time_embed.2.weight"), "embedding")
        self.layer("time_embed.0", [self.seg(hidden)], [_fixed(self.width("time_embed.0.weight", 1))])
        self.layer("time_embed.2", [self.seg(emb)], [self.seg(hidden)])
        if self.has("label_emb.0.0.weight"):
            label = self.new("label_emb:hidden", self.width("label_emb.0.0.weight"), "embedding hidden")
            self.layer("label_emb.0.0", [self.seg(label)], [_fixed(self.width("label_emb.0.0.weight", 1))])
            self.layer("label_emb.0.2", [self.seg(emb)], [self.seg(label)])
        return emb

    def module(self, p, inputs, emb) -> str:
        if self.has(f"{p}.in_layers.0.weight"):
            return self.resblock(p, inputs, emb)
        if len(inputs) != 1:
            raise ArchitectureError(f"'{UNET}{p}' receives a skip concatenation but is not a ResBlock")
        if self.has(f"{p}.proj_in.weight"):
            return self.transformer(p, inputs[0])
        for conv in ("op", "conv"):         # Downsample / Upsample: a conv that starts a new space
            if self.has(f"{p}.{conv}.weight"):
                out = self.new(f"{p}:stream", self.width(f"{p}.{conv}.weight"), "stream")
                self.layer(f"{p}.{conv}", [self.seg(out)], [self.seg(inputs[0])])
                return out
        raise ArchitectureError(f"unknown UNet module at '{UNET}{p}'")

    def resblock(self, p, inputs, emb) -> str:
        ins = [self.seg(v) for v in inputs]
        self.groupnorm(f"{p}.in_layers.0", ins)
        hidden = self.new(f"{p}:hidden", self.width(f"{p}.in_layers.2.weight"), "resblock hidden")
        self.layer(f"{p}.in_layers.2", [self.seg(hidden)], ins)
        copies = self.width(f"{p}.emb_layers.1.weight") // self.variables[hidden].size  # 2 with scale-shift norm
        self.layer(f"{p}.emb_layers.1", [self.seg(hidden)] * copies, [self.seg(emb)])
        self.groupnorm(f"{p}.out_layers.0", [self.seg(hidden)])
        if self.has(f"{p}.skip_connection.weight"):
            out = self.new(f"{p}:stream", self.width(f"{p}.out_layers.3.weight"), "stream")
            self.layer(f"{p}.skip_connection", [self.seg(out)], ins)
        elif len(inputs) == 1 and self.variables[inputs[0]].size == self.width(f"{p}.out_layers.3.weight"):
            out = inputs[0]                 # identity skip: the residual stream continues
        else:
            raise ArchitectureError(f"'{UNET}{p}' changes width without a skip_connection")
        self.layer(f"{p}.out_layers.3", [self.seg(out)], [self.seg(hidden)])
        return out

    def transformer(self, p, stream) -> str:
        s = [self.seg(stream)]
        self.groupnorm(f"{p}.norm", s)
        inner = self.new(f"{p}:inner", self.width(f"{p}.proj_in.weight"), "transformer inner")
        self.layer(f"{p}.proj_in", [self.seg(inner)], s)
        for b in range(self.count(f"{p}.transformer_blocks")):
            q = f"{p}.transformer_blocks.{b}"
            for n in (1, 2, 3):
                self.layernorm(f"{q}.norm{n}", [self.seg(inner)])
            self.attention(f"{q}.attn1", inner, cross=False)
            self.attention(f"{q}.attn2", inner, cross=True)
            hidden = self.new(f"{q}.ff:hidden", self.width(f"{q}.ff.net.0.proj.weight") // 2, "feed-forward hidden")
            self.layer(f"{q}.ff.net.0.proj", [self.seg(hidden), self.seg(hidden)], [self.seg(inner)])  # GEGLU halves
            self.layer(f"{q}.ff.net.2", [self.seg(inner)], [self.seg(hidden)])
        self.layer(f"{p}.proj_out", s, [self.seg(inner)])
        return stream

    def attention(self, p, inner, cross: bool):
        width = self.width(f"{p}.to_q.weight")
        heads = attention_heads(self.arch, width, self.scale)
        if heads:
            var = self.new(f"{p}:heads", width, "attention", ("qk", "v"), _heads_tree(width, heads))
            qk, v = [self.seg(var, 0)], [self.seg(var, 1)]
        else:
            qk = v = [_fixed(width)]
        source = [_fixed(self.width(f"{p}.to_k.weight", 1))] if cross else [self.seg(inner)]
        self.layer(f"{p}.to_q", qk, [self.seg(inner)])
        self.layer(f"{p}.to_k", qk, source)
        self.layer(f"{p}.to_v", v, source)
        self.layer(f"{p}.to_out.0", [self.seg(inner)], v)

    def finish(self) -> PermutationSpec:
        unknown = sorted(set(self.shapes) - set(self.axes))
        if unknown:
            raise ArchitectureError(f"{len(unknown)} UNet key(s) of the {self.arch} layout are not understood by the "
                                    f"Re-Basin spec, e.g. '{UNET}{unknown[0]}'")
        for key, axes in self.axes.items():
            if None in axes:
                raise ArchitectureError(f"'{UNET}{key}': axis {axes.index(None)} was never assigned")
            owners = [{s.var for s in segs if s.var} for segs in axes]
            for i in range(len(owners)):
                for j in range(i + 1, len(owners)):
                    if owners[i] & owners[j]:
                        raise ArchitectureError(f"'{UNET}{key}': one permutation on two axes ({owners[i] & owners[j]})")
        for v in self.variables.values():
            if v.tree is None:
                v.tree = structure(v.size, v.partitions)
        axes = {UNET + k: tuple(a) for k, a in self.axes.items() if any(s.var for segs in a for s in segs)}
        unpermuted = tuple(UNET + k for k in self.axes if UNET + k not in axes)
        return PermutationSpec(self.arch, self.scale, self.groups, self.variables, axes, unpermuted)
