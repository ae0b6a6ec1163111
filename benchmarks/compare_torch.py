#!/usr/bin/python3
"""Side-by-side: adalora's benchmark binary and the PyTorch reference idioms, in one run.

Run it with Debian's python3-torch (/usr/bin/python3), normally through benchmarks/compare.sh,
which builds the binary with --config=opt first:

    benchmarks/compare.sh [--reps N] [--threads 1,2] [--json PATH] [--quick]
                          [--allow-reference-blas] [--max-other-cpu SHARE]

What is compared, per benchmark shape (DeBERTaV3-base r=12, LLaMA-7B r=8 and r=64):
  importance_update  PEFT RankAllocator.update_ipt: per parameter, ipt = (p*g).abs(), then the
                     two EMAs, each a fresh tensor (docs/algorithm.md §4).
  allocator_step     update_ipt + mask_to_budget: per-parameter element scores, means over
                     dim 1 (A) / dim 0 (B), the concatenated triplet scores, torch.kthvalue and
                     masked_fill_ on E (docs/algorithm.md §4-§6), pruning to half the initial budget.
  orthogonality      torch autograd of the regularizer, sum of ||A A^T - I||_F and
                     ||B^T B - I||_F over all adapters (docs/algorithm.md §8), value + backward.
against the binary's allocator_step / importance_update and its orthogonality regularizer with
the Eigen kernel. The same thread count is used on both sides: torch.set_num_threads, and the
BLAS's own count where it has one (OpenBLAS, FlexiBLAS, BLIS; see blas_thread_setter).

Timing: per shape, both sides are sampled in --reps rounds (one repetition of each of our
benchmarks, then one call of each torch operation), and each figure is the median of its
rounds, so that the shared machine's drift over minutes reaches both sides alike; a torch
operation slower than 10 s per call is timed in two rounds only (LLaMA r=64 regularizer). The
adapter benchmarks run last, in --reps rounds of their own (one process each, the benchmarks in
random order). The JSON rows hold, per shape, operation and thread count:
  ours_ms, torch_ms   medians;
  ratio               torch_ms / ours_ms (how many times faster adalora is);
  triad_fraction      adalora's bytes/s over the STREAM triad at the same thread count, measured
                      by the same binary in the same run (24 bytes per parameter for the
                      allocator; 16 per element of A and B for the regularizer);
  gemm_fraction       (regularizer) its FLOP/s over Eigen's SGEMM rate measured likewise;
  roofline_ms         the time at the roofline (bytes at the triad rate; for the regularizer the
                      larger of that and its FLOPs at the SGEMM rate);
Allocator rows also hold target_triad_fraction (0.8, docs/algorithm.md §13: on two threads stated
against the two-thread triad of the same run, since two threads can only go as fast as the memory
system allows) and target_met; two-thread rows hold speedup (our one-thread time over our
two-thread time) beside the machine's triad_speedup. A two-thread row that is not trustworthy
has its derived figures set to null and says why in "untrusted" (a reason code -> message;
empty where trusted):
  other_cpu           other processes (and hypervisor steal) took more than --max-other-cpu of a
                      core during the shape's rounds: ratio, triad_fraction, target_met and
                      speedup are null (both sides' two-thread times and the triad are
                      disturbed);
  torch_collapse      torch's two-thread time is over 1.5x its one-thread time for the same
                      operation: its OpenMP threads spin at barriers and collapse when a core is
                      shared; ratio is null.
"machine" also holds "blas" (the BLAS torch loaded, from /proc/self/maps; "reference": true only
under --allow-reference-blas, which a run on the reference BLAS needs; "threads_pinned": whether
the BLAS's own thread count followed torch's) and "state": the load
averages before and after, and the CPU time other processes took, for the whole run and per
phase (see cpu_snapshot for the method).
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
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

BETA1 = 0.85
BETA2 = 0.85

# Two-thread figures are not trusted where torch's two-thread time exceeds its one-thread time by
# this factor: on this class of machine that only happens when its OpenMP threads collapse.
TORCH_COLLAPSE = 1.5
# The allocator step's bandwidth target, as a fraction of the triad at the same thread count.
STEP_TARGET = 0.80


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


# ---- the machine: which BLAS torch runs on, and who else used the CPUs -----------------------


def blas_kind(path):
    """The BLAS implementation a mapped file belongs to (from its file and folder name), or None."""
    name = os.path.basename(path)
    folder = os.path.basename(os.path.dirname(path))
    if name.startswith("libflexiblas_"):  # a FlexiBLAS backend, e.g. libflexiblas_netlib.so
        backend = name[len("libflexiblas_"):].split(".")[0]
        return "reference" if backend == "netlib" else f"FlexiBLAS ({backend})"
    if name.startswith("libflexiblas"):
        return "FlexiBLAS"
    if "openblas" in name or "openblas" in folder:
        return "OpenBLAS"
    if name.startswith("libmkl"):
        return "MKL"
    if name.startswith("libblis") or folder.startswith("blis"):
        return "BLIS"
    if name.startswith(("libatlas", "libsatlas", "libtatlas")) or folder == "atlas":
        return "ATLAS"
    # Netlib's own libblas (Debian's libblas3 in .../blas/, Fedora's in the library folder).
    if re.match(r"lib(c)?blas\.so", name):
        return "reference"
    return None


def blas_of_maps(maps):
    """Which BLAS a process runs on, from the text of its /proc/PID/maps: a dict of library
    (a name, or None where no BLAS file is mapped, e.g. one linked statically), path, reference
    (whether it is the reference BLAS) and mapped (every BLAS file mapped). The kernel names each
    file by its resolved path, so Debian's libblas.so.3 shows where its alternative points.
    libtorch needs libblas.so.3, so that file is the one it calls; an implementation mapped beside
    a reference libblas (pulled in by another library) does not serve torch's products, hence a
    reference libblas.so counts as reference whatever else is mapped."""
    mapped = []
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/"):
            path = fields[5].strip()
            if blas_kind(path) and path not in mapped:
                mapped.append(path)
    flexi = [p for p in mapped if os.path.basename(p).startswith("libflexiblas_")]
    blas_so = [p for p in mapped if re.match(r"lib(c)?blas\.so", os.path.basename(p))]
    if flexi:  # FlexiBLAS forwards to the backend it loaded
        chosen = flexi
    elif blas_so:
        chosen = blas_so
    else:
        chosen = mapped
    if not chosen:
        return {"library": None, "path": None, "reference": False, "mapped": []}
    reference = [p for p in chosen if blas_kind(p) == "reference"]
    path = reference[0] if reference else chosen[0]
    return {"library": blas_kind(path), "path": path, "reference": bool(reference),
            "mapped": mapped}


def torch_blas():
    """The BLAS this process's torch loaded, after one product (so that a lazily loaded one is
    in, too)."""
    a = torch.rand(64, 256)
    (a @ a.T).sum().item()
    with open("/proc/self/maps") as f:
        return blas_of_maps(f.read())


# The functions that set a BLAS's own thread count. torch.set_num_threads sets torch's OpenMP
# pool (and MKL's), not these: Debian's OpenBLAS (pthread variant) starts one thread per core
# whatever torch is told, so without this a "one-thread" torch row multiplied on two cores (a
# 64x11008 Gram: 0.81 ms against 1.15 ms pinned, measured here).
BLAS_THREAD_SETTERS = {"OpenBLAS": "openblas_set_num_threads", "FlexiBLAS": "flexiblas_set_num_threads",
                       "BLIS": "bli_thread_set_num_threads"}


def blas_thread_setter(blas):
    """A function t -> None that sets the thread count of the BLAS torch runs on, or None where
    that BLAS has no such call or is not identified (MKL follows torch.set_num_threads)."""
    name = BLAS_THREAD_SETTERS.get((blas["library"] or "").split(" ")[0])
    if name is None or not blas["path"]:
        return None
    try:
        fn = getattr(ctypes.CDLL(blas["path"]), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], None
    return fn


def blas_warning(blas, allow_reference):
    """The loud line for a run on the reference BLAS (None otherwise); without allow_reference,
    exits with the reason instead."""
    if not blas["reference"]:
        return None
    why = (f"torch runs on the reference BLAS ({blas['path']}): its matrix products are ~20x "
           f"slower than on OpenBLAS (a 64x4096 Gram ~10 ms against ~0.45 ms), so the torch "
           f"regularizer times and their ratios are not representative")
    if not allow_reference:
        sys.exit(f"compare_torch.py: {why}.\nInstall OpenBLAS (Debian: apt-get install "
                 f"libopenblas0; the libblas.so.3 alternative then points to it), or pass "
                 f"--allow-reference-blas to measure anyway (the output is then marked).")
    return f"*** REFERENCE BLAS (--allow-reference-blas): {why}. ***"


def cpu_snapshot():
    """What cpu_used compares: the wall clock, the busy and steal seconds of the CPUs this
    process may run on (/proc/stat), and the CPU seconds of this process tree (os.times: this
    process's threads, torch's included, and the children it has waited for: the benchmark
    binary).

    Method: other processes' CPU time = the CPUs' busy time minus this process tree's, between
    two snapshots. Unlike summing /proc/PID/stat over the other processes, this also counts the
    processes that start and end between the snapshots (a compiler's jobs, a test runner's
    children) and the kernel's threads. Busy = user + nice + system + irq + softirq (guest time
    is already in user); steal (time the hypervisor gave to other machines) is kept apart. Only
    the CPUs in this process's affinity set count, so that a container pinned to some CPUs of a
    larger host does not see the host's other work; without such pinning /proc/stat counts the
    whole host. Both sides are kernel tick counts (1/CLK_TCK s): the figure is good to a few
    ticks per snapshot pair."""
    cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
    busy = steal = 0
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] in cpus:
                user, nice, system, _idle, _iowait, irq, softirq, st = map(int, fields[1:9])
                busy += user + nice + system + irq + softirq
                steal += st
    tick = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return {"time": time.monotonic(), "busy": busy / tick, "steal": steal / tick,
            "own": own.user + own.system + own.children_user + own.children_system}


def cpu_used(before, after):
    """The CPU other processes and the hypervisor took between two snapshots, in seconds and as
    a share of one core (the difference can come out a few ticks below zero: shown as 0)."""
    wall = after["time"] - before["time"]
    own = after["own"] - before["own"]
    other = max(after["busy"] - before["busy"] - own, 0.0)
    steal = after["steal"] - before["steal"]
    return {"wall_s": round(wall, 3), "own_cpu_s": round(own, 2), "other_cpu_s": round(other, 2),
            "steal_s": round(steal, 2), "other_share": other / wall if wall > 0 else 0.0,
            "steal_share": steal / wall if wall > 0 else 0.0}


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
    ap.add_argument("--allow-reference-blas", action="store_true",
                    help="run even where torch loaded the reference BLAS (refused otherwise: its "
                         "products are ~20x slower than OpenBLAS'); the output says so loudly")
    ap.add_argument("--max-other-cpu", type=float, default=0.05, metavar="SHARE",
                    help="two-thread figures of a shape are marked n/t where other processes took "
                         "more than this share of one core during its rounds (default 0.05)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {', '.join(unknown)}; the shapes are {', '.join(SHAPES)}")

    # The machine's state is part of every result: the load before anything of ours runs, which
    # BLAS torch calls (refused if the reference one), and the CPU others take from here on.
    load_before = os.getloadavg()
    blas = torch_blas()
    blas_line = blas_warning(blas, args.allow_reference_blas)
    if blas_line:
        print(blas_line, file=sys.stderr, flush=True)
    set_blas_threads = blas_thread_setter(blas)
    blas["threads_pinned"] = set_blas_threads is not None or blas["library"] == "MKL"

    def set_threads(t):
        """Both of torch's thread counts: its OpenMP pool and its BLAS's own."""
        torch.set_num_threads(t)
        if set_blas_threads:
            set_blas_threads(t)
    run_start = cpu_snapshot()
    phases = {}

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
        phase_start = cpu_snapshot()
        for rnd in range(rounds):
            print(f"round {rnd + 1}/{rounds}: {shape}", file=sys.stderr, flush=True)
            context, ours = run_binary(args.binary, 1, f"/{shape}/")
            contexts.append(context)
            for key, v in ours.items():
                ours_samples.setdefault(key, []).append(v)
            for t in threads:
                set_threads(t)
                for op, fn in (("importance_update", idiom.update_ipt), ("allocator_step", idiom.step)):
                    torch_samples.setdefault(f"{op}/{shape}/threads:{t}", []).append(
                        time_torch(fn, 1, warm_up=rnd == 0))
            # The regularizer is single-threaded on our side; torch gets 1 thread too. Calls over
            # 10 s (LLaMA r = 64) are timed in the first two rounds only.
            set_threads(1)
            key = f"orthogonality/{shape}"
            if reg is not None and (rnd < 2 or torch_samples[key][-1] < 10e3):
                torch_samples.setdefault(key, []).append(
                    time_torch(reg.value_and_gradient, 1, warm_up=rnd == 0))
        phases[shape] = cpu_used(phase_start, cpu_snapshot())
        del idiom, reg
    # The adapter benchmarks (ours only, small fixtures), in rounds of their own, one process each:
    # adapter_pair runs the full- and the half-rank adapter in alternation and reports both times
    # and their ratio over the same seconds; the memory-traffic floors beside them. Separate
    # full- and half-rank benchmarks compared different moments of a drifting machine: the same
    # binary's DeBERTa forward gave half/full from 43% to 65% in consecutive processes.
    adapter_samples = {}
    phase_start = cpu_snapshot()
    for rnd in range(rounds):
        print(f"round {rnd + 1}/{rounds}: adapters", file=sys.stderr, flush=True)
        context, adapters = run_binary(args.binary, 1, "adapter_(pair|io_floor)/", interleave=True)
        contexts.append(context)
        for key, v in adapters.items():
            adapter_samples.setdefault(key, []).append(v)
    phases["adapters"] = cpu_used(phase_start, cpu_snapshot())
    state = dict(cpu_used(run_start, cpu_snapshot()), load_avg_before=list(load_before),
                 load_avg_after=list(os.getloadavg()), max_other_share=args.max_other_cpu,
                 other_cpu_method="busy time of this process's CPUs (/proc/stat) minus this "
                                  "process tree's CPU time (os.times), between snapshots",
                 phases=phases)

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
        taken = phases[shape]["other_share"] + phases[shape]["steal_share"]
        for t in threads:
            for op in ("importance_update", "allocator_step"):
                key = f"{op}/{shape}/threads:{t}"
                if key not in ours:
                    print(f"note: {key} not in the binary (no threads option?)", file=sys.stderr)
                    continue
                torch_ms = torch_ms_of[key]
                ours_ms = ours[key]["ms"]
                row = {
                    "shape": shape, "operation": op, "threads": t,
                    "ours_ms": ours_ms, "torch_ms": torch_ms, "ratio": torch_ms / ours_ms,
                    "triad_fraction": 24.0 * parameters(shape) / (ours_ms * 1e-3) / triad[t],
                    "roofline_ms": 24.0 * parameters(shape) / triad[t] * 1e3,
                    "other_share": phases[shape]["other_share"],
                    "steal_share": phases[shape]["steal_share"],
                }
                if op == "allocator_step":
                    row["target_triad_fraction"] = STEP_TARGET
                    row["target_met"] = row["triad_fraction"] >= STEP_TARGET
                one = f"{op}/{shape}/threads:1"
                if t > 1 and one in ours:
                    row["speedup"] = ours[one]["ms"] / ours_ms
                # Two threads on a 2-core machine: a share of a core taken by anything else
                # stalls a thread of each side (and the triad), and torch's OpenMP threads, which
                # spin at barriers, collapse; such ratios are artefacts, not results.
                untrusted = {}
                if t > 1 and taken > args.max_other_cpu:
                    untrusted["other_cpu"] = (
                        f"other processes (and steal) took {taken:.0%} of a core during "
                        f"{shape}'s rounds (limit {args.max_other_cpu:.0%})")
                    row.update(ratio=None, triad_fraction=None)
                    if "speedup" in row:
                        row["speedup"] = None
                    if "target_met" in row:
                        row["target_met"] = None
                if t > 1 and one in torch_ms_of and torch_ms > TORCH_COLLAPSE * torch_ms_of[one]:
                    untrusted["torch_collapse"] = (
                        f"torch took {torch_ms / torch_ms_of[one]:.1f}x its one-thread time "
                        f"(limit {TORCH_COLLAPSE}x): its OpenMP threads collapsed")
                    row["ratio"] = None
                row["untrusted"] = untrusted
                rows.append(row)
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
                "untrusted": {},
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
        "triad_speedup": triad[2] / triad[1],
        "eigen_sgemm_GFLOPs": sgemm / 1e9,
        "eigen_dgemm_GFLOPs": dgemm,
        "torch": torch.__version__, "blas": dict(blas, warning=blas_line),
        "reference_blas": blas["reference"], "state": state,
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
    blas, state = machine["blas"], machine["state"]
    if blas["warning"]:
        print(blas["warning"])
    print(f"machine: STREAM triad {machine['triad_1thread_GBps']:.1f} GB/s (1 thread), "
          f"{machine['triad_2threads_GBps']:.1f} GB/s (2 threads); Eigen SGEMM "
          f"{machine['eigen_sgemm_GFLOPs']:.1f} GFLOP/s, DGEMM {machine['eigen_dgemm_GFLOPs']:.1f}; "
          f"torch {machine['torch']}; medians of {machine['reps']}")
    if blas["library"]:
        pinned = ("its threads set with torch's" if blas.get("threads_pinned") else
                  "its own thread count NOT controlled: torch rows may use more threads than stated")
        print(f"torch BLAS: {blas['library']}, {blas['path']} (mapped: "
              f"{', '.join(os.path.basename(p) for p in blas['mapped'])}); {pinned}")
    else:
        print("torch BLAS: not identified (no BLAS library among the mapped files: linked "
              "statically?)")
    phases = ", ".join(f"{name} {p['other_share'] + p['steal_share']:.0%}"
                       for name, p in state["phases"].items())
    print(f"machine state: load average {state['load_avg_before'][0]:.2f} before, "
          f"{state['load_avg_after'][0]:.2f} after (1 min, this run's own threads included);\n"
          f"  other processes took {state['other_share']:.0%} of a core during the run "
          f"({state['other_cpu_s']:.1f} s of CPU in {state['wall_s']:.0f} s; ours "
          f"{state['own_cpu_s']:.1f} s), steal {state['steal_share']:.0%}; "
          f"per phase, with steal: {phases}\n  (two-thread rows are n/t above "
          f"{state['max_other_share']:.0%} of a core)")
    print()
    print(f"{'shape':<12} {'operation':<26} {'thr':>3} {'ours ms':>9} {'torch ms':>9} "
          f"{'ratio':>7} {'triad':>6} {'target':>8} {'gemm':>6} {'roof ms':>8}")
    untrusted = []
    for r in rows:
        nt = r.get("untrusted")
        if nt:
            untrusted.append(r)
        ratio = fmt(r["ratio"], ">6.1f", suffix="x")
        triad = fmt(r["triad_fraction"], ">5.0f", 100, "%")
        target = ""
        if "target_met" in r:
            target = f"≥{r['target_triad_fraction']:.0%} " + ("ok" if r["target_met"] else "no")
        if nt:
            ratio = format("n/t", ">7")
            if "other_cpu" in nt:
                triad, target = format("n/t", ">6"), ("n/t" if target else "")
        print(f"{r['shape']:<12} {r['operation']:<26} {r['threads']:>3} {r['ours_ms']:>9.2f} "
              f"{fmt(r['torch_ms'], '>9.1f')} {ratio} {triad} {target:>8} "
              f"{fmt(r.get('gemm_fraction'), '>5.0f', 100, '%')} "
              f"{fmt(r.get('roofline_ms'), '>8.2f')}")
    print()
    print("ratio = torch ms / ours ms; triad = our bytes/s over the STREAM triad at the same "
          "thread count;\ngemm = our FLOP/s over Eigen SGEMM; roof = the roofline time (bytes at "
          "the triad rate, or FLOPs\nat the SGEMM rate); target = the allocator step's: at least "
          f"{STEP_TARGET:.0%} of the triad at its thread\ncount, measured in this run (two "
          "threads go only as fast as the memory allows: here the\ntwo-thread triad is "
          f"{machine['triad_speedup']:.2f}x the one-thread triad)")
    speedups = [f"{r['shape']} {r['speedup']:.2f}x" for r in rows
                if r["operation"] == "allocator_step" and r.get("speedup") is not None]
    if speedups:
        print(f"allocator step, two threads over one: {', '.join(speedups)}")
    if untrusted:
        print("n/t = not trusted, two-thread rows only (the medians are as measured; a ratio of "
              "them would be an artefact):")
        for r in untrusted:
            print(f"  {r['shape']} {r['operation']}, {r['threads']} threads:")
            for why in r["untrusted"].values():
                print(f"    {why}")
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
