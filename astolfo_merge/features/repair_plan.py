"""Repair planning (REPAIR.md §10): which key of the repaired file comes from where.

Planned from headers only (no tensor data but the one small position-ids tensor), so a dry run,
the report's preview (repair_diagnose) and the writer (repair_write) share one plan: fill, never
strip — the canonical key set of the detected architecture + the file's markers; the file's own
tensors are copied bit for bit, gaps come from a base (cast to the file's dominant float dtype),
position ids are rewritten as int64 0..76. Also the small word helpers every repair report uses.
"""
from __future__ import annotations

import collections
import math
import os
from dataclasses import dataclass, field

import torch

from ..errors import ArchitectureError, CheckpointError
from ..io import arch as archmod
from ..io.arch import POSITION_IDS, TE0, TE1, UNET, UNET_PREFIX, VAE
from ..io.header import FLOAT_DTYPES, NAME_OF
from ..io.reader import CheckpointReader

COMPONENT_NAMES = {UNET: "UNET", TE0: "TE0", TE1: "TE1", VAE: "VAE"}


def nbytes(info) -> int:
    """Bytes of one tensor from its header entry (without allocating anything)."""
    return math.prod(info.shape) * info.dtype.itemsize


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return ""


def short_key(key: str) -> str:
    """A key without its component prefix (for one-line reports)."""
    for prefix in (UNET_PREFIX, "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                   "conditioner.embedders.1.model.", "cond_stage_model.transformer.text_model.",
                   "cond_stage_model.model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def first_few(items, n=5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", … (+{len(items) - n})" if len(items) > n else "")


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
            parts.append(f"fill {len(self.filled)} key(s) from {source}: {first_few([short_key(k) for k in self.filled], 3)}")
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
            by_comp[archmod.component_of(key)].append(short_key(key))
        return "; ".join(f"{COMPONENT_NAMES.get(c, c)} {len(ks)}: {first_few(ks, examples)}" for c, ks in by_comp.items())

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


def check_result(plan: RepairPlan):
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
