#!/usr/bin/env bash
# GPU check (<= 8 min on one GPU): images/s of the CIFAR-10 profile's UNet in bf16 through our Trainer vs a plain
# bf16 PyTorch loop (and their ratio), peak memory with ZeRO 0 and 2, and the step time of each student stage, on a
# synthetic archive in the CIFAR-10 format (nothing downloaded). Writes JSON (default benchmarks/results/gpu_check.json).
#
#   scripts/gpu_check.sh                       # on a GPU machine
#   scripts/gpu_check.sh --tiny --out /tmp/x.json   # CPU smoke run with a tiny UNet (what the test suite runs)
#   scripts/gpu_check.sh --batch 256 --steps 100
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
PY=.venv/bin/python
[ -x "$PY" ] || PY=python
exec timeout 480 "$PY" scripts/gpu_check.py "$@"
