"""Diagnosis of pruned / "BROKEN" checkpoints: the full report of REPAIR.md §11.

`diagnose(header, ident)`: severity, gaps in words, position ids, non-weight keys, metadata, how
the model-toolkit (repair_toolkit) and A1111 will see the file, and the repair plan's preview
(repair_plan). Only the one small position-ids tensor is read.
"""
from __future__ import annotations

import collections

from ..io import arch as archmod
from ..io.arch import TE0, TE1, UNET, VAE
from ..io.header import NAME_OF
from .repair_plan import (
    COMPONENT_NAMES,
    distilled_sdxl,
    first_few,
    human_size,
    nbytes,
    plan_repair,
    position_ids_health,
    short_key,
)
from .repair_toolkit import toolkit_view

OK, FIXABLE, NEEDS_BASE, NOT_REPAIRABLE, NOT_SD = (
    "OK", "fixable-without-base", "needs-base", "not-repairable", "not an SD checkpoint")
SEVERITIES = (OK, FIXABLE, NEEDS_BASE, NOT_REPAIRABLE, NOT_SD)
NOTABLE_METADATA = ("modelspec.architecture", "modelspec.prediction_type", "modelspec.title",
                    "ss_base_model_version", "ss_sd_model_name", "sd_merge_recipe", "sd_merge_models",
                    "mecha_recipe", "format", "astolfo_merge_recipe", "astolfo_merge_repair")
FAMILY_WORDS = {"pony": "Pony", "illustrious": "Illustrious", "noob": "NoobAI", "animagine": "Animagine",
                "juggernaut": "Juggernaut", "playground": "Playground"}


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


def _gap_meaning(key: str, arch: str) -> str:
    """What a missing TE/VAE/UNET key means for inference, in words (§4, §7)."""
    rest = short_key(key)
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


def _severity(ident, position, preview) -> tuple:
    """(severity, reasons): the worst problem decides."""
    distilled = distilled_sdxl(ident)
    if distilled:
        return NOT_REPAIRABLE, [distilled]
    wrong = [(c, k, f, w) for c, s in ident.components.items() for k, f, w in s.wrong_shape]
    if wrong:
        comp, key, found, want = wrong[0]
        return NOT_REPAIRABLE, [f"{len(wrong)} key(s) with an incompatible shape ({COMPONENT_NAMES[comp]} "
                                f"{short_key(key)} {list(found)}, expected {list(want)}; inpainting or another variant?)"]
    if preview.filled:
        by_comp = collections.defaultdict(list)
        for key in preview.filled:
            by_comp[archmod.component_of(key)].append(short_key(key))
        parts = [f"{COMPONENT_NAMES.get(c, c)} {len(ks)}: {first_few(ks, 3)}" for c, ks in by_comp.items()]
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
            lines.append(f"       {gap['problem']}: {short_key(gap['key'])} — {gap['meaning']}")
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
                         f"{first_few([str(i) for i in pos.get('wrong_positions', [])], 12)} (repair resets)",
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
