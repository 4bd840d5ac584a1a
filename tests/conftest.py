"""Shared fixtures: tiny synthetic checkpoints with every real key name (shapes scaled 1/64).

`demo_dir` is built once per session; `models` gives each test its own folder with links to those
files, so tests can write outputs without disturbing each other.
"""
from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

from astolfo_merge.core.engine import run_merge  # noqa: E402
from astolfo_merge.core.plan import build_plan  # noqa: E402
from astolfo_merge.core.recipe import Recipe, parse_recipe  # noqa: E402
from astolfo_merge.core.run_options import RunOptions  # noqa: E402
from astolfo_merge.features.demo import write_synthetic  # noqa: E402

TEST_SCALE = 64
SD1_FILES = {"sd1-base": None, "sd1-a": 1, "sd1-b": 2, "sd1-c": 3}
SDXL_FILES = {"sdxl-base": None, "sdxl-a": 11, "sdxl-b": 12, "sdxl-c": 13}


def load_tool(name: str):
    """tools/<name>.py imported as a module (the tools are scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    for name, variant in SD1_FILES.items():
        write_synthetic(folder / f"{name}.safetensors", "sd1", TEST_SCALE, variant=variant)
    for name, variant in SDXL_FILES.items():
        write_synthetic(folder / f"{name}.safetensors", "sdxl", TEST_SCALE, variant=variant)
    write_synthetic(folder / "sdxl-pruned.safetensors", "sdxl", TEST_SCALE, variant=14,
                    drop=["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"])
    write_synthetic(folder / "sdxl-vpred.safetensors", "sdxl", TEST_SCALE, variant=15, markers=["v_pred", "ztsnr"])
    return folder


@pytest.fixture
def models(demo_dir, tmp_path):
    """A fresh models folder holding links to the session's tiny checkpoints."""
    return link_files(demo_dir, tmp_path)


def link_files(source, folder):
    """`folder` with a link to every file of `source` (a fresh models folder over shared files)."""
    for f in source.iterdir():
        os.symlink(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is several times faster than two spinning on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def metadata(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


@pytest.fixture
def make_checkpoint(tmp_path):
    """make_checkpoint(name, arch, variant=None, **write_synthetic options) -> path in tmp_path."""
    def make(name, arch="sd1", variant=None, folder=None, **kw):
        path = pathlib.Path(folder or tmp_path) / name
        write_synthetic(path, arch, kw.pop("scale", TEST_SCALE), variant=variant, **kw)
        return path
    return make


def run_recipe(models, recipe, output=None, progress=None, cancel=None, **options):
    """The tests' one recipe -> plan -> run: `recipe` (a Recipe or its dict) planned over the `models`
    folder (into `output`, else the recipe's own name there) and merged with RunOptions(hash_inputs=False,
    **options). Returns the MergeResult."""
    if not isinstance(recipe, Recipe):
        recipe = parse_recipe(recipe)
    plan = build_plan(recipe, None if models is None else str(models), None if output is None else str(output))
    return run_merge(plan, RunOptions(**{"hash_inputs": False, **options}), progress=progress, cancel=cancel)


def close(a: torch.Tensor, b: torch.Tensor, rtol=1e-12, atol=1e-12) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)


def run_cli(*args, cwd, env_extra=None, preexec=None, stdout=None, timeout=120):
    """`python -m astolfo_merge ARGS` in a subprocess (a clean HOME in `cwd`): CompletedProcess with text output."""
    import subprocess
    env = {"PYTHONPATH": str(ROOT), "HOME": str(cwd), "PATH": "/usr/bin:/bin", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "astolfo_merge", *map(str, args)], cwd=cwd, env=env, timeout=timeout,
                          stdout=subprocess.PIPE if stdout is None else stdout, stderr=subprocess.PIPE, text=True,
                          preexec_fn=preexec)


def cli(*args, cwd=None):
    """`python -m astolfo_merge ARGS` (cwd and HOME: `cwd`, else the repository): (returncode, stdout, stderr)."""
    import subprocess
    proc = subprocess.run([sys.executable, "-m", "astolfo_merge", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "HOME": str(cwd or ROOT),
                                                                "PATH": "/usr/bin:/bin"})
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(proc, *needles, code=2) -> str:
    """Assert a CLI run failed as bad input does: exit `code`, one line on stderr, no traceback, naming `needles`."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, proc.stderr
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err
