"""The code stays lint-clean: ruff (rules in pyproject.toml: pyflakes, syntax, import order) over everything we
ship and test."""
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def _ruff():
    exe = shutil.which("ruff", path=str(ROOT / ".venv" / "bin")) or shutil.which("ruff")
    if exe:
        return [exe]
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.skip("ruff is not installed (requirements-dev.txt installs it)")
    return [sys.executable, "-m", "ruff"]


CHECKED = ["astolfo_merge", "tests", "bench", "scripts", "tools"]


def test_ruff_is_clean():
    result = subprocess.run(_ruff() + ["check", "--no-cache", *CHECKED], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_imports_are_in_order():
    """Import order (isort rules, I) is checked even if the selection in pyproject.toml loses it."""
    result = subprocess.run(_ruff() + ["check", "--no-cache", "--select", "I", *CHECKED], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
