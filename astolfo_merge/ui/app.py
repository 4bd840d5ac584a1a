"""`python -m astolfo_merge app`: the Merger tab in a browser, without the WebUI.

Serves the same `ui.build_tab` the WebUI extension uses, on 127.0.0.1, over a plain models
folder (StandaloneHost). With `--demo`, or when the default folder is empty, it first writes the
small demo checkpoints so a newcomer can click through at once.

The server is app_server's: same-origin requests only, `/file=` limited to the app's own files
folder (paths.app_files_dir), loopback unless `--host` says otherwise (with a warning).
"""
from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no network calls from gradio

from ..cli.commands import DEFAULT_MODELS_DIR, THROTTLE_HELP, memory_gb_arg, register_command, throttle_arg  # noqa: E402
from ..io.checkpoint import is_checkpoint_name  # noqa: E402
from ..io.paths import app_files_dir  # noqa: E402
from . import app_server  # noqa: E402
from .host import HostSettings, StandaloneHost, scan_checkpoints  # noqa: E402

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


def cmd_app(args):
    from .compat import enable_queue

    folder = os.path.abspath(args.models_dir or DEFAULT_MODELS_DIR)
    if args.demo or (args.models_dir is None and not has_checkpoints(folder)):
        from ..features.demo import write_demo_models
        written = write_demo_models(folder)
        print(f"{len(written)} demo checkpoint(s) written to {folder}" if written else f"demo checkpoints already in {folder}")
    elif not has_checkpoints(folder):
        print(f"note: no checkpoints in {folder} yet (add some, or start with --demo)", file=sys.stderr)
    warning = app_server.exposure_warning(args.host, args.port, folder)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    host = StandaloneHost(folder, HostSettings(threads=args.threads, memory_gb=args.memory_gb, device=args.device,
                                               throttle=args.throttle))
    files = app_files_dir()
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = files   # gradio's copies of downloads and uploads: the app's own folder
    try:
        page = build_app(host)
        enable_queue(page)
        # SIGTERM -> SystemExit, so atexit hooks run and a running merge removes its temp file.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(
            args.host, f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host)
        print(f"AstolfoMerge: http://{shown}:{args.port} (models: {folder}); Ctrl+C stops", flush=True)
        private = [folder, host.output_dir(), host.recipes_dir(), *host.lora_dirs(), os.getcwd()]
        app_server.serve(page, server_name=args.host, server_port=args.port, files_dir=files, private_dirs=private)
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
    return 0


@register_command
def add_app_command(sub):
    p = sub.add_parser("app", help="serve the Merger tab on 127.0.0.1 without the WebUI")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; anything else exposes the "
                        "tab and the models folder to the network, without a password)")
    p.add_argument("--models-dir", default=None, help=f"checkpoint folder (default {DEFAULT_MODELS_DIR}; "
                                                      "demo models are written there when it is empty)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--demo", action="store_true", help="write the demo checkpoints into the models folder first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--memory-gb", type=memory_gb_arg, default=1.5)
    p.add_argument("--throttle", type=throttle_arg, default=0.0, metavar="SECONDS", help=THROTTLE_HELP)
    p.set_defaults(func=cmd_app)
