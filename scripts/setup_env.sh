#!/usr/bin/env bash
# Create .venv and install the pinned environment. Idempotent: does nothing when constraints.txt and the
# dependency list in pyproject.toml are unchanged since the last successful install.
#
#   TORCH_SPEC       what to install as torch first (default torch==2.13.0, the CPU build here)
#   TORCH_INDEX_URL  a wheel index for a CUDA build, e.g. https://download.pytorch.org/whl/cu128 (GPU machines)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null \
  || { echo "error: Python 3.11 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2; exit 2; }

stamp=".venv/.installed-$(cat constraints.txt pyproject.toml | md5sum | cut -c1-12)"
if [ -f "$stamp" ]; then scripts/vendor_plots.sh; exit 0; fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

# torch first: any later requirement is then satisfied by this build instead of pulling another one.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
else
  .venv/bin/pip install -q "$TORCH_SPEC"
fi

# One list of dependencies (pyproject.toml), pinned by constraints.txt.
reqs=$(mktemp)
.venv/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > "$reqs"
.venv/bin/pip install -q -c constraints.txt -r "$reqs"
rm -f "$reqs" .venv/.installed-*
touch "$stamp"
scripts/vendor_plots.sh
echo "environment ready: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
