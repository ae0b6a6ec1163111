#pragma once
// The run the checkpoint tests share: four adapters (one of rank 0), b0 = 11 -> bT = 5, T = 30,
// tinit = 5, tfinal = 7, delta_t = 3. Phases: warm-up t <= 5, reduction 5 < t <= 23 (masks at
// multiples of 3), final t > 23. T - tfinal = 23 is not a multiple of 3, so PEFT force-masks there
// and loralib does not (its first final-phase mask is at 24): the two semantics differ there.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/io/checkpoint.hpp"
#include "adalora/rank_allocator.hpp"

namespace checkpoint_run {

inline const std::vector<adalora::adapter_shape> run_shapes = {
    {"layers.0.q", 6, 5, 4}, {"layers.0.v", 3, 7, 4}, {"layers.1.q", 5, 4, 3}, {"layers.1.v", 4, 4, 0}};
inline constexpr std::int64_t total_steps = 32;  // runs past T into the final phase
inline const adalora::schedule_options run_schedule = {.initial_budget = 11, .target_budget = 5,
                                                       .total_step = 30, .tinit = 5, .tfinal = 7,
                                                       .delta_t = 3};

template <class T>
using allocator_t = adalora::rank_allocator<T>;

template <class T>
allocator_t<T> make_allocator(adalora::allocator_options o = {}, unsigned threads = 1) {
  o.threads = threads;
  return allocator_t<T>(run_shapes, adalora::cubic_schedule(run_schedule),
                        adalora::smoothed_sensitivity({.beta1 = 0.85, .beta2 = 0.85}), o);
}

/// A deterministic value in [-0.5, 0.5) from a few integers (splitmix64), so that gradients are
/// a pure function of (step, adapter, tensor, index) and need no generator state to resume.
inline double noise(std::uint64_t a, std::uint64_t b, std::uint64_t c, std::uint64_t d) {
  std::uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull) * 0xBF58476D1CE4E5B9ull ^
                    (c + 1) * 0x94D049BB133111EBull ^ (d + 7) * 0xD6E8FEB86659FD93ull;
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return static_cast<double>(x >> 11) / static_cast<double>(std::uint64_t{1} << 53) - 0.5;
}

template <class X>
std::uint64_t bits(X x) {
  if constexpr (sizeof(X) == 4) return std::bit_cast<std::uint32_t>(x);
  else return std::bit_cast<std::uint64_t>(x);
}

/// Everything observable about an allocator, as bits: its ranks, resumable state and last result.
template <class A>
std::vector<std::uint64_t> snapshot(const A& alloc) {
  std::vector<std::uint64_t> v;
  for (const auto& s : alloc.shapes()) v.push_back(static_cast<std::uint64_t>(s.rank));
  const auto s = alloc.resumable();
  v.push_back(static_cast<std::uint64_t>(s.last_step));
  v.push_back(s.force_masked);
  for (auto x : s.metric_state) v.push_back(bits(x));
  for (auto x : s.kept) v.push_back(x);
  for (auto x : s.scores) v.push_back(bits(x));
  const auto& r = *s.last;
  for (auto x : {r.step, r.budget, r.prune_count, r.non_finite, r.missing, std::int64_t(r.kept_total)})
    v.push_back(static_cast<std::uint64_t>(x));
  for (bool b : {r.mask_due, r.importance_updated, r.forced, r.skipped}) v.push_back(b);
  v.push_back(static_cast<std::uint64_t>(r.action));
  v.push_back(bits(r.threshold));
  for (auto k : r.kept) v.push_back(static_cast<std::uint64_t>(k));
  return v;
}

/// The first index where two snapshots (or traces) differ, -1 where they are equal.
inline std::ptrdiff_t first_difference(const std::vector<std::uint64_t>& a, const std::vector<std::uint64_t>& b) {
  const auto n = std::min(a.size(), b.size());
  for (std::size_t i = 0; i < n; ++i)
    if (a[i] != b[i]) return static_cast<std::ptrdiff_t>(i);
  return a.size() == b.size() ? -1 : static_cast<std::ptrdiff_t>(n);
}

/// How a resumed run gets its checkpoint across: as bytes, through a stream, or through a file
/// (file_and_config: the second allocator is also built from the file's configuration).
enum class via { bytes, file, file_and_config, stream };

/// Saves `alloc` by `how`: returns the bytes (bytes, stream), or writes `path` and returns none.
template <class A>
std::vector<std::uint8_t> save_via(via how, const A& alloc, const std::string& path) {
  if (how == via::bytes) return adalora::checkpoint_bytes(alloc);
  if (how == via::stream) {
    std::ostringstream out;
    adalora::write_checkpoint(alloc, out);
    const std::string s = out.str();
    return std::vector<std::uint8_t>(s.begin(), s.end());
  }
  adalora::save_checkpoint(alloc, path);
  return {};
}

/// Loads into `alloc` what save_via(how, ..., path) saved.
template <class A>
void load_via(via how, A& alloc, const std::vector<std::uint8_t>& saved, const std::string& path) {
  if (how == via::bytes) {
    adalora::load_checkpoint_bytes(alloc, saved);
  } else if (how == via::stream) {
    std::istringstream in(std::string(saved.begin(), saved.end()));
    adalora::read_checkpoint(alloc, in);
  } else {
    adalora::load_checkpoint(alloc, path);
  }
}

}  // namespace checkpoint_run
