#pragma once
// What the checkpoint fuzz target and its seed-corpus generator share: the allocator
// configuration the seeds are made for, tensors to step it with, and the checks a successful
// load must pass. Test code only.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <span>
#include <stdexcept>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/importance/magnitude.hpp"
#include "adalora/io/checkpoint.hpp"
#include "adalora/rank_allocator.hpp"

namespace fuzz {

/// Three adapters, one of rank 0: b0 = 5 -> bT = 2, T = 12, tinit = 2, tfinal = 3, delta_t = 2.
inline std::vector<adalora::adapter_shape> shapes() {
  return {{"q", 5, 4, 3}, {"v", 3, 6, 2}, {"o", 4, 4, 0}};
}
inline adalora::schedule_options schedule_options() {
  return {.initial_budget = 5, .target_budget = 2, .total_step = 12, .tinit = 2, .tfinal = 3,
          .delta_t = 2};
}

/// Stops the process with a message: a broken invariant is a finding, like a crash.
[[noreturn]] inline void invariant_broken(const char* what) {
  std::fprintf(stderr, "fuzz: invariant broken: %s\n", what);
  std::abort();
}

/// The extents this process holds of an adapter: its shard's counts (-1 = to the end).
struct local_extent {
  adalora::index_t r, in, out;
  explicit local_extent(const adalora::adapter_shape& s)
      : r(count(s.shard.triplet_count, s.shard.triplet_begin, s.rank)),
        in(count(s.shard.in_count, s.shard.in_begin, s.in_features)),
        out(count(s.shard.out_count, s.shard.out_begin, s.out_features)) {}
  static adalora::index_t count(adalora::index_t c, adalora::index_t begin, adalora::index_t n) {
    return c >= 0 ? c : n - begin;
  }
};

/// Owning parameters and gradients for any shapes (the local slice when a shape is a shard),
/// with finite values that change per step.
template <class T>
struct tensors {
  std::vector<adalora::adapter_shape> shapes;
  std::vector<std::vector<T>> A, E, B, gA, gE, gB;
  std::vector<adalora::adapter_tensors<T>> views;

  explicit tensors(std::vector<adalora::adapter_shape> s) : shapes(std::move(s)) {
    for (const auto& sh : shapes) {
      const local_extent d(sh);
      const auto a = static_cast<std::size_t>(d.r * d.in);
      const auto b = static_cast<std::size_t>(d.out * d.r);
      const auto r = static_cast<std::size_t>(d.r);
      A.emplace_back(a, T(0.5));
      E.emplace_back(r, T(1));
      B.emplace_back(b, T(-0.25));
      gA.emplace_back(a);
      gE.emplace_back(r);
      gB.emplace_back(b);
    }
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      const local_extent d(shapes[i]);
      views.push_back({{adalora::make_matrix_view(A[i].data(), d.r, d.in),
                        adalora::vector_view<T>(E[i].data(), d.r),
                        adalora::make_matrix_view(B[i].data(), d.out, d.r)},
                       {adalora::make_matrix_view<const T>(gA[i].data(), d.r, d.in),
                        adalora::vector_view<const T>(gE[i].data(), d.r),
                        adalora::make_matrix_view<const T>(gB[i].data(), d.out, d.r)}});
    }
  }
  /// Gradients of step t (a fixed pattern of small values, different per element and step).
  void set_gradients(std::int64_t t) {
    std::uint32_t x = static_cast<std::uint32_t>(t) * 2654435761u + 1u;
    for (auto* gs : {&gA, &gE, &gB})
      for (auto& g : *gs)
        for (auto& v : g) {
          x = x * 1664525u + 1013904223u;
          v = T(static_cast<int>(x >> 24) - 128) / T(64);
        }
  }
};

/// Values an allocator for these shapes keeps (state of the elements this process holds, and
/// the per-triplet and block sums of the whole adapters), or max() beyond 1e18.
inline std::uint64_t footprint(std::span<const adalora::adapter_shape> shapes) {
  constexpr long double block = 256.0L;
  long double n = 0;
  for (const auto& s : shapes) {
    const local_extent d(s);
    const long double r = static_cast<long double>(s.rank);
    n += static_cast<long double>(d.r) *
         (static_cast<long double>(d.in) + 1.0L + static_cast<long double>(d.out));
    n += r * (1.0L + std::ceil(static_cast<long double>(s.in_features) / block) +
              std::ceil(static_cast<long double>(s.out_features) / block));
    if (n > 1e18L) return std::numeric_limits<std::uint64_t>::max();
  }
  return static_cast<std::uint64_t>(n);
}

/// Everything observable about an allocator, for all-or-nothing checks.
template <class A>
std::vector<double> snapshot(const A& alloc) {
  const auto s = alloc.resumable();
  std::vector<double> v = {double(s.last_step), double(s.force_masked), double(s.last->budget),
                           double(s.last->prune_count), double(s.last->kept_total), s.last->threshold};
  for (auto x : s.metric_state) v.push_back(double(x));
  for (auto x : s.kept) v.push_back(double(x));
  for (auto x : s.scores) v.push_back(x);
  for (auto k : s.last->kept) v.push_back(double(k));
  return v;
}

/// The checks a successfully loaded allocator must pass: kept counts agree with the mask, saving
/// it again gives back the loaded bytes (the format is canonical; the writer string and the
/// thread count are the allocator's own), and it can take a step.
template <class T, class M, class S>
void check_loaded(adalora::rank_allocator<T, M, S>& alloc, std::span<const std::uint8_t> loaded) {
  const auto st = alloc.resumable();
  adalora::index_t total = 0;
  for (std::size_t a = 0; a < alloc.num_adapters(); ++a) {
    adalora::index_t kept = 0;
    for (auto k : alloc.kept_mask(a)) kept += k;
    if (kept != st.last->kept[a]) invariant_broken("kept count differs from the kept mask");
    total += kept;
  }
  if (total != st.last->kept_total) invariant_broken("kept_total differs from the kept mask");

  auto im = adalora::detail::ckpt::parse<T>(loaded);
  const auto mine = adalora::detail::ckpt::image_of(alloc);
  im.writer = mine.writer;
  im.options.threads = mine.options.threads;
  const auto expected = adalora::detail::ckpt::encode(im);
  if (adalora::checkpoint_bytes(alloc) != expected)
    invariant_broken("saving a loaded allocator does not give back the loaded checkpoint");

  if (st.last_step >= std::numeric_limits<std::int64_t>::max() - 1) return;
  if (footprint(alloc.shapes()) > (1u << 16)) return;  // keep each input fast
  tensors<T> t({alloc.shapes().begin(), alloc.shapes().end()});
  t.set_gradients(st.last_step + 1);
  try {
    alloc.step(st.last_step + 1, t.views);
  } catch (const std::domain_error&) {
    // Allowed: state values near the type's maximum overflow a score; step() names it.
  }
}

}  // namespace fuzz
