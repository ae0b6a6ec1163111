#!/usr/bin/env bash
# Builds (optimised) and runs the demo, installing missing Debian packages first.
# Usage: scripts/demo.sh [demo arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec bazel run --config=opt //examples:demo -- "$@"
