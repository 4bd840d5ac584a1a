"""Forms generated from declarations: method hyperparameters and MBW block weights.

No per-method UI code: a `ParamForm` owns a few *slots* per widget kind (slider, number, checkbox,
dropdown, list box) — as many as the most demanding registered method needs — and relabels them
(name, range, step, default, help text) when the method changes. A method registered tomorrow
appears in every form without touching this file. Block-weight sliders follow the architecture's
block names (`arch.block_names`: SD1/SD2 26, SDXL 20 + VAE).
"""
from __future__ import annotations

import math
import re

import gradio as gr

from ..errors import RecipeError
from ..io import arch as archmod
from .state import shown_params

SLOT_KINDS = ("slider", "number", "bool", "choice", "floats")


def slot_kind(param) -> str:
    """Which widget shows `param`: a slider only when its range is finite and its default sits on the
    slider's step grid (a tolerance like 1e-20 would be rounded away by a slider; it gets a number box)."""
    if param.kind in ("float", "int"):
        if param.minimum is None or param.maximum is None:
            return "number"
        default = param.default if param.default is not None else param.minimum
        step = _step(param)
        if default and abs(default) < step / 2:
            return "number"
        ticks = (default - param.minimum) / step
        return "slider" if abs(ticks - round(ticks)) < 1e-6 else "number"
    return {"bool": "bool", "choice": "choice", "floats": "floats"}.get(param.kind, "floats")


def assign_slots(method) -> dict:
    """kind -> the method's shown parameters of that kind, in declaration order."""
    out = {k: [] for k in SLOT_KINDS}
    for p in shown_params(method):
        out[slot_kind(p)].append(p)
    return out


def _step(param) -> float:
    if param.step:
        return param.step
    if param.kind == "int":
        return 1
    span = param.maximum - param.minimum
    return 10 ** math.floor(math.log10(span / 100)) if span > 0 else 0.01


def _help(param) -> str:
    bits = [param.help] if param.help else []
    if param.minimum is not None or param.maximum is not None:
        bits.append(f"range [{param.minimum if param.minimum is not None else '-∞'}, "
                    f"{param.maximum if param.maximum is not None else '∞'}], default {param.default!r}")
    elif param.kind != "bool":
        bits.append(f"default {param.default!r}")
    if param.kind == "floats":
        bits.append("comma-separated numbers; leave empty for the default")
    return " — ".join(bits)


def slot_update(param) -> dict:
    """Everything a slot shows for `param` (a gr.update payload)."""
    kind = slot_kind(param)
    common = {"visible": True, "label": param.name, "info": _help(param)}
    if kind == "slider":
        return gr.update(minimum=param.minimum, maximum=param.maximum, step=_step(param), value=param.default, **common)
    if kind == "number":
        return gr.update(value=param.default, minimum=param.minimum, maximum=param.maximum, **common)
    if kind == "bool":
        return gr.update(value=bool(param.default), **common)
    if kind == "choice":
        return gr.update(choices=[str(c) for c in param.choices], value=str(param.default), **common)
    return gr.update(value=format_floats(param.default), **common)


def format_floats(values) -> str:
    return "" if values is None else ", ".join(f"{v:g}" for v in values)


def parse_floats(text, where) -> list | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return [float(t) for t in re.split(r"[,;\s]+", text) if t]
    except ValueError:
        raise RecipeError(where, f"must be comma-separated numbers, got {text!r}") from None


class ParamForm:
    """Slots for the hyperparameters of any registered method (see the module docstring)."""

    def __init__(self, methods: dict, method_name: str, elem_prefix: str):
        self.methods = methods
        counts = {k: max((len(assign_slots(m)[k]) for m in methods.values()), default=0) for k in SLOT_KINDS}
        initial = assign_slots(methods[method_name]) if method_name in methods else {k: [] for k in SLOT_KINDS}
        self.slots = {}
        for kind in SLOT_KINDS:
            self.slots[kind] = [self._make(kind, f"{elem_prefix}_{kind}{i}",
                                           initial[kind][i] if i < len(initial[kind]) else None)
                                for i in range(counts[kind])]
        self.components = [c for kind in SLOT_KINDS for c in self.slots[kind]]

    @staticmethod
    def _make(kind, elem_id, param):
        shown = param is not None
        label = param.name if shown else "parameter"
        info = _help(param) if shown else None
        opts = {"label": label, "info": info, "visible": shown, "elem_id": elem_id, "interactive": True}
        if kind == "slider":
            comp = gr.Slider(minimum=param.minimum if shown else 0, maximum=param.maximum if shown else 1,
                             step=_step(param) if shown else 0.01, value=param.default if shown else 0, **opts)
        elif kind == "number":
            bounds = {"minimum": param.minimum, "maximum": param.maximum} if shown else {}
            comp = gr.Number(value=param.default if shown else 0, **bounds, **opts)
        elif kind == "bool":
            comp = gr.Checkbox(value=bool(param.default) if shown else False, **opts)
        elif kind == "choice":
            choices = [str(c) for c in param.choices] if shown else []
            comp = gr.Dropdown(choices=choices, value=str(param.default) if shown else None, **opts)
        else:
            comp = gr.Textbox(value=format_floats(param.default) if shown else "", lines=1, **opts)
        comp.do_not_save_to_config = True   # labels change with the method: never persist by label (A1111.md §2.2)
        return comp

    def updates(self, method_name: str, params: dict | None = None) -> list:
        """One update per slot (in `components` order): relabel for `method_name`, values from `params`."""
        method = self.methods.get(method_name)
        assigned = assign_slots(method) if method else {k: [] for k in SLOT_KINDS}
        out = []
        for kind in SLOT_KINDS:
            for i, _slot in enumerate(self.slots[kind]):
                if i >= len(assigned[kind]):
                    out.append(gr.update(visible=False))
                    continue
                param = assigned[kind][i]
                upd = slot_update(param)
                if params and param.name in params and params[param.name] is not None:
                    value = params[param.name]
                    upd["value"] = format_floats(value) if kind == "floats" else (str(value) if kind == "choice" else value)
                out.append(upd)
        return out

    def params(self, method_name: str, values: list, where: str = "params") -> dict:
        """The method's parameters from the slot values (in `components` order), typed per declaration."""
        method = self.methods.get(method_name)
        if method is None:
            return {}
        by_kind, i = {}, 0
        for kind in SLOT_KINDS:
            n = len(self.slots[kind])
            by_kind[kind] = list(values[i:i + n])
            i += n
        out = {}
        for kind, params in assign_slots(method).items():
            for param, value in zip(params, by_kind[kind]):
                out[param.name] = self._typed(param, kind, value, f"{where}.{param.name}")
        return out

    @staticmethod
    def _typed(param, kind, value, where):
        if kind == "floats":
            return parse_floats(value, where)
        if kind == "choice":
            return next((c for c in param.choices if str(c) == value), value)
        if kind == "bool":
            return bool(value)
        if value is None:
            return None
        return int(round(value)) if param.kind == "int" else float(value)


# ---------------------------------------------------------------------------------------------
# MBW block weights

def block_group(arch: str | None) -> str:
    """Which slider layout an architecture uses: SD1 and SD2 share one (26 blocks), SDXL has its own."""
    return "sdxl" if arch == "sdxl" else "sd1"


def _position(name: str, arch: str) -> float | None:
    """Where a block sits on the U: IN00 -1 … M00 0 … last OUT +1 (None for BASE / VAE)."""
    n = 9 if arch == "sdxl" else 12
    if name.startswith("IN"):
        return -1 + int(name[2:]) / n
    if name.startswith("OUT"):
        return (int(name[3:]) + 1) / n
    if name == "M00":
        return 0.0
    return None


def _smooth(x: float) -> float:
    return x * x * (3 - 2 * x)


PRESETS = {   # name -> (value at position t in [-1, 1] (None: BASE/VAE), base value)
    "Flat 0.25": (lambda t: 0.25, 0.25),
    "Flat 0.5": (lambda t: 0.5, 0.5),
    "Flat 0.75": (lambda t: 0.75, 0.75),
    "Gradient V (ends 1, middle 0)": (lambda t: abs(t), 0.0),
    "Gradient A (ends 0, middle 1)": (lambda t: 1 - abs(t), 0.0),
    "Smoothstep IN→OUT (0 → 1)": (lambda t: _smooth((t + 1) / 2), 0.0),
    "Reverse smoothstep (1 → 0)": (lambda t: 1 - _smooth((t + 1) / 2), 0.0),
    "IN blocks only": (lambda t: 1.0 if t < 0 else 0.0, 0.0),
    "Middle block only": (lambda t: 1.0 if t == 0 else 0.0, 0.0),
    "OUT blocks only": (lambda t: 1.0 if t > 0 else 0.0, 0.0),
}


def preset_values(name: str, arch: str) -> dict:
    """block -> weight for a preset on `arch`'s blocks, rounded to 4 decimals."""
    fn, base_value = PRESETS[name]
    out = {}
    for block in archmod.block_names(arch):
        t = _position(block, arch)
        out[block] = round(base_value if t is None else fn(t), 4)
    return out


class BlockWeights:
    """An on/off switch, a preset picker and one slider per block, per architecture layout."""

    GROUP_ARCH = {"sd1": "sd1", "sdxl": "sdxl"}

    def __init__(self, default=0.5, elem_prefix="astolfo_merge_mbw", visible_group="sd1"):
        self.enabled = gr.Checkbox(label="Use block weights (MBW)", value=False, elem_id=f"{elem_prefix}_enabled",
                                   info="each UNET block gets its own value of the method's block parameter "
                                        "(e.g. alpha); BASE covers the text encoders and time embedding")
        self.preset = gr.Dropdown(label="Preset", choices=list(PRESETS), value=None, elem_id=f"{elem_prefix}_preset")
        self.groups, self.sliders = {}, {}
        for group, arch in self.GROUP_ARCH.items():
            with gr.Group(visible=group == visible_group) as box:
                self.sliders[group] = self._layout(arch, default, f"{elem_prefix}_{group}")
            self.groups[group] = box
        self.components = [s for g in self.GROUP_ARCH for s in self.sliders[g].values()]

    @staticmethod
    def _layout(arch, default, prefix) -> dict:
        names = archmod.block_names(arch)
        sliders = {}

        def slider(name):
            sliders[name] = gr.Slider(minimum=-1.0, maximum=2.0, step=0.01, value=default, label=name,
                                      elem_id=f"{prefix}_{name}", elem_classes=["astolfo-mbw-slider"])

        with gr.Row():
            for name in [n for n in names if _position(n, arch) is None or n == "M00"]:
                with gr.Column(min_width=120):
                    slider(name)
        with gr.Row():
            with gr.Column(min_width=160):
                for name in [n for n in names if n.startswith("IN")]:
                    slider(name)
            with gr.Column(min_width=160):
                for name in [n for n in names if n.startswith("OUT")]:
                    slider(name)
        return {n: sliders[n] for n in names}

    def values(self, arch: str | None, values: list) -> dict:
        """block -> weight of the layout `arch` uses, from all slider values (in `components` order)."""
        group = block_group(arch)
        start = 0
        for g in self.GROUP_ARCH:
            n = len(self.sliders[g])
            if g == group:
                return {name: float(v) for name, v in zip(self.sliders[g], values[start:start + n])}
            start += n
        return {}

    def show_updates(self, arch: str | None) -> dict:
        group = block_group(arch)
        return {box: gr.update(visible=g == group) for g, box in self.groups.items()}

    def set_updates(self, arch: str | None, blocks: dict) -> dict:
        """Slider updates that show `blocks` (block -> weight) on the layout of `arch`."""
        sliders = self.sliders[block_group(arch)]
        return {sliders[name]: gr.update(value=value) for name, value in blocks.items() if name in sliders}
