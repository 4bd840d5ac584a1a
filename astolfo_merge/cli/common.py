"""What every sub-command shares: the default models folder, the progress line, the one-line parser errors
and the --memory-gb type (here, so the sub-command modules and the parser import downwards only)."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import OptionError, check_memory_gb, check_throttle

DEFAULT_MODELS_DIR = os.environ.get("ASTOLFO_MODELS_DIR", os.path.join(os.getcwd(), "models"))


def progress_printer(stream=sys.stderr, interval=0.5):
    """A one-line progress bar, redrawn at most every `interval` seconds (plain lines off a TTY)."""
    state = {"len": 0, "last": 0.0}
    tty = stream.isatty()

    def show(p):
        final = p.keys_done == p.keys_total and not p.message
        if not final and p.elapsed - state["last"] < interval and not p.message:
            return
        state["last"] = p.elapsed
        width = 30
        filled = int(width * p.fraction)
        eta = f" ETA {p.eta:4.0f}s" if p.eta is not None and not final else f" {p.elapsed:.1f}s"
        text = p.message or f"[{'#' * filled}{'.' * (width - filled)}] {100 * p.fraction:5.1f}% keys {p.keys_done}/{p.keys_total}{eta}"
        if tty:
            stream.write("\r" + text.ljust(state["len"]) + ("\n" if final else ""))
            state["len"] = len(text)
        else:
            stream.write(text + "\n")
        stream.flush()
    return show


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line like every other bad input: one line, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def memory_gb_arg(text: str) -> float:
    """argparse `type` of every --memory-gb: a finite number of GB above 0."""
    try:
        return check_memory_gb(text, "--memory-gb")
    except OptionError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


THROTTLE_HELP = "pause after each key, in every worker (default 0): leaves a shared disk and CPU to others"


def throttle_arg(text: str) -> float:
    """argparse `type` of every --throttle: seconds from 0 to 60."""
    try:
        return check_throttle(text, "--throttle")
    except OptionError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def workers_arg(text):
    """--workers: 0 (auto) or a positive count."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (auto) or a positive integer, got {text!r}")
    return value
