"""Default output names that say what a file is: pool size, method, date."""
from __future__ import annotations

import datetime
import re


def default_output_name(recipe, today=None) -> str:
    today = today or datetime.date.today()
    first = re.sub(r"\.(safetensors|ckpt|pt|pth)$", "", recipe.pool[0].split("/")[-1], flags=re.I)
    first = re.sub(r"[^A-Za-z0-9_.-]+", "_", first)[:40]
    return f"merge-{len(recipe.pool)}x-{recipe.method}-{first}-{today:%Y%m%d}.safetensors"
