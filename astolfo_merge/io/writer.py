"""The streaming atomic safetensors writer: `SafetensorsWriter`, `RangeWriter`, `save_file`, tensor bytes.

The header is fixed up front from the planned (key, dtype, shape) list; tensors are then streamed
in that order (hashed and written on a background thread) or, in positioned mode, written into
their byte ranges by any process. The output appears under its name only on `commit()`, atomically,
from a locked temp file (`tempfiles`). `cast_output` gives a tensor its output dtype (fp8 rounded once).
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
import threading
from collections import deque

import torch

from ..errors import CheckpointError, OutputExistsError
from .hashes import sha256_file
from .header import FP8_DTYPES, MAX_HEADER_BYTES, NAME_OF, O_BINARY
from .tempfiles import fsync_dir, open_locked, partial_path, reclaim_temp_files

try:
    import fcntl
except ImportError:       # Windows: renames and deletes no open file (see `commit`, `abort`)
    fcntl = None


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


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor (bf16/fp8 included)."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    size = t.element_size()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return memoryview(t.reshape(-1).view(as_int).numpy()).cast("B")


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
        self._f = open_locked(self.tmp, self.target)
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
        fsync_dir(os.path.dirname(self.target))
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


def save_file(tensors: dict, path, metadata=None, overwrite=False) -> str:
    """Small helper (tests, demo models, repair): write a dict of tensors atomically."""
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(path, entries, metadata, overwrite) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.commit()
