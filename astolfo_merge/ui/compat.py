"""Gradio 3.41 (A1111) / 4.x (Forge) differences, decided per feature by looking at signatures.

A1111.md §7.5: `_js` became `js`, `concurrency_limit` exists only in 4.x, `queue(concurrency_count)`
became `default_concurrency_limit`, `.style()` and `Component.update` are gone. Nothing here
compares version numbers: each helper asks the installed gradio whether it takes the argument.
"""
from __future__ import annotations

import inspect


def _accepted(fn) -> tuple:
    """(names of keyword parameters, whether **kwargs is accepted) of a callable."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in sig.parameters.values()}
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def listen(event, fn, inputs=None, outputs=None, js: str | None = None, **options):
    """Register `fn` on `event` (e.g. `button.click`) with only the options this gradio takes.

    `js` goes to `js=` (4.x) or `_js=` (3.x); options the event does not know are dropped
    (`concurrency_limit` on 3.41, `every` on 5.x, ...).
    """
    names, _var_kw = _accepted(event)
    kwargs = {k: v for k, v in options.items() if k in names}
    if js is not None:
        if "js" in names:
            kwargs["js"] = js
        elif "_js" in names:
            kwargs["_js"] = js
    return event(fn, inputs=inputs if inputs is not None else [], outputs=outputs if outputs is not None else [], **kwargs)


def poll_options() -> dict:
    """Options for a status-polling event: no progress overlay, never blocked behind other events."""
    return {"show_progress": "hidden", "queue": False, "concurrency_limit": None}


def enable_queue(blocks, workers: int = 8):
    """`blocks.queue(...)` with as many parallel events as this gradio lets us ask for."""
    names, _ = _accepted(blocks.queue)
    if "default_concurrency_limit" in names:
        return blocks.queue(default_concurrency_limit=workers)
    if "concurrency_count" in names:
        return blocks.queue(concurrency_count=workers)
    return blocks.queue()


def launch(blocks, **options):
    """`blocks.launch(...)` with only the options this gradio takes."""
    names, _ = _accepted(blocks.launch)
    return blocks.launch(**{k: v for k, v in options.items() if k in names})


def file_value_bytes(value) -> bytes | None:
    """The bytes of a `gr.File(type="binary")` value (bytes in 3.x and 4.x; a path or file object elsewhere)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    path = getattr(value, "name", value)
    with open(path, "rb") as f:
        return f.read()


def component_kwargs(cls, **options) -> dict:
    """Constructor options `cls` takes (4.x refuses unknown keyword arguments)."""
    names, var_kw = _accepted(cls.__init__)
    if var_kw:
        return options
    return {k: v for k, v in options.items() if k in names}


def make(cls, *args, **options):
    """Create a component with only the constructor options this gradio supports."""
    return cls(*args, **component_kwargs(cls, **options))
