#pragma once
// Shared pieces of the benchmarks: the model shapes of docs/algorithm.md §13, the adapters' tensors in one
// arena per model (allocated once per shape, not once per benchmark), a STREAM triad as the
// memory roofline and an Eigen GEMM as the compute roofline.
//
// Why an arena held in a single slot: the LLaMA-7B r = 64 shape needs ~1.3 GB of parameters and
// gradients plus ~1.3 GB of allocator state in f32. Benchmarks are registered grouped by shape,
// so keeping only the current shape's tensors alive bounds the peak memory to one shape and
// allocates (and page-faults) each shape once.

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <typeinfo>
#include <vector>

#include "adalora/matrix_view.hpp"
#include "adalora/rank_allocator.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora_bench {

using adalora::index_t;

/// A model's adapted weights (in, out, r per weight).
struct model_shape {
  std::string name;
  std::vector<adalora::adapter_shape> adapters;

  std::int64_t parameters() const {
    std::int64_t n = 0;
    for (const auto& s : adapters) n += s.rank * (s.in_features + 1 + s.out_features);
    return n;
  }
  std::int64_t total_rank() const {
    std::int64_t n = 0;
    for (const auto& s : adapters) n += s.rank;
    return n;
  }
  /// Σ over the regularizer's matrices (A: r × in, Bᵀ: r × out) of r·cols: the length of the
  /// Gram products, i.e. Σ r·(in + out).
  std::int64_t gram_elements() const {
    std::int64_t n = 0;
    for (const auto& s : adapters) n += s.rank * (s.in_features + s.out_features);
    return n;
  }
  /// The regularizer's arithmetic at its floor, in FLOP: per matrix M (r × c) the upper triangle
  /// of the Gram M·Mᵀ (r(r+1)/2 dot products of length c: r(r+1)·c) and the gradient (C − I)·M
  /// (2r²·c); summed over A (c = in) and Bᵀ (c = out).
  double gram_flops() const {
    double f = 0;
    for (const auto& s : adapters) {
      const double r = static_cast<double>(s.rank);
      const double c = static_cast<double>(s.in_features + s.out_features);
      f += r * (r + 1) * c + 2 * r * r * c;
    }
    return f;
  }
};

/// DeBERTaV3-base: q, k, v, o (768 × 768) and both FFN matrices (768 ↔ 3072) of 12 layers.
inline model_shape deberta_v3_base(index_t r) {
  model_shape m{"deberta_r" + std::to_string(r), {}};
  for (int layer = 0; layer < 12; ++layer) {
    const std::string p = "layer." + std::to_string(layer) + ".";
    for (const char* w : {"query", "key", "value", "attention.output"})
      m.adapters.push_back({p + w, 768, 768, r});
    m.adapters.push_back({p + "intermediate", 768, 3072, r});
    m.adapters.push_back({p + "output", 3072, 768, r});
  }
  return m;
}

/// LLaMA-7B: q, k, v, o (4096 × 4096) and gate, up (4096 → 11008), down (11008 → 4096) of 32
/// layers.
inline model_shape llama_7b(index_t r) {
  model_shape m{"llama_r" + std::to_string(r), {}};
  for (int layer = 0; layer < 32; ++layer) {
    const std::string p = "layers." + std::to_string(layer) + ".";
    for (const char* w : {"q_proj", "k_proj", "v_proj", "o_proj"})
      m.adapters.push_back({p + w, 4096, 4096, r});
    m.adapters.push_back({p + "gate_proj", 4096, 11008, r});
    m.adapters.push_back({p + "up_proj", 4096, 11008, r});
    m.adapters.push_back({p + "down_proj", 11008, 4096, r});
  }
  return m;
}

/// The three benchmark shapes (docs/algorithm.md §13), by index (benchmark arguments are integers).
inline const model_shape& shape_by_index(std::int64_t i) {
  static const model_shape shapes[] = {deberta_v3_base(12), llama_7b(8), llama_7b(64)};
  return shapes[i];
}
inline constexpr std::int64_t shape_count = 3;

/// Cheap deterministic fill (a 64-bit LCG) in [-scale, scale]: filling 2 × 160M floats with
/// std::normal_distribution would take longer than the benchmarks it serves.
template <class T>
void fill_uniform(T* x, std::size_t n, std::uint64_t seed, double scale) {
  std::uint64_t s = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  for (std::size_t i = 0; i < n; ++i) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    const double u = static_cast<double>(s >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
    x[i] = static_cast<T>((2 * u - 1) * scale);
  }
}

/// The parameters and gradients of every adapter of a model, row-major, each tensor 64-byte
/// aligned in one arena, as views the library takes. Two sets of gradients: an allocator stepped
/// with the same gradients again and again drives the uncertainty EMA |I − Ī| to zero through
/// subnormal floats (after ~480 steps at these magnitudes), where x86 arithmetic is 10-100x
/// slower; training never repeats a gradient, so the benchmarks alternate the two sets.
template <class T>
class model_tensors {
 public:
  explicit model_tensors(const model_shape& shape) : shape_(shape) {
    std::size_t total = 0;
    auto place = [&](std::size_t n) {
      const std::size_t at = total;
      total += (n + 15) / 16 * 16;  // 16 floats / 8 doubles or more: 64-byte aligned starts
      return at;
    };
    struct offsets {
      std::size_t a, e, b;
    };
    std::vector<offsets> off;
    for (const auto& s : shape_.adapters)
      off.push_back({place(static_cast<std::size_t>(s.rank * s.in_features)),
                     place(static_cast<std::size_t>(s.rank)),
                     place(static_cast<std::size_t>(s.out_features * s.rank))});
    params_.reset(new (std::align_val_t{64}) T[total]);
    grads_.reset(new (std::align_val_t{64}) T[total]);
    other_grads_.reset(new (std::align_val_t{64}) T[total]);
    // Magnitudes of a model in training: N(0, 0.02)-like A and B, small gradients.
    fill_uniform(params_.get(), total, 1, 0.035);
    fill_uniform(grads_.get(), total, 2, 1e-3);
    fill_uniform(other_grads_.get(), total, 3, 1e-3);
    for (std::size_t k = 0; k < shape_.adapters.size(); ++k) {
      const auto& s = shape_.adapters[k];
      const index_t r = s.rank, in = s.in_features, out = s.out_features;
      auto ref = [&](T* base) {
        return adalora::svd_adapter_ref<T>{
            adalora::matrix_view<T>(base + off[k].a, r, in, in, 1),
            adalora::vector_view<T>(base + off[k].e, r, 1),
            adalora::matrix_view<T>(base + off[k].b, out, r, r, 1)};
      };
      params_refs_.push_back(ref(params_.get()));
      grads_refs_.push_back(ref(grads_.get()));
      tensors_.push_back({params_refs_.back(), grads_refs_.back()});
      other_tensors_.push_back({params_refs_.back(), ref(other_grads_.get())});
    }
  }

  const model_shape& shape() const noexcept { return shape_; }
  const std::vector<adalora::svd_adapter_ref<T>>& params() const noexcept { return params_refs_; }
  const std::vector<adalora::svd_adapter_ref<T>>& grads() const noexcept { return grads_refs_; }
  /// The parameters with the first (even step) or second (odd step) set of gradients.
  const std::vector<adalora::adapter_tensors<T>>& tensors(std::int64_t step) const noexcept {
    return step % 2 == 0 ? tensors_ : other_tensors_;
  }

 private:
  struct aligned_delete {
    void operator()(T* p) const noexcept { ::operator delete[](p, std::align_val_t{64}); }
  };
  model_shape shape_;
  std::unique_ptr<T[], aligned_delete> params_;
  std::unique_ptr<T[], aligned_delete> grads_;
  std::unique_ptr<T[], aligned_delete> other_grads_;
  std::vector<adalora::svd_adapter_ref<T>> params_refs_;
  std::vector<adalora::svd_adapter_ref<T>> grads_refs_;
  std::vector<adalora::adapter_tensors<T>> tensors_;
  std::vector<adalora::adapter_tensors<T>> other_tensors_;
};

/// One slot of big objects keyed by a string: asking for another key frees what is held first,
/// so only one shape's buffers are alive at a time. Objects built under the same shape prefix
/// ("llama_r64/...") are kept together; a new prefix clears the slot.
class fixture_cache {
 public:
  template <class X>
  X& get(const std::string& group, const std::string& key, const std::function<X*()>& make) {
    if (group != group_) {
      items_.clear();  // free the previous shape's memory before allocating the next
      group_ = group;
    }
    for (auto& [k, p] : items_)
      if (k == key) return *static_cast<X*>(p.get());
    std::shared_ptr<void> p(make());
    items_.emplace_back(key, p);
    return *static_cast<X*>(p.get());
  }

 private:
  std::string group_;
  std::vector<std::pair<std::string, std::shared_ptr<void>>> items_;
};

inline fixture_cache& cache() {
  static fixture_cache c;
  return c;
}

template <class T>
model_tensors<T>& model(std::int64_t shape_index) {
  const model_shape& s = shape_by_index(shape_index);
  return cache().get<model_tensors<T>>(s.name, std::string("model/") + typeid(T).name(),
                                       [&] { return new model_tensors<T>(s); });
}

// ---- rooflines ---------------------------------------------------------------------------------

/// a[i] = b[i] + s·c[i] over [lo, hi): the STREAM triad kernel.
template <class T>
void triad_range(T* __restrict a, const T* __restrict b, const T* __restrict c, T s,
                 std::size_t lo, std::size_t hi) noexcept {
  for (std::size_t i = lo; i < hi; ++i) a[i] = b[i] + s * c[i];
}

/// Runs `work(lo, hi)` over [0, n) split evenly over `threads` threads (the calling thread takes
/// the last part) and returns the wall time in seconds.
template <class F>
double timed_split(std::size_t n, int threads, const F& work) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t + 1 < threads; ++t)
    pool.emplace_back([&, t] { work(n * t / threads, n * (t + 1) / threads); });
  work(n * (threads - 1) / threads, n);
  for (auto& th : pool) th.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Elements per triad array: 3 × 64M floats = 768 MB, well beyond any cache level (the L3 of
/// these VMs reports up to 300 MiB), so the triad measures DRAM.
inline constexpr std::size_t triad_elements = std::size_t{64} << 20;

/// The machine's measured STREAM triad bandwidth in bytes/s (STREAM's count: 3 × sizeof(float)
/// per element, the write-allocate read of `a` not counted) for 1 and 2 threads, measured once on
/// first use. Every "% of triad" counter divides by this. The best of 15 runs, as STREAM itself
/// reports: on a shared machine other tenants only ever slow a run down, so the best run is the
/// closest to what the memory system delivers, and fractions of it are conservative.
inline double triad_bandwidth(int threads) {
  static double bw[3] = {0, 0, 0};
  static std::vector<float> a, b, c;
  if (bw[threads] == 0) {
    a.assign(triad_elements, 1.0f);
    b.assign(triad_elements, 2.0f);
    c.assign(triad_elements, 3.0f);
    double best = 1e30;
    for (int rep = 0; rep < 15; ++rep)
      best = std::min(best, timed_split(triad_elements, threads, [&](std::size_t lo, std::size_t hi) {
                        triad_range(a.data(), b.data(), c.data(), 3.0f, lo, hi);
                      }));
    bw[threads] = 3.0 * sizeof(float) * static_cast<double>(triad_elements) / best;
    benchmark::DoNotOptimize(a.data());
    a = {};
    b = {};
    c = {};
  }
  return bw[threads];
}

/// Eigen's C = A·B rate in FLOP/s at n = 1024 (best of 7 runs, measured once on first use; see
/// triad_bandwidth for why the best): the compute roofline of this binary, built with the same
/// compiler flags as the kernels it judges.
template <class T>
double gemm_rate() {
  static double rate = 0;
  if (rate == 0) {
    constexpr index_t n = 1024;
    using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
    matrix a = matrix::Random(n, n), b = matrix::Random(n, n), c(n, n);
    c.noalias() = a * b;  // warm-up: Eigen's buffers, page faults
    double best = 1e30;
    for (int rep = 0; rep < 7; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      c.noalias() = a * b;
      benchmark::DoNotOptimize(c.data());
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    rate = 2.0 * n * n * n / best;
  }
  return rate;
}

/// Times every iteration of `body` on the wall clock (benchmarks register UseManualTime()), so
/// that multi-threaded work is timed as the caller sees it and the counters below can be plain
/// numbers. Returns the total seconds.
template <class F>
double timed_loop(benchmark::State& state, F&& body) {
  double total = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    body();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.SetIterationTime(s);
    total += s;
  }
  return total;
}

/// bytes_per_second and triad_fraction = (bytes/s) / (measured triad bandwidth at `threads`).
inline void set_bandwidth_counters(benchmark::State& state, double bytes_per_iteration,
                                   int threads, double seconds) {
  const double rate = bytes_per_iteration * static_cast<double>(state.iterations()) / seconds;
  state.counters["bytes_per_second"] = rate;
  state.counters["triad_fraction"] = rate / triad_bandwidth(threads);
}

/// FLOP/s, and gemm_fraction = (FLOP/s) / `gemm_rate` when a GEMM rate is given.
inline void set_flop_counters(benchmark::State& state, double flops_per_iteration, double seconds,
                              double gemm_rate = 0) {
  const double rate = flops_per_iteration * static_cast<double>(state.iterations()) / seconds;
  state.counters["FLOP/s"] = rate;
  if (gemm_rate > 0) state.counters["gemm_fraction"] = rate / gemm_rate;
}

}  // namespace adalora_bench
