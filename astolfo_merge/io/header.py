"""Checkpoint headers: the safetensors dtype table, TensorInfo / Header, and `read_header`'s validation.

Safetensors layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor bytes.
Headers are validated once, here, with errors that name the file (STYLE.md). fp8_scaled files are
recognised (`describe_quantization`), other quantized formats refused by name; legacy `.ckpt`/`.pt`
headers are read through `legacy`.
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError
from .legacy import legacy_state_dict
from .strict_json import JSONInputError, loads as strict_loads

O_BINARY = getattr(os, "O_BINARY", 0)   # Windows opens fds in text mode otherwise

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
MAX_HEADER_DEPTH = 32     # a header needs 3 levels (object, entry, shape); metadata values are strings
MAX_HEADER_DIGITS = 20    # offsets and dims are u64 in the format: at most 20 digits
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

DTYPES = {  # safetensors name -> (torch dtype, itemsize)
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
NAME_OF = {t: n for n, (t, _s) in DTYPES.items()}
FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16,
                torch.float8_e4m3fn, torch.float8_e5m2}
OUTPUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
                 "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Dtype names of quantized formats we do not read, with what they are (safetensors names them so).
QUANTIZED_DTYPE_NAMES = {
    "F4": "4-bit float (FP4 / NVFP4 packed weights)", "F6_E2M3": "6-bit float (FP6)", "F6_E3M2": "6-bit float (FP6)",
    "F8_E8M0": "exponent-only block scales (MXFP8 / MXFP4)", "F8_E4M3FNUZ": "AMD fp8 variant e4m3fnuz",
    "F8_E5M2FNUZ": "AMD fp8 variant e5m2fnuz",
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple
    begin: int = 0   # byte offset inside the data section (safetensors only)
    end: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass
class Header:
    path: str
    tensors: dict            # key -> TensorInfo, in file order
    metadata: dict           # raw __metadata__ (values may be non-strings in hostile files)
    data_start: int = 0
    file_size: int = 0
    format: str = "safetensors"
    warnings: list = field(default_factory=list)
    # fp8_scaled files (ComfyUI): weight key -> its scale key (value = weight x scale), and the scale /
    # marker keys themselves, which are no model weights (left out of `shapes`, so of identification).
    scales: dict = field(default_factory=dict)
    aux: frozenset = frozenset()
    quantization: str | None = None     # a short description ("fp8_scaled (ComfyUI)") or None

    @property
    def shapes(self) -> dict:
        return {k: v.shape for k, v in self.tensors.items() if k not in self.aux}


def is_checkpoint_name(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def check_file(path) -> str:
    """`path` as a str if it names a non-empty regular file; else CheckpointError saying what it is."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except (OSError, ValueError) as exc:   # permissions, a loop of links, a name the OS refuses
        raise CheckpointError(path, f"cannot be opened ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(path, f"is not a regular file (a {_file_kind(st.st_mode)}), so not a checkpoint")
    if st.st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes)")
    return path


def _file_kind(mode) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def read_header(path) -> Header:
    """Header only: names, dtypes, shapes, offsets and metadata. Cheap for any file size."""
    path = check_file(path)
    _refuse_gguf(path)
    if not path.lower().endswith(".safetensors"):
        return _legacy_header(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(path, f"truncated: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(path, f"header length {n} is larger than the file ({size} bytes): truncated or not safetensors")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    try:
        doc = strict_loads(raw, max_depth=MAX_HEADER_DEPTH, max_digits=MAX_HEADER_DIGITS, what="name")
    except JSONInputError as exc:
        raise CheckpointError(path, f"safetensors header {exc}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(path, "header JSON is not an object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "__metadata__ is not an object")
    data_start, data_len = 8 + n, size - 8 - n
    tensors = {key: _parse_entry(path, key, entry, data_len) for key, entry in doc.items()}
    _check_layout(path, tensors, data_len)
    return describe_quantization(Header(path, tensors, metadata, data_start, size))


def _check_layout(path, tensors: dict, data_len: int):
    """As the reference library's `Metadata::validate`: sorted by offsets, the tensors' bytes follow each
    other from 0 with no gap or overlap and end exactly at the end of the file."""
    at, last = 0, None
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin < at:
            raise CheckpointError(path, f"tensors '{last}' and '{key}' overlap in the data section")
        if info.begin > at:
            after = f"after tensor '{last}'" if last is not None else "at the start of the data section"
            raise CheckpointError(path, f"{info.begin - at} bytes {after} belong to no tensor (a hole before '{key}'); "
                                        "the safetensors format has none")
        at, last = info.end, key
    if at < data_len:
        raise CheckpointError(path, f"{data_len - at} bytes after the last tensor belong to no tensor; "
                                    "the safetensors format has none")


def _parse_entry(path, key, entry, data_len) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(path, f"tensor '{key}': header entry is not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype_name not in DTYPES:
        raise CheckpointError(path, _dtype_problem(key, dtype_name))
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(path, f"tensor '{key}': shape {_short(shape)} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(path, f"tensor '{key}': data_offsets {_short(offsets)} are invalid")
    dtype, itemsize = DTYPES[dtype_name]
    if math.prod(max(d, 1) for d in shape) * itemsize >= 2 ** 63:   # Python ints: no overflow here, torch would
        raise CheckpointError(path, f"tensor '{key}': shape {_short(shape)} is too large (its size overflows 64 bits)")
    if offsets[1] > data_len:
        raise CheckpointError(path, f"tensor '{key}': data runs past the end of the file (truncated?)")
    if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise CheckpointError(path, f"tensor '{key}': {offsets[1] - offsets[0]} bytes do not match shape {_short(shape)} of {dtype_name}")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _short(value, limit: int = 80) -> str:
    """repr() for messages, cut to `limit` characters (hostile headers hold megabyte-long values)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + " … " + text[-2:]


def _legacy_header(path) -> Header:
    sd = legacy_state_dict(path)
    tensors = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in sd.items()}
    return describe_quantization(Header(path, tensors, {}, 0, os.path.getsize(path), format="ckpt"))


# ---------------------------------------------------------------------------------------------
# Quantized files. fp8 (F8_E4M3 / F8_E5M2) is a plain dtype, widened exactly. ComfyUI's "fp8_scaled"
# files store chosen weights as fp8 plus a scale per weight: the old form (`<layer>.scale_weight`,
# `<layer>.scale_input`, a `<model prefix>scaled_fp8` marker whose dtype names the fp8 type) and the
# newer mixed-precision form (`<layer>.weight_scale`, `<layer>.input_scale`, `<layer>.comfy_quant` or
# a `_quantization_metadata` metadata entry). Their value is weight x scale; the scale and marker
# keys are no model weights. Other quantized formats (GGUF, NVFP4, MXFP, int8, bitsandbytes) are
# refused by name.

GGUF_MAGIC = b"GGUF"
SCALED_FP8_MARKER = "scaled_fp8"
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")        # per weight: old and new ComfyUI names
AUX_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")   # activation scales and per-layer tags
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")                    # ComfyUI's names of the formats we read
_CONVERT = "convert it to an fp16 / bf16 / fp8 safetensors checkpoint first"
_BNB_SUFFIXES = (".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4", ".SCB")


def _refuse_gguf(path):
    with open(path, "rb") as f:
        if f.read(4) == GGUF_MAGIC:
            raise CheckpointError(path, "GGUF quantized checkpoints are not supported; convert to safetensors first")


def _dtype_problem(key, name) -> str:
    what = QUANTIZED_DTYPE_NAMES.get(name) if isinstance(name, str) else None
    if what:
        return f"tensor '{key}': dtype {name!r} ({what}) is a quantized format that is not supported; {_CONVERT}"
    return f"tensor '{key}': unsupported dtype {_short(name)}"


def describe_quantization(hdr: Header) -> Header:
    """Fill `hdr.scales` / `hdr.aux` for fp8_scaled files; refuse quantized formats we cannot read."""
    path, tensors = hdr.path, hdr.tensors
    _refuse_other_quantization(hdr)
    scales, aux = {}, set()
    for key in tensors:
        if key == SCALED_FP8_MARKER or key.endswith("." + SCALED_FP8_MARKER) or key.endswith(AUX_SUFFIXES):
            aux.add(key)
        elif key.endswith(WEIGHT_SCALE_SUFFIXES):
            aux.add(key)
            weight = key[:key.rindex(".")] + ".weight"
            if weight in tensors:
                scales[weight] = key
    for weight, scale in scales.items():
        _check_scaled(path, weight, tensors[weight], scale, tensors[scale])
    if aux:
        hdr.scales, hdr.aux = scales, frozenset(aux)
        hdr.quantization = f"fp8_scaled (ComfyUI): {len(scales)} weight(s) stored as fp8 x scale"
    return hdr


def _refuse_other_quantization(hdr: Header):
    path, keys = hdr.path, hdr.tensors
    nvfp4 = next((k for k in keys if k.endswith(".weight_scale_2")), None)
    if nvfp4:
        raise CheckpointError(path, f"NVFP4 quantized checkpoints are not supported (key '{nvfp4}'); {_CONVERT}")
    bnb = next((k for k in keys if k.endswith(_BNB_SUFFIXES)), None)
    if bnb:
        raise CheckpointError(path, f"bitsandbytes (NF4 / FP4 / int8) quantized checkpoints are not supported "
                              f"(key '{bnb}'); {_CONVERT}")
    raw = hdr.metadata.get("_quantization_metadata")
    if raw is None:
        return
    try:
        layers = json.loads(raw)["layers"] if isinstance(raw, str) else raw["layers"]
        formats = {(v.get("format") if isinstance(v, dict) else v) for v in layers.values()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise CheckpointError(path, "metadata '_quantization_metadata' is not the ComfyUI layer table "
                              "({\"layers\": {layer: {\"format\": ...}}}); cannot tell how its weights are stored") from None
    unknown = sorted(str(f) for f in formats - set(FP8_FORMATS))
    if unknown:
        name = "NVFP4" if "nvfp4" in unknown else f"'{unknown[0]}'"
        raise CheckpointError(path, f"{name} quantized checkpoints are not supported (metadata '_quantization_metadata' "
                              f"names the format(s) {', '.join(unknown)}; only {' / '.join(FP8_FORMATS)} are read); {_CONVERT}")


def _check_scaled(path, weight, info: TensorInfo, scale_key, scale: TensorInfo):
    if info.dtype not in FP8_DTYPES:
        kind = {torch.uint8: "packed 4-bit (NVFP4 / FP4)", torch.int8: "int8"}.get(info.dtype, NAME_OF[info.dtype])
        raise CheckpointError(path, f"tensor '{weight}' is stored as {NAME_OF[info.dtype]} with a scale ('{scale_key}'): "
                              f"{kind} quantized weights are not supported (only fp8 x scale); {_CONVERT}")
    if scale.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise CheckpointError(path, f"scale '{scale_key}' is stored as {NAME_OF[scale.dtype]}: block-scaled formats "
                              f"(NVFP4 / MXFP) are not supported, only an fp32/fp16/bf16 scale per weight or row; {_CONVERT}")
    rows = info.shape[0] if info.shape else 1
    per_row = scale.numel == rows and scale.numel > 1 and len(scale.shape) >= 1 and scale.shape[0] == rows \
        and math.prod(scale.shape[1:]) == 1
    if scale.numel != 1 and not per_row:
        raise CheckpointError(path, f"scale '{scale_key}' has shape {list(scale.shape)} for weight shape {list(info.shape)}: "
                              f"only one scale per weight or per output row is supported (block-wise scales are not); {_CONVERT}")
