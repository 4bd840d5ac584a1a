"""A merge worker process: `python -m astolfo_merge.core.worker_main`, driven over stdin / stdout.

Started fresh by `worker_process.WorkerProcess` (never forked from the host). Receives the plan (data),
the results of its whole-plan stages (data: prepared method state, the LoRA files to bake, the
Fermat temp file and matching) and the output's byte ranges once ("setup"), then tasks (runs of key
indices); for each key it reports "started" and "key" (with the key's log lines), for each task
"task". Any failure is sent back as data ("error") before the process exits.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import torch

from ..io.reader import CheckpointReader
from ..io.writer import RangeWriter
from .devices import worker_device, worker_torch_settings
from .key_chunks import write_key
from .stage_run import Bindings
from .worker_process import RAW_KIND, pack_error, read_frame, send_frame, send_raw
from .workers import ChunkWorkers, auto_workers


class ChunkSender:
    """A writer that sends a key's chunks to the parent (raw "chunk" messages: key, dtype, bytes)
    instead of writing a file. Small chunks are gathered into one buffer of FRAME_BYTES (methods
    produce cache-sized chunks; a message each would cost more than their arithmetic), larger ones
    go straight from the tensor's memory; "rewind" when a key starts over."""

    FRAME_BYTES = 8 << 20

    def __init__(self, outbox):
        self.outbox, self.key, self.dtype, self.size = outbox, None, None, 0
        self.buffer = torch.empty(self.FRAME_BYTES, dtype=torch.uint8)

    def write(self, key, chunk: torch.Tensor):
        if key != self.key:
            self.flush()
            self.key, self.dtype = key, str(chunk.dtype).replace("torch.", "")
        data = chunk.detach().contiguous().reshape(-1).view(torch.uint8)
        if self.size + data.numel() > self.FRAME_BYTES:
            self.flush()
        if data.numel() >= self.FRAME_BYTES:
            send_raw(self.outbox, (RAW_KIND, key, self.dtype), data.numpy())
            return
        self.buffer[self.size:self.size + data.numel()].copy_(data)
        self.size += data.numel()

    def flush(self):
        if self.size:
            send_raw(self.outbox, (RAW_KIND, self.key, self.dtype), self.buffer[:self.size].numpy())
        self.size = 0

    def rewind(self, key):
        self.size = 0
        send_frame(self.outbox, ("rewind", key))

    def close(self):
        self.flush()


def run_keys(setup: dict, tmp: str, ranges: dict, dtypes: dict, first: int, stop: int, started=None, finished=None,
             sender=None, device: str | None = None):
    """The per-task code every executor shares (worker processes, Ray): keys plan.keys[first:stop],
    read from the inputs' paths and written with positioned writes into `ranges` of the temp output
    `tmp` — or, given a `sender` (ChunkSender: live merges), sent back to the parent instead.
    `started(index)` / `finished(index, log_lines)` are called around each key. `device`: this
    worker's own (devices.worker_device), else the merge's."""
    plan, bound = setup["plan"], Bindings(setup["plan"], setup["results"])
    dtype, chunk_bytes = setup["dtype"], setup["chunk_bytes"]
    device = torch.device(device or setup["device"])
    throttle = setup.get("throttle", 0.0)
    readers = [CheckpointReader(s.path, s.header) for s in plan.sources]
    pool, writer = ChunkWorkers(auto_workers(device.type)), None
    try:
        writer = sender if sender is not None else RangeWriter(tmp, ranges, dtypes)
        for index in range(first, stop):
            if started is not None:
                started(index)
            log = []
            write_key(plan, plan.keys[index], writer, readers, dtype, device, chunk_bytes, log, None, bound, pool)
            if sender is not None:
                sender.flush()
            if finished is not None:
                finished(index, log)
            if throttle:
                time.sleep(throttle)
    finally:
        if writer is not None and writer is not sender:
            writer.close()
        pool.close()
        bound.close()
        for r in readers:
            r.close()


def serve(inbox, outbox, index: int = 0):
    """Worker `index`'s loop: a merge's setup, then its tasks. "park" drops the setup and answers
    "parked" (a kept crew waits for the next merge's setup: live merges in a grid, live_workers.py);
    "stop", anything else or the parent's end of the pipe ends the worker."""
    started = lambda index: send_frame(outbox, ("started", index))  # noqa: E731
    finished = lambda index, log: send_frame(outbox, ("key", index, log))  # noqa: E731
    setup = device = sender = None
    while (msg := read_frame(inbox)) is not None:
        if msg[0] == "setup":
            setup = msg[1]
            device = worker_device(setup["device"], index)
            sender = ChunkSender(outbox) if setup.get("send_chunks") else None   # live merges: chunks over the pipe
        elif msg[0] == "task" and setup is not None:
            _, task_id, first, stop = msg
            run_keys(setup, setup.get("tmp"), setup.get("ranges"), setup.get("dtypes"), first, stop, started,
                     finished, sender, device)
            send_frame(outbox, ("task", task_id))
        elif msg[0] == "park":
            setup = device = sender = None
            send_frame(outbox, ("parked",))
        else:
            return


def main():
    index = int(sys.argv[1]) if len(sys.argv) > 1 else 0     # this worker's number (its GPU, on CUDA)
    worker_torch_settings()
    # The protocol owns the real stdout; anything else printed goes to stderr.
    outbox = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    inbox = sys.stdin.buffer
    try:
        with torch.no_grad():
            serve(inbox, outbox, index)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent as data
        try:
            send_frame(outbox, ("error", pack_error(exc), traceback.format_exc(limit=8)))
        except OSError:
            pass
        sys.exit(1)


if __name__ == "__main__":
    main()
