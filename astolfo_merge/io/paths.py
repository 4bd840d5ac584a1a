"""Where the tab may read and write, and bounded reads of recipe files.

The tab's handlers (standalone app and WebUI alike) take file names from the page: pool, base,
component and LoRA entries, saved-recipe names, output names. Whoever can send the page a request
can type any string there, so every such name is resolved and confined before anything opens it:

- model files (pool, base, component take / pool / base) to the models folder and the output folder,
  or to a file the host lists (the WebUI lists checkpoints of several folders);
- LoRA files to the models folder and the host's LoRA folders;
- recipe files to the recipes folder; outputs to the output folder.

"Inside" means: the realpath is inside a folder's realpath, or the name stays inside the folder as
written (after `..` is applied) *and* resolves to the same file as written. So links the folder's
owner put there (a checkpoint linked in from another disk) are followed, while `../`, absolute paths
and `..` through a linked folder cannot leave the folder. A refused name gets one message, whether or
not a file by that name exists outside (the page learns nothing about other folders).

The CLI is the user's own shell and keeps accepting any path; only `read_recipe_text` (a recipe file
read with bounds: regular files only, at most RECIPE_MAX_BYTES, never blocking on a FIFO) is shared.
"""
from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile

from ..errors import AstolfoError, RecipeError

RECIPE_MAX_BYTES = 4 * 1024 * 1024
_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class RecipeFileError(RecipeError):
    """A recipe file that cannot be used as one: names the file and the problem."""

    def __init__(self, path, problem):
        self.field, self.problem, self.path = "(file)", problem, str(path)
        AstolfoError.__init__(self, f"recipe file {self.path}: {problem}")


class PathRefused(RecipeError):
    """A name from the page that is not a file inside the folders the tab may use. The text is the
    same whether or not something by that name exists outside them."""

    def __init__(self, field, name, what, folders):
        self.name = name
        super().__init__(field, f"{name!r} is not a file in {what} ({', '.join(folders)}); "
                                f"the tab only opens files inside its folders")


# -- inside or not ---------------------------------------------------------------------------------

def is_inside(path: str, root: str) -> bool:
    """`path` is `root` or below it (both absolute and normalised; no file system access)."""
    path, root = os.path.normcase(path), os.path.normcase(root)
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:   # different drives
        return False


def within(path: str, roots) -> bool:
    """`path` (what will be opened, as it will be opened) stays inside one of `roots` (see the module doc)."""
    real = os.path.realpath(path)
    if any(is_inside(real, os.path.realpath(r)) for r in roots):
        return True
    written = os.path.abspath(path)     # `..` applied to the name as written
    return any(is_inside(written, os.path.abspath(r)) for r in roots) and os.path.realpath(written) == real


def _folders(paths) -> list:
    return list(dict.fromkeys(os.path.abspath(p) for p in paths if p))


class Folders:
    """The folders of one host the tab may use; each check returns the path to open or raises PathRefused."""

    def __init__(self, host):
        self.host = host
        self.models_dir = host.models_dir()
        extra = host.extra_model_dirs() if hasattr(host, "extra_model_dirs") else []   # Neo's --ckpt-dirs
        self.models = _folders([self.models_dir, host.output_dir(), *extra])
        self.recipes = _folders([host.recipes_dir()])
        self.loras = _folders([self.models_dir, *host.lora_dirs()])

    def _listed(self, path) -> bool:
        """A checkpoint the host lists (the WebUI lists files of --ckpt-dir and models/Stable-diffusion)."""
        try:
            real = os.path.realpath(path)
            return any(os.path.realpath(p) == real for p in self.host.checkpoint_paths())
        except (OSError, AstolfoError):
            return False

    def model(self, name: str, where: str) -> str:
        """The checkpoint `name` names, as plan.build_plan will open it (relative: in the models folder)."""
        path = name if os.path.isabs(name) else os.path.join(self.models_dir, name)
        if not (within(path, self.models) or self._listed(path)) or not os.path.lexists(path):
            raise PathRefused(where, name, "the models folder", self.models)
        if not os.path.isfile(path):
            raise RecipeError(where, f"{name!r} is not a regular file")
        return path

    def lora(self, name: str, where: str) -> str:
        """The LoRA file `name` names, as lora.find_lora will open it (its first search folder holding it)."""
        candidates = [name] if os.path.isabs(name) else [os.path.join(d, name) for d in lora_search_dirs(self.models_dir)]
        for path in candidates:
            if os.path.isfile(path):   # find_lora opens the first one: it must be inside
                if within(path, self.loras):
                    return path
                break
        raise PathRefused(where, name, "the LoRA folders", self.loras)

    def recipe(self, name: str, where: str) -> str:
        """A recipe file in the recipes folder (read or written; `read_recipe_text` checks what it is)."""
        path = name if os.path.isabs(name) else os.path.join(self.recipes[0], name)
        if not name or not within(path, self.recipes):
            raise PathRefused(where, name, "the recipes folder", self.recipes)
        return path

    def output(self, path: str, where: str = "output") -> str:
        if not within(path, self.models):
            raise PathRefused(where, os.path.basename(path), "the output folder", self.models)
        return path


def recipe_files(recipe) -> list:
    """(field, name) of every checkpoint a recipe names (pool, base, components' take / pool / base)."""
    found = [(f"pool[{i}]", n) for i, n in enumerate(recipe.pool)]
    if recipe.base:
        found.append(("base", recipe.base))
    for comp, rule in recipe.components.items():
        if rule.take and rule.take != "base":
            found.append((f"components.{comp}.take", rule.take))
        found += [(f"components.{comp}.pool[{i}]", n) for i, n in enumerate(rule.pool or [])]
        if rule.base:
            found.append((f"components.{comp}.base", rule.base))
    return found


def confine_recipe(host, recipe, output: str | None = None) -> None:
    """Refuse a recipe from the page that names a file outside the host's folders (before any file is read)."""
    folders = Folders(host)
    if hasattr(host, "resolved"):   # "<folder>/<path>" names of the host's other checkpoint folders
        recipe = host.resolved(recipe)
    for where, name in recipe_files(recipe):
        folders.model(name, where)
    for i, entry in enumerate(recipe.extra.get("loras") or []):
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            folders.lora(entry["file"], f"loras[{i}].file")
    if output or recipe.output:
        folders.output(output or host.output_path(recipe))


def recipe_path(host, name: str, where: str = "(recipe)") -> str:
    return Folders(host).recipe(name, where)


# -- recipe files, read with bounds ----------------------------------------------------------------

def check_recipe_size(size: int, what: str) -> None:
    if size > RECIPE_MAX_BYTES:
        raise RecipeFileError(what, f"is {size:,} bytes; a recipe may be at most {RECIPE_MAX_BYTES // 2**20} MiB")


def read_recipe_text(path) -> str:
    """The text of a recipe file: only a regular file (a FIFO or device is refused without blocking on
    it), at most RECIPE_MAX_BYTES, UTF-8 (a BOM is allowed). Errors name the file."""
    path = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)   # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer
    except OSError as exc:
        raise RecipeFileError(path, f"cannot read it: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a file")
            raise RecipeFileError(path, f"not a regular file ({kind}); a recipe is a .json file")
        check_recipe_size(st.st_size, path)
        chunks, total = [], 0
        while total <= RECIPE_MAX_BYTES:   # the size may have changed since fstat: never read past the limit
            chunk = os.read(fd, min(1 << 20, RECIPE_MAX_BYTES + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        check_recipe_size(total, path)
    except OSError as exc:
        raise RecipeFileError(path, f"cannot read it: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeFileError(path, f"is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON") from None


# -- the app's own files ---------------------------------------------------------------------------

_FILES_DIR = None


def app_files_dir() -> str:
    """The one folder for files this process makes to show on the page (plots, gradio's copies of
    downloads and uploads): the standalone app serves files from here and nowhere else. Removed at exit."""
    global _FILES_DIR
    if _FILES_DIR is None or not os.path.isdir(_FILES_DIR):
        _FILES_DIR = tempfile.mkdtemp(prefix="astolfo-merge-files-")
        atexit.register(shutil.rmtree, _FILES_DIR, True)
    return _FILES_DIR


LORA_DIR_NAMES = ("Lora", "LyCORIS")   # WebUI folders next to models/Stable-diffusion


def lora_search_dirs(models_dir) -> list:
    dirs = [models_dir] if models_dir else []
    if models_dir:
        parent = os.path.dirname(os.path.abspath(models_dir))
        dirs += [os.path.join(parent, d) for d in LORA_DIR_NAMES]
    if os.environ.get("ASTOLFO_LORA_DIR"):
        dirs.append(os.environ["ASTOLFO_LORA_DIR"])
    return dirs
