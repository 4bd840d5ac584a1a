"""`python -m astolfo_merge app`: the Merger tab in a browser, without the WebUI.

Serves the same `ui.build_tab` the WebUI extension uses, on 127.0.0.1, over a plain models
folder (StandaloneHost). With `--demo`, or when the default folder is empty, it first writes the
small demo checkpoints so a newcomer can click through at once.

The server is app_server's: same-origin requests only, `/file=` limited to the app's own files
folder (paths.app_files_dir), loopback unless `--host` says otherwise (with a warning).
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no network calls from gradio

from ..io.header import is_checkpoint_name  # noqa: E402
from .host import scan_checkpoints  # noqa: E402

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
EXTENSION_DIR = os.path.dirname(os.path.dirname(PACKAGE_DIR))   # where style.css and javascript/ live (the WebUI loads them itself)
DEFAULT_PORT = 7870


def page_assets() -> tuple:
    """(css, js) the WebUI would add to its page; empty strings if the files are missing."""
    def read(*parts):
        try:
            with open(os.path.join(EXTENSION_DIR, *parts), encoding="utf-8") as f:
                return f.read()
        except OSError:
            return ""
    return read("style.css"), read("javascript", "astolfo_merge.js")


def build_app(host):
    """A page holding only the Merger tab (rendered exactly as the WebUI renders it)."""
    import gradio as gr

    from .compat import listen
    from .tab import build_tab

    css, js = page_assets()
    tab = build_tab(host)
    with gr.Blocks(title="AstolfoMerge", css=css, analytics_enabled=False) as page:
        tab.render()
        listen(page.load, None, [], [], js="() => {" + js + "\n; window.astolfoMergeStart(); return []; }")
    return page


def has_checkpoints(folder) -> bool:
    return os.path.isdir(folder) and any(is_checkpoint_name(p) for p in scan_checkpoints(folder))
