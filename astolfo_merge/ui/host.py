"""The host interface: everything the tab needs from whoever serves it (ARCHITECTURE.md layering).

The WebUI host lives in `scripts/astolfo_merge_tab.py` (it is the only code that talks to
`modules.*`); the standalone host below serves a plain models folder. The tab, the jobs and the
XYZ trials only ever call these methods.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

from ..core.plan import build_plan
from ..core.plan_data import Plan
from ..core.recipe import Recipe
from ..core.run_options import MergeResult, RunOptions
from ..errors import AstolfoError, RecipeError
from ..io.header import is_checkpoint_name


@dataclass
class HostSettings:
    """Defaults for the tab's output form (the WebUI keeps them in its Settings)."""
    output_dir: str = ""        # empty: the models folder
    threads: int = 0            # 0: torch's default
    workers: int = 0            # worker processes; 0: auto (RunOptions.workers)
    memory_gb: float = 1.5
    device: str = "cpu"
    precision: str = "fp64"
    throttle: float = 0.0       # seconds to pause after each key (RunOptions.throttle)


class Host:
    """Base class: the folder logic shared by every host. Subclasses say where models live."""

    key = "host"                 # one job manager per key (jobs.manager)
    title = "AstolfoMerge"
    can_load_model = False       # a "load the result" button makes sense
    has_xyz = False              # the XYZ grid can use merge recipes
    has_loaded_model = False     # the host holds a model the tab could merge into (the WebUI: live.py)

    # -- what subclasses provide ------------------------------------------------------------------
    def models_dir(self) -> str:
        """The folder recipe names are relative to (and the default output folder)."""
        raise NotImplementedError

    def checkpoint_paths(self) -> list:
        """Every checkpoint file the host knows (absolute paths)."""
        raise NotImplementedError

    def extra_model_dirs(self) -> list:
        """Checkpoint folders besides `models_dir()` (Forge Neo's --ckpt-dirs; A1111's models folder next
        to its --ckpt-dir). Their files are named "<folder name>/<path inside it>" (see `name_of`)."""
        return []

    def refresh(self) -> None:
        """Re-scan the folders (the WebUI rebuilds its checkpoint list)."""

    def settings(self) -> HostSettings:
        return HostSettings()

    def recipes_dir(self) -> str:
        return os.path.join(self.models_dir(), "recipes")

    def after_merge(self, result: MergeResult) -> str | None:
        """Called on the worker thread once a merge is written; returns a line for the job log."""
        self.refresh()
        return None

    def load_model(self, path: str) -> tuple:
        """(message, name the page should select or None)."""
        return (f"This host cannot load models; the merge is at {path}", None)

    # -- live merge into the host's loaded model (live.py); only the WebUI has one ----------------
    def live_target(self, load: bool = False):
        """The loaded model as a live_state.LiveTarget (`load`: inside a generation, the host may load
        its model first); raises LiveError saying why not."""
        from ..features.live_state import LiveError
        raise LiveError("merging into the loaded model needs the WebUI; here merges go to files")

    def live_lock(self):
        """Held around live changes made from the tab (the WebUI: never while it generates)."""
        return contextlib.nullcontext()

    def live_unsupported(self) -> str | None:
        from ..features.live_state import LiveError
        try:
            self.live_target()
        except LiveError as exc:
            return str(exc)
        return None

    def merge_live(self, plan: Plan, options: RunOptions, progress=None, cancel=None, locked: bool = True):
        """Merge `plan` into the loaded model (only changed keys); `locked=False` when the caller holds
        the host's lock already (an XYZ cell runs inside a generation)."""
        from ..features.live import merge_into
        with self.live_lock() if locked else contextlib.nullcontext():
            return merge_into(self.live_target(), plan, options, progress, cancel)

    def start_live_workers(self, plan: Plan, options: RunOptions) -> int:
        """Park the worker processes a grid's live cells will use (features/live.start_workers)."""
        from ..features.live import start_workers
        return start_workers(self.live_target(), plan, options)

    def end_live_workers(self):
        from ..core.live_workers import release_crew
        release_crew()

    def restore_live(self, locked: bool = True):
        from ..features.live import restore
        with self.live_lock() if locked else contextlib.nullcontext():
            return restore(self.live_target())

    def save_live(self, name: str, overwrite: bool = False) -> MergeResult:
        """Write the loaded merge to `name` in the output folder, then register it like a merge."""
        from ..features.live import save_loaded
        from ..io.paths import Folders
        if not name or not is_checkpoint_name(name):
            raise RecipeError("File name", f"{name!r}: give a file name ending in .safetensors")
        path = Folders(self).output(os.path.join(self.output_dir(), name), "File name")
        with self.live_lock():
            result = save_loaded(self.live_target(), path, overwrite)
        note = self.after_merge(result)
        if note:
            result.log.append(note)
        return result

    def lora_dirs(self) -> list:
        """Folders the tab's LoRA picker lists: a `Lora` folder inside the models folder and
        $ASTOLFO_LORA_DIR (the WebUI host lists models/Lora instead)."""
        dirs = [os.path.join(self.models_dir(), "Lora")]
        if os.environ.get("ASTOLFO_LORA_DIR"):
            dirs.append(os.environ["ASTOLFO_LORA_DIR"])
        return list(dict.fromkeys(os.path.abspath(d) for d in dirs))

    # -- shared logic ---------------------------------------------------------------------------
    def output_dir(self) -> str:
        return self.settings().output_dir or self.models_dir()

    def name_of(self, path: str) -> str:
        """How a recipe names `path`: relative to the models folder when inside it; "<folder name>/<path
        inside>" when inside one of `extra_model_dirs()` (unless that name is a path in the models
        folder too); else absolute."""
        path = os.path.abspath(path)
        rel = os.path.relpath(path, os.path.abspath(self.models_dir()))
        if not (rel.startswith(os.pardir) or os.path.isabs(rel)):
            return rel.replace(os.sep, "/")
        for label, root in self._extra_labels().items():
            if path.startswith(root + os.sep):
                name = f"{label}/{os.path.relpath(path, root)}".replace(os.sep, "/")
                if not os.path.exists(os.path.join(self.models_dir(), name)):
                    return name
                break
        return path

    def _extra_labels(self) -> dict:
        """folder name -> folder, for `extra_model_dirs()` (two folders of one name: the first one keeps it)."""
        labels = {}
        for root in self.extra_model_dirs():
            root = os.path.abspath(root)
            labels.setdefault(os.path.basename(root) or root, root)
        return labels

    def path_of(self, name: str) -> str | None:
        """The file an extra-folder name (see `name_of`) means, or None for every other name (those
        resolve against the models folder, as build_plan does)."""
        if not name or os.path.isabs(name) or os.path.exists(os.path.join(self.models_dir(), name)):
            return None
        label, _, inside = name.replace("\\", "/").partition("/")
        root = self._extra_labels().get(label)
        return os.path.join(root, *inside.split("/")) if root and inside else None

    def resolved(self, recipe: Recipe) -> Recipe:
        """`recipe` with extra-folder names replaced by their paths, which build_plan resolves as they are."""
        if not self.extra_model_dirs():
            return recipe

        def fix(name):
            return (self.path_of(name) or name) if isinstance(name, str) else name
        out = copy.deepcopy(recipe)
        out.pool = [fix(n) for n in out.pool]
        out.base = fix(out.base)
        for rule in out.components.values():
            rule.pool = [fix(n) for n in rule.pool] if rule.pool else rule.pool
            rule.base = fix(rule.base)
            if rule.take and rule.take != "base":
                rule.take = fix(rule.take)
        return out

    def named_checkpoints(self) -> list:
        """(recipe name, path) of every checkpoint, sorted by name (case-insensitive)."""
        pairs = [(self.name_of(p), p) for p in self.checkpoint_paths()]
        return sorted(dict(pairs).items(), key=lambda np: np[0].lower())

    def lora_files(self) -> list:
        """(recipe name, lora.list_loras entry) of every LoRA in `lora_dirs()`, sorted by name. The name is
        one `lora.find_lora` resolves back to the same file (relative when it can, else absolute)."""
        from ..core.lora import find_lora, list_loras
        found = {}
        for folder in self.lora_dirs():
            for entry in list_loras(folder):
                found.setdefault(self._lora_name(entry, folder, find_lora), entry)
        return sorted(found.items(), key=lambda ne: ne[0].lower())

    def _lora_name(self, entry: dict, folder: str, find_lora) -> str:
        path = entry["path"]
        rel = self.name_of(path)
        for name in ([rel] if not os.path.isabs(rel) else []) + [entry["name"]]:
            try:
                if os.path.samefile(find_lora(name, self.models_dir(), "loras"), path):
                    return name
            except (OSError, AstolfoError):   # not resolvable by that name
                continue
        return os.path.abspath(path)

    def output_path(self, recipe: Recipe) -> str:
        return os.path.join(self.output_dir(), recipe.output)

    def plan(self, recipe: Recipe) -> Plan:
        return build_plan(self.resolved(recipe), self.models_dir(), self.output_path(recipe))

    def run_options(self, overwrite=False, **overrides) -> RunOptions:
        s = self.settings()
        values = {"device": s.device, "threads": s.threads, "workers": s.workers, "memory_gb": s.memory_gb,
                  "overwrite": overwrite, "throttle": s.throttle}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return RunOptions(**values)


def scan_checkpoints(folder: str) -> list:
    """Checkpoint files under `folder`, recursively, like the WebUI lists them: hidden folders,
    temp files of running merges and `*.vae.*` files are skipped. Linked folders are followed, but
    each real folder is entered once (a link loop neither repeats nor hangs the walk) and a file
    reached through several links is listed once, under the first path found."""
    found, seen_dirs, seen_files = [], set(), set()

    def first_visit(path) -> bool:
        try:
            st = os.stat(path)
        except OSError:          # a dangling link or a folder that vanished meanwhile
            return False
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            return False
        seen_dirs.add(key)
        return True

    if not first_visit(folder):
        return found
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in sorted(dirs) if not d.startswith(".") and first_visit(os.path.join(root, d))]
        for name in sorted(files):
            if name.startswith(".") or not is_checkpoint_name(name) or ".vae." in name.lower():
                continue
            path = os.path.join(root, name)
            real = os.path.realpath(path)
            if real not in seen_files:
                seen_files.add(real)
                found.append(path)
    return found


class StandaloneHost(Host):
    """A models folder on disk (the `app` sub-command): nothing to load a model into."""

    key = "standalone"

    def __init__(self, models_dir: str, settings: HostSettings | None = None):
        self._models_dir = os.path.abspath(models_dir)
        self._settings = settings or HostSettings()
        self.key = f"standalone:{self._models_dir}"   # one merge at a time per models folder

    def models_dir(self) -> str:
        return self._models_dir

    def checkpoint_paths(self) -> list:
        """The models folder's checkpoints, less its LoRA folder (a LoRA is not a pool member)."""
        if not os.path.isdir(self._models_dir):
            return []
        lora_roots = tuple(d + os.sep for d in self.lora_dirs())
        return [p for p in scan_checkpoints(self._models_dir) if not os.path.abspath(p).startswith(lora_roots)]

    def settings(self) -> HostSettings:
        return self._settings

    def load_model(self, path: str) -> tuple:
        return (f"Loading a model needs the WebUI; the standalone app only merges. The file is {path}", None)
