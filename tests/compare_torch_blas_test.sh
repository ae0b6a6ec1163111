#!/usr/bin/env bash
# Runs tests/compare_torch_blas_test.py (benchmarks/compare_torch.py's BLAS detection, its refusal
# of the reference BLAS and its CPU accounting) under Debian's /usr/bin/python3 with
# python3-torch. Without them the check is skipped, loudly.
# Usage: compare_torch_blas_test.sh TEST_SCRIPT COMPARE_TORCH_SCRIPT
set -euo pipefail
if ! /usr/bin/python3 -c 'import torch' >/dev/null 2>&1; then
  echo "SKIPPED compare_torch_blas_test: /usr/bin/python3 cannot import torch (install" \
       "python3-torch, or run scripts/setup.sh)" >&2
  exit 0
fi
/usr/bin/python3 "$1" "$2"
