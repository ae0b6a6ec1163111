#!/usr/bin/env bash
# Runs the libtorch example with Adam and with SGD on the quickstart's problem and checks that
# both keep the planted ranks (4, 0, 2), the same as the quickstart's own loop, and that the
# PEFT export it writes loads back.
set -euo pipefail
program=$1
out="${TEST_TMPDIR:-$(mktemp -d)}"
for optimizer in adam sgd; do
  log=$("$program" --optimizer "$optimizer" --compare --export "$out/$optimizer" 2>&1)
  echo "$log"
  for expected in "3 of 3 layers kept exactly their hidden rank" \
                  "3 of 3 layers kept the same rank as the quickstart's loop"; do
    if ! grep -qF -- "$expected" <<<"$log"; then
      echo "libtorch_finetune_test: $optimizer: expected: $expected" >&2
      exit 1
    fi
  done
  test -s "$out/$optimizer/adapter_model.safetensors"
  grep -q '"peft_type": "ADALORA"' "$out/$optimizer/adapter_config.json"
done
