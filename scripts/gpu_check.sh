#!/usr/bin/env bash
# pcamx's GPU check, one prepared command for a short GPU window: `make gpu-check` or
#   scripts/gpu_check.sh [--quick] [--dry-run] [--out DIR] [--wheels DIR]
# (the steps and their time boxes: scripts/gpu_check.py). On the GPU machine, which reaches no package
# registry, carry the wheels of `make gpu-wheels` (.whl) with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
