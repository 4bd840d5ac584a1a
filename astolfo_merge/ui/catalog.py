"""What each checkpoint of a models folder is, from its header only, cached by (path, size, mtime).

The pool picker lists every checkpoint with its architecture, prediction type, size and repair
status. Reading a header and identifying it costs ~10-60 ms per file, so a 300-model folder
would take ~20 s on every refresh; with this cache (in memory, and on disk across restarts) only
new or changed files are read again.
"""
from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import asdict, dataclass, field

from ..errors import AstolfoError
from ..io import arch as archmod
from ..io.header import read_header

CACHE_VERSION = 2   # 2: ModelInfo.partial, status wording
BASE_NAME = re.compile(r"(^|[^a-z])(base|v1-5-pruned|sd-v1-5|sd_v1-5|v2-1_(512|768)|512-base|768-v-ema)([^a-z]|$)", re.I)
PREDICTION_TITLES = {"epsilon": "eps", "v": "v-pred", "edm-v": "EDM v-pred", "edm": "EDM eps"}


@dataclass
class ModelInfo:
    """One checkpoint as the pool picker shows it (sizes in bytes, mtime in ns)."""
    name: str                 # as recipes name it: relative to the models folder, or absolute
    path: str
    size: int
    mtime_ns: int
    arch: str | None = None   # sd1 | sd2 | sdxl | None (not mergeable)
    scale: int = 1
    title: str = "unknown"
    prediction: str = ""
    status: str = ""          # complete | complete, N optional key(s) missing | partial: ... | not mergeable: ...
    mergeable: bool = False
    has_recipe: bool = False
    partial: list = field(default_factory=list)   # components that are not complete (partial or absent)

    @property
    def label(self) -> str:
        """One line for a checkbox: name — architecture · prediction · size · status."""
        parts = [self.title]
        if self.prediction:
            parts.append(self.prediction)
        parts += [format_size(self.size), self.status]
        if self.has_recipe:
            parts.append("merged (recipe inside)")
        return f"{self.name} — " + " · ".join(parts)

    @property
    def looks_like_base(self) -> bool:
        return bool(BASE_NAME.search(os.path.basename(self.name)))


def format_size(size: int) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def describe(name: str, path: str) -> ModelInfo:
    """Header-only description of one file; never raises for a bad file (it is listed as such)."""
    st = os.stat(path)
    info = ModelInfo(name, path, st.st_size, st.st_mtime_ns)
    try:
        header = read_header(path)
        ident = archmod.identify(header.shapes, header.metadata)
    except AstolfoError as exc:
        info.status = f"not readable: {getattr(exc, 'problem', exc)}"
        return info
    except Exception as exc:  # noqa: BLE001 - a hostile file must not break the listing
        info.status = f"not readable: {exc.__class__.__name__}"
        return info
    info.has_recipe = "astolfo_merge_recipe" in header.metadata
    if ident.refusal:
        info.status = f"not mergeable: {ident.refusal}"
        return info
    info.arch, info.scale, info.title, info.mergeable = ident.arch, ident.scale, ident.title, True
    info.prediction = PREDICTION_TITLES.get(ident.prediction, ident.prediction) + (" + ztSNR" if ident.ztsnr else "")
    info.status = _repair_status(ident)
    info.partial = list(ident.partial_components)
    return info


def _repair_status(ident) -> str:
    partial = [c for c in ident.partial_components]
    if partial:
        return "partial: " + ", ".join(c.upper() for c in partial) + " — a base fills it (Base model, or Repair)"
    optional = sum(len(c.missing_optional) for c in ident.components.values())
    if optional:
        return f"complete, {optional} optional key(s) missing"
    return "complete"


class Catalog:
    """Cached `describe` for many files; thread-safe; persisted as JSON at `path` (None: memory only)."""

    def __init__(self, path: str | None = None):
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict = {}     # realpath -> ModelInfo fields
        self._dirty = False
        if path:
            self._load()

    def _load(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return
        if isinstance(doc, dict) and doc.get("version") == CACHE_VERSION and isinstance(doc.get("entries"), dict):
            self._entries = doc["entries"]

    def save(self):
        if not self.path or not self._dirty:
            return
        with self._lock:
            doc = {"version": CACHE_VERSION, "entries": dict(self._entries)}
            self._dirty = False
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f)
            os.replace(tmp, self.path)
        except OSError:
            pass

    def info(self, name: str, path: str) -> ModelInfo:
        key = os.path.realpath(path)
        st = os.stat(path)
        with self._lock:
            cached = self._entries.get(key)
        if cached and cached["size"] == st.st_size and cached["mtime_ns"] == st.st_mtime_ns:
            return ModelInfo(**{**cached, "name": name, "path": path})
        info = describe(name, path)
        with self._lock:
            self._entries[key] = asdict(info)
            self._dirty = True
        return info

    def list(self, named_paths) -> list:
        """ModelInfo for each (name, path), in the given order; files that vanished are skipped."""
        out = []
        for name, path in named_paths:
            try:
                out.append(self.info(name, path))
            except FileNotFoundError:
                continue
        self.save()
        return out


def default_catalog() -> Catalog:
    """The process-wide catalog, persisted next to the hash cache."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            folder = os.environ.get("ASTOLFO_MERGE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "astolfo_merge")
            _DEFAULT = Catalog(os.path.join(folder, "catalog.json"))
        return _DEFAULT


_DEFAULT: Catalog | None = None
_DEFAULT_LOCK = threading.Lock()


def guess_base(infos, arch: str | None, scale: int | None = None) -> str | None:
    """A model of `arch` (and `scale`: a 1/64-scale demo base never matches full-size models) whose
    name looks like a base (…base…, v1-5-pruned, …), complete ones first."""
    candidates = [i for i in infos if i.mergeable and (arch is None or i.arch == arch) and i.looks_like_base
                  and (scale is None or i.scale == scale)]
    candidates.sort(key=lambda i: (not i.status.startswith("complete"), len(i.name), i.name))
    return candidates[0].name if candidates else None


def pool_scale(infos_by_name: dict, pool) -> int | None:
    """The scale of the selected pool (that of its first identified model; 1 = full size)."""
    for name in pool:
        info = infos_by_name.get(name)
        if info is not None and info.arch:
            return info.scale
    return None


def pool_arch(infos_by_name: dict, pool) -> str | None:
    """The architecture of the selected pool (that of its first identified model)."""
    for name in pool:
        info = infos_by_name.get(name)
        if info is not None and info.arch:
            return info.arch
    return None
