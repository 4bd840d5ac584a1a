"""Diagnosis and repair of pruned / "BROKEN" checkpoints (REPAIR.md §6–§11): the public names in one place.

The work is split by job, each planned from the header (key -> shape, dtype) so tests can feed
synthetic maps:
- repair_diagnose: `diagnose(header, ident)`, the full report of §11, and `a1111_view`.
- repair_toolkit: `toolkit_view(shapes, scale)`, the original model-toolkit's detection (§8).
- repair_plan: `plan_repair` (fill, never strip, §10) and the report's word helpers.
- repair_write: `run_repair` / `repair_file`, streamed through the one loop (stream).
"""
from __future__ import annotations

from .repair_diagnose import (
                              FAMILY_WORDS,
                              FIXABLE,
                              NEEDS_BASE,
                              NOT_REPAIRABLE,
                              NOT_SD,
                              NOTABLE_METADATA,
                              OK,
                              SEVERITIES,
                              a1111_view,
                              diagnose,
)
from .repair_plan import (
                              COMPONENT_NAMES,
                              SSD_PROBE,
                              RepairPlan,
                              RepairStep,
                              distilled_sdxl,
                              dominant_float_dtype,
                              human_size,
                              nbytes,
                              plan_repair,
                              position_ids_health,
)
from .repair_toolkit import ToolkitView, toolkit_view
from .repair_write import (
                              CHUNK_BYTES,
                              FILLED_KEYS_IN_RECORD,
                              RepairResult,
                              default_output,
                              repair_file,
                              repair_metadata,
                              run_repair,
)

__all__ = ["CHUNK_BYTES", "COMPONENT_NAMES", "FAMILY_WORDS", "FILLED_KEYS_IN_RECORD", "FIXABLE", "NEEDS_BASE",
           "NOTABLE_METADATA", "NOT_REPAIRABLE", "NOT_SD", "OK", "SEVERITIES", "SSD_PROBE", "RepairPlan",
           "RepairResult", "RepairStep", "ToolkitView", "a1111_view", "default_output", "diagnose",
           "distilled_sdxl", "dominant_float_dtype", "human_size", "nbytes", "plan_repair", "position_ids_health",
           "repair_file", "repair_metadata", "run_repair", "toolkit_view"]
