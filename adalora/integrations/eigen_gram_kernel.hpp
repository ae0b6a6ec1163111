#pragma once
// eigen_gram_kernel<T, Acc>: the orthogonality regularizer's Kernel policy on Eigen's packet math
// (see portable_gram_kernel in orthogonality.hpp for the contract):
//     adalora::orthogonality_regularizer<float, adalora::eigen_gram_kernel<float>> orth;
// Agreement with the portable kernel, not bit parity: see eigen_kernels.hpp.
//
// Why its own register blocks and not Eigen's GEMM (which the first version called: a symmetric
// rank update for C, a GEMM for (C − I)·M). The regularizer's products are thin, r × n by n × r
// and r × r by r × n with r = 8 to 64, and there are many of them (448 factors in LLaMA-7B).
// Eigen's GEMM re-packs both operands into its own layout on every call, its register blocks are
// mostly empty at r = 8 or 12, and its rank update runs well below its GEMM rate; measured at
// the benchmark shapes (one thread), that version took 2.8× the FLOP/memory floor at DeBERTa
// r = 12, 2.1× at LLaMA r = 8 and 1.55× at LLaMA r = 64 (issue 15). Here every product is one
// loop nest of register blocks that reads the operands where they lie:
//   Gram      Bᵀ (any r) and A with r > 16: C += Pᵀ·P over a k-major panel P (column k of M is
//             row k of P): for Bᵀ that is B itself, read in place; A is transposed, 8 × 8
//             values at a time in registers, into a staged chunk of many panels (stage_budget).
//             Blocks from the diagonal's packet on only: about half the FLOPs of a GEMM.
//             A with r <= 16: dot products along A's rows, in place, over chunks of all rows
//             (gram_along_rows).
//   gradient  A:  G += s·D·A, chunks of A's columns staged as a strip (see rows_in_place:
//                 4 KiB strides), G updated in place;
//             Bᵀ: G_B += s·B·D with the rows of D as packets, B and G_B in place.
// The blocks hold 12 packet accumulators where the output is three packets wide or more (4 rows
// × 3 packets; 6 rows × 2 for Bᵀ's gradient, whose rows are many), else 8 (4 × 2, or 8 × 1 where
// the output is one packet wide): a core with two FMA pipes of latency 4 needs 8 independent
// chains, and 12 leave slack for the loads (7 or 8 per 12 FMAs against 6 per 8). Measured at
// r = 64 in cache against 8 accumulators: the Gram 66/84 against 63/78 GFLOP/s (A/Bᵀ), the
// gradient 92/101 against 87/99; the whole LLaMA r = 64 model 435 against 455 ms. C and D live
// in scratch with the rank padded to whole packets (zeros beyond r), so that no block needs a
// scalar edge there. (Software prefetch into L1 or L2, of the next panel, the next chunk of A's
// rows, G's next rows or the next factor, was tried in two sessions and did not measurably
// help; staging A in long runs and reading short rows in chunks did.)
//
// Per-call overhead is 0.1–0.3 µs at r = 12 (zeroing C, padding D), under 5% of the smallest
// DeBERTa factor's time: batching factors of the same shape, which would amortise it, is not
// worth its complexity.
//
// Accumulation. eigen_gram_kernel<T> accumulates in T (the fast choice for float). C − I cancels
// near an orthonormal M, so in float the norm ||C − I|| then carries an absolute error of order
// sqrt(n)·ε_f32·||m_i||·||m_j|| (n = columns of M), ~1e-5 for n = 4096 and unit rows: fine for a
// regularizer, not for measuring tiny deviations. eigen_gram_kernel<float, double> converts M to
// double while packing (both products then run on packed panels, at half the packet width): the
// portable kernel's accuracy, at 3.7–4.7× the float kernel's time (DeBERTa r = 12, LLaMA r = 8),
// still 1.25–1.9× faster than the portable kernel.
//
// Sums: each output of a panel block is a sequential sum over its k (Gram) or j (gradient), one
// FMA at a time, the Gram's panels added one after another; the dot blocks keep one partial sum
// per packet lane. Agreement with the portable kernel within the tolerances of
// tests/eigen_kernels_test.cpp, not bit parity.

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "adalora/integrations/eigen_dense.hpp"
#include "adalora/integrations/eigen_thin_products.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/orthogonality.hpp"

namespace adalora {
namespace detail::eigen_gram {

using eigen_kernels::lanes;
using eigen_kernels::packet;
using eigen_kernels::with_size;

/// The rank padded to whole packets and to the tallest register block (8 rows): the width of
/// the scratch C, D and of packed panels, whose columns from r on are zero.
template <class Acc>
constexpr index_t padded_rank(index_t r) noexcept {
  constexpr index_t q = std::max<index_t>(lanes<Acc>, 8);
  return (r + q - 1) / q * q;
}

/// Columns of M per packed panel (depth × padded rank values): about 32 KiB, an L1 data cache,
/// so that the Gram's register blocks re-read the panel from there. A multiple of 8.
template <class Acc>
inline constexpr index_t panel_budget = static_cast<index_t>((32 * 1024) / sizeof(Acc));
template <class Acc>
constexpr index_t panel_depth(index_t rp) noexcept {
  return std::max<index_t>(8, panel_budget<Acc> / std::max<index_t>(rp, 1) / 8 * 8);
}
/// An upper bound of panel_depth(rp) · rp for every padded rank rp <= rp_max.
template <class Acc>
constexpr index_t panel_capacity(index_t rp_max) noexcept {
  return std::max<index_t>(panel_budget<Acc>, 8 * rp_max);
}

/// Values of Acc in the staging area, about 256 KiB (a quarter of an L2 cache). A row-major A is
/// staged there a chunk of columns at a time, for the Gram (transposed) and the gradient (copied):
/// each of its rows is then read in runs of KiBs, which the hardware prefetcher follows, where
/// an L1-sized panel read 64 rows 512 bytes at a time (measured over the whole LLaMA model at
/// r = 64, from memory: A's gradient 160 → 128 ms).
template <class Acc>
inline constexpr index_t stage_budget = static_cast<index_t>((256 * 1024) / sizeof(Acc));
/// A cache line in values of Acc.
template <class Acc>
inline constexpr index_t line = std::max<index_t>(1, static_cast<index_t>(64 / sizeof(Acc)));
/// The staging area's size for padded ranks up to rp_max: the budget, or what the smallest
/// chunk (2 packets and 2 lines per row) needs.
template <class Acc>
constexpr index_t stage_capacity(index_t rp_max) noexcept {
  return std::max(std::max(stage_budget<Acc>, panel_capacity<Acc>(rp_max)),
                  (2 * lanes<Acc> + 2 * line<Acc>) * rp_max);
}

/// The register block: acc[a][b] = Σ_{l < depth} x[a·x_row + l·x_step] · y[l·y_step + b·L, +L)
/// (L = lanes), each lane a sequential sum, one FMA (where the target has it) per term.
template <index_t MR, index_t NR, class Acc>
inline void block_product(const Acc* x, index_t x_row, index_t x_step, const Acc* y,
                          index_t y_step, index_t depth, packet<Acc> (&acc)[MR][NR]) noexcept {
  namespace ei = Eigen::internal;
  using P = packet<Acc>;
  constexpr index_t L = lanes<Acc>;
  for (index_t a = 0; a < MR; ++a)
    for (index_t b = 0; b < NR; ++b) acc[a][b] = ei::pset1<P>(Acc(0));
  for (index_t l = 0; l < depth; ++l) {
    P yl[NR];
    for (index_t b = 0; b < NR; ++b) yl[b] = ei::ploadu<P>(y + l * y_step + b * L);
    for (index_t a = 0; a < MR; ++a) {
      const P xa = ei::pset1<P>(x[a * x_row + l * x_step]);
      for (index_t b = 0; b < NR; ++b) acc[a][b] = ei::pmadd(xa, yl[b], acc[a][b]);
    }
  }
}

/// Calls f(MR, NR) (as integral constants) with the register block for outputs `width` values
/// wide (a multiple of L): from three packets wide, 4 rows × 3 packets (Tall: 6 rows × 2, for a
/// product over many rows); 4 × 2 where the output is two packets wide (6 × 2 measured slightly
/// slower at r = 12), 8 × 1 where it is one. 12 accumulators, or 8 where the output is narrower.
template <class Acc, bool Tall = false, class F>
void with_block_shape(index_t width, F&& f) {
  if (Tall && width >= 3 * lanes<Acc>)
    f(std::integral_constant<index_t, 6>{}, std::integral_constant<index_t, 2>{});
  else if (width >= 3 * lanes<Acc>)
    f(std::integral_constant<index_t, 4>{}, std::integral_constant<index_t, 3>{});
  else if (width >= 2 * lanes<Acc>)
    f(std::integral_constant<index_t, 4>{}, std::integral_constant<index_t, 2>{});
  else
    f(std::integral_constant<index_t, 8>{}, std::integral_constant<index_t, 1>{});
}

/// C (rp × rp, row-major) += Pᵀ·P on and above the diagonal blocks, P: depth rows of a k-major
/// panel with row stride ldp whose first rp columns are readable (zeros from r on).
template <class Acc>
void gram_update(const Acc* p, index_t ldp, index_t depth, index_t r, index_t rp,
                 Acc* c) noexcept {
  namespace ei = Eigen::internal;
  using P = packet<Acc>;
  constexpr index_t L = lanes<Acc>;
  with_block_shape<Acc>(rp, [&](auto mr, auto nr) {
    constexpr index_t MR = decltype(mr)::value, NR = decltype(nr)::value;
    for (index_t i0 = 0; i0 < r; i0 += MR) {
      // From the packet that holds the diagonal: packets wholly below it are skipped.
      index_t j0 = i0 / L * L;
      auto add = [&](auto nb) {
        constexpr index_t N = decltype(nb)::value;
        P acc[MR][N];
        block_product<MR, N>(p + i0, 1, ldp, p + j0, ldp, depth, acc);
        for (index_t a = 0; a < MR; ++a)
          for (index_t b = 0; b < N; ++b) {
            Acc* cij = c + (i0 + a) * rp + j0 + b * L;
            ei::pstoreu(cij, ei::padd(ei::ploadu<P>(cij), acc[a][b]));
          }
      };
      for (; j0 + NR * L <= rp; j0 += NR * L) add(nr);
      if (j0 < rp) with_size<NR>((rp - j0) / L, add);  // rp is a multiple of L
    }
  });
}

/// out(k, i) += scale · Σ_{j < r} X(k, j) · D(j, i) for the `depth` rows k of a k-major operand
/// X (row stride ldx) and the columns i < width (<= rp) of out (row stride ldo); D: rp × rp
/// row-major with zeros beyond r. The store is written out here, not passed in as a callback:
/// handing the accumulators to one by reference made g++ keep them in memory.
template <class Acc>
void add_times_d(const Acc* x, index_t ldx, index_t depth, const Acc* d, index_t r, index_t rp,
                 Acc scale, Acc* out, index_t ldo, index_t width) noexcept {
  namespace ei = Eigen::internal;
  using P = packet<Acc>;
  constexpr index_t L = lanes<Acc>;
  const P ps = ei::pset1<P>(scale);
  with_block_shape<Acc, true>(rp, [&](auto mr, auto nr) {
    constexpr index_t MR = decltype(mr)::value, NR = decltype(nr)::value;
    index_t k0 = 0;
    auto rows = [&](auto mb) {
      constexpr index_t M = decltype(mb)::value;
      index_t i0 = 0;
      auto one = [&](auto nb) {
        constexpr index_t N = decltype(nb)::value;
        P acc[M][N];
        block_product<M, N>(x + k0 * ldx, ldx, 1, d + i0, rp, r, acc);
        Acc* o = out + k0 * ldo + i0;
        if (i0 + N * L <= width) {
          for (index_t a = 0; a < M; ++a)
            for (index_t b = 0; b < N; ++b)
              ei::pstoreu(o + a * ldo + b * L,
                          ei::pmadd(ps, acc[a][b], ei::ploadu<P>(o + a * ldo + b * L)));
          return;
        }
        for (index_t a = 0; a < M; ++a)  // the block reaches into D's padding columns
          for (index_t b = 0; b < N; ++b) {
            Acc* ob = o + a * ldo + b * L;
            const index_t live = width - (i0 + b * L);
            if (live >= L) {
              ei::pstoreu(ob, ei::pmadd(ps, acc[a][b], ei::ploadu<P>(ob)));
            } else if (live > 0) {  // lane by lane: AVX's masked store (vmaskmovps) was
                                      // measured 1.5× slower for this product on these cores
              alignas(64) Acc lane[L];
              ei::pstoreu(lane, ei::pmul(ps, acc[a][b]));
              for (index_t c = 0; c < live; ++c) ob[c] += lane[c];
            }
          }
      };
      for (; i0 + NR * L <= rp; i0 += NR * L) one(nr);
      if (i0 < rp) with_size<NR>((rp - i0) / L, one);
    };
    for (; k0 + MR <= depth; k0 += MR) rows(mr);
    if (k0 < depth) with_size<MR>(depth - k0, rows);  // the last depth % MR rows
  });
}

}  // namespace detail::eigen_gram

/// The orthogonality regularizer's Kernel policy on Eigen's packet math (contract:
/// portable_gram_kernel in orthogonality.hpp; design: this header's comment). Acc is the
/// accumulator: T (default) or a wider type (eigen_gram_kernel<float, double>: M is converted
/// while packed, the portable kernel's accuracy). Not bit-identical with portable_gram_kernel.
template <class T, class Acc = T>
class eigen_gram_kernel {
  static_assert(std::is_floating_point_v<T> && std::is_floating_point_v<Acc>,
                "adalora::eigen_gram_kernel<T, Acc>: T and Acc must be floating-point types");
  static_assert(sizeof(Acc) >= sizeof(T),
                "adalora::eigen_gram_kernel<T, Acc>: Acc must be at least as wide as T");

 public:
  using accumulator_type = Acc;

  /// After reserve(max_rank), calls with r <= max_rank allocate nothing.
  void reserve(index_t max_rank) {
    namespace eg = detail::eigen_gram;
    const index_t rp = eg::padded_rank<Acc>(max_rank > 0 ? max_rank : 0);
    const auto square = static_cast<std::size_t>(rp * rp);
    const auto panel = static_cast<std::size_t>(eg::panel_capacity<Acc>(rp));
    const auto stage = static_cast<std::size_t>(eg::stage_capacity<Acc>(rp));
    if (square_.size() < square) square_.resize(square);
    if (panel_.size() < 2 * panel) panel_.resize(2 * panel);
    if (stage_.size() < stage) stage_.resize(stage);
  }

  Acc gram_minus_identity(matrix_view<const T> m, Acc* d) noexcept {
    namespace eg = detail::eigen_gram;
    const index_t r = m.rows(), n = m.cols();
    if (r == 0) return Acc(0);
    const index_t rp = eg::padded_rank<Acc>(r);
    Acc* c = square_.data();
    std::fill(c, c + rp * rp, Acc(0));
    const index_t depth = eg::panel_depth<Acc>(rp);
    detail::eigen_kernels::dense<const T> md;
    index_t packed_from = 0;  // columns of M from here on go through a packed panel
    if (as_short_rows(m, md)) {
      gram_along_rows(md, c, rp);
      packed_from = n;
    } else if (as_k_major(m, md) && (r == rp || md.outer == r)) {
      // M = Bᵀ of a row-major B: B's rows are the panel, read in place. The blocks read whole
      // packets, rp − r values past a row's end where r is not a whole number of them: then
      // only for a dense B, where those are the next row's first values (they reach C's
      // padding only), and the last rows, whose next row is not there, are packed instead.
      // Nothing outside the view is read.
      const index_t past = rp - r;
      packed_from = n - std::min(n, (past + md.outer - 1) / md.outer);
      for (index_t k0 = 0; k0 < packed_from; k0 += depth)
        eg::gram_update(as_acc(md.data) + k0 * md.outer, md.outer,
                        std::min(depth, packed_from - k0), r, rp, c);
    }
    // Packed: a staged chunk of many panels (see stage_budget), the Gram panel by panel.
    const index_t staged = std::max(depth, eg::stage_budget<Acc> / rp / depth * depth);
    for (index_t k0 = packed_from; k0 < n; k0 += staged) {
      const index_t kb = std::min(staged, n - k0);
      pack_k_major(m, k0, kb, rp, stage_.data());
      for (index_t p0 = 0; p0 < kb; p0 += depth)
        eg::gram_update(static_cast<const Acc*>(stage_.data()) + p0 * rp, rp,
                        std::min(depth, kb - p0), r, rp, c);
    }
    for (index_t i = 0; i < r; ++i)
      for (index_t j = i; j < r; ++j) d[i * r + j] = c[i * rp + j];
    return detail::finish_gram(d, r);  // the same finish as the portable kernel
  }

  void add_scaled_product(const Acc* d, Acc scale, matrix_view<const T> m,
                          matrix_view<T> g) noexcept {
    namespace eg = detail::eigen_gram;
    const index_t r = m.rows(), n = m.cols();
    if (r == 0 || n == 0) return;
    const index_t rp = eg::padded_rank<Acc>(r);
    Acc* dp = square_.data();  // D, padded with zeros to rp × rp
    std::fill(dp, dp + rp * rp, Acc(0));
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < r; ++j) dp[i * rp + j] = d[i * r + j];

    detail::eigen_kernels::dense<const T> md;
    detail::eigen_kernels::dense<T> gd;
    if constexpr (std::is_same_v<T, Acc>) {
      if (detail::eigen_kernels::as_dense(m, md) && detail::eigen_kernels::as_dense(g, gd) &&
          md.row_major && gd.row_major) {
        rows_in_place(dp, rp, scale, md, gd);
        return;
      }
      if (as_k_major(m, md) && detail::eigen_kernels::as_dense(g, gd) && !gd.row_major) {
        // G_B(k, i) += s · Σ_j B(k, j) · D(j, i): B's and G_B's rows are the k-major rows.
        eg::add_times_d(md.data, md.outer, n, static_cast<const Acc*>(dp), r, rp, scale, gd.data,
                        gd.outer, r);
        return;
      }
    }
    // Any other layout or accumulator: pack M k-major, form Q = P·D, add s·Q into g.
    const index_t depth = eg::panel_depth<Acc>(rp);
    Acc* panel = panel_.data();
    Acc* q = panel_.data() + panel_.size() / 2;
    for (index_t k0 = 0; k0 < n; k0 += depth) {
      const index_t kb = std::min(depth, n - k0);
      pack_k_major(m, k0, kb, rp, panel);
      std::fill(q, q + kb * rp, Acc(0));
      eg::add_times_d(static_cast<const Acc*>(panel), rp, kb, static_cast<const Acc*>(dp), r, rp,
                      Acc(1), q, rp, rp);
      add_k_major(g, k0, kb, q, rp, scale);
    }
  }

 private:
  using packet_t = detail::eigen_gram::packet<Acc>;

  static const Acc* as_acc(const T* p) noexcept {
    if constexpr (std::is_same_v<T, Acc>) return p;
    else return nullptr;  // never called: as_short_rows and as_k_major are false then
  }

  /// C (upper triangle) = M·Mᵀ for a row-major M of at most short_rows rows, as dot products
  /// along its rows, read in place: blocks of 4 × 2 rows (eigen_thin's dot_packets, the loop of
  /// its dot_block) over chunks of a few KiB of all rows (row_chunk_bytes), each (i, j) keeping
  /// one packet of lane sums in the stage between chunks, reduced once at the end. Why chunks: a factor read from memory arrives through all of its
  /// rows at once, the streams the hardware prefetcher runs ahead on; block by block over whole
  /// rows it arrived two to four rows at a time. Measured at LLaMA r = 8 (n = 4096, from memory):
  /// the Gram 22–23 against 17 GFLOP/s. Each lane's sum runs over k in order, as before.
  void gram_along_rows(const detail::eigen_kernels::dense<const T>& md, Acc* c,
                       index_t rp) noexcept {
    namespace eg = detail::eigen_gram;
    namespace ei = Eigen::internal;
    constexpr index_t L = eg::lanes<Acc>;
    const index_t r = md.rows, n = md.cols, ld = md.outer;
    const Acc* const a = as_acc(md.data);
    static_assert(short_rows * short_rows * L <= eg::stage_budget<Acc>);
    Acc* const sums = stage_.data();  // packet of lane sums of (i, j) at (i · r + j) · L
    std::fill(sums, sums + r * r * L, Acc(0));
    const index_t body = n / L * L;
    const index_t chunk =
        std::max<index_t>(L, row_chunk_bytes / static_cast<index_t>(sizeof(Acc)) / r / L * L);
    for (index_t k0 = 0; k0 < body; k0 += chunk) {
      const index_t k1 = std::min(body, k0 + chunk);
      for (index_t i0 = 0; i0 < r; i0 += 4)
        eg::with_size<4>(r - i0, [&](auto mi) {
          constexpr index_t MI = decltype(mi)::value;
          for (index_t j0 = i0; j0 < r; j0 += 2)
            eg::with_size<2>(r - j0, [&](auto nj) {
              constexpr index_t CJ = decltype(nj)::value;
              packet_t acc[MI][CJ];
              for (index_t i = 0; i < MI; ++i)
                for (index_t j = 0; j < CJ; ++j)
                  acc[i][j] = ei::ploadu<packet_t>(sums + ((i0 + i) * r + j0 + j) * L);
              detail::eigen_thin::dot_packets<MI, CJ>(a + i0 * ld, ld, a + j0 * ld, ld, k0, k1,
                                                      acc);
              for (index_t i = 0; i < MI; ++i)
                for (index_t j = 0; j < CJ; ++j)
                  ei::pstoreu(sums + ((i0 + i) * r + j0 + j) * L, acc[i][j]);
            });
        });
    }
    for (index_t i = 0; i < r; ++i)
      for (index_t j = i; j < r; ++j) {
        Acc s = ei::predux(ei::ploadu<packet_t>(sums + (i * r + j) * L));
        for (index_t k = body; k < n; ++k) s += a[i * ld + k] * a[j * ld + k];
        c[i * rp + j] = s;
      }
  }

  /// Bytes of all rows per chunk of gram_along_rows. From memory (LLaMA r = 8) 2–4 KiB measured
  /// alike and best, 8 KiB and more lose the gain; a factor already in L1/L2 prefers longer
  /// chunks (at DeBERTa r = 12 in L3 the Gram is about 8% slower than unchunked), and the models
  /// that need speed do not fit in cache.
  static constexpr index_t row_chunk_bytes = 4096;

  /// The largest rank whose row-major Gram runs as dot products along the rows.
  static constexpr index_t short_rows = 16;

  /// True when m is a dense row-major M (T is Acc) of at most short_rows rows.
  static bool as_short_rows(const matrix_view<const T>& m,
                            detail::eigen_kernels::dense<const T>& md) noexcept {
    if constexpr (!std::is_same_v<T, Acc>) {
      return false;
    } else {
      return m.rows() <= short_rows && detail::eigen_kernels::as_dense(m, md) && md.row_major;
    }
  }

  /// True when m (r × n) is Bᵀ of a dense row-major B (T is Acc), whose rows are then the
  /// k-major rows of M, read in place.
  static bool as_k_major(const matrix_view<const T>& m,
                         detail::eigen_kernels::dense<const T>& md) noexcept {
    if constexpr (!std::is_same_v<T, Acc>) {
      return false;
    } else {
      return m.cols() > 1 && detail::eigen_kernels::as_dense(m, md) && !md.row_major;
    }
  }

  /// G += s · D · M for row-major M and G (T is Acc): blocks of 4 rows of D by 3 packets of
  /// M's columns (then 2 or 1 for the chunk's last), over chunks of M's columns copied to a
  /// strip; the last n % L columns one at a time. (Blocks of 8 rows by 1 packet, one block per
  /// column at r <= 8, measured slower.)
  ///
  /// Why the strip, and rows outside columns within a chunk: a factor's rows lie n values apart,
  /// and for n a multiple of 1024 floats (4 KiB) all rows of M and of G share their low 12
  /// address bits. Read in place, a block's rows then fall into one L1 set; and a load of G's
  /// next row right after a store to this row waits for the store (the core's 4 KiB aliasing
  /// check). Measured at n = 4096 against 11008 before this layout: 29 against 72 GFLOP/s at
  /// r = 64, 21 against 62 at r = 8.
  void rows_in_place(const Acc* dp, index_t rp, Acc scale,
                     const detail::eigen_kernels::dense<const T>& md,
                     const detail::eigen_kernels::dense<T>& gd) noexcept {
    namespace eg = detail::eigen_gram;
    namespace ei = Eigen::internal;
    constexpr index_t L = eg::lanes<Acc>;
    const index_t r = md.rows, n = md.cols;
    const packet_t ps = ei::pset1<packet_t>(scale);
    T* const g = gd.data;
    const index_t ldg = gd.outer;
    Acc* const strip = stage_.data();
    // Columns per chunk: a multiple of 2 packets, all r rows in the staging area; the strip's
    // rows are a cache line longer than that, two where one would make them a multiple of
    // 4 KiB apart, so that they do not share their L1 set either.
    constexpr index_t line = eg::line<Acc>;
    const index_t room = eg::stage_capacity<Acc>(rp) / std::max<index_t>(r, 1) - 2 * line;
    const index_t chunk = std::max<index_t>(2 * L, room / (2 * L) * (2 * L));
    const index_t lds =
        chunk + ((chunk + line) * static_cast<index_t>(sizeof(Acc)) % 4096 == 0 ? 2 * line : line);
    const index_t body = n / L * L;
    for (index_t c0 = 0; c0 < body; c0 += chunk) {
      const index_t width = std::min(chunk, body - c0);  // a multiple of L
      for (index_t j = 0; j < r; ++j)
        std::copy_n(md.data + j * md.outer + c0, width, strip + j * lds);
      for (index_t i0 = 0; i0 < r; i0 += 4) {
        const index_t live = std::min<index_t>(4, r - i0);  // D's padding rows: not stored
        auto block = [&](index_t k, auto nb) {
          constexpr index_t N = decltype(nb)::value;
          packet_t acc[4][N];
          eg::block_product<4, N>(dp + i0 * rp, rp, 1, static_cast<const Acc*>(strip + k), lds,
                                  r, acc);
          // All loads of G before any store: G's rows share their low address bits, and a load
          // after a store to another row would wait for it (see above).
          T* o = g + i0 * ldg + c0 + k;
          for (index_t a = 0; a < live; ++a)
            for (index_t b = 0; b < N; ++b)
              acc[a][b] = ei::pmadd(ps, acc[a][b], ei::ploadu<packet_t>(o + a * ldg + b * L));
          for (index_t a = 0; a < live; ++a)
            for (index_t b = 0; b < N; ++b) ei::pstoreu(o + a * ldg + b * L, acc[a][b]);
        };
        index_t k = 0;
        for (; k + 3 * L <= width; k += 3 * L) block(k, std::integral_constant<index_t, 3>{});
        if (k < width)
          eg::with_size<2>((width - k) / L, [&](auto nb) { block(k, nb); });
      }
    }
    for (index_t k = body; k < n; ++k)
      for (index_t i = 0; i < r; ++i) {
        Acc s = 0;
        for (index_t j = 0; j < r; ++j) s += dp[i * rp + j] * md.data[j * md.outer + k];
        T& o = g[i * ldg + k];
        o = o + scale * s;
      }
  }

  /// panel[k · rp + i] = Acc(m(i, k0 + k)) for k < kb, i < r; zeros for r <= i < rp. Reads m
  /// along its contiguous index.
  static void pack_k_major(const matrix_view<const T>& m, index_t k0, index_t kb, index_t rp,
                           Acc* panel) noexcept {
    const index_t r = m.rows();
    detail::eigen_kernels::dense<const T> md;
    if constexpr (std::is_same_v<T, Acc>) {
      if (detail::eigen_kernels::as_dense(m, md) && md.row_major) {
        transpose_into(md, k0, kb, rp, panel);
        return;
      }
    }
    if (detail::rows_are_contiguous(m)) {
      for (index_t i = 0; i < r; ++i)
        for (index_t k = 0; k < kb; ++k) panel[k * rp + i] = static_cast<Acc>(m(i, k0 + k));
    } else {
      for (index_t k = 0; k < kb; ++k)
        for (index_t i = 0; i < r; ++i) panel[k * rp + i] = static_cast<Acc>(m(i, k0 + k));
    }
    if (r < rp)
      for (index_t k = 0; k < kb; ++k) std::fill(panel + k * rp + r, panel + (k + 1) * rp, Acc(0));
  }

  /// panel[k · rp + i] = md(i, k0 + k) (zeros for r <= i < rp) for a row-major M, square blocks
  /// of one packet per side transposed in registers; the edges one value at a time. (The plain
  /// loop took as long as the Gram it feeds at r = 64.)
  static void transpose_into(const detail::eigen_kernels::dense<const T>& md, index_t k0,
                             index_t kb, index_t rp, Acc* panel) noexcept {
    namespace ei = Eigen::internal;
    constexpr index_t L = detail::eigen_gram::lanes<Acc>;
    const index_t r = md.rows;
    const index_t rows = r / L * L, cols = kb / L * L;
    for (index_t i0 = 0; i0 < rows; i0 += L)
      for (index_t k = 0; k < cols; k += L) {
        // PacketBlock of a vector type: g++ warns that the type's alignment attribute does not
        // carry into the template argument, which is harmless here (the block lives in registers).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
        ei::PacketBlock<packet_t, L> block;
#pragma GCC diagnostic pop
        for (index_t a = 0; a < L; ++a)
          block.packet[a] = ei::ploadu<packet_t>(md.data + (i0 + a) * md.outer + k0 + k);
        ei::ptranspose(block);
        for (index_t a = 0; a < L; ++a) ei::pstoreu(panel + (k + a) * rp + i0, block.packet[a]);
      }
    for (index_t i = 0; i < rp; ++i)
      for (index_t k = i < rows ? cols : 0; k < kb; ++k)
        panel[k * rp + i] = i < r ? md.data[i * md.outer + k0 + k] : Acc(0);
  }

  /// g(i, k0 + k) = T(Acc(g(i, k0 + k)) + scale · q[k · rp + i]), one rounding, along g's
  /// contiguous index.
  static void add_k_major(const matrix_view<T>& g, index_t k0, index_t kb, const Acc* q,
                          index_t rp, Acc scale) noexcept {
    const index_t r = g.rows();
    if (detail::rows_are_contiguous(g)) {
      for (index_t i = 0; i < r; ++i)
        for (index_t k = 0; k < kb; ++k) {
          T& o = g(i, k0 + k);
          o = static_cast<T>(static_cast<Acc>(o) + scale * q[k * rp + i]);
        }
    } else {
      for (index_t k = 0; k < kb; ++k)
        for (index_t i = 0; i < r; ++i) {
          T& o = g(i, k0 + k);
          o = static_cast<T>(static_cast<Acc>(o) + scale * q[k * rp + i]);
        }
    }
  }

  std::vector<Acc> square_;  // C, then the padded D: padded_rank² values
  std::vector<Acc> panel_;   // a packed panel of M, and Q = panel · D: 2 · panel_capacity
  std::vector<Acc> stage_;   // a staged chunk of A (stage_capacity)
};

}  // namespace adalora
