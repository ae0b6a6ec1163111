// adalora micro-benchmarks (targets: docs/algorithm.md §13): the allocator step and its importance update, the
// orthogonality regularizer (portable and Eigen kernels), the adapter forward/backward at full and
// half rank, and the rooflines they are judged against (STREAM triad, Eigen GEMM) in the same
// binary, so that "% of triad" compares numbers measured on the same machine in the same run.
//
// Shapes: DeBERTaV3-base r=12, LLaMA-7B r=8 and r=64 (bench_common.hpp). Every benchmark reports real (wall) time.
// Counters: bytes_per_second and triad_fraction for memory-bound work, FLOP/s and gemm_fraction
// for compute-bound work.

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <chrono>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/integrations/eigen_kernels.hpp"
#include "adalora/orthogonality.hpp"
#include "adalora/rank_allocator.hpp"
#include "adalora/svd_adapter.hpp"
#include "benchmarks/bench_common.hpp"

namespace ab = adalora_bench;
using adalora::index_t;

namespace {

// ---- STREAM triad ------------------------------------------------------------------------------

void BM_stream_triad(benchmark::State& state, int threads) {
  std::vector<float> a(ab::triad_elements, 1.0f), b(ab::triad_elements, 2.0f),
      c(ab::triad_elements, 3.0f);
  const double seconds = ab::timed_loop(state, [&] {
    ab::timed_split(ab::triad_elements, threads, [&](std::size_t lo, std::size_t hi) {
      ab::triad_range(a.data(), b.data(), c.data(), 3.0f, lo, hi);
    });
    benchmark::ClobberMemory();
  });
  ab::set_bandwidth_counters(state, 3.0 * sizeof(float) * static_cast<double>(ab::triad_elements),
                             threads, seconds);
}

// ---- allocator ---------------------------------------------------------------------------------

/// The allocator with a schedule that either never masks (the importance update alone: every
/// step is in the warm-up) or masks every step to half the initial budget (the whole step:
/// update + triplet scores + threshold + mask).
template <class T>
struct allocator_fixture {
  using allocator_type =
      adalora::rank_allocator<T, adalora::smoothed_sensitivity, adalora::constant_schedule>;

  allocator_fixture(const ab::model_shape& shape, bool mask_every_step, int threads)
      : alloc(shape.adapters, schedule(shape.total_rank(), mask_every_step), {},
              options(threads)) {}

  static adalora::constant_schedule schedule(std::int64_t b0, bool mask) {
    constexpr std::int64_t far = std::int64_t{1} << 40;
    return adalora::constant_schedule({.initial_budget = b0,
                                       .target_budget = b0 / 2,
                                       .total_step = 2 * far,
                                       .tinit = mask ? 0 : far,
                                       .tfinal = 0,
                                       .delta_t = 1});
  }
  static adalora::allocator_options options([[maybe_unused]] int threads) {
    adalora::allocator_options o;
    if constexpr (requires { o.threads; }) o.threads = threads;
    return o;
  }

  allocator_type alloc;
  std::int64_t t = 1;  // t = 0 would be the warm-up step (no mask) of the masking schedule
};

/// Thread counts the allocator offers: 1 and 2 once allocator_options has `threads`.
constexpr bool allocator_has_threads = requires(adalora::allocator_options o) { o.threads; };

template <class T>
void allocator_benchmark(benchmark::State& state, std::int64_t shape, int threads, bool mask) {
  auto& m = ab::model<T>(shape);
  const std::string key = std::string(mask ? "step/" : "update/") + std::to_string(threads) +
                          typeid(T).name();
  auto& fx = ab::cache().get<allocator_fixture<T>>(m.shape().name, key, [&] {
    return new allocator_fixture<T>(m.shape(), mask, threads);
  });
  const double seconds = ab::timed_loop(state, [&] {
    const auto& r = fx.alloc.step(fx.t, m.tensors(fx.t));  // gradients alternate: see model_tensors
    ++fx.t;
    benchmark::DoNotOptimize(&r);
  });
  // Reads p, grad and the K = 2 state values, writes the 2 state values: 6 · sizeof(T) bytes per
  // parameter (24 in f32); the scores, threshold and mask touch O(total rank) more.
  ab::set_bandwidth_counters(state, 6.0 * sizeof(T) * static_cast<double>(m.shape().parameters()),
                             threads, seconds);
}

void BM_importance_update(benchmark::State& state, std::int64_t shape, int threads) {
  allocator_benchmark<float>(state, shape, threads, false);
}
void BM_allocator_step(benchmark::State& state, std::int64_t shape, int threads) {
  allocator_benchmark<float>(state, shape, threads, true);
}

// ---- GEMM roofline -----------------------------------------------------------------------------

/// Eigen's plain C = A·B at n = 1024, allowed its own buffers: the rate every "gemm_fraction"
/// divides by (the machine's practical GEMM peak with this binary's compiler flags).
template <class T>
void BM_eigen_gemm(benchmark::State& state) {
  const auto n = static_cast<index_t>(state.range(0));
  using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  matrix a = matrix::Random(n, n), b = matrix::Random(n, n), c(n, n);
  const double seconds = ab::timed_loop(state, [&] {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
  });
  ab::set_flop_counters(state, 2.0 * static_cast<double>(n) * n * n, seconds,
                        ab::gemm_rate<T>());
}

// ---- orthogonality regularizer -----------------------------------------------------------------

enum class gram : int { portable, eigen, eigen_f64_accumulate };

template <class Kernel>
void orthogonality_benchmark(benchmark::State& state, std::int64_t shape) {
  auto& m = ab::model<float>(shape);
  const auto& params = m.params();
  const auto& grads = m.grads();
  adalora::orthogonality_regularizer<float, Kernel> orth({.weight = 0.5});
  orth.reserve(m.shape().adapters.front().rank);
  std::vector<adalora::svd_adapter_ref<const float>> cparams(params.begin(), params.end());
  const double seconds = ab::timed_loop(state, [&] {
    benchmark::DoNotOptimize(orth.value_and_gradient(
        std::span<const adalora::svd_adapter_ref<const float>>(cparams),
        std::span<const adalora::svd_adapter_ref<float>>(grads)));
  });
  // Memory: M read twice (Gram, then gradient), the gradient read and written: 16 bytes per
  // element of A and B in f32. Arithmetic: the symmetric Gram and the gradient product.
  ab::set_bandwidth_counters(state, 16.0 * static_cast<double>(m.shape().gram_elements()), 1,
                             seconds);
  ab::set_flop_counters(state, m.shape().gram_flops(), seconds, ab::gemm_rate<float>());
}

void BM_orthogonality(benchmark::State& state, std::int64_t shape, gram kernel) {
  switch (kernel) {
    case gram::portable:
      orthogonality_benchmark<adalora::portable_gram_kernel<float>>(state, shape);
      break;
    case gram::eigen:
      orthogonality_benchmark<adalora::eigen_gram_kernel<float>>(state, shape);
      break;
    case gram::eigen_f64_accumulate:
      orthogonality_benchmark<adalora::eigen_gram_kernel<float, double>>(state, shape);
      break;
  }
}

// ---- adapter forward / backward ----------------------------------------------------------------

/// An adapted weight at full rank r, or resized to r/2 (every other triplet kept, r_init
/// unchanged, as after pruning and resize_adapter).
adalora::svd_adapter<float> make_adapter(index_t in, index_t out, index_t r, bool half) {
  adalora::svd_adapter<float> full(in, out, r, 16.0);
  std::mt19937_64 rng(1);
  full.initialize(rng);
  if (!half) return full;
  std::vector<bool> keep(static_cast<std::size_t>(r));
  for (index_t i = 0; i < r; ++i) keep[static_cast<std::size_t>(i)] = i % 2 == 0;
  return full.resized(keep);
}

/// A batch of n rows through an in → out adapter: inputs x and dy, outputs y and dx.
struct batch_tensors {
  index_t n, in, out;
  std::vector<float> x, dy, y, dx;

  batch_tensors(index_t batch, index_t in_features, index_t out_features)
      : n(batch), in(in_features), out(out_features) {
    x.resize(static_cast<std::size_t>(n * in));
    dy.resize(static_cast<std::size_t>(n * out));
    y.assign(dy.size(), 0.0f);
    dx.assign(x.size(), 0.0f);
    ab::fill_uniform(x.data(), x.size(), 3, 1.0);
    ab::fill_uniform(dy.data(), dy.size(), 4, 1e-3);
  }
  adalora::matrix_view<const float> xv() const { return {x.data(), n, in, in, 1}; }
  adalora::matrix_view<const float> dyv() const { return {dy.data(), n, out, out, 1}; }
  adalora::matrix_view<float> yv() { return {y.data(), n, out, out, 1}; }
  adalora::matrix_view<float> dxv() { return {dx.data(), n, in, in, 1}; }
};

struct adapter_config {
  const char* name;
  index_t in, out, r, batch;
};
// A LLaMA-7B q_proj at r = 64 with 256 tokens; a DeBERTaV3-base query at r = 12 with 512 tokens.
constexpr adapter_config adapter_configs[] = {{"llama_q_r64", 4096, 4096, 64, 256},
                                              {"deberta_q_r12", 768, 768, 12, 512}};

/// One forward (y += ...) or backward (grads += ..., dx += ...) of `adapter` on the batch.
void adapter_pass(adalora::svd_adapter<float>& adapter, batch_tensors& b,
                  adalora::adapter_workspace<float>& ws, bool eigen, bool backward) {
  const auto params = std::as_const(adapter).params();
  const auto& scale = adapter.scale();
  if (!backward) {
    if (eigen) adalora::eigen_adapter_forward<float>(params, scale, b.xv(), b.yv(), ws);
    else adalora::adapter_forward<float>(params, scale, b.xv(), b.yv(), ws);
  } else {
    const auto grads = adapter.grads();
    if (eigen)
      adalora::eigen_adapter_backward<float>(params, scale, b.xv(), b.dyv(), grads, ws, b.dxv());
    else adalora::adapter_backward<float>(params, scale, b.xv(), b.dyv(), grads, ws, b.dxv());
  }
  benchmark::ClobberMemory();
}

/// FLOPs of one pass at rank r. Forward: x·(A⊙E)ᵀ and h·Bᵀ; backward: h again, dB, dh,
/// d(A⊙E) and dx.
double adapter_flops(const adapter_config& c, index_t r, bool backward) {
  const double n = static_cast<double>(c.batch), in = static_cast<double>(c.in),
               out = static_cast<double>(c.out), rr = static_cast<double>(r);
  return backward ? 2 * n * rr * (3 * in + 2 * out) : 2 * n * rr * (in + out);
}

void BM_adapter(benchmark::State& state, adapter_config c, bool eigen, bool backward, bool half) {
  batch_tensors batch(c.batch, c.in, c.out);
  adalora::svd_adapter<float> adapter = make_adapter(c.in, c.out, c.r, half);
  adalora::adapter_workspace<float> ws;
  ws.reserve(c.batch, c.in, c.out, adapter.rank());
  const double seconds =
      ab::timed_loop(state, [&] { adapter_pass(adapter, batch, ws, eigen, backward); });
  ab::set_flop_counters(state, adapter_flops(c, adapter.rank(), backward), seconds,
                        ab::gemm_rate<float>());
  state.counters["rank"] = static_cast<double>(adapter.rank());
}

/// The full- and the half-rank adapter in alternation on the same batch, each pass timed on its
/// own: half_over_full = Σ half / Σ full over the same seconds. On a shared machine whose speed
/// drifts, two separate benchmarks compare different moments (the DeBERTa forward's half/full
/// ranged from 43% to 65% between consecutive processes); alternating call by call puts the same
/// drift into both sums. Reported time: one full plus one half pass.
void BM_adapter_pair(benchmark::State& state, adapter_config c, bool eigen, bool backward) {
  batch_tensors batch(c.batch, c.in, c.out);
  adalora::svd_adapter<float> full = make_adapter(c.in, c.out, c.r, false),
                              half = make_adapter(c.in, c.out, c.r, true);
  adalora::adapter_workspace<float> ws;
  ws.reserve(c.batch, c.in, c.out, c.r);
  using clock = std::chrono::steady_clock;
  double full_s = 0, half_s = 0;
  for (auto _ : state) {
    const auto t0 = clock::now();
    adapter_pass(full, batch, ws, eigen, backward);
    const auto t1 = clock::now();
    adapter_pass(half, batch, ws, eigen, backward);
    const auto t2 = clock::now();
    const double f = std::chrono::duration<double>(t1 - t0).count(),
                 h = std::chrono::duration<double>(t2 - t1).count();
    full_s += f;
    half_s += h;
    state.SetIterationTime(f + h);
  }
  const auto calls = static_cast<double>(state.iterations());
  state.counters["full_ms"] = full_s / calls * 1e3;
  state.counters["half_ms"] = half_s / calls * 1e3;
  state.counters["half_over_full"] = half_s / full_s;
  state.counters["full_FLOP/s"] = adapter_flops(c, c.r, backward) * calls / full_s;
}

/// What the adapter's forward/backward cannot avoid whatever the rank: its memory traffic on the
/// batch tensors. Forward: read x, read and write y (y += ...); backward: read x and dy, read and
/// write dx. Measured as the same traffic with one add per element, so that "half rank costs at
/// most X% of full rank" can be judged against (floor + (full − floor) / 2) / full.
void BM_adapter_io_floor(benchmark::State& state, adapter_config c, bool backward) {
  if (c.in != c.out) {
    state.SkipWithError("adapter_io_floor: written for square adapters (in == out)");
    return;
  }
  const auto m = static_cast<std::size_t>(c.batch * c.in);  // elements of x, y, dy and dx
  std::vector<float> x(m, 0.5f), dy(m, 0.25f), y(m, 0.0f);
  const double seconds = ab::timed_loop(state, [&] {
    float* __restrict yp = y.data();
    const float* __restrict xp = x.data();
    const float* __restrict dp = dy.data();
    if (backward)
      for (std::size_t i = 0; i < m; ++i) yp[i] += xp[i] + dp[i];
    else
      for (std::size_t i = 0; i < m; ++i) yp[i] += 0.5f * xp[i];
    benchmark::ClobberMemory();
  });
  const double bytes = sizeof(float) * static_cast<double>((backward ? 4 : 3) * m);
  ab::set_bandwidth_counters(state, bytes, 1, seconds);
}

// ---- registration, grouped by shape so that each shape's tensors are allocated once -------------

double min_time_for(std::int64_t shape) { return shape == 0 ? 0.2 : shape == 1 ? 0.3 : 0.5; }

void register_all() {
  benchmark::RegisterBenchmark("stream_triad/threads:1", BM_stream_triad, 1)->UseManualTime()->MinTime(0.5);
  benchmark::RegisterBenchmark("stream_triad/threads:2", BM_stream_triad, 2)->UseManualTime()->MinTime(0.5);
  benchmark::RegisterBenchmark("eigen_sgemm/n:1024", BM_eigen_gemm<float>)->Arg(1024)->UseManualTime()->MinTime(0.3);
  benchmark::RegisterBenchmark("eigen_dgemm/n:1024", BM_eigen_gemm<double>)->Arg(1024)->UseManualTime()->MinTime(0.3);

  for (std::int64_t s = 0; s < ab::shape_count; ++s) {
    const std::string name = ab::shape_by_index(s).name;
    for (int threads : {1, 2}) {
      if (threads > 1 && !allocator_has_threads) continue;
      using fn = void (*)(benchmark::State&, std::int64_t, int);
      const std::pair<std::string, fn> families[] = {{"importance_update/", BM_importance_update},
                                                     {"allocator_step/", BM_allocator_step}};
      for (const auto& [family, f] : families)
        benchmark::RegisterBenchmark((family + name + "/threads:" + std::to_string(threads)).c_str(),
                                     f, s, threads)
            ->UseManualTime()
            ->MinTime(min_time_for(s));
    }
    const std::pair<const char*, gram> kernels[] = {{"portable", gram::portable},
                                                    {"eigen", gram::eigen},
                                                    {"eigen_f64acc", gram::eigen_f64_accumulate}};
    for (const auto& [kname, k] : kernels)
      benchmark::RegisterBenchmark(("orthogonality/" + name + "/" + kname).c_str(),
                                   BM_orthogonality, s, k)
          ->UseManualTime()
          ->MinTime(k == gram::portable ? 0.1 : min_time_for(s));
  }

  for (const adapter_config& c : adapter_configs)
    for (bool backward : {false, true})
      benchmark::RegisterBenchmark((std::string("adapter_io_floor/") + (backward ? "backward/" : "forward/") +
                                    c.name).c_str(),
                                   BM_adapter_io_floor, c, backward)
          ->UseManualTime()
          ->MinTime(0.2);
  for (const adapter_config& c : adapter_configs)
    for (bool backward : {false, true})
      for (bool eigen : {false, true})
        benchmark::RegisterBenchmark((std::string("adapter_pair/") +
                                      (backward ? "backward/" : "forward/") + c.name +
                                      (eigen ? "/eigen" : "/portable"))
                                         .c_str(),
                                     BM_adapter_pair, c, eigen, backward)
            ->UseManualTime()
            ->MinTime(0.4);
  for (const adapter_config& c : adapter_configs)
    for (bool backward : {false, true})
      for (bool eigen : {false, true})
        for (bool half : {false, true})
          benchmark::RegisterBenchmark((std::string("adapter_") + (backward ? "backward/" : "forward/") +
                                        c.name + (eigen ? "/eigen" : "/portable") +
                                        (half ? "/half_rank" : "/full_rank"))
                                           .c_str(),
                                       BM_adapter, c, eigen, backward, half)
              ->UseManualTime()
              ->MinTime(0.2);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  // The rooflines first, on a quiet heap, so every fraction divides by the same figures.
  benchmark::AddCustomContext("triad_1thread_GBps", std::to_string(ab::triad_bandwidth(1) / 1e9));
  benchmark::AddCustomContext("triad_2threads_GBps", std::to_string(ab::triad_bandwidth(2) / 1e9));
  benchmark::AddCustomContext("eigen_sgemm_GFLOPs", std::to_string(ab::gemm_rate<float>() / 1e9));
  benchmark::AddCustomContext("eigen_dgemm_GFLOPs", std::to_string(ab::gemm_rate<double>() / 1e9));
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
