"""Long tab actions (repair, analysis) on a worker thread, as a gradio generator event.

The event yields a "working … N s" line every half second while the work runs on its own thread,
then the work's outputs. Needs the queue (the WebUI and the standalone app enable it); other events
of the page keep answering meanwhile.
"""
from __future__ import annotations

import threading
import time

POLL_SECONDS = 0.5


def run_in_thread(work, waiting, poll: float = POLL_SECONDS):
    """Generator: `waiting(seconds_elapsed)` while `work()` runs, then `work()`'s return value
    (an exception of `work` is re-raised here, on the event's thread)."""
    box = {}

    def target():
        try:
            box["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the event's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="astolfo-merge-task", daemon=True)
    started = time.monotonic()
    thread.start()
    while thread.is_alive():
        thread.join(poll)
        if thread.is_alive():
            yield waiting(time.monotonic() - started)
    if "error" in box:
        raise box["error"]
    yield box["result"]


def last(generator):
    """The final value of a `run_in_thread` generator (tests, and callers that do not stream)."""
    value = None
    for value in generator:
        pass
    return value


NONE = "(none)"   # the "no model" choice of the sub-tabs' pickers


def error_text(exc: Exception) -> str:
    """A failure as the sub-tabs show it: bad input plainly, anything else as an internal error."""
    from ..errors import AstolfoError
    return f"**Error:** {exc}" if isinstance(exc, AstolfoError) else f"**Internal error:** {exc.__class__.__name__}: {exc}"
