"""Distances between models per component — the seeds' "L2 diagrams" (ARCHITECTURE.md, analysis).

For each component (UNET, TE0, TE1, VAE) and each model i, the delta d_i = x_i − r against a
reference r (the base, or the pool's mean when there is no base), flattened over every weight key
of that component. One streamed pass accumulates, in fp64, the N×N Gram matrix G_ij = ⟨d_i, d_j⟩
over row chunks of every key; from it come the L2 distance to the reference ‖d_i‖ = √G_ii, the
cosine similarity of deltas G_ij / √(G_ii G_jj) and the pairwise distances ‖d_i − d_j‖.

Memory: one row chunk of every model (+ the reference) at a time, sized to the budget; the pool
mean is computed per chunk from the chunks already resident, so no extra pass is needed.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.plan_data import GIB
from ..core.plan_inputs import load_source
from ..core.stream import row_spans
from ..errors import ArchitectureError, MemoryBudgetError, OptionError, RecipeError, check_memory_gb
from ..io import arch as archmod
from ..io.reader import CheckpointReader, ensure_open_files

COMPONENT_LABELS = {"unet": "UNET", "te0": "TE0 (CLIP-L)", "te1": "TE1 (OpenCLIP)", "vae": "VAE"}


@dataclass
class ComponentDistances:
    component: str
    keys: int                    # weight keys that entered the sums
    elements: int                # scalars per model
    gram: np.ndarray             # N×N fp64, G_ij = <d_i, d_j>
    skipped: list = field(default_factory=list)    # keys some input lacks (or has mis-shaped)

    @property
    def l2(self) -> np.ndarray:
        """‖x_i − reference‖ per model."""
        return np.sqrt(np.clip(np.diag(self.gram), 0.0, None))

    @property
    def cosine(self) -> np.ndarray:
        """Cosine similarity of the deltas; NaN where a delta is zero."""
        norms = self.l2
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.gram / np.outer(norms, norms)

    @property
    def pairwise_l2(self) -> np.ndarray:
        """‖x_i − x_j‖ = √(G_ii + G_jj − 2 G_ij) (independent of the reference)."""
        d = np.diag(self.gram)
        return np.sqrt(np.clip(d[:, None] + d[None, :] - 2 * self.gram, 0.0, None))

    def to_dict(self):
        return {"keys": self.keys, "elements": self.elements, "skipped_keys": self.skipped,
                "l2_to_reference": _jsonable(self.l2), "cosine": _jsonable(self.cosine),
                "l2_between": _jsonable(self.pairwise_l2)}


def _jsonable(a: np.ndarray):
    return [None if not math.isfinite(v) else float(v) for v in a] if a.ndim == 1 else [_jsonable(r) for r in a]


@dataclass
class Analysis:
    models: list                 # display names, in input order
    paths: list
    reference: str               # "base <name>" or "pool mean"
    arch: str
    scale: int
    components: dict             # component -> ComponentDistances

    def to_dict(self):
        return {"models": self.models, "paths": self.paths, "reference": self.reference, "arch": self.arch,
                "scale": self.scale, "components": {c: d.to_dict() for c, d in self.components.items()}}

    def lines(self) -> list:
        out = [f"{len(self.models)} {archmod.ARCH_TITLES[self.arch]} model(s); distances to the {self.reference}"]
        width = max(len(m) for m in self.models)
        for comp, d in self.components.items():
            out.append(f"{COMPONENT_LABELS[comp]}: {d.keys} keys, {d.elements:,} weights per model"
                       + (f", {len(d.skipped)} key(s) skipped (not in every input)" if d.skipped else ""))
            if not d.keys:
                continue
            cos = d.cosine
            for i, name in enumerate(self.models):
                others = [cos[i, j] for j in range(len(self.models)) if j != i and math.isfinite(cos[i, j])]
                mean_cos = f"{np.mean(others):+.3f}" if others else "   n/a"
                out.append(f"  {name:<{width}}  L2 {d.l2[i]:12.4f}   mean cosine to others {mean_cos}")
        return out


def _display_name(path) -> str:
    return os.path.splitext(os.path.basename(os.fspath(path)))[0]


def _load_all(paths, base):
    sources = [load_source(_display_name(p), os.fspath(p)) for p in paths]
    base_source = load_source(_display_name(base), os.fspath(base)) if base else None
    ref = sources[0].identity
    for src in sources[1:] + ([base_source] if base_source else []):
        if (src.identity.arch, src.identity.scale) != (ref.arch, ref.scale):
            raise ArchitectureError(f"cannot compare {sources[0].name} ({ref.title}) with {src.name} "
                                    f"({src.identity.title}): all models must have the same architecture")
    return sources, base_source


def _component_keys(sources, comp, arch, scale):
    """Weight keys of `comp` every input has with a usable shape (position ids are not weights)."""
    keys, skipped = [], []
    for key, spec in archmod.layout(arch, scale).items():
        if spec.component != comp or key.endswith("position_ids"):
            continue
        usable = all(s.has(key) and s.header.tensors[s.keys[key]].is_float and
                     s.header.tensors[s.keys[key]].numel == math.prod(spec.shape) for s in sources)
        (keys if usable else skipped).append(key)
    return keys, skipped


def _row_chunks(shape, n_resident, budget_bytes):
    rows = shape[0] if shape else 1
    row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
    need = n_resident * row_elems * 8
    if need > budget_bytes:
        raise MemoryBudgetError(f"one row of every model needs {need / 2 ** 20:.3f} MiB (fp64) but the budget is "
                                f"{budget_bytes / 2 ** 20:.3f} MiB; raise --memory-gb to at least {need / GIB:.6f}")
    return row_spans(rows, need, budget_bytes)


def _read_flat(reader, source, key, a, b):
    """Rows [a, b) of `key` as stored in `source`, flat (a scalar reads as its one row)."""
    return reader.read_rows(source.keys[key], a, b).reshape(-1)


def analyze(paths, base=None, memory_gb: float = 1.0, progress=None) -> Analysis:
    """Per-component L2 distances and delta cosines of `paths` against `base` (or the pool mean)."""
    memory_gb = check_memory_gb(memory_gb)
    if not paths:
        raise RecipeError("files", "give at least one model to analyze")
    if len(paths) < 2 and not base:
        raise RecipeError("base", "with a single model the pool mean is the model itself: give --base or more models")
    sources, base_source = _load_all(paths, base)
    ident = sources[0].identity
    inputs = sources + ([base_source] if base_source else [])
    ensure_open_files(len(inputs), "this analysis")
    readers = [CheckpointReader(s.path, s.header) for s in inputs]
    n = len(sources)
    budget = int(memory_gb * GIB)
    components = {}
    try:
        for comp in archmod.COMPONENTS:
            if comp not in ident.components:
                continue
            keys, skipped = _component_keys(inputs, comp, ident.arch, ident.scale)
            gram = np.zeros((n, n), dtype=np.float64)
            elements = 0
            for key in keys:
                shape = archmod.layout(ident.arch, ident.scale)[key].shape
                elements += math.prod(shape)
                _accumulate(gram, key, shape, inputs, readers, n, base_source is not None, budget)
                if progress:
                    progress(comp, key)
            components[comp] = ComponentDistances(comp, len(keys), elements, gram, skipped)
    finally:
        for r in readers:
            r.close()
    reference = f"base {base_source.name}" if base_source else "pool mean"
    return Analysis([s.name for s in sources], [s.path for s in sources], reference, ident.arch, ident.scale, components)


def _accumulate(gram, key, shape, inputs, readers, n, has_base, budget):
    """Add this key's ⟨d_i, d_j⟩ to `gram`, one row chunk of all models at a time (fp64)."""
    for a, b in _row_chunks(shape, n + 2, budget):
        chunk = None
        for i in range(n):
            x = _read_flat(readers[i], inputs[i], key, a, b)
            if chunk is None:
                chunk = torch.empty((n, x.numel()), dtype=torch.float64)
            chunk[i].copy_(x)
        if has_base:
            ref = _read_flat(readers[n], inputs[n], key, a, b).to(torch.float64)
        else:
            ref = chunk.mean(dim=0)
        chunk.sub_(ref)
        gram += (chunk @ chunk.T).numpy()


# ---------------------------------------------------------------------------------------------
# The picture: one row per component, L2 bars on the left, the delta-cosine heatmap on the right.

def _short_label(name: str, limit: int = 28) -> str:
    """Long names keep their head and their tail (versions usually differ at the end)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[len(name) - (limit - 1 - head):]


PLOT_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "webp")


def check_plot_path(path, overwrite: bool = False) -> str:
    """Refuse, before any work, a plot file that cannot be written: an extension matplotlib would not
    write as an image, a missing folder, or an existing file (unless `overwrite`). Returns the format."""
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        shown = f"'.{fmt}'" if fmt else "no extension"
        raise OptionError(path, f"a plot cannot be written with {shown}; use one of "
                                + ", ".join("." + f for f in PLOT_FORMATS))
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OptionError(path, f"folder {folder} does not exist")
    if os.path.isdir(path):
        raise OptionError(path, "is a folder; give a file name for the plot")
    if os.path.lexists(path) and not overwrite:
        raise OptionError(path, "exists; pass --overwrite to replace it")
    return fmt


def plot(analysis: Analysis, path, overwrite: bool = False) -> str:
    """Render the analysis as an image (PNG, SVG, PDF, …: `PLOT_FORMATS`) readable with 50+ models
    (sizes and fonts scale with N). An existing file is replaced only with `overwrite`.

    Axes are placed in inches (no tight_layout pass): a model gets a fixed slot on every axis,
    rotated names get the room their length needs, so 60 models still read at 6-pt type.
    """
    fmt = check_plot_path(path, overwrite)
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    n = len(analysis.models)
    labels = [_short_label(m) for m in analysis.models]
    font = 10 if n <= 12 else (8 if n <= 30 else 6)
    panel = max(4.5, (0.22 if n > 12 else 0.5) * n)          # inches per panel side
    names = 0.012 * font * max(len(s) for s in labels) + 0.3   # inches taken by a rotated / left-side name
    top, left, gap, bar_room, row_gap = 0.8, 0.9, names + 0.5, 1.0, 0.6
    row_h = panel + names + row_gap
    rows = [(comp, d) for comp, d in analysis.components.items() if d.keys]   # a component no input shares has no picture
    width = left + panel + gap + panel + bar_room
    height = top + len(rows) * row_h
    fig = Figure(figsize=(width, height))
    for r, (comp, d) in enumerate(rows):
        y = height - top - (r + 1) * row_h + names + 0.1
        bar_ax = fig.add_axes((left / width, y / height, panel / width, (panel - 0.3) / height))
        heat_ax = fig.add_axes(((left + panel + gap) / width, y / height, panel / width, (panel - 0.3) / height))
        color_ax = fig.add_axes(((left + 2 * panel + gap + 0.15) / width, y / height, 0.2 / width, (panel - 0.3) / height))
        _bars(bar_ax, d, labels, font, analysis.reference, comp)
        _heatmap(fig, heat_ax, color_ax, d, labels, font, comp)
    fig.suptitle(f"{len(labels)} {archmod.ARCH_TITLES[analysis.arch]} models — distance to the {analysis.reference}",
                 fontsize=font + 4, y=1 - 0.3 / height)
    extra = {"pil_kwargs": {"compress_level": 3}} if fmt == "png" else {}   # big canvases: zlib level 6 dominates the time
    try:
        with open(path, "wb" if overwrite else "xb") as f:   # "xb": a file that appeared meanwhile is not replaced
            fig.savefig(f, format=fmt, dpi=100, **extra)
    except FileExistsError:
        raise OptionError(os.fspath(path), "exists; pass --overwrite to replace it") from None
    except BaseException:
        _remove_quietly(path)
        raise
    return os.fspath(path)


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _bars(ax, d: ComponentDistances, labels, font, reference, comp):
    x = np.arange(len(labels))
    ax.bar(x, d.l2, color="#4c72b0")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=font)
    ax.tick_params(axis="y", labelsize=font)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel("L2 distance", fontsize=font + 1)
    ax.set_title(f"{COMPONENT_LABELS[comp]}: L2 to the {reference} ({d.keys} keys)", fontsize=font + 2)
    ax.grid(axis="y", alpha=0.3)
    if len(labels) <= 20:
        for xi, v in zip(x, d.l2):
            ax.annotate(f"{v:.3g}", (xi, v), ha="center", va="bottom", fontsize=font - 1)


def _heatmap(fig, ax, color_ax, d: ComponentDistances, labels, font, comp):
    import matplotlib
    cos = d.cosine
    off = cos[~np.eye(len(labels), dtype=bool)]
    off = off[np.isfinite(off)]
    limit = max(0.1, math.ceil(float(np.max(np.abs(off))) * 10) / 10) if off.size else 1.0
    shown = np.where(np.eye(len(labels), dtype=bool), np.nan, cos)   # the diagonal is 1 by definition
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest")
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(labels, rotation=90, fontsize=font)
    ax.set_yticklabels(labels, fontsize=font)
    ax.set_title(f"{COMPONENT_LABELS[comp]}: cosine similarity of deltas (grey: diagonal / zero delta)",
                 fontsize=font + 2)
    if len(labels) <= 12:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if i != j and math.isfinite(cos[i, j]):
                    ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=font - 1,
                            color="white" if abs(cos[i, j]) > 0.6 * limit else "black")
    bar = fig.colorbar(image, cax=color_ax)
    bar.ax.tick_params(labelsize=font)
