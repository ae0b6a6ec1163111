#!/usr/bin/env bash
# Runs the whole test suite with Bazel (offline), installing missing Debian packages first.
# Ends with one line "N passed, N failed" counting Catch2 test cases (and shell tests).
# Usage: scripts/test.sh [--asan] [extra bazel test arguments...]
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1

config=()
if [ "${1:-}" = "--asan" ]; then
  config=(--config=asan)
  shift
  echo "test: AddressSanitizer + UndefinedBehaviorSanitizer build"
fi

out=$(mktemp)
bazel test "${config[@]}" //... "$@" 2>&1 | tee "$out"
status=${PIPESTATUS[0]}

# Count test cases from the JUnit reports (Catch2 writes one per test binary, Bazel one per
# shell test). A target that failed without a readable report still counts as one failure.
testlogs=$(bazel info "${config[@]}" bazel-testlogs 2>/dev/null)
passed=0
failed=0
while IFS= read -r xml; do
  cases=$(grep -o '<testcase' "$xml" | wc -l)
  bad=$(grep -o '<failure\|<error' "$xml" | wc -l)
  passed=$((passed + cases - bad))
  failed=$((failed + bad))
done < <(find -L "$testlogs" -name test.xml 2>/dev/null)
failed_targets=$(grep -c ' FAILED in \| NO STATUS\| TIMEOUT in ' "$out" || true)
if [ "$status" -ne 0 ] && [ "$failed" -lt "$failed_targets" ]; then failed=$failed_targets; fi
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
rm -f "$out"
echo "${passed} passed, ${failed} failed"
exit $status
