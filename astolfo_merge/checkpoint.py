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
import math
import mmap
import os
import struct
import threading
import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import AstolfoError, CheckpointError, OutputExistsError

try:
    import fcntl
except ImportError:       # Windows: the temp file is locked with msvcrt instead
    fcntl = None
    import msvcrt

O_BINARY = getattr(os, "O_BINARY", 0)   # Windows opens fds in text mode otherwise

PARTIAL_SUFFIX = ".partial"

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
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
OUTPUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


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

    @property
    def shapes(self) -> dict:
        return {k: v.shape for k, v in self.tensors.items()}


def is_checkpoint_name(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def _check_path(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such file")
    if os.path.isdir(path):
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(path, "is empty (0 bytes)")
    return path


def read_header(path) -> Header:
    """Header only: names, dtypes, shapes, offsets and metadata. Cheap for any file size."""
    path = _check_path(path)
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
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"header is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(path, "header JSON is not an object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "__metadata__ is not an object")
    data_start, data_len = 8 + n, size - 8 - n
    tensors, spans = {}, []
    for key, entry in doc.items():
        tensors[key] = _parse_entry(path, key, entry, data_len)
        spans.append((tensors[key].begin, tensors[key].end, key))
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(path, f"tensors '{k0}' and '{k1}' overlap in the data section")
    hdr = Header(path, tensors, metadata, data_start, size)
    if spans and spans[-1][1] < data_len:
        hdr.warnings.append(f"{data_len - spans[-1][1]} trailing bytes after the last tensor")
    return hdr


def _parse_entry(path, key, entry, data_len) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(path, f"tensor '{key}': header entry is not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype_name not in DTYPES:
        raise CheckpointError(path, f"tensor '{key}': unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(path, f"tensor '{key}': shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(path, f"tensor '{key}': data_offsets {offsets!r} are invalid")
    dtype, itemsize = DTYPES[dtype_name]
    if offsets[1] > data_len:
        raise CheckpointError(path, f"tensor '{key}': data runs past the end of the file (truncated?)")
    if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise CheckpointError(path, f"tensor '{key}': {offsets[1] - offsets[0]} bytes do not match shape {shape} of {dtype_name}")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _legacy_state_dict(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        try:  # legacy (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
            raise CheckpointError(path, f"refused to load: {exc.__class__.__name__}: {str(exc)[:300]}") from None
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler refuses code
        raise CheckpointError(path, f"refused to load: {exc.__class__.__name__}: {str(exc)[:300]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(path, "does not contain a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _legacy_header(path) -> Header:
    sd = _legacy_state_dict(path)
    tensors = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in sd.items()}
    return Header(path, tensors, {}, 0, os.path.getsize(path), format="ckpt")


class CheckpointReader:
    """Reads whole tensors or row ranges of one checkpoint into fresh memory, or views them in place."""

    def __init__(self, path, header: Header | None = None):
        self.header = header or read_header(path)
        self.path = self.header.path
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
            return self._legacy[key].clone()
        return self._pread(info, info.begin, info.end).reshape(info.shape)

    def read_rows(self, key, start: int, stop: int, scratch: np.ndarray | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (a 0-/1-element tensor counts as one row).

        With `scratch` (a uint8 buffer at least that large) the bytes land there and the result is a
        view of it: valid until the next read into the same scratch (callers convert right away).
        """
        info = self.info(key)
        if len(info.shape) == 0:
            return self.read(key)
        if self._legacy is not None:
            return self._legacy[key][start:stop].clone()
        begin, end = self._row_bytes(info, start, stop)
        flat = self._pread(info, begin, end, scratch)
        return flat.reshape((stop - start,) + tuple(info.shape[1:]))

    def view_rows(self, key, start: int, stop: int) -> torch.Tensor | None:
        """Rows [start, stop) as a zero-copy view of the file's pages, in the stored dtype; None where
        that is not possible (legacy file, scalar, data not aligned to the dtype). READ-ONLY: the
        pages are mapped read-only, so writing into the view crashes; convert or copy first."""
        info = self.info(key)
        if self._fd is None or not info.shape or info.nbytes == 0:
            return None
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
                    raise CheckpointError(self.path, "unexpected end of file while reading tensor data")
                done += got
        else:     # Windows has no positioned reads: copy out of the memory map
            torch.from_numpy(buf).copy_(self._mapped()[at:at + size])
        return torch.frombuffer(buf, dtype=info.dtype)


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
    visible under the target name. The temp file `.<name>.partial` is held under an exclusive
    lock: a second writer of the same output is refused, and a temp file left by a killed
    process (lock released by the kernel) is reclaimed.
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
        self.total_bytes = 8 + len(blob) + offset
        self.tmp = partial_path(self.target)
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


def partial_path(target) -> str:
    target = os.path.abspath(os.fspath(target))
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}{PARTIAL_SUFFIX}")


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


class HashCache:
    """sha256 of input files, cached by (real path, size, mtime_ns) in a small JSON file."""

    def __init__(self, path=None):
        self.path = path or os.path.join(os.path.expanduser("~"), ".cache", "astolfo_merge", "hashes.json")
        try:
            with open(self.path) as f:
                self._data = json.load(f)
        except (OSError, ValueError):
            self._data = {}

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
