"""Bounded lineage: the `sd_merge_models` an output inherits from its inputs (A1111.md §8).

Each merge adds its inputs to the union of their own lineages, so over generations (or from one
hostile input) the header could grow past what readers accept (header.MAX_HEADER_BYTES). The
lineage is kept as it is while small; beyond the limits, the direct inputs are always kept (an
oversized recipe of theirs dropped) and then the most recent ancestors, as many as fit, and the
output says so in `astolfo_merge_lineage_truncated`.
"""
from __future__ import annotations

import json

MAX_ENTRIES = 32             # ancestors kept (direct inputs included)
MAX_BYTES = 256 * 1024       # the JSON of the whole lineage
MAX_ENTRY_BYTES = 16 * 1024  # one ancestor's entry (its name, hashes and recipe)
TRUNCATED_KEY = "astolfo_merge_lineage_truncated"


def _size(key, value) -> int:
    return len(json.dumps({key: value}))


def _shrunk(value):
    """A direct input's entry without its oversized recipe (names cut to file-name length)."""
    if not isinstance(value, dict):
        return None
    return {"name": str(value.get("name"))[:255], "legacy_hash": str(value.get("legacy_hash"))[:64],
            "sd_merge_recipe": None}


def bound_lineage(lineage: dict, parents) -> tuple:
    """(lineage, note): `lineage` unchanged with note None when within the limits; else the bounded
    lineage (insertion order kept: oldest first, as inherited) and a note saying what was dropped."""
    parents = set(parents)
    sizes = {k: _size(k, v) for k, v in lineage.items()}
    if len(lineage) <= MAX_ENTRIES and max(sizes.values(), default=0) <= MAX_ENTRY_BYTES and \
            sum(sizes.values()) <= MAX_BYTES:
        return lineage, None
    entries = {}
    for key, value in lineage.items():
        if sizes[key] <= MAX_ENTRY_BYTES:
            entries[key] = value
        elif key in parents and _shrunk(value) is not None:
            entries[key] = _shrunk(value)
    order = [k for k in entries if k in parents] + [k for k in reversed(list(entries)) if k not in parents]
    kept, used = set(), 0
    for key in order:
        size = _size(key, entries[key])
        if len(kept) >= MAX_ENTRIES or used + size > MAX_BYTES:
            if key in parents and len(kept) < MAX_ENTRIES:
                kept.add(key)         # the direct inputs always stay (each at most MAX_ENTRY_BYTES)
                used += size
            continue
        kept.add(key)
        used += size
    out = {k: v for k, v in entries.items() if k in kept}
    shrunk = sum(1 for k in out if out[k] is not lineage[k])
    note = (f"kept {len(out)} of {len(lineage)} ancestors in sd_merge_models (the direct inputs and the most recent; "
            f"limits: {MAX_ENTRIES} ancestors, {MAX_BYTES} bytes)" + (f"; {shrunk} oversized recipe(s) dropped" if shrunk else ""))
    return out, note
