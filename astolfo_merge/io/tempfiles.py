"""The writer's temp files: their names, the exclusive lock on them, and reclaiming those left by dead processes.

A writer of `<target>` writes `partial_path(target)` in the same folder, held under an exclusive
lock (`open_locked`) that the kernel releases when the process dies; a second writer of the same
output gets OutputBusyError, and a later merge into the folder deletes temp files whose owner is
gone (`reclaim_temp_files`).
"""
from __future__ import annotations

import errno
import hashlib
import os
import re

from ..errors import AstolfoError
from .header import O_BINARY

try:
    import fcntl
except ImportError:       # Windows: the temp file is locked with msvcrt instead
    fcntl = None
    import msvcrt


PARTIAL_SUFFIX = ".partial"
# The writer's temp file: `.am-<12 hex of the output's name>-<pid>.partial`, at most 33 bytes whatever the
# output name (so output names up to the file system's 255 bytes can be written), recognisable by any
# later merge into the folder, which reclaims those whose owner is gone (see `reclaim_temp_files`).
_TEMP_RE = re.compile(r"^\.am-([0-9a-f]{12})-([0-9]{1,10})\.partial$")
_LEGACY_TEMP_RE = re.compile(r"^\..+\.(safetensors|ckpt|pt|pth)\.partial$", re.I)   # `.<output name>.partial`


class OutputBusyError(AstolfoError):
    def __init__(self, target):
        self.target = str(target)
        super().__init__(f"{self.target}: another merge is writing this file right now; wait for it or pick another name")


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
            continue                      # our own temp name: open_locked reclaims or refuses it
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


def open_locked(tmp, target):
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


def fsync_dir(folder):
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
