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

from astolfo_merge.features.demo import write_synthetic  # noqa: E402

TEST_SCALE = 64
SD1_FILES = {"sd1-base": None, "sd1-a": 1, "sd1-b": 2, "sd1-c": 3}
SDXL_FILES = {"sdxl-base": None, "sdxl-a": 11, "sdxl-b": 12, "sdxl-c": 13}


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


def close(a: torch.Tensor, b: torch.Tensor, rtol=1e-12, atol=1e-12) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)


def run_cli(*args, cwd, env_extra=None, preexec=None, stdout=None, timeout=120):
    """`python -m astolfo_merge ARGS` in a subprocess (a clean HOME in `cwd`): CompletedProcess with text output."""
    import subprocess
    env = {"PYTHONPATH": str(ROOT), "HOME": str(cwd), "PATH": "/usr/bin:/bin", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "astolfo_merge", *map(str, args)], cwd=cwd, env=env, timeout=timeout,
                          stdout=subprocess.PIPE if stdout is None else stdout, stderr=subprocess.PIPE, text=True,
                          preexec_fn=preexec)


def one_line_error(proc, *needles, code=2) -> str:
    """Assert a CLI run failed as bad input does: exit `code`, one line on stderr, no traceback, naming `needles`."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, proc.stderr
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err
