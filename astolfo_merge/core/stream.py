"""The one streaming loop: row chunks of stored tensors in, key by key into the atomic writer out.

Merges (engine), repairs (repair_write) and analyses (analysis) all read and chunk through here,
and the two that write a checkpoint write through `write_file` / `write_chunks`, so there is one
place that decides how a key is cut into row chunks and one loop that feeds the writer. Why rows:
a row range of a safetensors tensor is one contiguous byte range (one positioned read), and a
writer fed chunks in row order produces the same bytes whatever the chunk size.
"""
from __future__ import annotations

import math
import threading
from typing import Callable, Iterable

import torch

from ..errors import Cancelled
from ..io.reader import CheckpointReader
from ..io.writer import SafetensorsWriter

REWIND = object()   # yielded by a key's chunks: "drop what was written of this key, it starts over"


def row_spans(rows: int, row_bytes: int, budget: int) -> list:
    """[(start, stop), ...] covering `rows` rows, as many rows per span as fit `budget` bytes at
    `row_bytes` each (at least one row per span, so a span may exceed a budget smaller than a row:
    callers that must refuse that check it first)."""
    step = max(1, budget // max(1, row_bytes))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


def stored_chunks(reader: CheckpointReader, stored: str, shape: tuple, budget: int, bytes_per_element: int | None = None):
    """(start, stop, tensor) of the stored tensor `stored`, in row chunks reshaped to `shape`.

    A chunk's rows take `bytes_per_element` (default: the stored itemsize) per element against
    `budget`. A tensor whose stored rows are not `shape`'s rows (a scalar, another row count) or
    that fits one chunk is read whole, so a chunk is always a plain row range of the file.
    """
    info = reader.info(stored)
    rows = shape[0] if shape else 1
    by_rows = bool(shape) and bool(info.shape) and info.shape[0] == rows and info.numel == math.prod(shape)
    row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
    per_element = info.dtype.itemsize if bytes_per_element is None else bytes_per_element
    spans = row_spans(rows, row_elems * per_element, budget) if by_rows else [(0, rows)]
    for start, stop in spans:
        t = reader.read_rows(stored, start, stop) if len(spans) > 1 else reader.read(stored)
        yield start, stop, t.reshape(((stop - start,) + tuple(shape[1:])) if shape else ())


def write_chunks(writer, key: str, chunks: Iterable):
    """Feed one key's chunks (row order) to `writer`; a `REWIND` drops what was written of the key."""
    for chunk in chunks:
        if chunk is REWIND:
            writer.rewind(key)
        else:
            writer.write(key, chunk)


def write_file(output, entries: list, metadata: dict, overwrite: bool, chunks_of: Callable[[int], Iterable],
               after_key: Callable[[int], None] | None = None, cancel: threading.Event | None = None) -> str:
    """Write `entries` [(key, dtype, shape)] into `output` atomically; `chunks_of(index)` gives the
    chunks of entry `index`. Checks `cancel` before each key, calls `after_key(index)` after it.
    Returns the file's sha256; any error (or cancel) leaves no output and no temp file behind."""
    with SafetensorsWriter(output, entries, metadata, overwrite) as writer:
        for index, (key, _dtype, _shape) in enumerate(entries):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            write_chunks(writer, key, chunks_of(index))
            if after_key is not None:
                after_key(index)
        return writer.commit()


def arange_ids(shape: tuple) -> torch.Tensor:
    """Position ids 0..n-1 (int64) in `shape`: what merges and repairs write for the TE0 buffer."""
    return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
