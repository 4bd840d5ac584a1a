"""`inspect`: what a checkpoint is, from its header alone (REPAIR.md §11, short form)."""
from __future__ import annotations

import collections
import json
import os

from ..core.recipe import MAX_RECIPE_DEPTH, MAX_RECIPE_DIGITS
from ..io.arch import COMPONENTS, identify
from ..io.header import NAME_OF, read_header
from ..io.strict_json import JSONInputError, loads as strict_loads

COMPONENT_TITLES = {"unet": "UNET", "te0": "TE0 (CLIP-L)", "te1": "TE1 (OpenCLIP)", "vae": "VAE"}


def inspect_file(path) -> dict:
    header = read_header(path)
    ident = identify(header.shapes, header.metadata)
    dtypes = collections.Counter(NAME_OF[t.dtype] for t in header.tensors.values())
    meta = header.metadata
    recipe, recipe_error = _embedded_recipe(meta)
    non_string = sorted(k for k, v in meta.items() if not isinstance(v, str))
    report = {"file": os.path.basename(path), "path": os.path.abspath(path), "size": header.file_size,
              "keys": len(header.tensors), "dtypes": dict(dtypes), **ident.to_dict(),
              "recipe": recipe, "recipe_error": recipe_error,
              "metadata_keys": sorted(meta), "metadata_not_strings": non_string, "warnings": header.warnings}
    try:
        from .repair_diagnose import diagnose  # the full report, when the repair modules are present
        report.update(diagnose(header, ident))
    except ImportError:
        pass
    if report.get("refusal"):
        _add_lora_description(report, header)
    return report


def _embedded_recipe(meta: dict):
    """(recipe document, None) or (None, why it cannot be read): a damaged or hostile recipe in the
    metadata is reported, the rest of the report stands."""
    text = meta.get("astolfo_merge_recipe")
    if text is None:
        return None, None
    if not isinstance(text, str):
        return None, f"the recipe in the metadata is a JSON {type(text).__name__}, not the text of a recipe"
    try:
        doc = strict_loads(text, max_depth=MAX_RECIPE_DEPTH, max_digits=MAX_RECIPE_DIGITS, what="field")
    except JSONInputError as exc:
        return None, f"the recipe in the metadata {exc}"
    if not isinstance(doc, dict):
        return None, f"the recipe in the metadata is a JSON {type(doc).__name__}, not a JSON object"
    return doc, None


def _add_lora_description(report, header):
    """A LoRA / LyCORIS file is refused as a checkpoint; say what it is instead (type, rank, components)."""
    try:
        from ..core.lora import describe
    except ImportError:
        return
    lora = describe(header)
    if lora:
        report["lora"] = lora
        report["verdict_text"] = lora["verdict"]
        report["report_lines"] = list(report.get("report_lines", [])) + lora["lines"]


def verdict(report) -> str:
    if report.get("refusal"):
        return f"not mergeable: {report['refusal']}"
    pred = report["prediction"] + (" + ztSNR" if report["ztsnr"] else "")
    state = "complete" if report["full"] else "partial: " + ", ".join(
        f"{c} {v['present']}/{v['expected']}" for c, v in report["components"].items() if v["status"] != "complete")
    return f"{report['title']} · {pred} · {state}"


def format_report(report) -> str:
    lines = [f"{report['file']} — {report['size'] / 1e6:.1f} MB, {report['keys']} keys, "
             + ", ".join(f"{k} x{v}" for k, v in report["dtypes"].items()),
             f"Verdict: {report.get('verdict_text') or verdict(report)}"]
    for comp in COMPONENTS:
        c = report["components"].get(comp)
        if not c:
            continue
        line = f"  {COMPONENT_TITLES[comp]:<15} {c['status']:<8} {c['present']}/{c['expected']}"
        missing = c["missing"] + c["missing_optional"]
        if missing:
            line += f" — missing {len(missing)}: " + ", ".join(m.split(".")[-3:][0] + "." + ".".join(m.split(".")[-2:]) for m in missing[:3])
        if c["wrong_shape"]:
            line += f" — {len(c['wrong_shape'])} mis-shaped"
        lines.append(line)
    extras = []
    if report["markers"]:
        extras.append("markers " + ", ".join(report["markers"]))
    if report["ema_keys"]:
        extras.append(f"{report['ema_keys']} EMA keys")
    if report["schedule_buffers"]:
        extras.append(f"{len(report['schedule_buffers'])} schedule buffers")
    if report["unknown"]:
        extras.append(f"{len(report['unknown'])} unknown keys (e.g. {report['unknown'][0]})")
    if report["renames"]:
        extras.append(f"{len(report['renames'])} legacy key names normalised")
    lines.append("Other: " + ("; ".join(extras) if extras else "nothing else"))
    for extra_line in report.get("report_lines", []):
        lines.append(extra_line)
    if report["recipe"]:
        r = report["recipe"]
        pool = r.get("pool")
        lines.append(f"Recipe: {str(r.get('method'))[:60]} over {len(pool) if isinstance(pool, list) else '?'} model(s), "
                     f"params {json.dumps(r.get('params', {}))[:300]}")
    elif report.get("recipe_error"):
        lines.append(f"Recipe: unreadable ({report['recipe_error']})")
    if report["metadata_not_strings"]:
        lines.append(f"Metadata values that are not strings (would break saving elsewhere): {', '.join(report['metadata_not_strings'][:5])}")
    return "\n".join(lines)
