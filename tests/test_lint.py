"""The code stays lint-clean: ruff (rules in pyproject.toml) over everything we ship and test."""
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


def test_ruff_is_clean():
    result = subprocess.run(_ruff() + ["check", "--no-cache", "astolfo_merge", "tests", "bench", "scripts", "tools"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
