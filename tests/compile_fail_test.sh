#!/usr/bin/env bash
# "Must not compile" tests. Each tests/compile_fail/*.cpp says what the compiler must do with it:
#   // expect-error: <text>    (one or more lines) compilation fails and its output contains
#                              every <text>: the refusal is the one we mean, with its message;
#   // expect: compiles        compilation succeeds. This control proves that the include paths
#                              and the harness work, so the failures above are real refusals.
# Run by Bazel (sh_test //tests:compile_fail_test) or by hand from the repository root.
set -uo pipefail

if [[ -n "${TEST_SRCDIR:-}" ]]; then
  # Under Bazel the snippets and headers are in the runfiles tree, at the workspace's root.
  root="$TEST_SRCDIR/${TEST_WORKSPACE:-adalora}"
else
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
work="${TEST_TMPDIR:-$(mktemp -d)}"

# The system compiler and the Debian include paths the WORKSPACE's repositories point at.
cxx=/usr/bin/g++
flags=(-std=c++20 -fsyntax-only -Wall -Wextra -Wpedantic -Werror
       -I"$root" -isystem /usr/include/eigen3)

shopt -s nullglob
snippets=("$root"/tests/compile_fail/*.cpp)
if (( ${#snippets[@]} < 2 )); then
  echo "compile_fail_test: found ${#snippets[@]} snippet(s) under $root/tests/compile_fail" >&2
  exit 1
fi

# Parse every snippet, each in the background: they are independent and parsing dominates.
# LC_ALL=C keeps the compiler's quotes ASCII, so the expected texts are stable.
for snippet in "${snippets[@]}"; do
  name="$(basename "$snippet" .cpp)"
  ( LC_ALL=C "$cxx" "${flags[@]}" "$snippet" >"$work/$name.log" 2>&1; echo $? >"$work/$name.rc" ) &
done
wait

passed=0
failed=0
for snippet in "${snippets[@]}"; do
  name="$(basename "$snippet" .cpp)"
  rc="$(cat "$work/$name.rc")"
  log="$work/$name.log"
  mapfile -t expected < <(sed -n 's|^// expect-error: ||p' "$snippet")
  compiles=$(grep -c '^// expect: compiles$' "$snippet")
  problem=""
  if (( compiles > 0 && ${#expected[@]} > 0 )) || (( compiles == 0 && ${#expected[@]} == 0 )); then
    problem="needs either '// expect: compiles' or '// expect-error: <text>' lines, not both"
  elif (( compiles > 0 )); then
    (( rc == 0 )) || problem="expected to compile, but the compiler failed (exit $rc)"
  elif (( rc == 0 )); then
    problem="expected a compile error, but it compiled"
  else
    for text in "${expected[@]}"; do
      grep -qF -- "$text" "$log" || problem+="${problem:+; }missing \"$text\""
    done
  fi
  if [[ -z "$problem" ]]; then
    echo "PASS $name"
    passed=$((passed + 1))
  else
    echo "FAIL $name: $problem"
    sed 's/^/    | /' "$log" | head -n 40
    failed=$((failed + 1))
  fi
done

echo "$passed passed, $failed failed"
(( failed == 0 ))
