"""What the backend's errors and notes mean in the tab's own words.

The backend speaks recipe fields (`components.vae.take`) and CLI flags (`--overwrite`), which is
right for the CLI and for recipe files. The tab translates at its boundary: a `RecipeError`'s
field becomes the label of the widget that sets it, and CLI advice ("pass --overwrite") becomes
the tab action ("tick Overwrite"). The CLI's messages stay as they are.
"""
from __future__ import annotations

import re

from ..errors import AstolfoError, RecipeError
from .state import COMPONENT_TITLES

COMPONENTS_PANEL = "Components"
# recipe field -> the tab's label (bold in Markdown: the words the user sees on the widget)
FIELD_LABELS = {
    "pool": "Pool",
    "base": "Base model",
    "method": "Method",
    "params": "method parameters",
    "blocks": "Block weights (MBW)",
    "components": COMPONENTS_PANEL,
    "seed": "Seed (random methods)",
    "precision": "Compute precision",
    "dtype": "Saved dtype",
    "output": "File name",
    "overwrite": "Overwrite an existing file",
    "memory_gb": "Memory budget (GB)",
    "device": "Device",
    "threads": "Threads",
    "nonfinite": "NaN / Inf in a result",
    "position_ids": "CLIP position ids",
    "allow_mixed_prediction": "Allow mixed prediction types (eps + v-pred)",
    "loras": "LoRA rows",
    "(document)": "Recipe file",
    "(file)": "Recipe file",
    "(metadata)": "Recipe embedded in a merged checkpoint",
    "(checkpoint)": "Recipe embedded in a merged checkpoint",
    "(recipe)": "Saved recipes",
    "files": "Models",
    "checkpoint": "Checkpoint",
    "models": "Models",
}
COMPONENT_FIELDS = {
    "take": "{title} from",
    "method": "{title} method",
    "pool": "{title} pool",
    "base": "{title} base (from the loaded recipe)",
    "blocks": "{title} block weights (from the loaded recipe)",
    "params": "{title} parameters",
}


def _title(component: str) -> str:
    return COMPONENT_TITLES.get(component, component.upper())


# Recipe fields with an index or a name in them, as the tab words them (first match wins).
_INDEXED_FIELDS = (
    (r"pool\[(\d+)\]", lambda n: f"**Pool** (model {int(n) + 1})"),
    (r"params\.(.+)", lambda name: f"**{name}** (method parameter)"),
    (r"blocks\.(.+)", lambda name: f"**{name}** (Block weights)"),
    (r"loras\[(\d+)\].*", lambda n: f"**LoRA {int(n) + 1}**"),
)


def field_label(field: str) -> str:
    """The tab's words for a recipe field path: 'components.vae.take' -> 'VAE from' (Components)."""
    field = str(field)
    m = re.fullmatch(r"components\.(\w+)(?:\.(\w+))?(?:\.(.+))?", field)
    if m:
        comp, sub, rest = m.groups()
        title = _title(comp)
        if sub is None:
            return f"**{title}** ({COMPONENTS_PANEL})"
        if sub == "params" and rest:
            return f"**{rest}** ({COMPONENTS_PANEL} → {title} → own method)"
        label = COMPONENT_FIELDS.get(sub, "{title} " + sub).format(title=title)
        return f"**{label}** ({COMPONENTS_PANEL} → {title})"
    for pattern, label in _INDEXED_FIELDS:
        m = re.fullmatch(pattern, field)
        if m:
            return label(m.group(1))
    if field in FIELD_LABELS:
        return f"**{FIELD_LABELS[field]}**"
    return f"recipe field `{field}`"


def _component_take(m) -> str:
    return f"**{_title(m.group(1))} from** ({COMPONENTS_PANEL} → {_title(m.group(1))} → Take from a model)"


# (pattern, replacement) for CLI / recipe advice inside any message, applied in order.
PHRASES = [
    (r"pass --overwrite \(or 'overwrite': true\) to replace it", "tick **Overwrite an existing file** to replace it, "
                                                                  "or change the file name"),
    (r"pass --overwrite", "tick **Overwrite an existing file**"),
    (r"pass --base BASE, (a complete [^,]+ model), to fill them", r"pick a **Base** (\1) to fill them"),
    (r"pass --base BASE", "pick a **Base**"),
    (r"give --base or more models", "pick a **Base** or more models"),
    (r"\(--base\)", "(pick a **Base**)"),
    (r"write it to a new file \(-o\)", "give another output file name"),
    (r"raise --memory-gb to at least", "raise **Memory budget (GB)** to at least"),
    (r"\(dropped unless --keep-ema\)", "(dropped)"),
    (r"set 'allow_mixed_prediction': true to merge them anyway",
     "tick **Allow mixed prediction types** (Output → Advanced) to merge them anyway"),
    (r"use it as components\.<vae\|te0\|te1>\.take instead",
     f"pick it under **Take from a model** in {COMPONENTS_PANEL} instead"),
    (r"add a base, or set components\.(\w+)\.take / components\.\w+\.pool",
     lambda m: f"pick a **Base model**, or set {_title(m.group(1))} to **Take from a model** (or give it its own "
               f"pool) in {COMPONENTS_PANEL}"),
    (r"components\.(\w+)\.take", _component_take),
    (r"is components\.(\w+) a 'take'\?", lambda m: f"is {_title(m.group(1))} set to Take from a model?"),
    (r"\s*\(see `python -m astolfo_merge methods`\)", ""),
    (r"'base' needs a recipe base model", "Keep base needs a **Base model**"),
    (r"needs a base model R \('base'\)", "needs a **Base model** R"),
]


def tab_words(text: str) -> str:
    """`text` with the CLI / recipe advice replaced by the tab's actions."""
    for pattern, replacement in PHRASES:
        text = re.sub(pattern, replacement, text)
    return text


def error_message(exc: Exception) -> str:
    """One Markdown line for the tab: what is wrong, named by the widget that sets it."""
    if isinstance(exc, RecipeError):
        return f"{field_label(exc.field)}: {tab_words(str(exc.problem))}"
    return tab_words(str(exc))


def error_text(exc: Exception, markdown: bool = True) -> str:
    """`**Error:** …` for input problems (AstolfoError), `**Internal error:** …` for anything else;
    `markdown=False` for text boxes (no bold markers)."""
    if isinstance(exc, AstolfoError):
        text = f"**Error:** {error_message(exc)}"
    else:
        text = f"**Internal error:** {exc.__class__.__name__}: {exc}"
    return text if markdown else plain(text)


def plain(text: str) -> str:
    """Markdown bold and code markers removed (for text boxes)."""
    return text.replace("**", "").replace("`", "")
