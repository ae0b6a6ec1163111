// A user's importance metric against the built-in one (a metric owns its fast path, the hook):
// the allocator step, masking every step, at the DeBERTaV3-base (r = 12) and LLaMA-7B (r = 8)
// shapes, with
//   builtin      adalora::smoothed_sensitivity (its block hook, detail/sensitivity_simd.hpp)
//   user_hook    the same metric written by a user, with its own block hook (update_block) and,
//                as the built-in, update_block_keeps_non_finite_state
//   user_hook_prechecked   the same hook without that declaration: the allocator tests each
//                chunk of 64 elements for NaN/infinity before handing it to the hook
//   user_plain   the same user metric without the hook: the allocator's generic element loop
// Same tensors, same allocator, same schedule; only the metric type differs. All three give the
// same bits (tests/score_kernels_test.cpp); the point is the time.
//
//   bazel build --config=opt //benchmarks:metric_hook_bench
//   bazel-bin/benchmarks/metric_hook_bench --benchmark_filter=deberta
//       --benchmark_repetitions=15 --benchmark_enable_random_interleaving=true
//       --benchmark_report_aggregates_only=true        (one command line)
// (one shape per run: the shapes' tensors are allocated once per run, see bench_common.hpp;
// interleaving the repetitions spreads the machine's noise over the three metrics alike.)

#include <benchmark/benchmark.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <typeinfo>

#include "adalora/budget_schedule.hpp"
#include "adalora/importance/metric.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/rank_allocator.hpp"
#include "benchmarks/bench_common.hpp"

namespace ab = adalora_bench;

namespace {

/// AdaLoRA's smoothed sensitivity as a user would write it in their own code base: the same
/// formula and the same roundings as adalora::smoothed_sensitivity (so the same bits), with no
/// access to anything of the library but the public concept.
struct user_sensitivity {
  static constexpr std::size_t state_size = 2;
  static constexpr bool scores_may_overflow = true;

  float b1 = static_cast<float>(0.85), c1 = static_cast<float>(1.0 - 0.85);
  float b2 = static_cast<float>(0.85), c2 = static_cast<float>(1.0 - 0.85);

  double update(adalora::tensor_role, float p, float g, std::span<float, 2> s) const noexcept {
    const float old_ema = s[0], old_unc = s[1];
    const float ipt = std::abs(p * g);
    const float ema = b1 * old_ema + c1 * ipt;
    const float unc = b2 * old_unc + c2 * std::abs(ipt - ema);
    const bool fits = unc <= std::numeric_limits<float>::max();
    s[0] = fits ? ema : old_ema;
    s[1] = fits ? unc : old_unc;
    return static_cast<double>(s[0]) * static_cast<double>(s[1]);
  }
  double score(adalora::tensor_role, float, std::span<const float, 2> s) const noexcept {
    return static_cast<double>(s[0]) * static_cast<double>(s[1]);
  }
};

// Vector code of 256 bits pays only where the target has such vectors (x86: AVX, which this
// binary is built for); see the note in examples/custom_importance/fisher_importance.hpp.
#if defined(__GNUC__) && defined(__AVX__)
/// The same metric with the block hook: eight elements in GCC/Clang vector code. The state
/// {Ī, Ū} of the eight elements is interleaved over 16 floats; loading it in quarters, as
/// [0..3 | 8..11] and [4..7 | 12..15], lets in-lane shuffles split and re-interleave it (x86's
/// cross-lane shuffles are slower). Element for element the operations of update(), in its order,
/// including its guard: an element whose new Ū would not be finite keeps its state, which is
/// also what a NaN or infinite param or grad gives (so the hook may declare that it keeps the
/// state of non-finite elements, below).
struct user_sensitivity_hook_checked : user_sensitivity {
  using f4 = float __attribute__((vector_size(16)));
  using f8 = float __attribute__((vector_size(32)));
  using i8 = std::int32_t __attribute__((vector_size(32)));
  using d4 = double __attribute__((vector_size(32)));

  static f8 splat(float x) noexcept { return f8{x, x, x, x, x, x, x, x}; }

  void update_block(adalora::tensor_role, std::span<const float, 8> params,
                    std::span<const float, 8> grads, std::span<float, 16> state,
                    std::span<double, 8> scores) const noexcept {
    f8 w, dw;
    f4 q0, q1, q2, q3;
    std::memcpy(&w, params.data(), sizeof w);
    std::memcpy(&dw, grads.data(), sizeof dw);
    std::memcpy(&q0, state.data(), sizeof q0);
    std::memcpy(&q1, state.data() + 4, sizeof q1);
    std::memcpy(&q2, state.data() + 8, sizeof q2);
    std::memcpy(&q3, state.data() + 12, sizeof q3);
    const f8 lo = __builtin_shufflevector(q0, q2, 0, 1, 2, 3, 4, 5, 6, 7);
    const f8 hi = __builtin_shufflevector(q1, q3, 0, 1, 2, 3, 4, 5, 6, 7);
    const f8 old_ema = __builtin_shufflevector(lo, hi, 0, 2, 8, 10, 4, 6, 12, 14);
    const f8 old_unc = __builtin_shufflevector(lo, hi, 1, 3, 9, 11, 5, 7, 13, 15);
    const i8 abs_mask = i8{} + 0x7fffffff;
    const f8 ipt = reinterpret_cast<f8>(reinterpret_cast<i8>(w * dw) & abs_mask);
    const f8 ema = splat(b1) * old_ema + splat(c1) * ipt;
    const f8 dev = reinterpret_cast<f8>(reinterpret_cast<i8>(ipt - ema) & abs_mask);
    const f8 unc = splat(b2) * old_unc + splat(c2) * dev;
    const i8 fits = unc <= splat(std::numeric_limits<float>::max());
    const f8 new_ema = fits ? ema : old_ema;
    const f8 new_unc = fits ? unc : old_unc;
    const f8 even = __builtin_shufflevector(new_ema, new_unc, 0, 8, 1, 9, 4, 12, 5, 13);
    const f8 odd = __builtin_shufflevector(new_ema, new_unc, 2, 10, 3, 11, 6, 14, 7, 15);
    q0 = __builtin_shufflevector(even, even, 0, 1, 2, 3);
    q1 = __builtin_shufflevector(odd, odd, 0, 1, 2, 3);
    q2 = __builtin_shufflevector(even, even, 4, 5, 6, 7);
    q3 = __builtin_shufflevector(odd, odd, 4, 5, 6, 7);
    std::memcpy(state.data(), &q0, sizeof q0);
    std::memcpy(state.data() + 4, &q1, sizeof q1);
    std::memcpy(state.data() + 8, &q2, sizeof q2);
    std::memcpy(state.data() + 12, &q3, sizeof q3);
    // Ī·Ū in double, four at a time (exact: a product of two floats).
    const d4 e_lo{new_ema[0], new_ema[1], new_ema[2], new_ema[3]};
    const d4 e_hi{new_ema[4], new_ema[5], new_ema[6], new_ema[7]};
    const d4 u_lo{new_unc[0], new_unc[1], new_unc[2], new_unc[3]};
    const d4 u_hi{new_unc[4], new_unc[5], new_unc[6], new_unc[7]};
    const d4 s_lo = e_lo * u_lo, s_hi = e_hi * u_hi;
    std::memcpy(scores.data(), &s_lo, sizeof s_lo);
    std::memcpy(scores.data() + 4, &s_hi, sizeof s_hi);
  }
};
/// The same hook, declaring what its guard gives: the allocator then tests for NaN/infinity
/// alongside the hook rather than before it, as for the built-in metric.
struct user_sensitivity_hook : user_sensitivity_hook_checked {
  static constexpr bool update_block_keeps_non_finite_state = true;
};
static_assert(adalora::detail::has_update_block<user_sensitivity_hook, float>);
#endif
static_assert(!adalora::detail::has_update_block<user_sensitivity, float>);

/// Masks every step to half the initial budget: the whole step (update, triplet scores,
/// threshold, mask).
adalora::constant_schedule every_step(std::int64_t b0) {
  constexpr std::int64_t far = std::int64_t{1} << 40;
  return adalora::constant_schedule({.initial_budget = b0,
                                     .target_budget = b0 / 2,
                                     .total_step = 2 * far,
                                     .tinit = 0,
                                     .tfinal = 0,
                                     .delta_t = 1});
}

template <class Metric>
struct fixture {
  explicit fixture(const ab::model_shape& shape)
      : alloc(shape.adapters, every_step(shape.total_rank())) {}
  adalora::rank_allocator<float, Metric, adalora::constant_schedule> alloc;
  std::int64_t t = 1;  // t = 0 is the schedule's warm-up step (no mask)
};

template <class Metric>
void BM_step(benchmark::State& state, std::int64_t shape) {
  auto& m = ab::model<float>(shape);
  auto& fx = ab::cache().get<fixture<Metric>>(m.shape().name, std::string("hook/") + typeid(Metric).name(),
                                              [&] { return new fixture<Metric>(m.shape()); });
  const double seconds = ab::timed_loop(state, [&] {
    const auto& r = fx.alloc.step(fx.t, m.tensors(fx.t));  // gradients alternate: see model_tensors
    ++fx.t;
    benchmark::DoNotOptimize(&r);
  });
  // 24 bytes per parameter in f32: p, grad and the two state values read, the state written.
  state.counters["bytes_per_second"] = 24.0 * static_cast<double>(m.shape().parameters()) *
                                       static_cast<double>(state.iterations()) / seconds;
}

void register_all() {
  for (std::int64_t s : {0, 1}) {  // DeBERTaV3-base r = 12, LLaMA-7B r = 8
    const std::string shape = ab::shape_by_index(s).name;
    const double min_time = s == 0 ? 0.3 : 0.5;
    benchmark::RegisterBenchmark(("metric_hook/" + shape + "/builtin").c_str(),
                                 BM_step<adalora::smoothed_sensitivity>, s)
        ->UseManualTime()->MinTime(min_time);
#if defined(__GNUC__) && defined(__AVX__)
    benchmark::RegisterBenchmark(("metric_hook/" + shape + "/user_hook").c_str(),
                                 BM_step<user_sensitivity_hook>, s)
        ->UseManualTime()->MinTime(min_time);
    benchmark::RegisterBenchmark(("metric_hook/" + shape + "/user_hook_prechecked").c_str(),
                                 BM_step<user_sensitivity_hook_checked>, s)
        ->UseManualTime()->MinTime(min_time);
#endif
    benchmark::RegisterBenchmark(("metric_hook/" + shape + "/user_plain").c_str(),
                                 BM_step<user_sensitivity>, s)
        ->UseManualTime()->MinTime(min_time);
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
