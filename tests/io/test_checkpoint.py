"""Checkpoint I/O: the streaming writer's format and atomicity, the header reader's validation."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file as st_save

from astolfo_merge.errors import CheckpointError, OutputExistsError
from astolfo_merge.io.hashes import sha256_file
from astolfo_merge.io.header import read_header
from astolfo_merge.io.reader import CheckpointReader
from astolfo_merge.io.writer import SafetensorsWriter, save_file


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(5, 3, generator=g).half(), "b.bias": torch.randn(7, generator=g),
            "c.bf": torch.randn(2, 2, 3, generator=g).bfloat16(), "ids": torch.arange(77).reshape(1, 77),
            "empty": torch.zeros((0,), dtype=torch.int64), "scalar": torch.tensor(4.5, dtype=torch.float64)}


def test_writer_output_is_read_back_identically_by_the_safetensors_library(tmp_path):
    tensors = sample_tensors()
    sha = save_file(tensors, tmp_path / "x.safetensors", {"k": "v", "n": {"nested": 1}})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    assert sha == sha256_file(tmp_path / "x.safetensors")
    meta = read_header(tmp_path / "x.safetensors").metadata
    assert meta == {"k": "v", "n": json.dumps({"nested": 1})}, "metadata values are always strings"


def test_writer_accepts_a_tensor_in_row_chunks(tmp_path):
    t = torch.randn(10, 4)
    with SafetensorsWriter(tmp_path / "c.safetensors", [("t", torch.float32, (10, 4))]) as w:
        for a in range(0, 10, 3):
            w.write("t", t[a:a + 3])
        w.commit()
    assert torch.equal(load_file(str(tmp_path / "c.safetensors"))["t"], t)


def test_reader_reads_whole_tensors_and_row_ranges(tmp_path):
    tensors = sample_tensors()
    st_save(tensors, str(tmp_path / "r.safetensors"))
    with CheckpointReader(tmp_path / "r.safetensors") as r:
        for k, v in tensors.items():
            assert torch.equal(r.read(k), v)
        assert torch.equal(r.read_rows("a.weight", 1, 4), tensors["a.weight"][1:4])
        assert torch.equal(r.read_rows("c.bf", 1, 2), tensors["c.bf"][1:2])


def test_existing_output_is_never_overwritten_unless_asked(tmp_path):
    target = tmp_path / "o.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(OutputExistsError):
        save_file({"x": torch.ones(2)}, target)
    assert target.read_bytes() == b"precious"
    save_file({"x": torch.ones(2)}, target, overwrite=True)
    assert torch.equal(load_file(str(target))["x"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors"]


def test_failed_write_leaves_no_output_and_no_temp_file(tmp_path):
    target = tmp_path / "f.safetensors"
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(target, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("method failed")
    assert os.listdir(tmp_path) == []


def test_commit_before_every_tensor_is_written_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="before tensor 'b'"):
        with SafetensorsWriter(tmp_path / "g.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]) as w:
            w.write("a", torch.ones(2))
            w.commit()
    assert os.listdir(tmp_path) == []


def _raw(tmp_path, header: bytes, data: bytes = b"", n=None):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)
    return path


@pytest.mark.parametrize("case,expect", [
    ("zero", "empty"), ("short", "truncated"), ("huge_n", "larger than the file"), ("not_json", "not valid JSON"),
    ("bad_dtype", "unsupported dtype"), ("past_end", "past the end"), ("overlap", "overlap"),
    ("size_mismatch", "do not match shape"), ("bad_shape", "shape"),
])
def test_bad_headers_raise_an_error_naming_the_file_and_the_problem(tmp_path, case, expect):
    ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "zero":
        path = tmp_path / "bad.safetensors"
        path.write_bytes(b"")
    elif case == "short":
        path = tmp_path / "bad.safetensors"
        path.write_bytes(b"\x01\x02")
    elif case == "huge_n":
        path = _raw(tmp_path, b"{}", n=10 ** 9)
    elif case == "not_json":
        path = _raw(tmp_path, b"{not json")
    else:
        header = {"bad_dtype": {"t": {**ok, "dtype": "C64"}},
                  "past_end": {"t": {**ok, "data_offsets": [0, 16], "shape": [4]}},
                  "overlap": {"t": ok, "u": {**ok, "data_offsets": [4, 12]}},
                  "size_mismatch": {"t": {**ok, "shape": [3]}},
                  "bad_shape": {"t": {**ok, "shape": [-2]}}}[case]
        path = _raw(tmp_path, json.dumps(header).encode(), b"\0" * 12)
    with pytest.raises(CheckpointError, match=expect) as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_missing_path_and_directory_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_header(tmp_path)


def test_legacy_ckpt_is_read_through_the_weights_only_loader(tmp_path):
    sd = {"model.diffusion_model.x": torch.randn(3, 2), "cond_stage_model.y": torch.randn(4)}
    torch.save({"state_dict": sd, "global_step": 5}, tmp_path / "m.ckpt")
    header = read_header(tmp_path / "m.ckpt")
    assert header.format == "ckpt" and set(header.tensors) == set(sd)
    with CheckpointReader(tmp_path / "m.ckpt") as r:
        assert torch.equal(r.read("model.diffusion_model.x"), sd["model.diffusion_model.x"])
        assert torch.equal(r.read_rows("model.diffusion_model.x", 1, 3), sd["model.diffusion_model.x"][1:3])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_ckpt_whose_pickle_would_run_code_is_refused_and_the_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    import pickle
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(str(marker))}}, f)
    with pytest.raises(CheckpointError, match="refusing to unpickle it"):
        read_header(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_the_windows_branch_closes_before_renaming_or_deleting(tmp_path, monkeypatch):
    """Without fcntl (Windows) the temp file is locked through msvcrt and must be closed before it is
    renamed or deleted; the results are the same as on POSIX: committed, refused, or aborted cleanly."""
    from astolfo_merge.io import tempfiles, writer as writer_module
    locked = []
    monkeypatch.setattr(writer_module, "fcntl", None)
    monkeypatch.setattr(tempfiles, "fcntl", None)
    monkeypatch.setattr(tempfiles, "_lock", lambda fd: locked.append(fd))
    entries = [("w", torch.float32, (2, 3))]
    value = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    with SafetensorsWriter(tmp_path / "a.safetensors", entries) as writer:
        writer.write("w", value)
        writer.commit()
    with CheckpointReader(tmp_path / "a.safetensors") as reader:
        assert locked and torch.equal(reader.read("w"), value)
    with pytest.raises(OutputExistsError):
        SafetensorsWriter(tmp_path / "a.safetensors", entries)
    with SafetensorsWriter(tmp_path / "a.safetensors", entries, overwrite=True) as writer:
        writer.write("w", value * 2)
        writer.commit()
    with CheckpointReader(tmp_path / "a.safetensors") as reader:
        assert torch.equal(reader.read("w"), value * 2)
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path / "b.safetensors", entries) as writer:
            writer.write("w", value[:1])
            raise RuntimeError("cancelled midway")
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
