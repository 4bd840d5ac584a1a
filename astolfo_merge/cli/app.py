"""`python -m astolfo_merge app`: serve the Merger tab (ui.app) on 127.0.0.1 over a plain models folder.

With `--demo`, or when the default folder is empty, it first writes the small demo checkpoints so a
newcomer can click through at once.
"""
from __future__ import annotations

import os
import signal
import sys

from ..io.paths import app_files_dir
from ..ui import app_server
from ..ui.app import DEFAULT_PORT, build_app, has_checkpoints
from ..ui.host import HostSettings, StandaloneHost
from .common import DEFAULT_MODELS_DIR, THROTTLE_HELP, memory_gb_arg, throttle_arg, workers_arg


def cmd_app(args):
    from ..ui.compat import enable_queue

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
    host = StandaloneHost(folder, HostSettings(threads=args.threads, workers=args.workers, memory_gb=args.memory_gb,
                                               device=args.device, throttle=args.throttle))
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
    p.add_argument("--workers", type=workers_arg, default=0, metavar="N",
                   help="worker processes per merge (0: auto, as many as cores and the memory budget allow)")
    p.add_argument("--memory-gb", type=memory_gb_arg, default=1.5)
    p.add_argument("--throttle", type=throttle_arg, default=0.0, metavar="SECONDS", help=THROTTLE_HELP)
    p.set_defaults(func=cmd_app)
