#!/usr/bin/env bash
# The GPU check in one call (see bench/gpu_check.py): Triton parity compiled for real, the kernel
# benchmarks against their peers, one short epoch per method; writes bench/results/<gpu>/ stage by
# stage and finishes within its time budget (--budget-s, default 420 s). On a fresh GPU machine:
#
#   pip install --no-deps --no-build-isolation -e .   # torch with CUDA, triton, pluggy, pytest-benchmark present
#   bench/gpu_check.sh
#
# `bench/gpu_check.sh --dry` runs the same stages on the CPU (Triton interpreter, tiny sizes).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu_check.py "$@"
