#!/usr/bin/env bash
# Builds every libFuzzer target under tests/fuzz with Debian's clang (AddressSanitizer +
# UndefinedBehaviorSanitizer, outside Bazel) and runs each for a bounded time on a copy of its
# seed corpus (tests/fuzz/corpus/<target>/, which it never modifies). Fails on any crash, leak,
# sanitizer report, timeout or uncaught exception, and keeps the input that caused it.
# The last line is "N passed, N failed", one test case per fuzz target, as scripts/test.sh's.
# The mutation sequence is fixed (FUZZ_SEED, default 1) so that CI is reproducible: a run that
# fails fails again on the same commit, given as many inputs. Set FUZZ_SEED=0 for a random seed
# when hunting for new findings with a longer time.
# Usage: tests/fuzz/run_fuzzers.sh [seconds per target, default 60]
set -uo pipefail
cd "$(dirname "$0")/../.."

seconds=${1:-60}
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: tests/fuzz/run_fuzzers.sh [seconds per target, default 60]" >&2
  exit 2
fi
if ! scripts/setup.sh clang libclang-rt-14-dev; then
  echo "fuzz: clang and libFuzzer (libclang-rt-14-dev) are missing and could not be installed"
  echo "0 passed, 1 failed"
  exit 1
fi
cxx=${FUZZ_CXX:-clang++}
seed=${FUZZ_SEED:-1}
artifacts=${FUZZ_ARTIFACTS:-/tmp/adalora-fuzz-artifacts}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# clang's "undefined" group includes float-cast-overflow (g++'s does not; .bazelrc adds it there).
flags=(-std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
       -ffp-contract=off -Wall -Wextra -Werror -I.)

targets=()
for src in tests/fuzz/*_fuzz.cpp; do targets+=("$(basename "$src" .cpp)"); done
echo "fuzz: ${#targets[@]} targets (${targets[*]}), ${seconds} s each, seed ${seed}, with $($cxx --version | head -n 1)"

passed=0
failed=0
for t in "${targets[@]}"; do
  echo "fuzz: building $t: $cxx ${flags[*]} tests/fuzz/$t.cpp"
  if ! $cxx "${flags[@]}" "tests/fuzz/$t.cpp" -o "$work/$t" 2>"$work/$t.build.log"; then
    cat "$work/$t.build.log"
    echo "fuzz: $t FAILED to build"
    failed=$((failed + 1))
    continue
  fi
  seeds=()
  count=0
  if [ -d "tests/fuzz/corpus/$t" ]; then
    seeds=("tests/fuzz/corpus/$t")
    count=$(find "tests/fuzz/corpus/$t" -type f | wc -l)
  fi
  # JSON readers get inputs large enough to nest 100,000 deep (their seeds have such 200 KB
  # documents); the others keep libFuzzer's default, which follows the largest seed.
  max_len=()
  case "$t" in
    rank_pattern_json_fuzz | peft_config_fuzz | safetensors_fuzz) max_len=(-max_len=262144) ;;
  esac
  mkdir -p "$work/$t.corpus" "$artifacts"
  echo "fuzz: running $t for ${seconds} s on $count seeds in tests/fuzz/corpus/$t ${max_len[*]}"
  # New inputs go to the first (scratch) corpus directory; the seeds are only read.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    "$work/$t" -seed="$seed" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    "${max_len[@]}" -artifact_prefix="$artifacts/$t-" "$work/$t.corpus" "${seeds[@]}" >"$work/$t.log" 2>&1
  rc=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || true)
  cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -n 1 || true)
  if [ "$rc" -eq 0 ] && ! grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:' "$work/$t.log"; then
    echo "fuzz: $t ok: ${runs:-?} inputs in ${seconds} s, ${cov:-cov: ?} edges, no crash, leak or sanitizer report"
    passed=$((passed + 1))
  else
    tail -n 60 "$work/$t.log"
    echo "fuzz: $t FAILED (exit $rc); the input is kept under $artifacts/$t-*"
    failed=$((failed + 1))
  fi
done
echo "fuzz: $passed of ${#targets[@]} targets ran clean"
echo "${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
