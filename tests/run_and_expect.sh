#!/usr/bin/env bash
# Runs a program and checks that its output contains an expected line.
# Usage: run_and_expect.sh PROGRAM 'expected text' [program arguments...]
set -uo pipefail
program=$1
expected=$2
shift 2
output=$("$program" "$@" 2>&1)
status=$?
echo "$output"
if [ $status -ne 0 ]; then
  echo "run_and_expect: $program exited with status $status" >&2
  exit 1
fi
if ! grep -qF -- "$expected" <<<"$output"; then
  echo "run_and_expect: expected output to contain: $expected" >&2
  exit 1
fi
