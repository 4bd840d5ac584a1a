"""Zero-copy reads: memory-mapped views give the same bytes as positioned reads, and every merge
computed from them is byte-identical to the one computed from copies (the fallback path)."""
import json
import os
import struct

import pytest
import torch

from astolfo_merge.core import key_inputs
from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.io.header import read_header
from astolfo_merge.io.reader import CheckpointReader
from astolfo_merge.io.writer import save_file

from conftest import load, run_recipe

SD1 = ["sd1-a.safetensors", "sd1-b.safetensors", "sd1-c.safetensors"]


def same_tensors(a, b) -> bool:
    """Bit-for-bit equal tensors (the metadata names the output file, so the files differ there)."""
    a, b = load(a), load(b)
    return a.keys() == b.keys() and all(torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8))
                                        for k in a)


def merge(models, name, **doc):
    return run_recipe(models, {"pool": SD1, "output": name, **doc}, chunk_bytes=64 * 1024).path   # many chunks per key


def test_views_equal_positioned_reads_for_every_key(demo_dir):
    path = demo_dir / "sd1-a.safetensors"
    with CheckpointReader(path) as reader:
        for key, info in reader.header.tensors.items():
            if not info.shape:
                assert reader.view_rows(key, 0, 1) is None
                continue
            rows = info.shape[0]
            a, b = rows // 3, max(rows // 3 + 1, rows - 1)
            view = reader.view_rows(key, a, b)
            assert view is not None and view.dtype == info.dtype
            assert torch.equal(view, reader.read_rows(key, a, b)), key
            reader.release(key, 0, b)
            assert torch.equal(view, reader.read_rows(key, a, b)), key    # a live view faults its pages back in
            reader.release(key)
            assert torch.equal(reader.view_rows(key, 0, rows), reader.read(key)), key


def test_reads_without_positioned_io_copy_from_the_map(demo_dir, monkeypatch):
    """Windows has no os.preadv: the reader copies out of the memory map instead, same bytes."""
    path = demo_dir / "sd1-b.safetensors"
    with CheckpointReader(path) as reader:
        expected = {k: reader.read(k) for k in list(reader.header.tensors)[:40]}
    monkeypatch.delattr(os, "preadv")
    with CheckpointReader(path) as reader:
        for key, value in expected.items():
            assert torch.equal(reader.read(key), value), key
            if value.dim():
                assert torch.equal(reader.read_rows(key, 0, 1), value[:1]), key


def misaligned_copy(src, dst):
    """The same tensors, with one byte of header padding more: the data section starts at an odd
    offset, so fp16 values cannot be viewed in place (the reader must fall back to copies)."""
    header = read_header(src)
    raw = open(src, "rb").read()
    blob = raw[8:header.data_start].rstrip(b" ")
    blob += b" " * ((-len(blob) % 8) + 1)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + raw[header.data_start:])
    assert (8 + len(blob)) % 2 == 1


def test_misaligned_files_fall_back_to_copies_with_the_same_result(models):
    misaligned_copy(models / "sd1-c.safetensors", models / "odd.safetensors")
    with CheckpointReader(models / "odd.safetensors") as reader:
        key = next(k for k, i in reader.header.tensors.items() if len(i.shape) == 2)
        assert reader.view_rows(key, 0, 1) is None
        assert torch.equal(reader.read(key), load(models / "sd1-c.safetensors")[key])
    plan = build_plan(parse_recipe({"pool": SD1[:2] + ["odd.safetensors"], "method": "n_average",
                                    "output": "odd-avg.safetensors"}), str(models))
    assert same_tensors(run_merge(plan, RunOptions(hash_inputs=False)).path, merge(models, "avg.safetensors", method="n_average"))


@pytest.mark.parametrize("doc", [
    {"method": "n_average"},                                                     # exact one-op fp64 sum
    {"method": "n_average", "params": {"weights": [0.2, 0.5, 0.3]}},             # ordered weighted sum, fp64
    {"method": "n_average", "params": {"weights": [0.2, 0.0, 0.7]}, "precision": "fp32"},   # a zero weight
    {"method": "n_average", "precision": "fp32"},
    {"method": "ties", "base": "sd1-base.safetensors", "params": {"k": 0.3}},   # stacked reads
    {"method": "geometric_median"},
], ids=lambda d: json.dumps(d, sort_keys=True))
def test_views_and_copies_give_the_same_bytes(models, monkeypatch, doc):
    monkeypatch.setattr(key_inputs, "RELEASE_BYTES", 1)     # unmap used pages behind every chunk
    with_views = merge(models, "views.safetensors", **doc)
    monkeypatch.setattr(CheckpointReader, "view_rows", lambda self, key, start, stop: None)
    with_copies = merge(models, "copies.safetensors", **doc)
    assert same_tensors(with_views, with_copies)


def test_nan_in_the_base_of_a_linear_method_names_the_base(models):
    """Linear methods skip the input scan; a non-finite output is traced back to the input."""
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    base = load(models / "sd1-base.safetensors")
    base[key] = base[key].clone()
    base[key].view(-1)[5] = float("nan")
    save_file(base, models / "nanbase.safetensors")
    plan = build_plan(parse_recipe({"pool": SD1[:2], "base": "nanbase.safetensors", "method": "add_difference",
                                    "output": "o.safetensors", "nonfinite": "skip"}), str(models))
    with pytest.raises(Exception, match="nanbase.safetensors has NaN/Inf values") as err:
        run_merge(plan, RunOptions(hash_inputs=False))
    assert err.value.key == key
    assert not (models / "o.safetensors").exists()
