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
expect_status 2 "--orth-weight expects a number >= 0, got '-1'" --orth-weight -1
expect_status 2 "--compact takes no value" --compact=1
expect_status 2 "--growth is an experiment on the planted task" --growth --task fashion-mnist
expect_status 1 "dataset-fashion-mnist" --task fashion-mnist --data-dir "$out/no-such-dir" --out "$out"

# Part 1, planted ranks, with the ablations.
"$finetune" --task planted --steps 40 --seeds 1 --budgets 2 --ablations --out "$out" \
  --summary-json "$out/planted.json" >"$log" 2>&1 || { cat "$log"; fail "planted run failed"; }
cat "$log"
for row in "| planted |" "| LoRA at AdaLoRA's ranks | 2 |" "| SVD form, no pruning | 2 |"; do
  grep -qF "$row" "$log" || fail "the planted table has no row $row"
done
"$check" planted "$out" "$out/planted.json" || fail "planted outputs"

# Compaction at budget 1 (7 triplets for 7 matrices: some matrices keep none, so rank-0 adapters
# train on) with the regularizer off: check_outputs holds the compacted runs' test loss to the
# masked runs' up to rounding, and their ranks to AdaLoRA's.
"$finetune" --task planted --steps 60 --seeds 2 --budgets 1 --compact --orth-weight 0 \
  --out "$out/compact" --summary-json "$out/compact.json" >"$log" 2>&1 ||
  { cat "$log"; fail "--compact run failed"; }
cat "$log"
grep -qF "compaction: largest relative test-loss difference" "$log" || fail "no compaction report"
"$check" planted "$out/compact" "$out/compact.json" || fail "--compact outputs"
ranks=$(awk -F'|' '$2 == " 1 " { print $(NF - 1) }' "$out/compact/planted_compaction.md")
[[ " $ranks " == *" 0 "* ]] || fail "no matrix compacted to rank 0 at budget 1 (ranks '$ranks')"

# Growth: from rank 2, at a constant total (budget 2) and a rising one (budget 3); check_outputs
# holds every growing run's total to its budget. The planted ranks differ from 2 everywhere but
# fc5, so rank that never moved is a failure.
"$finetune" --task planted --steps 100 --seeds 1 --budgets 2,3 --growth --grow-interval 10 \
  --out "$out/growth" --summary-json "$out/growth.json" >"$log" 2>&1 ||
  { cat "$log"; fail "--growth run failed"; }
cat "$log"
"$check" planted_growth "$out/growth" "$out/growth.json" || fail "--growth outputs"
grown=$(awk -F'|' '$2 == " growing AdaLoRA from rank 2 " && $3 == " 2 " { print $(NF - 1) }' \
  "$out/growth/planted_growth_table.md")
[ -n "$grown" ] || fail "the growth table has no row for growing AdaLoRA at budget 2"
[ "$grown" != " 2 2 2 2 2 2 2 " ] || fail "growth moved no rank"

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
