#pragma once
// Software prefetch for the allocator's pass over memory.
//
// Why: one core's bandwidth is bounded by the cache misses it keeps in flight. The pass does
// about as much arithmetic per byte as the memory delivers, and while the core computes, the
// hardware prefetcher alone falls behind: at the LLaMA-7B r = 8 shape the step took ~34 ms
// against ~25 ms for the same loads and stores with trivial arithmetic. Asking for the data
// 512 elements ahead (2 KB of parameters, 4 KB of state) closed the gap (~23 ms); 128 elements
// were too close and 2048 no better (measured with benchmarks/compare.sh).

#include <cstddef>
#include <cstdint>

#include "adalora/matrix_view.hpp"

namespace adalora::detail {

/// How far ahead of the element being scored the loops prefetch, in elements.
inline constexpr index_t prefetch_distance = 512;

/// Asks for the cache line `bytes` past x. The address is formed as an integer: it may lie
/// past the end of the tensor (the last runs), which a prefetch may touch without fault but
/// pointer arithmetic may not reach.
template <int Write>
[[gnu::always_inline]] inline void prefetch_line(const void* x, std::size_t bytes) noexcept {
#if defined(__GNUC__)
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(x) + bytes), Write);
#else
  (void)x, (void)bytes;
#endif
}

/// Prefetches, prefetch_distance elements ahead, the data of the next N elements the loop will
/// reach there: parameters p, gradients g unless null, and state st (K values per element, read
/// and written) unless K is 0.
template <index_t N, class T>
[[gnu::always_inline]] inline void prefetch_ahead(const T* p, const T* g, const T* st, index_t K) noexcept {
  constexpr std::size_t line = 64, bytes = N * sizeof(T);
  constexpr std::size_t ahead = prefetch_distance * sizeof(T);
  const auto k = static_cast<std::size_t>(K);
  for (std::size_t b = 0; b < bytes; b += line) {
    prefetch_line<0>(p, ahead + b);
    if (g) prefetch_line<0>(g, ahead + b);
  }
  for (std::size_t b = 0; b < k * bytes; b += line) prefetch_line<1>(st, k * ahead + b);
}

}  // namespace adalora::detail
