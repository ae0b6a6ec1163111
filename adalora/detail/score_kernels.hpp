#pragma once
// The element loops of the rank allocator's single pass over memory: the metric's update (or
// frozen score) of a run of elements, and the fixed-order sums of their scores.
//
// Why the loops look the way they do (each point was measured with benchmarks/adalora_bench.cpp):
//  * The common case, a contiguous run of finite values, goes through blocks of a compile-time
//    width on __restrict pointers. g++ at -O2 (Bazel's -c opt) only vectorises loops of known
//    trip count that need no runtime alias check (its "very cheap" cost model); a loop over n
//    elements through a metric call on possibly aliasing pointers stays scalar even at -O3.
//  * Each block is tested for NaN/infinity (an OR of exponent tests on values about to be read
//    anyway) before its update, instead of separate passes over the parameters and gradients.
//  * The metric is copied into a local when that is cheap, so that the compiler can see that
//    stores to the state do not change its coefficients.
//  * A metric with the block hook (update_block, importance/metric.hpp) updates groups of
//    metric_block (8) contiguous elements itself, in its own vector code; the loops around it
//    keep the NaN/infinity test, the validation of the scores, the eight-lane sums and B's
//    column sums (score_columns) in vector registers. No metric is named here: the built-in
//    smoothed_sensitivity takes that path through its hook, as a user's metric can.
//  * The NaN/infinity test of the hook's path is made per chunk of groups, one chunk ahead (a
//    test per group, or one whose latency the loop waits for, cost 15-25% of the step), or, for a
//    hook that keeps the state of non-finite elements (update_block_keeps_non_finite_state),
//    alongside the hook, with the run scored again from the state in the rare case: as cheap as
//    the old hand-written path, which folded the test into the update.
// Numerics are those of the plain loop: the same metric calls on the same values (or, for a run
// scored again, score() on the state, which equals update()'s return), the same summation order.
// Only the speed differs.

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <type_traits>
#include <utility>

#include "adalora/detail/prefetch.hpp"
#include "adalora/detail/vector_ext.hpp"
#include "adalora/importance/metric.hpp"
#include "adalora/matrix_view.hpp"

// The fixed-width loops must stay loops until the vectoriser sees them: g++ -O3 fully unrolls
// small constant trip counts first ("cunrolli"), and the unrolled straight-line code then stays
// scalar. And the block functions must be inlined into the run loop (g++ declines for size).
#if defined(__GNUC__) && !defined(__clang__)
#define ADALORA_VECTOR_LOOP _Pragma("GCC unroll 1")
#else
#define ADALORA_VECTOR_LOOP
#endif
#if defined(__GNUC__)
#define ADALORA_INLINE [[gnu::always_inline]] inline
#define ADALORA_INLINE_LAMBDA __attribute__((always_inline))
// Inlines every call in the function's body, recursively: a metric's update_block is then
// inlined into the allocator's loop without the metric having to ask for it.
#define ADALORA_FLATTEN [[gnu::flatten]]
#else
#define ADALORA_INLINE inline
#define ADALORA_INLINE_LAMBDA
#define ADALORA_FLATTEN
#endif

namespace adalora::detail {

/// What a pass over the elements does: update the state and score (before the final phase),
/// score from the frozen state, or only count non-finite parameters and gradients.
enum class pass_mode : std::uint8_t { update, frozen, check };

/// Elements per block of the vectorised loop: two AVX vectors of float, four of double.
inline constexpr index_t vector_block = 16;

template <class T>
bool is_non_finite(T x) noexcept {
  using bits_t = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  constexpr auto exponent = static_cast<bits_t>(sizeof(T) == 4 ? 0x7f800000ull : 0x7ff0000000000000ull);
  return (std::bit_cast<bits_t>(x) & exponent) == exponent;
}

/// The metric as the vectorised loop uses it: a copy when trivially copyable and small.
template <class Metric>
using metric_local = std::conditional_t<
    std::is_trivially_copyable_v<Metric> && sizeof(Metric) <= 256, const Metric, const Metric&>;

/// One element, every case handled: a non-finite parameter or gradient leaves the state alone
/// and the element is scored from it (0 for a non-finite parameter). Returns 1 for such an
/// element, else 0; the score goes to out.
template <pass_mode Mode, class T, class Metric>
std::int64_t score_one(const Metric& m, tensor_role role, T x, T dx, T* st, double& out) {
  constexpr std::size_t K = Metric::state_size;
  const bool ok = !is_non_finite(x) && (Mode == pass_mode::frozen || !is_non_finite(dx));
  if constexpr (Mode == pass_mode::update) {
    if (ok) {
      out = static_cast<double>(m.update(role, x, dx, std::span<T, K>(st, K)));
      return 0;
    }
  }
  if constexpr (Mode != pass_mode::check)
    out = is_non_finite(x) ? 0.0 : static_cast<double>(m.score(role, x, std::span<const T, K>(st, K)));
  return ok ? 0 : 1;
}

/// score_one for n elements (strides sp and sg): returns how many had a non-finite parameter or
/// gradient. The path for blocks with such values, for tails and for strided runs.
template <pass_mode Mode, class T, class Metric>
std::int64_t score_each(const Metric& m, tensor_role role, const T* p, index_t sp, const T* g,
                        index_t sg, T* st, index_t n, double* out) {
  constexpr auto K = static_cast<index_t>(Metric::state_size);
  std::int64_t bad = 0;
  for (index_t l = 0; l < n; ++l) bad += score_one<Mode>(m, role, p[l * sp], g[l * sg], st + l * K, out[l]);
  return bad;
}

/// vector_block finite elements of a contiguous run: no test, no branch, so it vectorises.
template <pass_mode Mode, class T, class Metric>
ADALORA_INLINE void score_block(const Metric& m, tensor_role role, const T* __restrict p, const T* __restrict g,
                 T* __restrict st, double* __restrict out) {
  constexpr std::size_t K = Metric::state_size;
  ADALORA_VECTOR_LOOP
  for (index_t l = 0; l < vector_block; ++l) {
    // The metric sees a copy of the element's state: through a span of st itself g++ loses the
    // __restrict and must assume that a state store may change the next parameter.
    T s[K > 0 ? K : 1];
    T* e = st + l * static_cast<index_t>(K);
    for (std::size_t k = 0; k < K; ++k) s[k] = e[k];
    if constexpr (Mode == pass_mode::update) {
      out[l] = static_cast<double>(m.update(role, p[l], g[l], std::span<T, K>(s, K)));
      for (std::size_t k = 0; k < K; ++k) e[k] = s[k];
    } else {
      out[l] = static_cast<double>(m.score(role, p[l], std::span<const T, K>(s, K)));
    }
  }
}

/// True iff the N parameters (and, unless frozen, gradients) are all finite: x − x is +0 for a
/// finite x and NaN otherwise. (A test on the bits, as is_non_finite does, stays scalar: g++
/// finds no vector type for the bit_cast.)
template <pass_mode Mode, index_t N = vector_block, class T>
ADALORA_INLINE bool block_finite(const T* __restrict p, const T* __restrict g) noexcept {
  unsigned any = 0;
  ADALORA_VECTOR_LOOP
  for (index_t l = 0; l < N; ++l) {
    any |= static_cast<unsigned>(p[l] - p[l] != T(0));
    if constexpr (Mode != pass_mode::frozen) any |= static_cast<unsigned>(g[l] - g[l] != T(0));
  }
  return any == 0;
}

/// True where a pass hands groups of metric_block contiguous elements to the metric's own
/// update_block (the block hook, importance/metric.hpp): updating, with a metric that has it for T.
template <pass_mode Mode, class T, class Metric>
inline constexpr bool uses_block_hook = Mode == pass_mode::update && has_update_block<Metric, T>;

/// True where B's rows are scored by score_columns (column sums in vector registers).
template <pass_mode Mode, class T, class Metric>
inline constexpr bool uses_column_kernel = ADALORA_VECTOR_EXTENSIONS && uses_block_hook<Mode, T, Metric>;

/// Where a run's scores go: summed (a row of A: only the sum is kept) or stored (E and B).
enum class score_sink : std::uint8_t { sum, store };

/// What a run of elements gave: elements with a non-finite parameter or gradient (see
/// score_one), the sum of the scores (score_sink::sum), and whether every score was finite and
/// >= 0 (a metric's contract).
struct run_summary {
  std::int64_t non_finite = 0;
  double sum = 0;
  bool valid = true;
};

/// 1 iff x is not finite and >= 0 (NaN fails both compares), or with MayOverflow (a metric whose
/// scores may exceed double's range, see metric.hpp) iff x is not >= 0: +inf is then a score
/// beyond double. Combined with a non-short-circuit & so that loops over it vectorise; &&
/// compiles to a branch per element.
template <bool MayOverflow = false>
ADALORA_INLINE unsigned invalid_score(double x) noexcept {
  if constexpr (MayOverflow)
    return static_cast<unsigned>(x >= 0.0) ^ 1u;
  else
    return (static_cast<unsigned>(x >= 0.0) & static_cast<unsigned>(x <= std::numeric_limits<double>::max())) ^ 1u;
}

inline constexpr auto block_elements = static_cast<index_t>(metric_block);

/// True if the N parameters and gradients are all finite; may be false for finite values whose
/// sum overflows (the caller then tests each group exactly, at a small cost). Each lane adds up
/// its p and g: a NaN or infinite p or g makes its lane's sum NaN or infinite (∞ − ∞ included),
/// so that x − x of that lane's sum is NaN, not 0. Two vector additions per eight float
/// elements, each with its load folded in, in four independent chains (one chain's latency,
/// 3 cycles per addition, would make the test cost more than the updates it guards), and one
/// reduction per call.
template <index_t N, class T>
ADALORA_INLINE bool chunk_finite(const T* __restrict p, const T* __restrict g) noexcept {
  static_assert(N % 16 == 0);
#if ADALORA_VECTOR_EXTENSIONS
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    using vec = std::conditional_t<std::is_same_v<T, float>, v8f, v4d>;
    constexpr index_t L = sizeof(vec) / sizeof(T);  // lanes
    vec acc[4] = {};
    for (index_t i = 0; i < N; i += 2 * L) {
      vec x[4];
      std::memcpy(&x[0], p + i, sizeof(vec));
      std::memcpy(&x[1], p + i + L, sizeof(vec));
      std::memcpy(&x[2], g + i, sizeof(vec));
      std::memcpy(&x[3], g + i + L, sizeof(vec));
      for (int c = 0; c < 4; ++c) acc[c] += x[c];
    }
    // NaN in every lane after a non-finite value, else 0; then folded in halves.
    const vec sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    const vec zero = sum - sum;
    if constexpr (L == 8) {
      const v4f half = __builtin_shufflevector(zero, zero, 0, 1, 2, 3) + __builtin_shufflevector(zero, zero, 4, 5, 6, 7);
      const v4f quarter = half + __builtin_shufflevector(half, half, 2, 3, 0, 1);
      return quarter[0] + quarter[1] == 0.0f;
    } else {
      return (zero[0] + zero[1]) + (zero[2] + zero[3]) == 0.0;
    }
  }
#endif
  T acc[16] = {};
  for (index_t i = 0; i < N; i += 16)
    for (index_t l = 0; l < 16; ++l) acc[l] += p[i + l] + g[i + l];
  T all = T(0);
  for (index_t l = 0; l < 16; ++l) all += acc[l];
  return all - all == T(0);
}

/// Whether every parameter and gradient of the groups shown to it was finite, tested alongside a
/// block hook that keeps the state of non-finite elements (block_keeps_non_finite_state): each
/// group's values are added to running vector sums (two additions per eight float elements,
/// which the compiler may fold into the hook's own loads), and finite() looks at the sums once,
/// at the end of the run. As chunk_finite, it may report a run of huge finite values as not
/// finite, which only costs the caller a rescore.
template <class T>
struct finite_tracker {
#if ADALORA_VECTOR_EXTENSIONS
  using vec = std::conditional_t<std::is_same_v<T, float>, v8f, v4d>;
  static constexpr index_t lanes = sizeof(vec) / sizeof(T);
  vec acc{};  // one register: the loops it runs in keep many sums in registers already

  ADALORA_INLINE void add(const T* p, const T* g) noexcept {
    for (index_t v = 0; v < block_elements; v += lanes) {
      vec x, y;
      std::memcpy(&x, p + v, sizeof x);
      std::memcpy(&y, g + v, sizeof y);
      acc += x;
      acc += y;
    }
  }
  bool finite() const noexcept {
    T all = T(0);
    for (index_t l = 0; l < lanes; ++l) all += acc[l] - acc[l];
    return all == T(0);
  }
#else
  T acc[block_elements] = {};

  void add(const T* p, const T* g) noexcept {
    for (index_t l = 0; l < block_elements; ++l) acc[l] += p[l] + g[l];
  }
  bool finite() const noexcept {
    T all = T(0);
    for (T a : acc) all += a - a;
    return all == T(0);
  }
#endif
};

/// For a run of n contiguous elements that a block hook updated while some value was not finite
/// (finite_tracker): each element's score as score_one gives it (0 for a non-finite parameter,
/// else score() from the state, which the hook left alone for a non-finite parameter or
/// gradient, and which equals update()'s return for the others: requirement 3 of metric.hpp),
/// passed in order to take(element, score). Returns the number of elements with a non-finite
/// parameter or gradient. The rare case: it need not be fast.
template <class T, class Metric, class Take>
std::int64_t rescore(const Metric& m, tensor_role role, const T* p, const T* g, const T* st,
                     index_t n, Take&& take) {
  constexpr std::size_t K = Metric::state_size;
  std::int64_t bad = 0;
  for (index_t e = 0; e < n; ++e) {
    const bool p_bad = is_non_finite(p[e]);
    bad += p_bad || is_non_finite(g[e]) ? 1 : 0;
    take(e, p_bad ? 0.0
                  : static_cast<double>(m.score(role, p[e], std::span<const T, K>(st + e * static_cast<index_t>(K), K))));
  }
  return bad;
}

/// The hook's path over `groups` groups of metric_block contiguous elements (p, g, st), in
/// chunks of G groups: one finiteness test per chunk (chunk_finite, inside the distance the
/// loops prefetch ahead), then loop(k_begin, k_end, std::bool_constant<known_finite>) over the
/// chunk's groups. Groups past the last whole chunk, and the groups of a chunk that failed the
/// test, are tested one by one (known_finite false). With Tracked (a hook that keeps the state of
/// non-finite elements, see finite_tracker), all groups in one loop, untested.
template <index_t G, bool Tracked, class T, class Loop>
ADALORA_INLINE void in_chunks(const T* p, const T* g, index_t groups, Loop&& loop) {
  constexpr index_t B = block_elements;
  if constexpr (Tracked) {  // tested alongside, by the groups themselves: no chunks
    loop(index_t{0}, groups, std::true_type{});
    return;
  }
  // Each chunk's test is made one chunk ahead, so that its latency overlaps the chunk before.
  bool next = groups >= G && chunk_finite<G * B>(p, g);
  index_t k = 0;
  for (; k + G <= groups; k += G) {
    const bool finite = next;
    if (k + 2 * G <= groups) next = chunk_finite<G * B>(p + B * (k + G), g + B * (k + G));
    if (finite)
      loop(k, k + G, std::true_type{});
    else
      loop(k, k + G, std::false_type{});
  }
  if (k < groups) loop(k, groups, std::false_type{});
}

/// One group of metric_block contiguous elements in an update pass with the block hook: the
/// metric's update_block (its values added to `seen` first where the hook keeps the state of
/// non-finite elements), or, where the group is not known to be finite and a parameter or
/// gradient is not, score_one per element (through `fallback`, the same metric: `m` is a local
/// copy whose address the caller keeps to itself, so that its members may stay in registers).
/// Scores to s[0, metric_block); returns the number of non-finite elements.
template <bool KnownFinite, class T, class Metric>
ADALORA_INLINE std::int64_t update_group(const Metric& m, const Metric& fallback, tensor_role role,
                                         const T* p, const T* g, T* st, double* s,
                                         finite_tracker<T>& seen) {
  constexpr std::size_t K = Metric::state_size;
  prefetch_ahead<block_elements>(p, g, st, static_cast<index_t>(K));
  if constexpr (block_keeps_non_finite_state<Metric>) seen.add(p, g);
  if (KnownFinite || block_finite<pass_mode::update, block_elements>(p, g)) {
    m.update_block(role, std::span<const T, metric_block>(p, metric_block),
                   std::span<const T, metric_block>(g, metric_block),
                   std::span<T, metric_block * K>(st, metric_block * K),
                   std::span<double, metric_block>(s, metric_block));
    return 0;
  }
  return score_each<pass_mode::update>(fallback, role, p, 1, g, 1, st, block_elements, s);
}

#if ADALORA_VECTOR_EXTENSIONS
/// The lanes of a comparison of two v4d.
using v4d_mask = decltype(v4d{} < v4d{});

/// Clears the lanes of ok whose score in x is not valid (see invalid_score).
template <bool MayOverflow>
ADALORA_INLINE void keep_valid(v4d_mask& ok, const v4d& x) noexcept {
  const v4d zero{0, 0, 0, 0};
  if constexpr (MayOverflow) {
    ok &= x >= zero;
  } else {
    const v4d max = v4d{} + std::numeric_limits<double>::max();
    ok &= (x >= zero) & (x <= max);
  }
}

/// True iff every lane of m is set.
ADALORA_INLINE bool all_lanes(const v4d_mask& m) noexcept {
  bool all = true;
  for (int i = 0; i < 4; ++i) all &= m[i] != 0;
  return all;
}

/// Groups of eight scores taken in turn: the eight lane sums (lane l takes elements l, l + 8, ...
/// in order, as score_run's plain loop adds them) and whether every score was valid, in vector
/// registers (g++ leaves the plain loop's reduction of the validity scalar).
struct score_lanes {
  v4d low{0, 0, 0, 0};
  v4d high{0, 0, 0, 0};
  v4d_mask ok = v4d_mask{} - 1;

  template <bool MayOverflow, bool Sum>
  ADALORA_INLINE void take(const double* s) noexcept {
    v4d a, b;
    std::memcpy(&a, s, sizeof a);
    std::memcpy(&b, s + 4, sizeof b);
    if constexpr (Sum) low += a, high += b;
    keep_valid<MayOverflow>(ok, a);
    keep_valid<MayOverflow>(ok, b);
  }
  void unpack(double* lane) const noexcept {
    std::memcpy(lane, &low, sizeof low);
    std::memcpy(lane + 4, &high, sizeof high);
  }
  bool valid() const noexcept { return all_lanes(ok); }
};
#endif

/// Scores n elements (parameters p and gradients g with strides sp and sg, their state st, K
/// values each). Sink::store writes the scores to out[0, n); Sink::sum adds them up in a fixed
/// order (eight interleaved lanes over the full groups of eight, the rest in order, then a fixed
/// tree: the same on every machine and for every thread count) without writing them anywhere.
/// In check mode it only counts non-finite elements. One pass: each block of elements is
/// checked, updated, summed and validated while it is in registers. A sum of valid scores beyond
/// double's range is +inf (never NaN: the scores are >= 0).
template <pass_mode Mode, score_sink Sink, class T, class Metric>
ADALORA_FLATTEN run_summary score_run(const Metric& metric, tensor_role role, const T* p, index_t sp, const T* g,
                      index_t sg, T* st, index_t n, double* out) {
  constexpr auto K = static_cast<index_t>(Metric::state_size);
  constexpr bool scores = Mode != pass_mode::check;
  constexpr bool may_overflow = scores_may_overflow<Metric>;
  metric_local<Metric> m = metric;
  run_summary r;
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  double tail = 0;
  unsigned invalid = 0;
  double block[vector_block];
  index_t j = 0;
  // A metric with the block hook, updating: its groups of eight, summed lane by lane.
  if constexpr (uses_block_hook<Mode, T, Metric>) {
    if (sp == 1 && sg == 1) {
      constexpr bool store = Sink == score_sink::store;
      constexpr bool tracked = block_keeps_non_finite_state<Metric>;
      const index_t groups = n / block_elements;
      double group[block_elements];
      finite_tracker<T> seen;
#if ADALORA_VECTOR_EXTENSIONS
      score_lanes acc;
#endif
      in_chunks<8, tracked>(p, g, groups, [&]<bool Finite>(index_t k0, index_t k1, std::bool_constant<Finite>) ADALORA_INLINE_LAMBDA {
        for (index_t k = k0; k < k1; ++k) {
          const index_t at = k * block_elements;
          double* o = store ? out + at : group;
          r.non_finite += update_group<Finite>(m, metric, role, p + at, g + at, st + at * K, o, seen);
#if ADALORA_VECTOR_EXTENSIONS
          acc.take<may_overflow, !store>(o);
#else
          for (index_t l = 0; l < block_elements; ++l) {
            invalid |= invalid_score<may_overflow>(o[l]);
            if constexpr (!store) lane[l] += o[l];
          }
#endif
        }
      });
      j = groups * block_elements;
      if (tracked && !seen.finite()) {  // score the groups again from the state
#if !ADALORA_VECTOR_EXTENSIONS
        invalid = 0;
        for (double& x : lane) x = 0;
#endif
        r.non_finite += rescore(metric, role, p, g, st, j, [&](index_t e, double x) {
          invalid |= invalid_score<may_overflow>(x);
          if constexpr (store)
            out[e] = x;
          else
            lane[e % 8] += x;
        });
      } else {
#if ADALORA_VECTOR_EXTENSIONS
        acc.unpack(lane);
        invalid |= acc.valid() ? 0u : 1u;
#endif
      }
    }
  }
  if (sp == 1 && sg == 1) {
    for (; j + vector_block <= n; j += vector_block) {
      double* o = Sink == score_sink::store ? out + j : block;
      prefetch_ahead<vector_block>(p + j, Mode == pass_mode::frozen ? nullptr : g + j,
                                   st + j * K, Mode == pass_mode::check ? 0 : K);
      if (block_finite<Mode>(p + j, g + j)) {
        if constexpr (scores) score_block<Mode>(m, role, p + j, g + j, st + j * K, o);
      } else {
        r.non_finite += score_each<Mode>(m, role, p + j, 1, g + j, 1, st + j * K, vector_block, o);
      }
      if constexpr (scores) {
        ADALORA_VECTOR_LOOP
        for (index_t l = 0; l < vector_block; ++l) invalid |= invalid_score<may_overflow>(o[l]);
        if constexpr (Sink == score_sink::sum)
          for (index_t h = 0; h < vector_block; h += 8)
            for (index_t l = 0; l < 8; ++l) lane[l] += o[h + l];
      }
    }
  }
  // The rest (and strided runs) one element at a time, in groups of eight for the sum's order.
  while (j < n) {
    const index_t c = n - j < 8 ? n - j : 8;
    double* o = Sink == score_sink::store ? out + j : block;
    r.non_finite += score_each<Mode>(m, role, p + j * sp, sp, g + j * sg, sg, st + j * K, c, o);
    if constexpr (scores) {
      for (index_t l = 0; l < c; ++l) invalid |= invalid_score<may_overflow>(o[l]);
      if constexpr (Sink == score_sink::sum) {
        if (c == 8)
          for (index_t l = 0; l < 8; ++l) lane[l] += o[l];
        else
          for (index_t l = 0; l < c; ++l) tail += o[l];
      }
    }
    j += c;
  }
  r.sum = (((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))) + tail;
  r.valid = invalid == 0;
  return r;
}

/// The widest rows score_columns takes (its lanes live on the stack).
inline constexpr index_t max_column_kernel_width = 256;

#if ADALORA_VECTOR_EXTENSIONS
/// An update pass over `rows` contiguous rows of `width` elements (rows of B, one per output
/// feature, one element per triplet; width a multiple of 4, at most max_column_kernel_width)
/// with the metric's block hook, adding each column's scores to col[i] in row order: the same
/// sums as adding row after row, without writing the scores anywhere. Used where
/// uses_column_kernel holds.
///
/// The column sums live in width / 4 vectors of four ("quads"); the eight scores of each group
/// go to two consecutive quads, cyclically, so that every column is one chain of additions in
/// row order whatever the width. For 8 and 12 columns (r = 8, 12: the common ranks) the quads
/// stay in registers.
template <class T, class Metric>
ADALORA_FLATTEN run_summary score_columns(const Metric& metric, const T* p, const T* g, T* st, index_t rows,
                          index_t width, double* col) {
  constexpr auto K = static_cast<index_t>(Metric::state_size);
  constexpr bool may_overflow = scores_may_overflow<Metric>;
  constexpr bool tracked = block_keeps_non_finite_state<Metric>;
  constexpr index_t B = block_elements;
  metric_local<Metric> m = metric;
  const index_t quads = width / 4;
  const index_t n = rows * width, groups = n / B;
  v4d sum[max_column_kernel_width / 4];
  for (index_t q = 0; q < quads; ++q) std::memcpy(&sum[q], col + 4 * q, sizeof sum[q]);
  v4d_mask ok = v4d_mask{} - 1;
  std::int64_t bad = 0;
  finite_tracker<T> seen;
  // Group k's eight scores into two column quads.
  auto group = [&]<bool Finite>(std::bool_constant<Finite>, index_t k, v4d& first, v4d& second) ADALORA_INLINE_LAMBDA {
    double s[B];
    bad += update_group<Finite>(m, metric, tensor_role::B, p + B * k, g + B * k, st + B * k * K, s, seen);
    v4d low, high;
    std::memcpy(&low, s, sizeof low);
    std::memcpy(&high, s + 4, sizeof high);
    first += low;
    second += high;
    keep_valid<may_overflow>(ok, low);
    keep_valid<may_overflow>(ok, high);
  };
  // Chunks of 24 groups: a whole number of the three-group cycle below.
  constexpr index_t chunk = 24;
  index_t k = 0;
  if (quads == 2) {  // a group is a row
    v4d s0 = sum[0], s1 = sum[1];
    in_chunks<chunk, tracked>(p, g, groups, [&](index_t k0, index_t k1, auto finite) ADALORA_INLINE_LAMBDA {
      for (index_t i = k0; i < k1; ++i) group(finite, i, s0, s1);
    });
    k = groups;
    sum[0] = s0, sum[1] = s1;
  } else if (quads == 3) {  // three groups make two rows
    v4d s0 = sum[0], s1 = sum[1], s2 = sum[2];
    in_chunks<chunk, tracked>(p, g, groups / chunk * chunk, [&](index_t k0, index_t k1, auto finite) ADALORA_INLINE_LAMBDA {
      for (index_t i = k0; i < k1; i += 3)
        group(finite, i, s0, s1), group(finite, i + 1, s2, s0), group(finite, i + 2, s1, s2);
    });
    k = groups / chunk * chunk;
    sum[0] = s0, sum[1] = s1, sum[2] = s2;
  }
  // Other widths, and what the loops above left, through the quads in memory. Half-group h
  // (four elements) belongs to quad h mod quads.
  auto next = [quads](index_t x) { return x + 1 == quads ? 0 : x + 1; };
  index_t q = 2 * k % quads;
  in_chunks<chunk, tracked>(p + B * k, g + B * k, groups - k, [&](index_t k0, index_t k1, auto finite) ADALORA_INLINE_LAMBDA {
    for (index_t i = k + k0; i < k + k1; ++i) {
      const index_t q1 = next(q);
      group(finite, i, sum[q], sum[q1]);
      q = next(q1);
    }
  });
  if (n % B != 0) {  // four elements left: the end of the last row
    double s[4];
    const index_t at = B * groups;
    bad += score_each<pass_mode::update>(metric, tensor_role::B, p + at, 1, g + at, 1, st + at * K, 4, s);
    v4d x;
    std::memcpy(&x, s, sizeof x);
    sum[q] += x;
    keep_valid<may_overflow>(ok, x);
  }
  run_summary r;
  if (tracked && !seen.finite()) {  // col still holds the sums before this call
    unsigned invalid = 0;
    r.non_finite = rescore(metric, tensor_role::B, p, g, st, n, [&](index_t e, double x) {
      col[e % width] += x;
      invalid |= invalid_score<may_overflow>(x);
    });
    r.valid = invalid == 0;
    return r;
  }
  for (index_t i = 0; i < quads; ++i) std::memcpy(col + 4 * i, &sum[i], sizeof sum[i]);
  r.non_finite = bad;
  r.valid = all_lanes(ok);
  return r;
}
#endif

/// col[i] += s[i] for i < n, in blocks of fixed width (vectorised at -O2 too).
inline void add_scores(double* __restrict col, const double* __restrict s, index_t n) noexcept {
  index_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (index_t l = 0; l < 4; ++l) col[i + l] += s[i + l];
  for (; i < n; ++i) col[i] += s[i];
}

}  // namespace adalora::detail
