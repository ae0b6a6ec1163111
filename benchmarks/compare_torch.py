#!/usr/bin/python3
"""Side-by-side: adalora's benchmark binary and the PyTorch reference idioms, in one run.

Run it with Debian's python3-torch (/usr/bin/python3), normally through benchmarks/compare.sh,
which builds the binary with --config=opt first:

    benchmarks/compare.sh [--reps N] [--threads 1,2] [--json PATH] [--quick]

What is compared, per benchmark shape (DeBERTaV3-base r=12, LLaMA-7B r=8 and r=64):
  importance_update  PEFT RankAllocator.update_ipt: per parameter, ipt = (p*g).abs(), then the
                     two EMAs, each a fresh tensor (docs/algorithm.md §4).
  allocator_step     update_ipt + mask_to_budget: per-parameter element scores, means over
                     dim 1 (A) / dim 0 (B), the concatenated triplet scores, torch.kthvalue and
                     masked_fill_ on E (docs/algorithm.md §4-§6), pruning to half the initial budget.
  orthogonality      torch autograd of the regularizer, sum of ||A A^T - I||_F and
                     ||B^T B - I||_F over all adapters (docs/algorithm.md §8), value + backward.
against the binary's allocator_step / importance_update and its orthogonality regularizer with
the Eigen kernel. The same thread count is used on both sides (torch.set_num_threads).

Timing: per shape, both sides are sampled in --reps rounds (one repetition of each of our
benchmarks, then one call of each torch operation), and each figure is the median of its
rounds, so that the shared machine's drift over minutes reaches both sides alike; a torch
operation slower than 10 s per call is timed in two rounds only (LLaMA r=64 regularizer). The
adapter benchmarks run last, in --reps rounds of their own (one process each, the benchmarks in
random order). The JSON rows hold, per shape, operation and thread count:
  ours_ms, torch_ms   medians;
  ratio               torch_ms / ours_ms (how many times faster adalora is);
  triad_fraction      adalora's bytes/s over the STREAM triad measured by the same binary in the
                      same run (24 bytes per parameter for the allocator; 16 per element of A
                      and B for the regularizer);
  gemm_fraction       (regularizer) its FLOP/s over Eigen's SGEMM rate measured likewise;
  roofline_ms         the time at the roofline (bytes at the triad rate; for the regularizer the
                      larger of that and its FLOPs at the SGEMM rate);
The "adapter" list holds the adapter forward/backward at full and half rank (ours only, the
binary's adapter_pair benchmarks: both adapters in alternation, each pass timed), with
  full_rank_ms, half_rank_ms     medians over the rounds of the mean time per pass;
  half_over_full      the median over the rounds of each round's half / full (their sums over the
                      same seconds), and half_over_full_min / _max, its range over the rounds;
  gemm_fraction       the full-rank pass's FLOP/s over Eigen's SGEMM rate;
  io_floor_ms         the memory traffic on the batch tensors that no rank changes (forward: read
                      x, read and write y; backward: read x and dy, read and write dx), measured
                      as the same traffic with one add per element.

The PyTorch idioms below are written from the description in docs/algorithm.md §4-§8, not copied.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

BETA1 = 0.85
BETA2 = 0.85


def model_shapes(name):
    """(in_features, out_features, r) of every adapted weight, in the binary's order."""
    if name == "deberta_r12":
        layer = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]
        return [(i, o, 12) for _ in range(12) for (i, o) in layer]
    r = {"llama_r8": 8, "llama_r64": 64}[name]
    layer = [(4096, 4096)] * 4 + [(4096, 11008), (4096, 11008), (11008, 4096)]
    return [(i, o, r) for _ in range(32) for (i, o) in layer]


SHAPES = ["deberta_r12", "llama_r8", "llama_r64"]


def parameters(shape):
    return sum(r * (i + 1 + o) for (i, o, r) in model_shapes(shape))


def gram_elements(shape):
    return sum(r * (i + o) for (i, o, r) in model_shapes(shape))


def gram_flops(shape):
    """Symmetric Gram r(r+1)c plus gradient 2r^2 c per matrix (c = in for A, out for B^T)."""
    return sum(r * (r + 1) * (i + o) + 2 * r * r * (i + o) for (i, o, r) in model_shapes(shape))


# ---- the PyTorch side ---------------------------------------------------------------------------


class peft_idiom:
    """The PEFT RankAllocator idiom: one tensor op per parameter and step."""

    def __init__(self, shape):
        torch.manual_seed(0)
        self.adapters = []
        for (i, o, r) in model_shapes(shape):
            tensors = {}
            for role, size in (("A", (r, i)), ("E", (r, 1)), ("B", (o, r))):
                p = (torch.rand(size) * 0.07 - 0.035)
                p.grad = torch.rand(size) * 2e-3 - 1e-3
                tensors[role] = p
            self.adapters.append(tensors)
        self.ipt = {}
        self.exp_avg_ipt = {}
        self.exp_avg_unc = {}
        for k, t in enumerate(self.adapters):
            for role, p in t.items():
                self.exp_avg_ipt[(k, role)] = torch.zeros_like(p)
                self.exp_avg_unc[(k, role)] = torch.zeros_like(p)
        self.init_bgt = sum(r for (_, _, r) in model_shapes(shape))

    @torch.no_grad()
    def update_ipt(self):
        for k, t in enumerate(self.adapters):
            for role, p in t.items():
                key = (k, role)
                self.ipt[key] = (p * p.grad).abs().detach()
                self.exp_avg_ipt[key] = BETA1 * self.exp_avg_ipt[key] + (1 - BETA1) * self.ipt[key]
                self.exp_avg_unc[key] = (BETA2 * self.exp_avg_unc[key] +
                                         (1 - BETA2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs())

    def element_score(self, key):
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @torch.no_grad()
    def mask_to_budget(self, budget):
        all_scores = []
        triplet = []
        for k in range(len(self.adapters)):
            score_a = torch.mean(self.element_score((k, "A")), dim=1, keepdim=True)
            score_b = torch.mean(self.element_score((k, "B")), dim=0, keepdim=False).view(-1, 1)
            score_e = self.element_score((k, "E"))
            ab = torch.cat([score_a, score_b], dim=1)
            s = ab.sum(dim=1, keepdim=False) + score_e.view(-1)
            triplet.append(s.view(-1, 1))
            all_scores.append(s.view(-1))
        threshold = torch.kthvalue(torch.cat(all_scores), k=self.init_bgt - budget)[0].item()
        for k, t in enumerate(self.adapters):
            t["E"].masked_fill_(triplet[k] <= threshold, 0.0)

    def step(self):
        self.update_ipt()
        self.mask_to_budget(self.init_bgt // 2)


class torch_regularizer:
    """PEFT's orthogonality regularizer under autograd (AdaLoraModel.forward's loop)."""

    def __init__(self, shape):
        torch.manual_seed(1)
        self.params = []
        for (i, o, r) in model_shapes(shape):
            a = (torch.rand(r, i) * 0.07 - 0.035).requires_grad_()
            b = (torch.rand(o, r) * 0.07 - 0.035).requires_grad_()
            self.params.append((a, b))

    def value_and_gradient(self):
        regu_loss = 0
        num_param = 0
        for a, b in self.params:
            for cov in (a @ a.T, b.T @ b):
                eye = torch.eye(cov.size(0))
                regu_loss = regu_loss + torch.norm(cov - eye, p="fro")
                num_param += 1
        loss = 0.5 * (regu_loss / num_param)
        loss.backward()
        return loss.item()


def time_torch(fn, reps, warm_up=True):
    if warm_up:
        fn()  # allocator caches, first-touch
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if times[-1] > 10.0 and len(times) >= 2:
            break
    return statistics.median(times) * 1e3


# ---- our side -----------------------------------------------------------------------------------


def run_binary(binary, reps, filt, interleave=False):
    """Runs the binary; its console lines go to stderr as they come (progress), the JSON to a
    temporary file. With interleave, the selected benchmarks (and their repetitions) run in
    random order, so that a burst of load on this shared machine spreads over all of them instead
    of always skewing the same one."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ours.json")
        cmd = [binary, f"--benchmark_out={out}", "--benchmark_out_format=json",
               f"--benchmark_repetitions={reps}", "--benchmark_report_aggregates_only=true",
               f"--benchmark_filter={filt}"]
        if interleave:
            cmd.append("--benchmark_enable_random_interleaving=true")
        print("running:", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        with open(out) as f:
            data = json.load(f)
    medians = {}
    for b in data["benchmarks"]:
        # With one repetition Google Benchmark reports no aggregates: the run is its own median.
        if b.get("aggregate_name") != "median" and not (reps == 1 and b.get("run_type") == "iteration"):
            continue
        name = "/".join(part for part in b["run_name"].split("/")
                        if not part.startswith(("min_time:", "manual_time", "real_time")))
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
        medians[name] = dict(b, ms=b["real_time"] * scale)
    return data["context"], medians


# ---- main ---------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", required=True,
                    help="the adalora benchmark binary, built with --config=opt (compare.sh "
                         "passes it)")
    ap.add_argument("--reps", type=int, default=5,
                    help="rounds per shape and of the adapter benchmarks; figures are their medians")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--json", help="write the table as JSON here")
    ap.add_argument("--quick", action="store_true",
                    help="skip the LLaMA r=64 torch regularizer (~20-40 s per call)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {', '.join(unknown)}; the shapes are {', '.join(SHAPES)}")

    # Both sides are sampled in rounds, per shape: one repetition of each of our benchmarks of
    # the shape, then one call of each torch operation, --reps times; each figure is the median
    # of its rounds. The machines are shared and their speed drifts over minutes: measuring one
    # side entirely before the other put the drift into the ratios (two runs of the same
    # binaries gave 10x and 6x at DeBERTa). The rooflines are measured by every binary run; the
    # table uses their medians too.
    ours_samples, torch_samples, contexts = {}, {}, []
    rounds = max(args.reps, 1)
    for shape in shapes:
        idiom = peft_idiom(shape)
        reg = None if args.quick and shape == "llama_r64" else torch_regularizer(shape)
        for rnd in range(rounds):
            print(f"round {rnd + 1}/{rounds}: {shape}", file=sys.stderr, flush=True)
            context, ours = run_binary(args.binary, 1, f"/{shape}/")
            contexts.append(context)
            for key, v in ours.items():
                ours_samples.setdefault(key, []).append(v)
            for t in threads:
                torch.set_num_threads(t)
                for op, fn in (("importance_update", idiom.update_ipt), ("allocator_step", idiom.step)):
                    torch_samples.setdefault(f"{op}/{shape}/threads:{t}", []).append(
                        time_torch(fn, 1, warm_up=rnd == 0))
            # The regularizer is single-threaded on our side; torch gets 1 thread too. Calls over
            # 10 s (LLaMA r = 64) are timed in the first two rounds only.
            torch.set_num_threads(1)
            key = f"orthogonality/{shape}"
            if reg is not None and (rnd < 2 or torch_samples[key][-1] < 10e3):
                torch_samples.setdefault(key, []).append(
                    time_torch(reg.value_and_gradient, 1, warm_up=rnd == 0))
        del idiom, reg
    # The adapter benchmarks (ours only, small fixtures), in rounds of their own, one process each:
    # adapter_pair runs the full- and the half-rank adapter in alternation and reports both times
    # and their ratio over the same seconds; the memory-traffic floors beside them. Separate
    # full- and half-rank benchmarks compared different moments of a drifting machine: the same
    # binary's DeBERTa forward gave half/full from 43% to 65% in consecutive processes.
    adapter_samples = {}
    for rnd in range(rounds):
        print(f"round {rnd + 1}/{rounds}: adapters", file=sys.stderr, flush=True)
        context, adapters = run_binary(args.binary, 1, "adapter_(pair|io_floor)/", interleave=True)
        contexts.append(context)
        for key, v in adapters.items():
            adapter_samples.setdefault(key, []).append(v)

    def median_of(samples):
        """The median sample (by time) of a list of Google Benchmark results."""
        return sorted(samples, key=lambda b: b["ms"])[len(samples) // 2]

    ours = {key: median_of(v) for key, v in ours_samples.items()}
    torch_ms_of = {key: statistics.median(v) for key, v in torch_samples.items()}
    triad = {t: statistics.median(float(c[f"triad_{t}thread{'s' if t > 1 else ''}_GBps"])
                                  for c in contexts) * 1e9 for t in (1, 2)}
    sgemm = statistics.median(float(c["eigen_sgemm_GFLOPs"]) for c in contexts) * 1e9
    dgemm = statistics.median(float(c["eigen_dgemm_GFLOPs"]) for c in contexts)

    rows = []
    for shape in shapes:
        for t in threads:
            for op in ("importance_update", "allocator_step"):
                key = f"{op}/{shape}/threads:{t}"
                if key not in ours:
                    print(f"note: {key} not in the binary (no threads option?)", file=sys.stderr)
                    continue
                torch_ms = torch_ms_of[key]
                ours_ms = ours[key]["ms"]
                rows.append({
                    "shape": shape, "operation": op, "threads": t,
                    "ours_ms": ours_ms, "torch_ms": torch_ms, "ratio": torch_ms / ours_ms,
                    "triad_fraction": 24.0 * parameters(shape) / (ours_ms * 1e-3) / triad[t],
                    "roofline_ms": 24.0 * parameters(shape) / triad[t] * 1e3,
                })
        torch_ms = torch_ms_of.get(f"orthogonality/{shape}")
        for kernel in ("eigen", "eigen_f64acc", "portable"):
            key = f"orthogonality/{shape}/{kernel}"
            if key not in ours:
                continue
            ours_ms = ours[key]["ms"]
            rows.append({
                "shape": shape, "operation": f"orthogonality_{kernel}", "threads": 1,
                "ours_ms": ours_ms, "torch_ms": torch_ms,
                "ratio": torch_ms / ours_ms if torch_ms else None,
                "triad_fraction": 16.0 * gram_elements(shape) / (ours_ms * 1e-3) / triad[1],
                "gemm_fraction": ours[key]["FLOP/s"] / sgemm,
                # The floor: the larger of the memory time (16 bytes per element of A and B at
                # the triad rate) and the compute time (symmetric Gram + gradient at Eigen's
                # measured SGEMM rate).
                "roofline_ms": max(16.0 * gram_elements(shape) / triad[1],
                                   gram_flops(shape) / sgemm) * 1e3,
            })

    # Adapter forward/backward: ours only; the half-rank cost relative to full rank.
    adapter_rows = []
    for key, samples in sorted(adapter_samples.items()):
        if not key.startswith("adapter_pair/"):
            continue
        _, op, shape, impl = key.split("/")
        io = adapter_samples.get(f"adapter_io_floor/{op}/{shape}")
        ratios = sorted(b["half_over_full"] for b in samples)
        adapter_rows.append({
            "shape": shape, "operation": f"adapter_{op}_{impl}", "threads": 1,
            "full_rank_ms": statistics.median(b["full_ms"] for b in samples),
            "half_rank_ms": statistics.median(b["half_ms"] for b in samples),
            "half_over_full": statistics.median(ratios),
            "half_over_full_min": ratios[0], "half_over_full_max": ratios[-1],
            "gemm_fraction": statistics.median(b["full_FLOP/s"] for b in samples) / sgemm,
            "io_floor_ms": statistics.median(b["ms"] for b in io) if io else None,
        })

    machine = {
        "triad_1thread_GBps": triad[1] / 1e9, "triad_2threads_GBps": triad[2] / 1e9,
        "eigen_sgemm_GFLOPs": sgemm / 1e9,
        "eigen_dgemm_GFLOPs": dgemm,
        "load_avg": list(os.getloadavg()), "torch": torch.__version__,
        "reps": args.reps,
    }
    print_table(machine, rows, adapter_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows, "adapter": adapter_rows}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)


def fmt(x, spec, scale=1.0, suffix=""):
    """x formatted with spec (after multiplying by scale), or '-' where there is no value."""
    if x is None:
        width = spec.split(".")[0]
        return format("-", width) + " " * len(suffix)
    return format(x * scale, spec) + suffix


def print_table(machine, rows, adapter_rows):
    print(f"machine: STREAM triad {machine['triad_1thread_GBps']:.1f} GB/s (1 thread), "
          f"{machine['triad_2threads_GBps']:.1f} GB/s (2 threads); Eigen SGEMM "
          f"{machine['eigen_sgemm_GFLOPs']:.1f} GFLOP/s, DGEMM {machine['eigen_dgemm_GFLOPs']:.1f}; "
          f"torch {machine['torch']}; medians of {machine['reps']}; "
          f"load average {machine['load_avg'][0]:.2f}")
    print()
    print(f"{'shape':<12} {'operation':<26} {'thr':>3} {'ours ms':>9} {'torch ms':>9} "
          f"{'ratio':>7} {'triad':>6} {'gemm':>6} {'roof ms':>8}")
    for r in rows:
        print(f"{r['shape']:<12} {r['operation']:<26} {r['threads']:>3} {r['ours_ms']:>9.2f} "
              f"{fmt(r['torch_ms'], '>9.1f')} {fmt(r['ratio'], '>6.1f', suffix='x')} "
              f"{fmt(r['triad_fraction'], '>5.0f', 100, '%')} "
              f"{fmt(r.get('gemm_fraction'), '>5.0f', 100, '%')} "
              f"{fmt(r.get('roofline_ms'), '>8.2f')}")
    print()
    print("ratio = torch ms / ours ms; triad = our bytes/s over the STREAM triad; gemm = our "
          "FLOP/s over Eigen SGEMM;\nroof = the roofline time (bytes at the triad rate, or FLOPs at "
          "the SGEMM rate)")
    print()
    print(f"{'adapter':<14} {'operation':<28} {'full ms':>9} {'half ms':>9} {'half/full':>9} "
          f"{'range':>9} {'gemm':>6} {'io ms':>7}")
    for r in adapter_rows:
        spread = (f"{r['half_over_full_min'] * 100:.0f}-{r['half_over_full_max'] * 100:.0f}%"
                  if r['half_over_full'] is not None else "-")
        print(f"{r['shape']:<14} {r['operation']:<28} {r['full_rank_ms']:>9.2f} "
              f"{fmt(r['half_rank_ms'], '>9.2f')} {fmt(r['half_over_full'], '>8.0f', 100, '%')} "
              f"{spread:>9} {fmt(r['gemm_fraction'], '>5.0f', 100, '%')} {fmt(r['io_floor_ms'], '>7.2f')}")
    print()
    print("half/full = the median over the rounds of each round's half / full, range = their lowest "
          "and highest;\nio = the batch tensors' memory traffic, which no rank changes")


if __name__ == "__main__":
    main()
