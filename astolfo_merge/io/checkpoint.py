"""Checkpoint files: header inspection, bounded reads, and the streaming atomic writer.

Safetensors layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor bytes.
Headers are validated once, here, with errors that name the file (STYLE.md). Tensor data is read
with positioned reads into fresh buffers (`read`, `read_rows`) so memory is what the caller asks
for, never the whole file; the engine's hot loops may instead take zero-copy, read-only views of a
memory map (`view_rows`) and hand the pages back after each key (`release`). Legacy `.ckpt`/`.pt` go only through
`torch.load(weights_only=True, mmap=True)`: no arbitrary unpickling.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import mmap
import os
import pickle
import re
import stat
import struct
import threading
import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import AstolfoError, CheckpointError, OutputExistsError
from .strict_json import JSONInputError, loads as strict_loads

try:
    import fcntl
except ImportError:       # Windows: the temp file is locked with msvcrt instead
    fcntl = None
    import msvcrt
try:
    import resource
except ImportError:       # Windows: no RLIMIT_NOFILE (the C runtime's own limit is far above a pool)
    resource = None

O_BINARY = getattr(os, "O_BINARY", 0)   # Windows opens fds in text mode otherwise

PARTIAL_SUFFIX = ".partial"
# The writer's temp file: `.am-<12 hex of the output's name>-<pid>.partial`, at most 33 bytes whatever the
# output name (so output names up to the file system's 255 bytes can be written), recognisable by any
# later merge into the folder, which reclaims those whose owner is gone (see `reclaim_temp_files`).
_TEMP_RE = re.compile(r"^\.am-([0-9a-f]{12})-([0-9]{1,10})\.partial$")
_LEGACY_TEMP_RE = re.compile(r"^\..+\.(safetensors|ckpt|pt|pth)\.partial$", re.I)   # `.<output name>.partial`

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


def _legacy_state_dict(path):
    with warnings.catch_warnings():   # torch warns about pickle protocols: our message says it all
        warnings.simplefilter("ignore")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            try:  # legacy (non-zip) serialisation cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
                raise CheckpointError(path, _legacy_refusal(path, exc)) from None
        except Exception as exc:  # noqa: BLE001 - the weights-only unpickler refuses code
            raise CheckpointError(path, _legacy_refusal(path, exc)) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a pickled {type(obj).__name__}, not a state dict of tensors: not a checkpoint")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


NOT_A_CHECKPOINT = "is not a safetensors or PyTorch (.ckpt/.pt) checkpoint, or it is damaged"
SAFE_GLOBALS = ("torch.", "collections.OrderedDict", "builtins.set", "_codecs.encode", "numpy.")


def _legacy_refusal(path, exc) -> str:
    """Our words for torch.load's failure (its own text tells the user how to bypass the safety check)."""
    if not isinstance(exc, pickle.UnpicklingError) or "weights only" not in str(exc).lower():
        return NOT_A_CHECKPOINT
    found = _pickle_globals(path)
    if found is None:
        return NOT_A_CHECKPOINT
    unsafe = [g for g in found if not g.startswith(SAFE_GLOBALS)]
    example = f" (e.g. {unsafe[0][:80]})" if unsafe else ""
    return (f"contains Python objects beyond tensors{example}; refusing to unpickle it (unsafe). "
            "Convert it with a trusted tool or use a .safetensors file")


def _pickle_globals(path):
    """The `module.name` globals a legacy checkpoint's pickle refers to, read without unpickling it
    (pickletools only decodes opcodes); None if it is no well-formed pickle (then: not a checkpoint)."""
    import pickletools
    import zipfile
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if name is None:
                    return None
                data = archive.read(name)
        else:
            with open(path, "rb") as f:
                data = f.read(64 << 20)
        found, strings = [], []
        for op, arg, _pos in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
        return found
    except Exception:  # noqa: BLE001 - any decoding failure: not a pickle we can describe
        return None


def _legacy_header(path) -> Header:
    sd = _legacy_state_dict(path)
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


def fp8_out_of_range(t: torch.Tensor, dtype) -> torch.Tensor:
    """Mask of the finite values of `t` whose round-to-nearest-even value lies beyond `dtype`'s largest
    finite value: |x| > 464 for e4m3fn (448 is the largest, the tie at 464 goes to 448), |x| >= 61440
    for e5m2 (57344 is the largest, the tie goes to the even 65536, i.e. inf)."""
    limit = {torch.float8_e4m3fn: 464.0, torch.float8_e5m2: 61440.0}[dtype]
    size = t.abs()
    beyond = size >= limit if dtype == torch.float8_e5m2 else size > limit
    return beyond & torch.isfinite(t)


def cast_output(t: torch.Tensor, dtype) -> torch.Tensor:
    """`t` on the CPU in the output `dtype`. fp64 -> fp8 rounds once, to nearest-even: torch's own cast
    goes through fp32 and so rounds twice; here the fp32 step rounds to odd instead, which makes the
    second rounding give the directly rounded value (fp32 keeps 20 more bits than fp8). Beyond fp8's
    range torch saturates e4m3fn to +-448 (infinities included) and overflows e5m2 to +-inf."""
    if dtype in FP8_DTYPES and t.dtype == torch.float64:
        t = _fp32_round_to_odd(t.cpu())
    return t.to(device="cpu", dtype=dtype)


def _fp32_round_to_odd(t: torch.Tensor) -> torch.Tensor:
    near = t.to(torch.float32)
    wide = near.to(torch.float64)
    inexact = wide != t                                       # NaN too: its payload stays a NaN
    toward_zero = torch.where(wide.abs() > t.abs(), torch.nextafter(near, torch.zeros_like(near)), near)
    bits = toward_zero.view(torch.int32)
    return torch.where(inexact, bits | 1, bits).view(torch.float32)


class CheckpointReader:
    """Reads whole tensors or row ranges of one checkpoint into fresh memory, or views them in place."""

    def __init__(self, path, header: Header | None = None, dequantize: bool = True):
        self.header = header or read_header(path)
        self.path = self.header.path
        # fp8_scaled weights read as weight x scale (fp64); dequantize=False reads the stored values
        self.dequantize = dequantize and bool(self.header.scales)
        self._scale_values = {}
        self._fd = None
        self._legacy = None
        self._map = self._bytes = None
        if self.header.format == "safetensors":
            self._fd = os.open(self.path, os.O_RDONLY | O_BINARY)
        else:
            self._legacy = _legacy_state_dict(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._bytes = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:    # a view is still alive somewhere: the map goes with it
                pass
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._legacy = None

    def __contains__(self, key):
        return key in self.header.tensors

    def info(self, key) -> TensorInfo:
        return self.header.tensors[key]

    def read(self, key) -> torch.Tensor:
        info = self.info(key)
        if self._legacy is not None:
            return self._scaled(key, self._legacy[key].clone(), 0, None)
        return self._scaled(key, self._pread(info, info.begin, info.end).reshape(info.shape), 0, None)

    def read_rows(self, key, start: int, stop: int, scratch: np.ndarray | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (a 0-/1-element tensor counts as one row).

        With `scratch` (a uint8 buffer at least that large) the bytes land there and the result is a
        view of it: valid until the next read into the same scratch (callers convert right away).
        """
        info = self.info(key)
        if len(info.shape) == 0:
            return self.read(key)
        if self._legacy is not None:
            return self._scaled(key, self._legacy[key][start:stop].clone(), start, stop)
        begin, end = self._row_bytes(info, start, stop)
        flat = self._pread(info, begin, end, scratch)
        return self._scaled(key, flat.reshape((stop - start,) + tuple(info.shape[1:])), start, stop)

    def view_rows(self, key, start: int, stop: int) -> torch.Tensor | None:
        """Rows [start, stop) as a zero-copy view of the file's pages, in the stored dtype; None where
        that is not possible (legacy file, scalar, data not aligned to the dtype). READ-ONLY: the
        pages are mapped read-only, so writing into the view crashes; convert or copy first."""
        info = self.info(key)
        if self._fd is None or not info.shape or info.nbytes == 0 or (self.dequantize and key in self.header.scales):
            return None
        self.check_size()
        begin, end = (self.header.data_start + at for at in self._row_bytes(info, start, stop))
        if begin % info.dtype.itemsize:
            return None
        flat = self._mapped()[begin:end]
        return flat.view(info.dtype).reshape((stop - start,) + tuple(info.shape[1:]))

    def release(self, key, start: int = 0, stop: int | None = None):
        """Unmap the pages of rows [start, stop) of `key` (default: all) that views touched; they
        stay in the page cache. Keeps the process's file-backed resident memory near one chunk per
        model instead of growing to whole files. Harmless for views still in use: they fault back."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        info = self.info(key)
        if not info.shape or info.nbytes == 0:
            return
        first, last = self._row_bytes(info, start, info.shape[0] if stop is None else stop)
        page = mmap.PAGESIZE
        begin = (self.header.data_start + first) // page * page
        end = min(len(self._map), self.header.data_start + last)
        if end > begin:
            self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def check_size(self):
        """Refuse to touch mapped pages of a file that changed size since its header was read: a page past
        a shrunk end kills the process with SIGBUS (one fstat; called before each key's views)."""
        size = os.fstat(self._fd).st_size
        if size != self.header.file_size:
            raise CheckpointError(self.path, f"changed while being read: it is now {size} bytes, it was "
                                             f"{self.header.file_size} when the merge started (replaced or truncated "
                                             "in place?); nothing was written")

    def _scaled(self, key, t: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
        """An fp8_scaled weight's rows times their scale, in fp64: exact (an fp8 value has at most 4
        significant bits, an fp32/fp16/bf16 scale at most 24). Other tensors as stored."""
        if not self.dequantize or key not in self.header.scales:
            return t
        scale = self._scale_values.get(key)
        if scale is None:
            scale = self._scale_values[key] = self.read(self.header.scales[key]).reshape(-1).to(torch.float64)
        out = t.to(torch.float64)
        if scale.numel() == 1:
            return out.mul_(scale[0])
        return out.mul_(scale[start:stop].reshape((-1,) + (1,) * (out.dim() - 1)))

    def _mapped(self) -> torch.Tensor:
        if self._bytes is None:
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            with warnings.catch_warnings():    # torch warns that the buffer is not writable: by design
                warnings.simplefilter("ignore", UserWarning)
                self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        return self._bytes

    @staticmethod
    def _row_bytes(info: TensorInfo, start: int, stop: int):
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        return info.begin + start * row, info.begin + stop * row

    def _pread(self, info: TensorInfo, begin: int, end: int, scratch=None) -> torch.Tensor:
        size = end - begin
        buf = scratch[:size] if scratch is not None and len(scratch) >= size else np.empty(size, dtype=np.uint8)
        if size == 0:
            return torch.empty(0, dtype=info.dtype)
        at = self.header.data_start + begin
        if hasattr(os, "preadv"):
            view, done = memoryview(buf), 0
            while done < size:
                got = os.preadv(self._fd, [view[done:]], at + done)
                if got <= 0:
                    raise CheckpointError(self.path, "unexpected end of file while reading tensor data (did the file "
                                                     "shrink while being read?)")
                done += got
        else:     # Windows has no positioned reads: copy out of the memory map
            self.check_size()
            torch.from_numpy(buf).copy_(self._mapped()[at:at + size])
        return torch.frombuffer(buf, dtype=info.dtype)


FDS_PER_FILE = 2   # the open file and the duplicate a memory map of it keeps
FD_MARGIN = 32     # the output, LoRA files opened per key, the interpreter's own


def ensure_open_files(count: int, what: str = "this merge"):
    """Up front, before any file is opened: make sure `count` checkpoints can be open at once. The
    soft RLIMIT_NOFILE is raised to the hard limit when needed (as Python's own default is often
    1024 while the hard limit is far higher); if even that is too low, a clear error instead of
    "Too many open files" halfway through the merge."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = _open_descriptors() + FDS_PER_FILE * count + FD_MARGIN
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    target = hard if hard != resource.RLIM_INFINITY else max(need, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (ValueError, OSError):
        pass
    if need > soft:
        raise AstolfoError(f"{what} reads {count} files at once and needs about {need} open files, but this process "
                           f"may open only {soft} (hard limit {hard}); raise the limit (ulimit -n {need}) or use fewer files")


def _open_descriptors() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 0


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor (bf16/fp8 included)."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    size = t.element_size()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return memoryview(t.reshape(-1).view(as_int).numpy()).cast("B")


class OutputBusyError(AstolfoError):
    def __init__(self, target):
        self.target = str(target)
        super().__init__(f"{self.target}: another merge is writing this file right now; wait for it or pick another name")


class _Emitter:
    """Hashes and writes the writer's byte chunks on a background thread, so that sha256 and the
    page-cache copy overlap the next chunk's arithmetic (hashlib and file writes release the GIL).
    Queued bytes are bounded (one item is always allowed); marks snapshot (offset, hash) in stream
    order; the first I/O error is re-raised to the caller at its next call."""

    LIMIT = 64 << 20

    def __init__(self, f):
        self.f, self.hash, self.offset = f, hashlib.sha256(), 0
        self.mark = None            # (tag, offset, hash) at the latest mark the stream reached
        self._items, self._pending, self._error = deque(), 0, None
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="astolfo-writer", daemon=True)
        self._thread.start()

    def put(self, data, mark=None):
        """Queue bytes (the memoryview must stay valid and unchanged until written) or a mark."""
        size = len(data) if data is not None else 0
        with self._cv:
            self._cv.wait_for(lambda: self._error or not self._items or self._pending + size <= self.LIMIT)
            self._raise()
            self._items.append((data, mark))
            self._pending += size
            self._cv.notify_all()

    def drain(self):
        with self._cv:
            self._cv.wait_for(lambda: self._error or (not self._items and self._pending == 0))
            self._raise()

    def reset(self, offset, digest):
        """After drain(): continue from an earlier mark (rewind)."""
        self.f.seek(offset)
        self.offset, self.hash = offset, digest.copy()

    def close(self):
        if not self._thread.is_alive():
            return
        with self._cv:
            self._items.append((None, "__stop__"))
            self._cv.notify_all()
        self._thread.join()

    def _raise(self):
        if self._error is not None:
            raise self._error

    def _run(self):
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._items)
                data, mark = self._items[0]
            if mark == "__stop__":
                return
            try:
                if data is not None:
                    self.f.write(data)
                    self.hash.update(data)
                    self.offset += len(data)
                else:
                    self.mark = (mark, self.offset, self.hash.copy())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                with self._cv:
                    self._error = exc
                    self._items.clear()
                    self._pending = 0
                    self._cv.notify_all()
                continue
            with self._cv:
                self._items.popleft()
                self._pending -= len(data) if data is not None else 0
                self._cv.notify_all()


class SafetensorsWriter:
    """Streams tensors into `<target>` through a hidden temp file in the same folder.

    The header is fixed up front from the planned (key, dtype, shape) list, tensors are then
    written in that order, in as many chunks as the caller likes. `commit()` fsyncs and renames
    atomically (refusing to replace an existing file unless `overwrite`); `abort()` or leaving
    the `with` block on an exception removes the temp file, so nothing half-written is ever
    visible under the target name. The temp file (`partial_path`: a short name made of a hash of
    the output name and this process's id) is held under an exclusive lock: a second writer of
    the same output is refused, and temp files left in the folder by killed processes (lock
    released by the kernel, owner pid gone) are reclaimed by the next writer into that folder.
    The header is refused up front if our own reader would refuse it (MAX_HEADER_BYTES).
    """

    def __init__(self, target, entries, metadata=None, overwrite=False, positioned=False):
        self.target = os.path.abspath(os.fspath(target))
        self.overwrite = overwrite
        folder = os.path.dirname(self.target)
        if not os.path.isdir(folder):
            raise CheckpointError(folder, "output folder does not exist")
        if os.path.exists(self.target) and not overwrite:
            raise OutputExistsError(self.target)
        self.entries = [(k, d, tuple(s)) for k, d, s in entries]
        header, offset = {}, 0
        self._sizes = []
        for key, dtype, shape in self.entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": NAME_OF[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes.append(nbytes)
            offset += nbytes
        meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
        if meta:
            header = {"__metadata__": meta, **header}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        if len(blob) > MAX_HEADER_BYTES:     # never write what we would refuse to read
            raise CheckpointError(self.target, f"the header would be {len(blob)} bytes, over the {MAX_HEADER_BYTES}-byte "
                                               "limit that readers (this one included) accept; nothing was written")
        self.total_bytes = 8 + len(blob) + offset
        self.tmp = partial_path(self.target)
        self.reclaimed = reclaim_temp_files(folder, self.target)
        self._f = _open_locked(self.tmp, self.target)
        self._finished = False
        self._index, self._left = 0, (self._sizes[0] if self._sizes else 0)
        self.sha256 = None
        head = struct.pack("<Q", len(blob)) + blob
        self.data_start = len(head)
        if positioned:     # other processes fill the tensors' byte ranges (see `ranges`)
            self._out = None
            try:
                _reserve(self._f.fileno(), self.total_bytes, folder)
                _pwrite_all(self._f.fileno(), memoryview(head), 0)
            except BaseException:
                self.abort()
                raise
            return
        self._out = _Emitter(self._f)
        self._out.put(memoryview(head))
        self._out.put(None, mark=0)

    def ranges(self) -> dict:
        """key -> (absolute byte offset in the file, byte count): where each tensor goes (positioned mode)."""
        out, at = {}, self.data_start
        for (key, _dtype, _shape), size in zip(self.entries, self._sizes):
            out[key] = (at, size)
            at += size
        return out

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self.sha256 is None:
            self.abort()

    def write(self, key, chunk: torch.Tensor):
        """Write (part of) the current tensor; chunks must come in row-major order. The bytes are
        written in the background: `chunk` must not be modified after this call."""
        while (self._index < len(self.entries) and self._sizes[self._index] == 0
               and self.entries[self._index][0] != key):
            self._advance()   # empty tensors need no bytes; callers may skip them
        if self._index >= len(self.entries) or self.entries[self._index][0] != key:
            expected = self.entries[self._index][0] if self._index < len(self.entries) else "(none)"
            raise RuntimeError(f"writer expected tensor '{expected}', got '{key}'")
        dtype = self.entries[self._index][1]
        data = tensor_bytes(chunk.to(dtype))
        if len(data) > self._left:
            raise RuntimeError(f"tensor '{key}': {len(data)} bytes written, only {self._left} left")
        self._out.put(data)
        self._left -= len(data)
        if self._left == 0:
            self._advance()

    def rewind(self, key):
        """Start the current (unfinished) tensor `key` over: its chunks are produced again."""
        index = self._index
        if index >= len(self.entries) or self.entries[index][0] != key:
            raise RuntimeError(f"cannot rewind '{key}': it is not the tensor being written")
        self._out.drain()
        tag, offset, digest = self._out.mark
        assert tag == index, (tag, index)
        self._out.reset(offset, digest)
        self._left = self._sizes[index]

    def _advance(self):
        self._index += 1
        self._left = self._sizes[self._index] if self._index < len(self._sizes) else 0
        self._out.put(None, mark=self._index)

    def commit(self, sha256: str | None = None) -> str:
        """fsync, rename atomically, return the file's sha256. In positioned mode the caller (who
        knows when every range is written) may pass the digest it hashed; else the file is read."""
        if self._out is None:
            digest = sha256 or sha256_file(self.tmp)
        else:
            while self._index < len(self.entries) and self._sizes[self._index] == 0:
                self._advance()
            if self._index < len(self.entries):
                raise RuntimeError(f"writer closed before tensor '{self.entries[self._index][0]}' was written")
            self._out.drain()
            self._out.close()
            digest = self._out.hash.hexdigest()
        self._f.flush()
        os.fsync(self._f.fileno())
        if fcntl is None:     # Windows renames and deletes no open file: close (and unlock) first
            self._f.close()
        if self.overwrite:
            os.replace(self.tmp, self.target)
        else:
            try:
                os.link(self.tmp, self.target)  # atomic "create if absent"
            except FileExistsError:
                self.abort()
                raise OutputExistsError(self.target) from None
            os.unlink(self.tmp)
        self._f.close()   # releases the lock only once the temp name is gone
        self._finished = True
        _fsync_dir(os.path.dirname(self.target))
        self.sha256 = digest
        return self.sha256

    def abort(self):
        if self._out is not None:
            self._out.close()
        if self._finished:
            return
        self._finished = True
        try:
            if fcntl is None:     # Windows deletes no open file
                self._f.close()
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        finally:
            self._f.close()


class RangeWriter:
    """Writes tensors into their byte ranges of a positioned `SafetensorsWriter`'s temp file, from
    any process (the owner holds the lock and commits). Same bytes as the streaming writer: chunks
    in row-major order, cast to the entry dtype; `rewind` starts a tensor over."""

    def __init__(self, path, ranges: dict, dtypes: dict):
        self.ranges, self.dtypes = ranges, dtypes
        self._fd = os.open(path, os.O_WRONLY | O_BINARY)
        self._written = {}

    def write(self, key, chunk: torch.Tensor):
        begin, size = self.ranges[key]
        done = self._written.get(key, 0)
        data = tensor_bytes(chunk.to(self.dtypes[key]))
        if done + len(data) > size:
            raise RuntimeError(f"tensor '{key}': {done + len(data)} bytes written, only {size} planned")
        _pwrite_all(self._fd, data, begin + done)
        self._written[key] = done + len(data)

    def rewind(self, key):
        self._written[key] = 0

    def written(self, key) -> int:
        return self._written.get(key, 0)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _reserve(fd, size, folder):
    """Size the file and allocate its blocks now, so a full disk fails here, once, with the folder
    named, rather than in whichever worker writes a range of a sparse file mid-merge."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CheckpointError(folder, f"not enough free disk space for the output ({size / 1e9:.2f} GB)") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)


def _pwrite_all(fd, data, at):
    """All of `data` at offset `at` (positioned writes may be short); Windows has no pwrite: seek."""
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        if hasattr(os, "pwrite"):
            done += os.pwrite(fd, view[done:], at + done)
        else:
            os.lseek(fd, at + done, os.SEEK_SET)
            done += os.write(fd, view[done:])




def _name_tag(target) -> str:
    name = os.path.basename(os.path.abspath(os.fspath(target)))
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def partial_path(target, pid: int | None = None) -> str:
    """The temp file a writer of `target` in process `pid` (default: this one) writes to."""
    target = os.path.abspath(os.fspath(target))
    pid = os.getpid() if pid is None else pid
    return os.path.join(os.path.dirname(target), f".am-{_name_tag(target)}-{pid}{PARTIAL_SUFFIX}")


def temp_files(folder, target=None) -> list:
    """Writer temp files in `folder` (of any process; only those of `target` when given), by path."""
    tag = _name_tag(target) if target is not None else None
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    out = []
    for name in names:
        m = _TEMP_RE.match(name)
        if (m and (tag is None or m.group(1) == tag)) or (tag is None and _LEGACY_TEMP_RE.match(name)):
            out.append(os.path.join(folder, name))
    return out


def _pid_alive(pid: int) -> bool:
    if os.name == "nt" or pid <= 0:   # os.kill(pid, 0) would terminate it on Windows: the lock alone decides there
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:          # exists, owned by another user
        return True
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    return True


def reclaim_temp_files(folder, target=None) -> list:
    """Delete the writer temp files in `folder` whose owner is gone: not locked by a live writer and
    (where the name carries one) not owned by a live process other than this one. With `target`,
    raise OutputBusyError if another writer holds a temp file of that output. Returns the paths
    deleted. A temp file of a live merge is never touched: its owner's pid is alive (not even
    opened), or it holds the lock (probe fails, nothing done)."""
    own, tag = os.getpid(), (_name_tag(target) if target is not None else None)
    reclaimed = []
    for path in temp_files(folder):
        m = _TEMP_RE.match(os.path.basename(path))
        mine = m is not None and m.group(1) == tag
        pid = int(m.group(2)) if m else None
        if pid == own and mine:
            continue                      # our own temp name: _open_locked reclaims or refuses it
        alive = pid is not None and pid != own and _pid_alive(pid)
        if alive and not mine:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | O_BINARY)
        except OSError:
            continue                      # gone already, or not ours to read
        try:
            try:
                _lock(fd)
            except OSError:
                if mine:
                    raise OutputBusyError(target) from None
                continue                  # a live writer holds it
            if alive:                     # unlocked but its pid lives (reused pid?): leave it alone
                continue
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    continue              # replaced under us: its new owner decides
                if fcntl is None:        # Windows deletes no open file
                    os.close(fd)
                    fd = None
                os.unlink(path)
            except OSError:
                continue
            reclaimed.append(path)
        finally:
            if fd is not None:
                os.close(fd)
    return reclaimed


def _open_locked(tmp, target):
    """Open and exclusively lock the temp file, reclaiming one left behind by a dead process."""
    for _attempt in range(5):
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | O_BINARY, 0o644)
        try:
            _lock(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputBusyError(target) from None
            raise
        try:
            same = os.stat(tmp).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:   # we hold the lock on the file that carries the name
            os.ftruncate(fd, 0)
            return os.fdopen(fd, "wb")
        os.close(fd)   # the name was unlinked/replaced under us: try again
    raise OutputBusyError(target)


def _lock(fd):
    """Exclusive, non-blocking lock on an open file, released by the kernel when the process dies."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as exc:
        raise OSError(errno.EWOULDBLOCK, str(exc)) from None


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_file(tensors: dict, path, metadata=None, overwrite=False) -> str:
    """Small helper (tests, demo models, repair): write a dict of tensors atomically."""
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(path, entries, metadata, overwrite) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.commit()


def sha256_file(path, block=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def legacy_model_hash(path) -> str:
    """The WebUI's old 8-hex hash: sha256 of 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


_SHA256 = re.compile(r"[0-9a-f]{64}")


class HashCache:
    """sha256 of input files, cached by (real path, size, mtime_ns) in a small JSON file."""

    def __init__(self, path=None):
        self.path = path or os.path.join(os.path.expanduser("~"), ".cache", "astolfo_merge", "hashes.json")
        self._data = self._load()

    def _load(self) -> dict:
        """The cached entries; a cache that is unreadable, not JSON or of the wrong shape is rebuilt
        (only well-formed entries are kept) and says so once: it must never fail a merge."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            return self._rebuilt(f"cannot be read ({exc.strerror})")
        try:
            doc = strict_loads(raw, max_depth=4)
        except JSONInputError as exc:
            return self._rebuilt(str(exc))
        if not isinstance(doc, dict):
            return self._rebuilt(f"holds a JSON {type(doc).__name__}, not an object")
        good = {k: v for k, v in doc.items() if isinstance(v, str) and _SHA256.fullmatch(v) and k.count("|") >= 2}
        if len(good) < len(doc):
            self._rebuilt(f"holds {len(doc) - len(good)} malformed entries", kept=len(good))
        return good

    def _rebuilt(self, why, kept=0) -> dict:
        logging.getLogger("astolfo_merge").warning(
            "hash cache %s %s; %s", self.path, why, f"kept {kept} good entries" if kept else "starting a new one")
        return {}

    def _key(self, file):
        st = os.stat(file)
        return f"{os.path.realpath(file)}|{st.st_size}|{st.st_mtime_ns}"

    def get(self, file):
        return self._data.get(self._key(file))

    def sha256(self, file) -> str:
        key = self._key(file)
        if key not in self._data:
            self._data[key] = sha256_file(file)
            self._save()
        return self._data[key]

    def put(self, file, digest):
        self._data[self._key(file)] = digest
        self._save()

    def _save(self):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self._data, f)
            os.replace(tmp, self.path)
        except OSError:
            pass
