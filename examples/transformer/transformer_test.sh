#!/usr/bin/env bash
# The transformer example at its tiny size (--tiny: a 2-layer encoder of width 32, a slice of the
# data, few steps), twice with one cache: every output is written and consistent, the PEFT export
# re-imports to the same logits, and the second run reuses the pre-trained encoder. It does not
# assert that AdaLoRA wins.
set -euo pipefail
program=$1
out="${TEST_TMPDIR:-$(mktemp -d)}/transformer"
fail() { echo "transformer_test: $*" >&2; exit 1; }

"$program" --tiny --out "$out" --cache "$out/cache" >"$out.stdout" 2>"$out.stderr" ||
  { cat "$out.stdout" "$out.stderr"; fail "the tiny run failed"; }
cat "$out.stdout" "$out.stderr"
grep -q "pretrain: no cached encoder" "$out.stderr" || fail "the first run should pre-train"
grep -q "^transformer: torch .* on " "$out.stderr" || fail "the BLAS torch runs on is not printed"
for f in transformer_table.md transformer_ranks.svg transformer_curves.svg \
         transformer_step_cost.md summary.json \
         transformer_adalora_peft/adapter_model.safetensors transformer_adalora_peft/adapter_config.json; do
  test -s "$out/$f" || fail "$f is missing or empty"
done
for f in transformer_ranks.svg transformer_curves.svg; do
  head -c 5 "$out/$f" | grep -q "<svg" || fail "$f is not an SVG document"
done

# The summary, the table, the rank pattern of the export and the safetensors shapes agree.
python3 - "$out" <<'EOF'
import json, struct, sys, math
out = sys.argv[1]
s = json.load(open(f"{out}/summary.json"))
task = s["tasks"][0]
assert task["classes"] == 45 and task["metric"] == "accuracy", task
adapters = task["adapters"]
assert len(adapters) == 2 * 6, adapters  # --tiny: 2 layers × q k v o f1 f2
results = {(r["method"], r["budget"]): r for r in task["results"]}
for key in [("lora", 2), ("adalora", 2), ("lora", 8), ("adalora", 8), ("full", None),
            ("svd_fixed_rank", 2), ("lora_at_adalora_ranks", 2)]:
    assert key in results, f"missing arm {key}"
width, ffn, classes = 32, 64, 45
extent = {"q": 2 * width, "k": 2 * width, "v": 2 * width, "o": 2 * width,
          "f1": width + ffn, "f2": width + ffn}
head = classes * width + classes
for (method, budget), r in results.items():
    assert len(r["values"]) == 2, (method, r["values"])  # --tiny: 2 seeds
    assert all(0 <= v <= 1 for v in r["values"]), r
    assert abs(r["mean"] - sum(r["values"]) / 2) < 1e-12, r
    if method == "adalora":
        for ranks in r["ranks"]:
            assert len(ranks) == len(adapters)
            # Never more than the budget; ties at the threshold may prune a few more.
            assert 0 < sum(ranks) <= budget * len(adapters), (budget, ranks)
            assert all(0 <= k <= budget * 3 // 2 for k in ranks), ranks
        # Trainable parameters: the kept triplets (in + out + 1 each) and the head.
        counts = [head + sum(k * (extent[a.split(".")[-1]] + 1) for a, k in zip(adapters, ranks))
                  for ranks in r["ranks"]]
        assert r["params"] == round(sum(counts) / len(counts)), (r["params"], counts)
    if method == "lora":
        assert all(all(k == budget for k in ranks) for ranks in r["ranks"]), r["ranks"]
        assert r["params"] == head + budget * sum(extent[a.split(".")[-1]] for a in adapters), r
    if method == "lora_at_adalora_ranks":
        assert r["ranks"] == results[("adalora", budget)]["ranks"], "not AdaLoRA's ranks"

# The PEFT export: its rank pattern is seed 0's ranks at the low budget, its tensors are resized.
trip = s["peft_round_trip"]
assert trip["same_predictions"] == trip["examples"] > 0, trip
assert trip["max_abs_logit_difference"] <= 1e-5 * max(1.0, trip["max_abs_logit"]), trip
config = json.load(open(f"{out}/transformer_adalora_peft/adapter_config.json"))
assert config["peft_type"] == "ADALORA" and config["init_r"] == 3 and config["target_r"] == 2, config
kept = {k[: -len(".lora_E")]: sum(v) for k, v in config["rank_pattern"].items()}
assert [kept[a] for a in adapters] == results[("adalora", 2)]["ranks"][0], (kept, adapters)
with open(f"{out}/transformer_adalora_peft/adapter_model.safetensors", "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
for a in adapters:
    k = kept[a]
    e = header[f"base_model.model.{a}.lora_E"]["shape"]
    assert e == [k, 1], (a, e, k)

# The step cost: four models per budget, every phase timed.
costs = s["step_cost"]
assert [c["budget"] for c in costs] == [2, 8], costs
for c in costs:
    for m in ["lora", "lora_initial_rank", "adalora", "peft_style"]:
        assert c[m]["total_ms"] > 0 and c[m]["forward_backward_ms"] > 0, (m, c[m])
    assert c["adalora"]["allocator_ms"] > 0 and c["peft_style"]["allocator_ms"] > 0, c
assert s["pretraining"]["reused"] is False
print("transformer_test: summary, table, export and step cost consistent")
EOF
grep -q "| AdaLoRA | 2 |" "$out/transformer_table.md" || fail "the table has no AdaLoRA row at budget 2"

# Second run, same cache: the encoder is reused, not trained again.
"$program" --tiny --seeds 1 --no-ablations --cost-steps 0 --out "$out/again" --cache "$out/cache" \
  >"$out.stdout2" 2>"$out.stderr2" || { cat "$out.stderr2"; fail "the second run failed"; }
grep -q "pretrain: REUSED the cached pre-trained encoder" "$out.stderr2" ||
  { cat "$out.stderr2"; fail "the second run did not reuse the cache"; }
python3 -c "import json,sys; assert json.load(open(sys.argv[1]))['pretraining']['reused'] is True" \
  "$out/again/summary.json" || fail "summary.json does not say the encoder was reused"

# Bad flags are refused with a message.
if "$program" --budgets 0 >/dev/null 2>"$out.stderr3"; then fail "--budgets 0 was accepted"; fi
grep -q "budget must be >= 1" "$out.stderr3" || fail "no message for --budgets 0"
echo "transformer_test: ok"
