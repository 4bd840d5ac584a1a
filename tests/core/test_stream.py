"""The one streaming loop (stream.py): row spans, stored chunks and the writer loop."""
from __future__ import annotations

import threading

import pytest
import torch

from astolfo_merge.core.stream import REWIND, row_spans, stored_chunks, write_file
from astolfo_merge.errors import Cancelled
from astolfo_merge.io.hashes import sha256_file
from astolfo_merge.io.header import read_header
from astolfo_merge.io.reader import CheckpointReader
from astolfo_merge.io.writer import save_file

TENSORS = {"w": torch.arange(60, dtype=torch.float32).reshape(10, 6), "s": torch.tensor(2.5),
           "e": torch.zeros((0,), dtype=torch.int64), "v": torch.arange(12, dtype=torch.float16).reshape(12, 1, 1)}


@pytest.fixture
def stored(tmp_path):
    path = tmp_path / "in.safetensors"
    save_file(TENSORS, path)
    return path


@pytest.mark.parametrize("rows,row_bytes,budget", [(10, 24, 24), (10, 24, 50), (10, 24, 10 ** 6), (7, 0, 1), (0, 8, 8)])
def test_row_spans_cover_every_row_once_within_the_budget(rows, row_bytes, budget):
    spans = row_spans(rows, row_bytes, budget)
    assert [r for a, b in spans for r in range(a, b)] == list(range(rows))
    assert all((b - a) * row_bytes <= max(budget, row_bytes) for a, b in spans)


@pytest.mark.parametrize("budget", [1, 24, 100, 10 ** 6])
def test_stored_chunks_rebuild_each_tensor_in_its_target_shape(stored, budget):
    with CheckpointReader(stored) as reader:
        for key, want in TENSORS.items():
            parts = [t for _a, _b, t in stored_chunks(reader, key, tuple(want.shape), budget)]
            whole = torch.cat(parts) if want.dim() and parts else (parts[0] if parts else want.new_empty(want.shape))
            assert whole.shape == want.shape and torch.equal(whole, want), key
        reshaped = [t for _a, _b, t in stored_chunks(reader, "v", (12,), 4)]
        assert torch.equal(torch.cat(reshaped), TENSORS["v"].reshape(12))


def _entries():
    return [(k, t.dtype, tuple(t.shape)) for k, t in TENSORS.items()]


def test_write_file_writes_the_same_bytes_as_a_one_shot_save(stored, tmp_path):
    def chunks_of(index):
        key = _entries()[index][0]
        t = TENSORS[key]
        return [t[a:b] for a, b in row_spans(t.shape[0], 1, 3)] if t.dim() else [t]

    done = []
    sha = write_file(tmp_path / "out.safetensors", _entries(), None, False, chunks_of, done.append)
    assert sha == sha256_file(stored) == sha256_file(tmp_path / "out.safetensors")
    assert done == [0, 1, 2, 3]


def test_a_rewind_drops_what_was_written_of_the_key(stored, tmp_path):
    def chunks_of(index):
        key = _entries()[index][0]
        t = TENSORS[key]
        if key == "w":
            return [t[:4] + 1, REWIND, t[:4], t[4:]]
        return [t]

    sha = write_file(tmp_path / "out.safetensors", _entries(), None, False, chunks_of)
    assert sha == sha256_file(stored)
    assert read_header(tmp_path / "out.safetensors").shapes == read_header(stored).shapes


def test_cancel_leaves_no_file_behind(tmp_path):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        write_file(tmp_path / "out.safetensors", _entries(), None, False, lambda i: [TENSORS[_entries()[i][0]]],
                   cancel=cancel)
    assert list(tmp_path.iterdir()) == []
