#!/usr/bin/env bash
# The transformer example at its tiny size (--tiny: a 2-layer encoder of width 32, a slice of the
# data, few steps), twice with one cache: every output is written and consistent, the PEFT export
# re-imports to the same logits, compaction (--compact) keeps the kept ranks and the masked runs'
# results, and the second run reuses the pre-trained encoder. It does not assert that AdaLoRA
# wins, nor any timing.
set -euo pipefail
program=$1
out="${TEST_TMPDIR:-$(mktemp -d)}/transformer"
fail() { echo "transformer_test: $*" >&2; exit 1; }

"$program" --tiny --compact --out "$out" --cache "$out/cache" >"$out.stdout" 2>"$out.stderr" ||
  { cat "$out.stdout" "$out.stderr"; fail "the tiny run failed"; }
cat "$out.stdout" "$out.stderr"
grep -q "pretrain: no cached encoder" "$out.stderr" || fail "the first run should pre-train"
grep -q "^transformer: torch .* on " "$out.stderr" || fail "the BLAS torch runs on is not printed"
for f in transformer_table.md transformer_ranks.svg transformer_curves.svg \
         transformer_step_cost.md transformer_compaction.md summary.json \
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

# Compaction: per budget, orthogonality 0.1 and 0, masked and compacted at both seeds.
comp = s["compaction"]
assert [(r["budget"], r["orthogonality"]) for r in comp["runs"]] == [(2, 0.1), (2, 0.0), (8, 0.1), (8, 0.0)], comp["runs"]
for r in comp["runs"]:
    b, m, c = r["budget"], r["masked"], r["compacted"]
    assert len(m["values"]) == len(c["values"]) == 2, r
    if r["orthogonality"] == 0.1:  # the protocol's own AdaLoRA runs, reused as the masked side
        assert m["values"] == results[("adalora", b)]["values"], (m, results[("adalora", b)])
        assert m["ranks"] == results[("adalora", b)]["ranks"]
    # Compacted at PEFT's force mask, T - tfinal = 60 - 18, to exactly the masked run's kept ranks
    # (the two runs are the same until then), and trained on at those ranks.
    assert c["compacted_at"] == [42, 42] and m["compacted_at"] == [-1, -1], r
    assert c["compacted_ranks"] == m["ranks"] == c["ranks"], r
    assert r["compacted_ranks_equal_kept"] is True, r
    for ranks in c["compacted_ranks"]:
        assert len(ranks) == len(adapters) and 0 < sum(ranks) <= b * len(adapters), ranks
    # The same function after compaction: the test loss equal up to rounding (torch's products at
    # another rank may sum in another order), and so is the accuracy (one example of slack).
    for lm, lc in zip(m["test_loss"], c["test_loss"]):
        assert math.isfinite(lc) and abs(lc - lm) <= 2e-5 * max(1.0, abs(lm)), (r, lm, lc)
    for am, ac in zip(m["values"], c["values"]):
        assert abs(am - ac) <= 1 / 300 + 1e-12, (r, am, ac)
for c in comp["final_phase_cost"]:
    b = c["budget"]
    assert c["initial_triplets"] == len(adapters) * round(1.5 * b), c
    assert 0 < c["kept_triplets"] <= b * len(adapters), c
    assert abs(c["kept_fraction"] - c["kept_triplets"] / c["initial_triplets"]) < 1e-12, c
    for m in ["rank0", "masked", "compacted"]:
        assert c[m]["total_ms"] > 0 and c[m]["forward_backward_ms"] > 0, (m, c)
assert [c["budget"] for c in comp["final_phase_cost"]] == [2, 8], comp["final_phase_cost"]
print("transformer_test: summary, table, export, step cost and compaction consistent")
EOF
grep -q "| AdaLoRA | 2 |" "$out/transformer_table.md" || fail "the table has no AdaLoRA row at budget 2"
grep -q "| 8 | AdaLoRA 12 → 8, compacted | " "$out/transformer_compaction.md" ||
  fail "transformer_compaction.md has no compacted row at budget 8"

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
if "$program" --cost-only --compact-only >/dev/null 2>"$out.stderr4"; then fail "--cost-only --compact-only was accepted"; fi
grep -q "exclude each other" "$out.stderr4" || fail "no message for --cost-only --compact-only"
echo "transformer_test: ok"
