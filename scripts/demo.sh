#!/usr/bin/env bash
# Builds (optimised) and runs the demo, examples/finetune: part 1, a planted-rank problem with a
# known answer, then part 2, Fashion-MNIST. Installs missing Debian packages first, the dataset
# (dataset-fashion-mnist) included. Pictures, tables, rank history and a JSON summary go to
# out/demo/.
# Usage: scripts/demo.sh [finetune flags...]   (see --help; e.g. --seeds 1 for a quicker look)
#
# With --task transformer it runs examples/transformer instead: a transformer pre-trained on
# GCIDE (cached in out/transformer/cache after the first run), fine-tuned on WordNet with full
# fine-tuning, LoRA and AdaLoRA, and the cost of a step. Outputs in out/transformer/.
# Usage: scripts/demo.sh --task transformer [transformer flags...]   (e.g. --seeds 1)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if [ "${1:-}" = "--task" ] && [ "${2:-}" = "transformer" ]; then
  shift 2
  scripts/setup.sh
  bazel build --config=opt //examples/transformer:transformer
  bazel-bin/examples/transformer/transformer --out out/transformer "$@"
  echo "demo: $(($(date +%s) - start)) s wall time in all, build included"
  exit 0
fi
scripts/setup.sh dataset-fashion-mnist
bazel build --config=opt //examples/finetune:finetune
out=out/demo
bazel-bin/examples/finetune/finetune --task all --out "$out" "$@"
echo "demo: pictures in $out/: planted_ranks.svg, planted_curves.svg, fashion-mnist_ranks.svg," \
  "fashion-mnist_curves.svg (tables: *_table.md, rank history: *_rank_history.csv)"
echo "demo: $(($(date +%s) - start)) s wall time in all, build included"
