#!/usr/bin/env bash
# Builds the benchmarks optimised and runs them side by side with the PyTorch reference idioms
# (benchmarks/compare_torch.py, Debian's python3-torch): one table of medians and ratios.
#
#   benchmarks/compare.sh                      # all shapes, 1 and 2 threads, 5 rounds
#   benchmarks/compare.sh --json perf.json     # also write the table as JSON
#   benchmarks/compare.sh --reps 3 --quick     # faster: skips the ~30 s LLaMA r=64 torch regularizer
#   benchmarks/compare.sh --allow-reference-blas   # run even on the reference BLAS (refused
#                                                  # otherwise; the output then says so loudly)
#   benchmarks/compare.sh --max-other-cpu 0.1  # n/t limit for two-thread rows (share of a core)
#
# Numbers are only comparable within one run: the machines are shared and noisy, so the script
# measures both sides (and the triad/GEMM rooflines) in the same run and reports medians. It
# prints which BLAS torch loaded and how much CPU other processes took during the run; two-thread
# ratios disturbed by them, or by torch's OpenMP threads collapsing, are printed as n/t.
set -euo pipefail
cd "$(dirname "$0")/.."
bazel build --config=opt //benchmarks:adalora_bench
# The bazel-bin symlink follows whatever configuration was built last (possibly by another
# command); ask Bazel where the opt binary is, and run a private copy of it.
bin_dir="$(bazel info --config=opt bazel-bin)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp "$bin_dir/benchmarks/adalora_bench" "$tmp/adalora_bench"
# The Bazel server keeps working for a while after a build (about a fifth of a core here), which
# on a 2-core machine halves what the first two-thread benchmarks measure. It restarts by itself
# at the next bazel command.
bazel shutdown
# Debian's torch is installed for the system interpreter, not for whatever `python3` is first
# on PATH.
/usr/bin/python3 benchmarks/compare_torch.py --binary "$tmp/adalora_bench" "$@"
