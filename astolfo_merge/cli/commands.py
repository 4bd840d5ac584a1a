"""`python -m astolfo_merge ...`: a thin client of the library.

Exit codes: 0 ok, 2 bad input (one clear message on stderr, no traceback), 1 internal error.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading

from .. import __version__
from ..errors import AstolfoError
from . import analysis, app, lora, rebasin, repair
from .common import (
    DEFAULT_MODELS_DIR,
    THROTTLE_HELP,
    OneLineParser,
    memory_gb_arg,
    progress_printer,
    throttle_arg,
    workers_arg,
)


def cmd_merge(args):
    from ..core.engine import run_merge
    from ..core.plan import build_plan
    from ..core.recipe import load_recipe, recipe_from_metadata
    from ..core.run_options import RunOptions
    from ..io.header import read_header

    if args.recipe.lower().endswith(".safetensors"):
        recipe = recipe_from_metadata(read_header(args.recipe).metadata, args.recipe)
    else:
        recipe = load_recipe(args.recipe)
    if not args.output and not recipe.output:
        from ..core.naming import default_output_name
        recipe.output = default_output_name(recipe)
    plan = build_plan(recipe, args.models_dir, args.output)
    options = RunOptions(device=args.device, threads=args.threads, memory_gb=args.memory_gb,
                         overwrite=args.overwrite, hash_inputs=not args.no_hash, workers=args.workers,
                         throttle=args.throttle, ray=args.ray)
    print(f"merging {len(recipe.pool)} model(s) with {recipe.method} ({plan.arch}, {len(plan.keys)} keys) -> {plan.output}",
          file=sys.stderr)
    for line in plan.log:
        print(f"  note: {line}", file=sys.stderr)
    result = run_merge(plan, options, progress=None if args.quiet else progress_printer(), cancel=threading.Event())
    for line in result.log[len(plan.log):]:
        print(f"  note: {line}", file=sys.stderr)
    print(result.summary())
    return 0


def cmd_inspect(args):
    from ..features.inspection import format_report, inspect_file
    reports = [inspect_file(p) for p in args.files]
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 0


def cmd_methods(args):
    from ..methods import METHODS
    if args.json:
        print(json.dumps([m.to_dict() for m in METHODS.values()], indent=2))
        return 0
    for m in METHODS.values():
        base = " (needs base)" if m.needs_base else ""
        arity = f"{m.min_models}" + ("+" if m.max_models is None else ("" if m.max_models == m.min_models else f"-{m.max_models}"))
        print(f"{m.name}: {m.title} — {arity} model(s){base}\n    {m.help}")
        for p in m.params:
            rng = f" [{p.minimum}, {p.maximum}]" if p.minimum is not None else ""
            choices = f" one of {list(p.choices)}" if p.choices else ""
            print(f"    {p.name} ({p.kind}, default {p.default!r}{rng}{choices}): {p.help}")
    return 0


def cmd_demo_models(args):
    from ..features.demo import write_demo_models
    written = write_demo_models(args.dir, scale=args.scale, overwrite=args.overwrite)
    print(f"{len(written)} demo checkpoint(s) written to {args.dir}" if written else f"demo checkpoints already in {args.dir}")
    return 0


def cmd_demo(args):
    """The README's one-command tour: demo models, then a merge of two of them, then inspect."""
    from ..core.engine import run_merge
    from ..core.plan import build_plan
    from ..core.recipe import parse_recipe
    from ..core.run_options import RunOptions
    from ..features.demo import write_demo_models
    write_demo_models(args.models_dir)
    recipe = parse_recipe({"pool": ["demo-sd1-anime.safetensors", "demo-sd1-photo.safetensors", "demo-sd1-painted.safetensors"],
                           "method": "n_average", "output": "demo-sd1-average.safetensors"})
    plan = build_plan(recipe, args.models_dir)
    print(f"merging {recipe.pool} with n_average -> {plan.output}")
    result = run_merge(plan, RunOptions(overwrite=True), progress=progress_printer())
    print(result.summary())
    return 0


def build_parser():
    p = OneLineParser(prog="python -m astolfo_merge", description="AstolfoMerge: exact, memory-bounded N-way SD checkpoint merging")
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    m = sub.add_parser("merge", help="run a recipe (JSON file, or a merged .safetensors to re-run its embedded recipe)")
    m.add_argument("recipe")
    m.add_argument("--models-dir", default=DEFAULT_MODELS_DIR)
    m.add_argument("--output", "-o", help="output path (default: the recipe's 'output' inside --models-dir)")
    m.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    m.add_argument("--threads", type=int, default=0,
                   help="chunk worker threads (0 = auto = 1; more only pays off where ops are not GIL-bound)")
    m.add_argument("--workers", type=workers_arg, default=0, metavar="N",
                   help="1 = in this process; N > 1 = N worker processes; 0 = auto (cores and --memory-gb allow)")
    m.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the tasks on Ray: the cluster at ADDRESS (e.g. HEAD:6379; inputs and output on a path "
                        "every node sees), or without ADDRESS a local Ray using this machine's cores")
    m.add_argument("--memory-gb", type=memory_gb_arg, default=1.5)
    m.add_argument("--throttle", type=throttle_arg, default=0.0, metavar="SECONDS",
                   help=THROTTLE_HELP)
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--no-hash", action="store_true", help="do not hash inputs for the metadata")
    m.add_argument("--quiet", "-q", action="store_true")
    m.set_defaults(func=cmd_merge)

    i = sub.add_parser("inspect", help="architecture, components, dtypes and embedded recipe of checkpoints")
    i.add_argument("files", nargs="+")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    me = sub.add_parser("methods", help="every merge method with its parameters")
    me.add_argument("--json", action="store_true")
    me.set_defaults(func=cmd_methods)

    d = sub.add_parser("demo-models", help="write small synthetic SD1 / SDXL checkpoints (real key names)")
    d.add_argument("dir", nargs="?", default=DEFAULT_MODELS_DIR)
    d.add_argument("--scale", type=int, default=32, help="divide model widths by this (1 = full size)")
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=cmd_demo_models)

    t = sub.add_parser("demo", help="write demo models into --models-dir and merge three of them")
    t.add_argument("--models-dir", default=DEFAULT_MODELS_DIR)
    t.set_defaults(func=cmd_demo)

    for add in (app.add_app_command, repair.add_repair, repair.add_swap, analysis.add_analyze, rebasin.add,
                lora.add):
        add(sub)
    return p


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGINT / SIGHUP arrived: unwinds as a KeyboardInterrupt (not an Exception, so no
    handler on the way wraps it; servers that stop on Ctrl-C stop on it), aborting the writer, which
    removes its temp file; atexit hooks (the app's job manager) then run as well."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def _on_stop_signal(signum, _frame):
    for sig in STOP_SIGNALS:      # a second signal must not interrupt the clean-up
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def _install_stop_handlers() -> dict:
    """Stop signals raise Interrupted in the main thread (only there can handlers be set); returns the
    previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(signal, "SIGXFSZ"):   # a file-size limit becomes an OSError we clean up after, not a kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous = _install_stop_handlers()
    try:
        code = args.func(args) or 0
        sys.stdout.flush()   # a closed pipe shows here, not as a message from the interpreter's exit
        return code
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        print(f"interrupted by {name}; the file being written (if any) was removed, nothing half-written is left",
              file=sys.stderr)
        return 128 + stop.signum
    except AstolfoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except UnicodeEncodeError as exc:   # a name the file system or the terminal cannot take
        print(f"error: {ascii(exc.object[:200])}: cannot be encoded as {exc.encoding} "
              f"({ascii(exc.object[exc.start:exc.end])}: {exc.reason}); use a name made of ordinary characters", file=sys.stderr)
        return 2
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) and exc.filename is None:
            return _output_closed()
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _output_closed() -> int:
    """The reader of our output went away (`methods | head`): stop quietly, as `cat` would. Python
    would otherwise report the failed flush of the buffered rest at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError):
                pass
    except OSError:
        pass
    return 141   # 128 + SIGPIPE: what a shell reports for a tool stopped by a closed pipe
