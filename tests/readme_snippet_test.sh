#!/usr/bin/env bash
# The README's "Use it in 20 lines" program, compiled exactly as the page shows it (the first
# ```cpp block of that section) with the project's warnings as errors, and run: the quick start
# cannot drift from the code. Run by Bazel (sh_test //tests:readme_snippet_test) or by hand.
set -euo pipefail

if [[ -n "${TEST_SRCDIR:-}" ]]; then
  root="$TEST_SRCDIR/${TEST_WORKSPACE:-adalora}"
else
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
work="${TEST_TMPDIR:-$(mktemp -d)}"

# From the section's heading to the end of its first cpp block.
awk '/^## Use it in /{section=1; next}
     section && /^```cpp$/{code=1; next}
     code && /^```$/{exit}
     code{print}' "$root/README.md" >"$work/readme_snippet.cpp"
lines=$(wc -l <"$work/readme_snippet.cpp")
if (( lines < 10 )); then
  echo "readme_snippet_test: found only $lines lines of code under '## Use it in' in README.md" >&2
  exit 1
fi
echo "readme_snippet_test: $lines lines of code from README.md"

/usr/bin/g++ -std=c++20 -O1 -Wall -Wextra -Wpedantic -Werror -ffp-contract=off -I"$root" \
  "$work/readme_snippet.cpp" -o "$work/readme_snippet" -pthread
"$work/readme_snippet"
echo "readme_snippet_test: compiled and ran"
