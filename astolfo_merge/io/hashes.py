"""File hashes: a file's sha256, the WebUI's old 8-hex model hash, and the sha256 cache of input files."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re

from .strict_json import JSONInputError, loads as strict_loads


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
