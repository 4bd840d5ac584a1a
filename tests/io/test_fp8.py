"""fp8: F8_E4M3 / F8_E5M2 inputs read exactly, ComfyUI fp8_scaled inputs read as weight x scale,
per-component output dtypes with fp64 -> fp8 rounded once, out-of-range values under the nonfinite
policy, and GGUF / NVFP4 / other quantized formats refused by name.

The differential tests compare every merged key, bit for bit, with the method run in memory on the
inputs dequantized here (from the safetensors library's reading of the files), cast once."""
import dataclasses
import json
import struct
from fractions import Fraction

import pytest
import torch

from astolfo_merge.core.key_inputs import FileKeyInputs
from astolfo_merge.core.plan_data import key_seed
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.errors import CheckpointError, MergeKeyError, RecipeError
from astolfo_merge.features.analysis import analyze
from astolfo_merge.features.demo import write_synthetic
from astolfo_merge.features.inspection import inspect_file
from astolfo_merge.features.repair import repair_file
from astolfo_merge.io import arch
from astolfo_merge.io.header import read_header
from astolfo_merge.io.reader import CheckpointReader
from astolfo_merge.io.writer import cast_output, fp8_out_of_range, save_file
from astolfo_merge.methods import get_method
from astolfo_merge.methods.registry import TensorInputs
from astolfo_merge.ui.state import carried_dtype, form_carry

from conftest import TEST_SCALE, cli, link_files, load, run_recipe

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
OUT = {"unet": "fp8_e4m3fn", "te0": "fp8_e5m2", "default": "fp16"}     # SD1 has unet, te0, vae
TORCH_OF = {"fp8_e4m3fn": E4, "fp8_e5m2": E5, "fp16": torch.float16, "fp32": torch.float32}
AUX = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant", "scaled_fp8")
QUANT_TAG = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)


def to_fp8_scaled(sd: dict) -> dict:
    """ComfyUI's fp8_scaled layout: UNET weights in the first form (one fp32 `scale_weight` per weight,
    `scale_input`, the `scaled_fp8` marker), TE weights in the mixed-precision form (`weight_scale`,
    here one per output row, `input_scale`, `comfy_quant`); the rest fp16."""
    out = {}
    for key, value in sd.items():
        comp = arch.component_of(key)
        if not (key.endswith(".weight") and value.dim() >= 2 and comp in ("unet", "te0")):
            out[key] = value.half() if value.is_floating_point() else value
            continue
        layer, wide = key[:-len(".weight")], value.double()
        if comp == "unet":
            scale = (wide.abs().max() / 448).float().reshape(())
            out[key] = (wide / scale.double()).to(E4)
            out[f"{layer}.scale_weight"], out[f"{layer}.scale_input"] = scale, torch.ones(())
        else:
            scale = (wide.abs().reshape(len(wide), -1).amax(1, keepdim=True) / 448).float().clamp_min(1e-8)
            out[key] = (wide / scale.double().reshape((-1,) + (1,) * (wide.dim() - 1))).to(E4)
            out[f"{layer}.weight_scale"], out[f"{layer}.input_scale"] = scale, torch.ones(())
            out[f"{layer}.comfy_quant"] = QUANT_TAG
    out["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=E4)
    return out


def dequantized(path) -> dict:
    """Every model key of a file in fp64, fp8_scaled weights times their scale (test-side, own code)."""
    sd, out = load(path), {}
    for key, value in sd.items():
        if key.endswith(AUX):
            continue
        layer = key[:-len(".weight")]
        scale = sd.get(f"{layer}.scale_weight", sd.get(f"{layer}.weight_scale")) if key.endswith(".weight") else None
        value = value.double() if value.is_floating_point() else value
        if scale is not None:
            value = value * scale.double().reshape((-1,) + (1,) * (value.dim() - 1) if scale.numel() > 1 else ())
        out[key] = value
    return out


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp8")
    write_synthetic(folder / "e4-a.safetensors", "sd1", TEST_SCALE, variant=1, dtype=E4)
    write_synthetic(folder / "e4-b.safetensors", "sd1", TEST_SCALE, variant=2, dtype=E4)
    write_synthetic(folder / "e5-c.safetensors", "sd1", TEST_SCALE, variant=3, dtype=E5)
    write_synthetic(folder / "f32-d.safetensors", "sd1", TEST_SCALE, variant=4, dtype=torch.float32)
    save_file(to_fp8_scaled(load(folder / "f32-d.safetensors")), folder / "scaled-d.safetensors")
    write_synthetic(folder / "sd1-base.safetensors", "sd1", TEST_SCALE)
    return folder


@pytest.fixture
def folder(fp8_dir, tmp_path):
    """A fresh models folder holding links to the module's fp8 files."""
    return link_files(fp8_dir, tmp_path)


def merge(folder, doc, name="out.safetensors", **opts):
    recipe = parse_recipe({"output": name, **doc})
    return recipe, run_recipe(folder, recipe, **opts)


def header_dtypes(path) -> set:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        doc = json.loads(f.read(n))
    return {v["dtype"] for k, v in doc.items() if k != "__metadata__"}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# ---------------------------------------------------------------------------------------------
# Rounding and range

def fp8_table(dtype):
    """(value, code) of every finite non-negative fp8 value, ascending."""
    codes = torch.arange(128, dtype=torch.uint8)
    values = codes.view(dtype).double()
    return [(Fraction(float(v)), int(c)) for v, c in zip(values, codes) if torch.isfinite(v)]


def nearest_even(x: float, table) -> float:
    """Round-to-nearest-even of the exact value x (|x| within range) by exact rational arithmetic."""
    target = Fraction(abs(x))
    lo = max((e for e in table if e[0] <= target), key=lambda e: e[0])
    hi = min((e for e in table if e[0] >= target), key=lambda e: e[0])
    gap_lo, gap_hi = target - lo[0], hi[0] - target
    pick = lo if gap_lo < gap_hi or (gap_lo == gap_hi and lo[1] % 2 == 0) else hi
    return float(pick[0]) if x >= 0 else -float(pick[0])


@pytest.mark.parametrize("dtype", [E4, E5])
def test_fp64_to_fp8_rounds_once_to_nearest_even_at_every_rounding_boundary(dtype):
    table = fp8_table(dtype)
    xs = []
    for (a, _ca), (b, _cb) in zip(table, table[1:]):
        mid = float((a + b) / 2)
        xs += [mid, mid * (1 + 2.0 ** -40), mid * (1 - 2.0 ** -40), float(a), float(b)]
    xs += [-x for x in xs]
    x = torch.tensor(xs, dtype=torch.float64)
    ours = cast_output(x, dtype).double()
    expect = torch.tensor([nearest_even(v, table) for v in xs], dtype=torch.float64)
    assert torch.equal(ours, expect)
    # torch's own fp64 -> fp8 cast rounds twice (through fp32): just above a midpoint it can go down
    assert not torch.equal(x.to(dtype).double(), expect)
    # from fp32 (the fp32 compute precision) torch rounds once: used as it is
    top = float(table[-1][0])
    x32 = torch.tensor([float(v) for v in expect if abs(v) < top], dtype=torch.float32) * (1 + 2.0 ** -20)
    assert torch.equal(cast_output(x32, dtype).double(),
                       torch.tensor([nearest_even(float(v), table) for v in x32], dtype=torch.float64))


def test_beyond_the_fp8_range_torch_saturates_e4m3fn_and_overflows_e5m2():
    x = torch.tensor([448.0, 464.0, 464.5, 1e4, float("inf"), -1e4], dtype=torch.float64)
    assert cast_output(x, E4).double().tolist() == [448.0, 448.0, 448.0, 448.0, 448.0, -448.0]
    assert fp8_out_of_range(x, E4).tolist() == [False, False, True, True, False, True]
    y = torch.tensor([57344.0, 61439.0, 61440.0, 1e6, -1e6], dtype=torch.float64)
    assert cast_output(y, E5).double().tolist() == [57344.0, 57344.0, float("inf"), float("inf"), float("-inf")]
    assert fp8_out_of_range(y, E5).tolist() == [False, False, True, True, True]
    assert torch.isnan(cast_output(torch.tensor([float("nan")], dtype=torch.float64), E4)).all()


# ---------------------------------------------------------------------------------------------
# Reading

def test_plain_fp8_is_read_exactly_on_every_reader_path(fp8_dir):
    for name in ("e4-a.safetensors", "e5-c.safetensors"):
        ref = load(fp8_dir / name)
        with CheckpointReader(fp8_dir / name) as reader:
            for key, value in ref.items():
                assert torch.equal(bits(reader.read(key)), bits(value)), key
                if value.dim() and len(value) > 2:
                    rows = reader.read_rows(key, 1, 3)
                    view = reader.view_rows(key, 1, 3)
                    assert rows.dtype == value.dtype and torch.equal(bits(rows), bits(value[1:3]))
                    assert view is not None and torch.equal(bits(view), bits(value[1:3]))
    every = torch.arange(256, dtype=torch.uint8)
    for dtype in (E4, E5):   # widening is exact: fp8 -> fp64 equals fp8 -> fp32 -> fp64 (NaNs aside)
        v = every.view(dtype)
        finite = torch.isfinite(v.double())
        assert torch.equal(v.double()[finite], v.float().double()[finite])


def test_fp8_scaled_weights_read_as_weight_times_scale_and_scale_keys_are_not_model_keys(fp8_dir):
    path = fp8_dir / "scaled-d.safetensors"
    header, ref = read_header(path), dequantized(path)
    assert header.quantization and len(header.scales) > 100
    ident = arch.identify(header.shapes, header.metadata)
    assert (ident.arch, ident.scale, ident.is_full) == ("sd1", TEST_SCALE, True)
    assert ident.unknown == [] and ident.markers == []
    assert inspect_file(path)["unknown"] == []
    per_row = next(k for k, s in header.scales.items() if s.endswith(".weight_scale"))
    per_weight = next(k for k, s in header.scales.items() if s.endswith(".scale_weight"))
    with CheckpointReader(path) as reader, CheckpointReader(path, dequantize=False) as raw:
        for key in (per_row, per_weight):
            rows = len(ref[key])
            assert torch.equal(reader.read(key), ref[key])
            assert torch.equal(torch.cat([reader.read_rows(key, a, min(a + 3, rows)) for a in range(0, rows, 3)]),
                               ref[key])
            assert reader.view_rows(key, 0, 1) is None
            assert raw.read(key).dtype == E4 and torch.equal(bits(raw.read(key)), bits(load(path)[key]))
    assert not ref[per_row].equal(ref[per_row].to(E4).double()), "the per-row scale must matter"


# ---------------------------------------------------------------------------------------------
# Merging: bit-exact against the in-memory method on the dequantized inputs, cast once

CASES = {
    "n_average-fp8-views": (["e4-a.safetensors", "e4-b.safetensors"], "n_average", {}, None),
    "weighted_sum": (["e4-a.safetensors", "scaled-d.safetensors"], "weighted_sum", {"alpha": 0.3}, None),
    "n_average-mixed": (["e4-a.safetensors", "scaled-d.safetensors", "e5-c.safetensors"], "n_average",
                        {"weights": [1.0, 2.0, 0.5]}, None),
    "ties": (["e4-a.safetensors", "scaled-d.safetensors", "e5-c.safetensors"], "ties", {}, "sd1-base.safetensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merging_fp8_and_fp8_scaled_inputs_equals_the_fp64_reference_cast_once(folder, case, monkeypatch):
    pool, method, params, base = CASES[case]
    staged = []
    original = FileKeyInputs._stage
    monkeypatch.setattr(FileKeyInputs, "_stage", lambda self, *a, **k: staged.append(1) or original(self, *a, **k))
    doc = {"pool": pool, "method": method, "params": params, "dtype": OUT, **({"base": base} if base else {})}
    # a few rows per chunk, so per-row scales are sliced (TIES, slower per chunk, runs whole keys)
    recipe, result = merge(folder, doc, chunk_bytes=None if method == "ties" else 4096)
    assert bool(staged) == (case == "n_average-fp8-views")    # all-fp8 pools take the zero-copy staged path
    out = load(result.path)
    assert set(out) == set(arch.layout("sd1", TEST_SCALE)) and not any(k.endswith(AUX) for k in out)
    assert header_dtypes(result.path) == {"F8_E4M3", "F8_E5M2", "F16", "I64"}
    inputs = [dequantized(folder / name) for name in pool]
    base_sd = dequantized(folder / base) if base else None
    run = get_method(method)
    for key, got in out.items():
        if not got.is_floating_point():
            continue
        kin = TensorInputs([sd[key] for sd in inputs], base=base_sd[key] if base else None, key=key,
                           seed=key_seed(recipe.seed, key), recipe_seed=recipe.seed)
        ref = torch.cat([c.reshape(-1) for c in run.run(kin, recipe.params)]).reshape(got.shape)
        want = TORCH_OF[recipe.dtype_of(arch.component_of(key))]
        assert got.dtype == want, key
        assert torch.equal(bits(got), bits(cast_output(ref, want))), key


def test_fp8_output_reads_back_and_merges_again_to_the_same_bytes(folder):
    _recipe, first = merge(folder, {"pool": ["e4-a.safetensors", "scaled-d.safetensors"], "method": "weighted_sum",
                                    "params": {"alpha": 0.5}, "dtype": OUT})
    written = load(first.path)
    with CheckpointReader(first.path) as reader:
        assert all(torch.equal(bits(reader.read(k)), bits(v)) for k, v in written.items())
    _recipe, again = merge(folder, {"pool": ["out.safetensors", "out.safetensors"], "method": "n_average",
                                    "dtype": OUT}, name="again.safetensors")
    assert all(torch.equal(bits(v), bits(written[k])) for k, v in load(again.path).items())


def _with_value(folder, name, value):
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load(folder / "e4-a.safetensors").items()}
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    sd[key].view(-1)[5] = value
    save_file(sd, folder / name)
    return key


@pytest.mark.parametrize("dtype,value,kept", [("fp8_e4m3fn", 1000.0, 448.0), ("fp8_e5m2", 1e5, float("inf"))])
def test_values_beyond_the_fp8_range_follow_the_nonfinite_policy(folder, dtype, value, kept):
    key = _with_value(folder, "big.safetensors", value)
    doc = {"pool": ["big.safetensors", "big.safetensors"], "method": "n_average", "dtype": {"unet": dtype}}
    with pytest.raises(MergeKeyError) as err:
        merge(folder, doc)
    assert key in str(err.value) and f"beyond the range of {dtype}" in str(err.value)
    assert not (folder / "out.safetensors").exists()
    for policy, expect in (("keep", kept), ("zero", 0.0)):
        _recipe, result = merge(folder, {**doc, "nonfinite": policy}, name=f"{policy}.safetensors")
        assert float(load(result.path)[key].view(-1)[5]) == expect
        assert any("beyond the" in line for line in result.log)


# ---------------------------------------------------------------------------------------------
# Per-component dtype

@pytest.mark.parametrize("dtype,field", [
    ({"unet": "fp8"}, "dtype.unet"), ({"clip": "fp16"}, "dtype.clip"), ({}, "dtype"), ("int8", "dtype"),
    ({"default": "fp64"}, "dtype.default"), (16, "dtype"),
])
def test_a_bad_dtype_is_refused_up_front_naming_the_field(dtype, field):
    with pytest.raises(RecipeError) as err:
        parse_recipe({"pool": ["a", "b"], "method": "weighted_sum", "dtype": dtype})
    assert err.value.field == field
    assert ("unknown component" if field == "dtype.clip" else "fp8_e4m3fn") in str(err.value)


def test_per_component_dtype_falls_back_to_default_and_survives_the_tab_round_trip():
    recipe = parse_recipe({"pool": ["a", "b"], "method": "weighted_sum", "dtype": {"unet": "fp8_e4m3fn", "vae": "fp32"}})
    assert [recipe.dtype_of(c) for c in ("unet", "te0", "te1", "vae")] == ["fp8_e4m3fn", "fp16", "fp16", "fp32"]
    assert parse_recipe(recipe.to_json()).dtype == recipe.dtype
    carry = form_carry(recipe)
    assert recipe.dtype_of("default") == "fp16"   # the tab's radio shows the default; the named components ride along
    again = parse_recipe(dataclasses.replace(recipe, dtype=carried_dtype("fp16", carry)).to_dict())
    assert [again.dtype_of(c) for c in ("unet", "te0", "vae")] == ["fp8_e4m3fn", "fp16", "fp32"]
    radio_changed = dataclasses.replace(recipe, dtype=carried_dtype("bf16", carry))
    assert parse_recipe(radio_changed.to_dict()).dtype_of("te0") == "bf16"
    assert parse_recipe({"pool": ["a", "b"], "method": "weighted_sum"}).to_dict()["dtype"] == "fp16"


# ---------------------------------------------------------------------------------------------
# Repair and analysis are not confused by the scale keys

def test_repair_of_an_fp8_scaled_file_keeps_weights_and_scales_bit_for_bit(fp8_dir, tmp_path):
    sd = load(fp8_dir / "scaled-d.safetensors")
    pos = arch.POSITION_IDS["sd1"]
    save_file({k: v for k, v in sd.items() if k != pos}, tmp_path / "pruned.safetensors")
    result = repair_file(tmp_path / "pruned.safetensors", output=tmp_path / "fixed.safetensors")
    fixed = load(result.path)
    assert set(fixed) == set(sd)
    assert all(torch.equal(bits(fixed[k]), bits(v)) for k, v in sd.items() if k != pos)
    assert torch.equal(fixed[pos], torch.arange(77).reshape(1, 77))


def test_analysis_sees_the_dequantized_values(fp8_dir, tmp_path):
    save_file(dequantized(fp8_dir / "scaled-d.safetensors"), tmp_path / "twin.safetensors")    # fp64: exact
    result = analyze([fp8_dir / "scaled-d.safetensors", tmp_path / "twin.safetensors"],
                     base=fp8_dir / "sd1-base.safetensors")
    for comp in result.components.values():
        assert comp.pairwise_l2[0, 1] == 0.0 and comp.l2[0] > 0


# ---------------------------------------------------------------------------------------------
# Refusals

def raw_safetensors(path, entries, metadata=None):
    """A safetensors file with any dtype names: entries = [(key, dtype name, shape, itemsize bits)]."""
    header, offset = {}, 0
    for key, name, shape, bits_each in entries:
        size = -(-int(torch.tensor(shape).prod()) * bits_each // 8) if shape else bits_each // 8
        header[key] = {"dtype": name, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))
    return path


W = "model.diffusion_model.input_blocks.1.1.proj_in.weight"


@pytest.mark.parametrize("make,needle", [
    (lambda p: save_file({W: torch.zeros(4, 8, dtype=torch.uint8), W + "_scale": torch.zeros(4, 1, dtype=E4),
                          W + "_scale_2": torch.ones(())}, p), "NVFP4 quantized checkpoints are not supported"),
    (lambda p: save_file({W: torch.zeros(4, 8, dtype=E4)}, p,
                         {"_quantization_metadata": json.dumps({"layers": {W[:-7]: {"format": "nvfp4"}}})}),
     "NVFP4 quantized checkpoints are not supported"),
    (lambda p: save_file({W: torch.zeros(4, 8, dtype=E4)}, p,
                         {"_quantization_metadata": json.dumps({"layers": {W[:-7]: {"format": "int8_tensorwise"}}})}),
     "'int8_tensorwise' quantized checkpoints are not supported"),
    (lambda p: save_file({W: torch.zeros(4, 8, dtype=torch.int8), W + "_scale": torch.ones(())}, p),
     "int8 quantized weights are not supported"),
    (lambda p: save_file({W: torch.zeros(4, 64, dtype=E4), W + "_scale": torch.ones(4, 2)}, p),
     "block-wise scales are not"),
    (lambda p: save_file({W: torch.zeros(4, 8, dtype=torch.uint8), W + ".absmax": torch.ones(2)}, p),
     "bitsandbytes (NF4 / FP4 / int8) quantized checkpoints are not supported"),
    (lambda p: raw_safetensors(p, [(W, "F4", [4, 8], 4)]), "dtype 'F4' (4-bit float (FP4 / NVFP4 packed weights))"),
    (lambda p: raw_safetensors(p, [(W, "F8_E4M3", [4, 32], 8), (W + "_scale", "F8_E8M0", [4, 1], 8)]),
     "dtype 'F8_E8M0' (exponent-only block scales (MXFP8 / MXFP4))"),
    (lambda p: raw_safetensors(p, [(W, "Q4_K", [4, 8], 8)]), "unsupported dtype 'Q4_K'"),
])
def test_other_quantized_formats_are_refused_by_name(tmp_path, make, needle):
    path = tmp_path / "q.safetensors"
    make(path)
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_gguf_is_refused_by_its_magic_bytes_whatever_the_name(tmp_path, folder):
    for name in ("x.gguf", "renamed.safetensors"):
        path = tmp_path / name
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + bytes(64))
        with pytest.raises(CheckpointError) as err:
            read_header(path)
        assert str(err.value) == f"{path}: GGUF quantized checkpoints are not supported; convert to safetensors first"
    (folder / "x.gguf").write_bytes((tmp_path / "x.gguf").read_bytes())
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"pool": ["e4-a.safetensors", "x.gguf"], "method": "weighted_sum", "output": "o"}))
    rc, _out, err = cli("merge", recipe, "--models-dir", folder, "--no-hash", cwd=tmp_path)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "x.gguf: GGUF quantized checkpoints are not supported; convert to safetensors first" in err
