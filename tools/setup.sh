#!/usr/bin/env bash
# Sets up .venv for running and testing AstolfoMerge (idempotent).
# torch is installed first and pinned (a CPU wheel); every other package is pinned by constraints.txt
# so pip never resolves a bare `torch` (a multi-GB CUDA build) nor backtracks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install torch==2.13.0
fi
"${PIP[@]}" install -r requirements-dev.txt -c constraints.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, gradio, numpy, scipy, safetensors; print('venv ready: torch', torch.__version__, 'gradio', gradio.__version__)"
# Debian's chromium for the browser test (root only; the test skips without it).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed; the browser test will be skipped"
fi
