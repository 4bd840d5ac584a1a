"""Checkpoint reads: `CheckpointReader` (bounded reads, zero-copy views) and the open-file limit they need.

Tensor data is read with positioned reads into fresh buffers (`read`, `read_rows`) so memory is what
the caller asks for, never the whole file; the engine's hot loops may instead take zero-copy,
read-only views of a memory map (`view_rows`) and hand the pages back after each key (`release`).
fp8_scaled weights read as weight x scale.
"""
from __future__ import annotations

import mmap
import os
import warnings

import numpy as np
import torch

from ..errors import AstolfoError, CheckpointError
from .header import O_BINARY, Header, TensorInfo, read_header
from .legacy import legacy_state_dict

try:
    import resource
except ImportError:       # Windows: no RLIMIT_NOFILE (the C runtime's own limit is far above a pool)
    resource = None


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
            self._legacy = legacy_state_dict(self.path)

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
