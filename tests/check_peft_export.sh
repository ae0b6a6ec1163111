#!/usr/bin/env bash
# Runs peft_export_writer, then checks its files with tests/check_peft_export.py under Debian's
# /usr/bin/python3 with python3-torch. Without them the check is skipped, loudly.
# Usage: check_peft_export.sh WRITER SCRIPT
set -euo pipefail
writer=$1
script=$2
if ! /usr/bin/python3 -c 'import torch' >/dev/null 2>&1; then
  echo "SKIPPED check_peft_export: /usr/bin/python3 cannot import torch (install python3-torch," \
       "or run scripts/setup.sh)" >&2
  exit 0
fi
out="${TEST_TMPDIR:-$(mktemp -d)}/peft_export"
"$writer" "$out"
/usr/bin/python3 "$script" "$out"
