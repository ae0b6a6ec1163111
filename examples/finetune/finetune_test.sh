#!/usr/bin/env bash
# Runs the fine-tuning demo at a tiny size and checks what it prints and writes.
# Usage: finetune_test.sh FINETUNE CHECK_OUTPUTS
set -uo pipefail
finetune=$1
check=$2
out=${TEST_TMPDIR:-$(mktemp -d)}/finetune_out
log=$out.log
fail() {
  echo "finetune_test: FAIL: $*" >&2
  exit 1
}

# Flags: a mistake is exit status 2 with a message, --help is 0.
expect_status() {
  local want=$1 text=$2
  shift 2
  "$finetune" "$@" >"$log" 2>&1
  local got=$?
  [ "$got" -eq "$want" ] || { cat "$log"; fail "'$*' exited with $got, expected $want"; }
  grep -qF -- "$text" "$log" || { cat "$log"; fail "'$*' did not print: $text"; }
}
expect_status 0 "usage: finetune" --help
expect_status 2 "unknown flag '--bogus'" --bogus
expect_status 2 "--steps expects an integer" --steps 12x
expect_status 2 "--budgets expects an integer in 1..7, got '9'" --budgets 1,9
expect_status 2 "--task must be planted, fashion-mnist or all" --task mnist
expect_status 2 "--seeds needs a value" --seeds
expect_status 1 "dataset-fashion-mnist" --task fashion-mnist --data-dir "$out/no-such-dir" --out "$out"

# Part 1, planted ranks, with the ablations.
"$finetune" --task planted --steps 40 --seeds 1 --budgets 2 --ablations --out "$out" \
  --summary-json "$out/planted.json" >"$log" 2>&1 || { cat "$log"; fail "planted run failed"; }
cat "$log"
for row in "| planted |" "| LoRA at AdaLoRA's ranks | 2 |" "| SVD form, no pruning | 2 |"; do
  grep -qF "$row" "$log" || fail "the planted table has no row $row"
done
"$check" planted "$out" "$out/planted.json" || fail "planted outputs"

# Part 2, Fashion-MNIST, where Debian's dataset-fashion-mnist is installed.
data=/usr/share/datasets/fashion-mnist
if [ -f "$data/train-images-idx3-ubyte.gz" ]; then
  "$finetune" --task fashion-mnist --steps 20 --seeds 1 --budgets 2 --pretrain-steps 20 \
    --out "$out" --summary-json "$out/fashion.json" >"$log" 2>&1 ||
    { cat "$log"; fail "fashion-mnist run failed"; }
  cat "$log"
  "$check" fashion-mnist "$out" "$out/fashion.json" || fail "fashion-mnist outputs"
else
  echo "SKIP: the fashion-mnist part: $data is missing (install Debian's dataset-fashion-mnist)"
fi
echo "finetune_test: PASS"
