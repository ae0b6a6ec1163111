// Tests of adalora/integrations/eigen_kernels.hpp: the Eigen GEMM paths agree with the portable
// kernels within the tolerances stated below, in float and double, for every view layout
// (row-major, column-major, padded rows, and views with no unit stride, which are packed), for
// rank 0 and empty batches; they check their input like the portable functions and allocate
// nothing once their scratch has grown.
//
// Tolerances, and why. The portable kernels sum sequentially without FMA (bit parity with torch);
// Eigen blocks and fuses the sums, so only rounding differs:
//  * Gram D = M·Mᵀ − I, entrywise: |D_eigen − D_portable| <= (n+2)·u·(|M|·|M|ᵀ) + 2u·|D|, with
//    n the length of the dot products and u the unit roundoff of the accumulator (2^-24 for
//    eigen_gram_kernel<float>, 2^-53 when it accumulates in double). This is the classical
//    worst-case bound of a dot product in any summation order (plus the rounding of − 1), so the
//    check cannot flake; the norm is then checked through |‖D1‖ − ‖D2‖| <= ‖D1 − D2‖ plus the
//    rounding of its own sum of r² squares.
//  * Regularizer value and gradient, adapter forward and backward (relative, Frobenius norm of
//    the difference over the norm of what was computed): 2e-5 in float (float accumulation,
//    dot products of up to 1200 terms), 1e-6 for float with double accumulation (one final
//    rounding to float each), 1e-12 in double.

#define EIGEN_RUNTIME_NO_MALLOC  // lets a test forbid Eigen's own malloc (set_is_malloc_allowed)

#include "adalora/integrations/eigen_kernels.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "adalora/orthogonality.hpp"
#include "adalora/svd_adapter.hpp"
#include "adalora/testing/allocation_counter.hpp"

ADALORA_TESTING_COUNT_ALLOCATIONS();

namespace {

using adalora::index_t;
using adalora::matrix_view;

/// How a test matrix is laid out in memory.
enum class kind {
  row_major,     ///< C order
  col_major,     ///< Fortran order
  padded,        ///< C order with 3 unused elements after each row (outer stride > cols)
  no_unit_stride ///< every other element, rows 2·cols + 1 apart: Eigen cannot map it directly
};
constexpr kind all_kinds[] = {kind::row_major, kind::col_major, kind::padded, kind::no_unit_stride};

const char* name(kind k) {
  switch (k) {
    case kind::row_major: return "row-major";
    case kind::col_major: return "column-major";
    case kind::padded: return "padded";
    default: return "no unit stride";
  }
}

/// A rows × cols matrix in a buffer of its own, filled with values in [-scale, scale].
template <class T>
struct owned {
  index_t rows = 0, cols = 0;
  kind k = kind::row_major;
  std::vector<T> buffer;

  owned(index_t r, index_t c, kind kk) : rows(r), cols(c), k(kk) {
    buffer.assign(static_cast<std::size_t>(std::max<index_t>(1, 2 * (r + 1) * (c + 3))), T(0));
  }
  matrix_view<T> view() {
    switch (k) {
      case kind::row_major: return {buffer.data(), rows, cols, cols, 1};
      case kind::col_major: return {buffer.data(), rows, cols, 1, rows};
      case kind::padded: return {buffer.data(), rows, cols, cols + 3, 1};
      default: return {buffer.data(), rows, cols, 2 * cols + 1, 2};
    }
  }
  matrix_view<const T> cview() { return view(); }
  void fill(std::mt19937_64& rng, double scale) {
    std::uniform_real_distribution<double> u(-scale, scale);
    auto v = view();
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < cols; ++j) v(i, j) = static_cast<T>(u(rng));
  }
  /// Copies of the logical values, row-major, in double.
  std::vector<double> values() {
    std::vector<double> out;
    auto v = view();
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < cols; ++j) out.push_back(static_cast<double>(v(i, j)));
    return out;
  }
};

double frobenius(const std::vector<double>& x) {
  double s = 0;
  for (double v : x) s += v * v;
  return std::sqrt(s);
}
double frobenius_diff(const std::vector<double>& x, const std::vector<double>& y) {
  REQUIRE(x.size() == y.size());
  double s = 0;
  for (std::size_t i = 0; i < x.size(); ++i) s += (x[i] - y[i]) * (x[i] - y[i]);
  return std::sqrt(s);
}

template <class T>
double relative_tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-12;
}

/// The relative difference ‖got − want‖ / ‖want − before‖ of an add-into output (what was added),
/// or the absolute difference when nothing was added.
double relative_increment_error(const std::vector<double>& before, const std::vector<double>& want,
                                const std::vector<double>& got) {
  std::vector<double> added(want.size());
  for (std::size_t i = 0; i < want.size(); ++i) added[i] = want[i] - before[i];
  const double scale = frobenius(added);
  const double diff = frobenius_diff(want, got);
  return scale > 0 ? diff / scale : diff;
}

// ---- Gram kernel -------------------------------------------------------------------------------

template <class T, class Acc>
void check_gram_against_portable(index_t r, index_t n, kind k, std::mt19937_64& rng) {
  owned<T> m(r, n, k);
  m.fill(rng, 1.0);
  adalora::portable_gram_kernel<T> portable;
  adalora::eigen_gram_kernel<T, Acc> eigen;
  portable.reserve(r);
  eigen.reserve(r);
  using pacc = typename adalora::portable_gram_kernel<T>::accumulator_type;
  std::vector<pacc> dp(static_cast<std::size_t>(r * r));
  std::vector<Acc> de(static_cast<std::size_t>(r * r));
  const double fp = static_cast<double>(portable.gram_minus_identity(m.cview(), dp.data()));
  const double fe = static_cast<double>(eigen.gram_minus_identity(m.cview(), de.data()));

  const double u = std::numeric_limits<Acc>::epsilon() / 2;
  const double ud = std::numeric_limits<double>::epsilon() / 2;  // the portable kernel's own
  const auto mv = m.cview();
  double bound_sq = 0;
  for (index_t i = 0; i < r; ++i)
    for (index_t j = 0; j < r; ++j) {
      double abs_dot = 0;
      for (index_t c = 0; c < n; ++c)
        abs_dot += std::abs(static_cast<double>(mv(i, c))) * std::abs(static_cast<double>(mv(j, c)));
      // The dot product's bound, plus one rounding of the − 1 on the diagonal.
      const double bound = static_cast<double>(n + 2) * (u + ud) * abs_dot +
                           2 * u * std::abs(static_cast<double>(dp[i * r + j])) + 1e-300;
      const double diff = std::abs(static_cast<double>(de[i * r + j]) - static_cast<double>(dp[i * r + j]));
      INFO("r = " << r << ", n = " << n << ", " << name(k) << ", D(" << i << ", " << j << ")");
      REQUIRE(diff <= bound);
      REQUIRE(de[i * r + j] == de[j * r + i]);  // symmetric, all r² entries written
      bound_sq += bound * bound;
    }
  INFO("r = " << r << ", n = " << n << ", " << name(k) << ": ||D||^2 " << fe << " vs " << fp);
  // Plus the rounding of the norm's own sum of r² squares in Acc.
  const double norm_rounding = static_cast<double>(r * r + 4) * u * std::sqrt(fp);
  REQUIRE(std::abs(std::sqrt(fe) - std::sqrt(fp)) <= std::sqrt(bound_sq) + norm_rounding + 1e-300);
}

TEMPLATE_TEST_CASE("eigen_gram_kernel: D = M·Mᵀ − I within the dot-product bound of the portable "
                   "kernel, every layout", "[eigen_kernels][gram]", float, double) {
  std::mt19937_64 rng(7);
  for (kind k : all_kinds)
    // Ranks that fill whole register blocks (8, 16, 64: B read in place) and ranks that do not
    // (padded), widths around the packet and block sizes.
    for (index_t r : {0, 1, 3, 8, 12, 16, 17, 24, 64})
      for (index_t n : {0, 1, 5, 37, 300, 1200}) {
        check_gram_against_portable<TestType, TestType>(r, n, k, rng);
        if constexpr (std::is_same_v<TestType, float>)
          check_gram_against_portable<float, double>(r, n, k, rng);
      }
}

/// Adapters of several shapes and layouts, and zeroed gradients in other layouts.
template <class T>
struct adapter_set {
  struct one {
    owned<T> a, b, ga, gb;
    std::vector<T> e, ge;
  };
  std::vector<one> items;

  adapter_set(std::mt19937_64& rng, double scale) {
    // Layouts rotate with the index (A, B, grad A, grad B = kinds v, v+1, v+2, v+3 mod 4), so
    // that each kernel path meets ranks on and off its register blocks: e.g. {12, 41, 77} has
    // a row-major B and a padded row-major grad B (B read in place, rank not a whole packet).
    const index_t shapes[][3] = {{4, 30, 20},  {0, 7, 9},    {8, 300, 1200}, {1, 16, 3},
                                 {12, 64, 64}, {16, 37, 21}, {24, 19, 45},   {64, 70, 133},
                                 {3, 10, 40},  {17, 33, 65}, {9, 20, 30},    {12, 41, 77}};
    std::size_t v = 0;
    for (const auto& s : shapes) {
      const index_t r = s[0], in = s[1], out = s[2];
      const kind ka = all_kinds[v % 4], kb = all_kinds[(v + 1) % 4];
      const kind kga = all_kinds[(v + 2) % 4], kgb = all_kinds[(v + 3) % 4];
      ++v;
      one o{owned<T>(r, in, ka), owned<T>(out, r, kb), owned<T>(r, in, kga), owned<T>(out, r, kgb),
            std::vector<T>(static_cast<std::size_t>(r), T(0.5)),
            std::vector<T>(static_cast<std::size_t>(r), T(0))};
      o.a.fill(rng, scale);
      o.b.fill(rng, scale);
      o.ga.fill(rng, 0.01);
      o.gb.fill(rng, 0.01);
      items.push_back(std::move(o));
    }
  }
  std::vector<adalora::svd_adapter_ref<const T>> params() {
    std::vector<adalora::svd_adapter_ref<const T>> p;
    for (auto& o : items)
      p.push_back({o.a.cview(), adalora::vector_view<const T>(o.e.data(), o.a.rows), o.b.cview()});
    return p;
  }
  std::vector<adalora::svd_adapter_ref<T>> grads() {
    std::vector<adalora::svd_adapter_ref<T>> g;
    for (auto& o : items)
      g.push_back({o.ga.view(), adalora::vector_view<T>(o.ge.data(), o.a.rows), o.gb.view()});
    return g;
  }
  std::vector<double> grad_values() {
    std::vector<double> out;
    for (auto& o : items) {
      for (double x : o.ga.values()) out.push_back(x);
      for (double x : o.gb.values()) out.push_back(x);
    }
    return out;
  }
};

template <class T, class Kernel>
void check_regularizer(double tolerance, adalora::orthogonality_form form) {
  for (double scale : {0.05, 1.0}) {
    std::mt19937_64 rng(11);
    adapter_set<T> portable_set(rng, scale);
    std::mt19937_64 rng2(11);
    adapter_set<T> eigen_set(rng2, scale);
    const auto before = portable_set.grad_values();
    std::vector<T> norms_p(2 * portable_set.items.size()), norms_e(norms_p.size());

    adalora::orthogonality_regularizer<T> portable({.weight = 0.3, .form = form});
    adalora::orthogonality_regularizer<T, Kernel> eigen({.weight = 0.3, .form = form});
    const auto pp = portable_set.params();
    const auto pg = portable_set.grads();
    const auto ep = eigen_set.params();
    const auto eg = eigen_set.grads();
    const T rp = portable.value_and_gradient(std::span<const adalora::svd_adapter_ref<const T>>(pp),
                                             std::span<const adalora::svd_adapter_ref<T>>(pg),
                                             std::span<T>(norms_p));
    const T re = eigen.value_and_gradient(std::span<const adalora::svd_adapter_ref<const T>>(ep),
                                          std::span<const adalora::svd_adapter_ref<T>>(eg),
                                          std::span<T>(norms_e));
    INFO("scale " << scale << ": R " << re << " vs " << rp);
    REQUIRE(std::abs(static_cast<double>(re) - static_cast<double>(rp)) <=
            tolerance * std::abs(static_cast<double>(rp)));
    for (std::size_t i = 0; i < norms_p.size(); ++i) {
      INFO("matrix " << i << ": norm " << norms_e[i] << " vs " << norms_p[i]);
      REQUIRE(std::abs(static_cast<double>(norms_e[i]) - static_cast<double>(norms_p[i])) <=
              tolerance * std::abs(static_cast<double>(norms_p[i])));
    }
    const double err = relative_increment_error(before, portable_set.grad_values(),
                                                eigen_set.grad_values());
    INFO("scale " << scale << ": gradient relative error " << err);
    REQUIRE(err <= tolerance);
    // The value alone agrees too (no gradient requested).
    const T ve = eigen.value(std::span<const adalora::svd_adapter_ref<const T>>(ep));
    REQUIRE(std::abs(static_cast<double>(ve) - static_cast<double>(re)) <=
            tolerance * std::abs(static_cast<double>(re)));
  }
}

TEMPLATE_TEST_CASE("orthogonality_regularizer with eigen_gram_kernel agrees with the portable "
                   "kernel: value, norms and gradient, both forms, rank 0 included",
                   "[eigen_kernels][gram]", float, double) {
  for (auto form : {adalora::orthogonality_form::reference_mean,
                    adalora::orthogonality_form::paper_squared}) {
    check_regularizer<TestType, adalora::eigen_gram_kernel<TestType>>(
        relative_tolerance<TestType>(), form);
    if constexpr (std::is_same_v<TestType, float>)
      check_regularizer<float, adalora::eigen_gram_kernel<float, double>>(1e-6, form);
  }
}

TEMPLATE_TEST_CASE("eigen_gram_kernel: an exactly orthonormal M gives f = 0 and no gradient",
                   "[eigen_kernels][gram]", float, double) {
  // Rows of a permutation: C = I exactly in any summation order.
  std::vector<TestType> a = {0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0}, e = {1, 1, 1};
  std::vector<TestType> b = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  std::vector<TestType> ga(a.size(), TestType(0)), ge(3), gb(b.size(), TestType(0));
  const adalora::svd_adapter_ref<const TestType> p{{a.data(), 3, 4, 4, 1}, {e.data(), 3}, {b.data(), 3, 3, 3, 1}};
  const adalora::svd_adapter_ref<TestType> g{{ga.data(), 3, 4, 4, 1}, {ge.data(), 3}, {gb.data(), 3, 3, 3, 1}};
  adalora::orthogonality_regularizer<TestType, adalora::eigen_gram_kernel<TestType>> orth;
  const TestType r = orth.value_and_gradient(std::span<const adalora::svd_adapter_ref<const TestType>>(&p, 1),
                                             std::span<const adalora::svd_adapter_ref<TestType>>(&g, 1));
  REQUIRE(r == TestType(0));
  for (TestType x : ga) REQUIRE(x == TestType(0));
  for (TestType x : gb) REQUIRE(x == TestType(0));
}

// ---- adapter forward / backward ----------------------------------------------------------------

template <class T>
struct adapter_case {
  index_t in, out, r, n;
  owned<T> a, b, x, dy, y, dx, ga, gb;
  std::vector<T> e, ge;

  adapter_case(index_t in_, index_t out_, index_t r_, index_t n_, kind kp, kind kx, kind ko,
               std::mt19937_64& rng)
      : in(in_), out(out_), r(r_), n(n_),
        a(r_, in_, kp), b(out_, r_, kp == kind::row_major ? kind::col_major : kind::row_major),
        x(n_, in_, kx), dy(n_, out_, kx), y(n_, out_, ko), dx(n_, in_, ko), ga(r_, in_, ko),
        gb(out_, r_, ko),
        e(static_cast<std::size_t>(r_)), ge(static_cast<std::size_t>(r_)) {
    for (auto* m : {&a, &b}) m->fill(rng, 0.1);
    for (auto* m : {&x, &dy}) m->fill(rng, 1.0);
    for (auto* m : {&y, &dx, &ga, &gb}) m->fill(rng, 0.5);
    std::uniform_real_distribution<double> u(-1, 1);
    for (auto& v : e) v = static_cast<T>(u(rng));
    for (auto& v : ge) v = static_cast<T>(u(rng));
    if (r > 1) e[1] = T(0);  // a masked triplet
  }
  adalora::svd_adapter_ref<const T> params() {
    return {a.cview(), adalora::vector_view<const T>(e.data(), r), b.cview()};
  }
  adalora::svd_adapter_ref<T> grads() {
    return {ga.view(), adalora::vector_view<T>(ge.data(), r), gb.view()};
  }
  std::vector<double> ge_values() const {
    return std::vector<double>(ge.begin(), ge.end());
  }
};

template <class T>
void check_adapter(index_t in, index_t out, index_t r, index_t n, kind kp, kind kx, kind ko) {
  std::mt19937_64 rng(3);
  adapter_case<T> pc(in, out, r, n, kp, kx, ko, rng);
  std::mt19937_64 rng2(3);
  adapter_case<T> ec(in, out, r, n, kp, kx, ko, rng2);
  const adalora::adapter_scale<T> scale(16.0, r + 2);  // r_init > r: a resized adapter
  adalora::adapter_workspace<T> wp, we;
  const double tol = relative_tolerance<T>();
  INFO("in " << in << ", out " << out << ", r " << r << ", n " << n << "; params " << name(kp)
             << ", inputs " << name(kx) << ", outputs " << name(ko));

  const auto y0 = pc.y.values();
  adalora::adapter_forward<T>(pc.params(), scale, pc.x.cview(), pc.y.view(), wp);
  adalora::eigen_adapter_forward<T>(ec.params(), scale, ec.x.cview(), ec.y.view(), we);
  {
    const double err = relative_increment_error(y0, pc.y.values(), ec.y.values());
    INFO("forward: relative error " << err);
    REQUIRE(err <= tol);
  }

  const auto ga0 = pc.ga.values(), gb0 = pc.gb.values(), ge0 = pc.ge_values(), dx0 = pc.dx.values();
  adalora::adapter_backward<T>(pc.params(), scale, pc.x.cview(), pc.dy.cview(), pc.grads(), wp,
                               pc.dx.view());
  adalora::eigen_adapter_backward<T>(ec.params(), scale, ec.x.cview(), ec.dy.cview(), ec.grads(),
                                     we, ec.dx.view());
  const double ea = relative_increment_error(ga0, pc.ga.values(), ec.ga.values());
  const double eb = relative_increment_error(gb0, pc.gb.values(), ec.gb.values());
  const double ee = relative_increment_error(ge0, pc.ge_values(), ec.ge_values());
  const double ex = relative_increment_error(dx0, pc.dx.values(), ec.dx.values());
  INFO("backward relative errors: dA " << ea << ", dB " << eb << ", dE " << ee << ", dx " << ex);
  REQUIRE(ea <= tol);
  REQUIRE(eb <= tol);
  REQUIRE(ee <= tol);
  REQUIRE(ex <= tol);

  // Without dx: the same parameter gradients are added again, dx is not touched.
  const auto dx1 = ec.dx.values();
  adalora::eigen_adapter_backward<T>(ec.params(), scale, ec.x.cview(), ec.dy.cview(), ec.grads(), we);
  REQUIRE(ec.dx.values() == dx1);
}

TEMPLATE_TEST_CASE("eigen_adapter_forward/backward agree with the portable adapter, every layout",
                   "[eigen_kernels][adapter]", float, double) {
  for (kind kp : all_kinds)
    for (kind kx : all_kinds)
      for (kind ko : all_kinds) check_adapter<TestType>(37, 29, 5, 11, kp, kx, ko);
  // Products larger than one GEMM tile (128 × 128 × 128 floats) in every dimension.
  check_adapter<TestType>(300, 260, 24, 150, kind::row_major, kind::row_major, kind::row_major);
  check_adapter<TestType>(300, 260, 24, 150, kind::col_major, kind::padded, kind::no_unit_stride);
  // The small-rank kernels (eigen_thin_products.hpp: r <= 16, row-major batch tensors) at the
  // edges of their register blocks (rows of 4, 3 and 6 columns, 1 and 2 packets, scalar tails),
  // and Eigen's GEMM just above them and with column-major batch tensors.
  for (index_t r : {1, 4, 6, 7, 12, 16, 17})
    check_adapter<TestType>(45, 70, r, 13, kind::row_major, kind::row_major, kind::padded);
  check_adapter<TestType>(300, 260, 6, 150, kind::row_major, kind::row_major, kind::row_major);
  check_adapter<TestType>(300, 260, 6, 150, kind::no_unit_stride, kind::col_major, kind::padded);
  check_adapter<TestType>(300, 260, 12, 150, kind::col_major, kind::row_major, kind::col_major);
  check_adapter<TestType>(70, 90, 66, 40, kind::row_major, kind::padded, kind::row_major);
  // The small-rank backward in blocks of rows: several blocks and a short last one (2 rows past
  // the last 4-row register block).
  constexpr index_t wide_in = 1500, wide_out = 1100, rows = 70;
  const index_t block = adalora::detail::eigen_thin::row_block<TestType>(wide_in + wide_out);
  REQUIRE(block < rows);
  REQUIRE(rows % block % 4 == 2);
  for (index_t r : {6, 13})
    check_adapter<TestType>(wide_in, wide_out, r, rows, kind::row_major, kind::row_major,
                            r == 6 ? kind::row_major : kind::padded);
}

TEMPLATE_TEST_CASE("eigen adapter: rank 0, an empty batch and single rows", "[eigen_kernels][adapter]",
                   float, double) {
  for (kind k : {kind::row_major, kind::no_unit_stride}) {
    check_adapter<TestType>(9, 7, 0, 4, k, k, k);   // r = 0: nothing is added, nothing breaks
    check_adapter<TestType>(9, 7, 3, 0, k, k, k);   // empty batch
    check_adapter<TestType>(9, 7, 3, 1, k, k, k);   // one row
    check_adapter<TestType>(1, 1, 1, 1, k, k, k);   // 1 × 1 everything
  }
}

TEMPLATE_TEST_CASE("eigen adapter: bad shapes throw like the portable functions, naming the "
                   "Eigen function", "[eigen_kernels][adapter]", float, double) {
  std::mt19937_64 rng(5);
  adapter_case<TestType> c(6, 4, 2, 3, kind::row_major, kind::row_major, kind::row_major, rng);
  const adalora::adapter_scale<TestType> scale(8.0, 2);
  adalora::adapter_workspace<TestType> ws;
  owned<TestType> bad_x(3, 5, kind::row_major), bad_y(3, 5, kind::row_major);
  REQUIRE_THROWS_WITH(
      adalora::eigen_adapter_forward<TestType>(c.params(), scale, bad_x.cview(), c.y.view(), ws),
      Catch::Contains("adalora::eigen_adapter_forward: x must have in_features = 6 columns, got 3 x 5"));
  REQUIRE_THROWS_WITH(
      adalora::eigen_adapter_forward<TestType>(c.params(), scale, c.x.cview(), bad_y.view(), ws),
      Catch::Contains("eigen_adapter_forward: y must be 3 x 4"));
  REQUIRE_THROWS_WITH(adalora::eigen_adapter_backward<TestType>(c.params(), scale, c.x.cview(),
                                                                bad_y.cview(), c.grads(), ws),
                      Catch::Contains("eigen_adapter_backward: dy must be 3 x 4"));
  const auto y_before = c.y.values();
  REQUIRE_THROWS_AS(
      adalora::eigen_adapter_forward<TestType>(c.params(), scale, bad_x.cview(), c.y.view(), ws),
      std::invalid_argument);
  REQUIRE(c.y.values() == y_before);  // nothing written before the checks pass
}

// ---- no allocation -----------------------------------------------------------------------------

/// Neither operator new (the testing kit's counter) nor Eigen's own malloc (Eigen aborts on it
/// under EIGEN_RUNTIME_NO_MALLOC once forbidden) may be called by `f`.
template <class F>
void require_no_allocation(F&& f) {
  REQUIRE(adalora::testing::allocation_counter::wired());
  const auto before = adalora::testing::allocation_counter::count();
  Eigen::internal::set_is_malloc_allowed(false);
  f();
  Eigen::internal::set_is_malloc_allowed(true);
  REQUIRE(adalora::testing::allocation_counter::count() == before);
}

TEMPLATE_TEST_CASE("eigen kernels allocate nothing once their scratch has grown, also for "
                   "LLaMA-sized products", "[eigen_kernels][alloc]", float, double) {
  std::mt19937_64 rng(9);
  // A LLaMA-7B q_proj adapter at r = 64: M is 64 × 4096 (A) and 64 × 11008-like sizes for Bᵀ.
  owned<TestType> a(64, 4096, kind::row_major), b(2000, 64, kind::row_major);
  owned<TestType> ga(64, 4096, kind::row_major), gb(2000, 64, kind::no_unit_stride);
  a.fill(rng, 0.05);
  b.fill(rng, 0.05);
  std::vector<TestType> e(64, TestType(1)), ge(64, TestType(0));
  const adalora::svd_adapter_ref<const TestType> p{a.cview(), {e.data(), 64}, b.cview()};
  const adalora::svd_adapter_ref<TestType> g{ga.view(), {ge.data(), 64}, gb.view()};
  adalora::orthogonality_regularizer<TestType, adalora::eigen_gram_kernel<TestType>> orth;
  orth.reserve(64);
  require_no_allocation([&] {
    orth.value_and_gradient(std::span<const adalora::svd_adapter_ref<const TestType>>(&p, 1),
                            std::span<const adalora::svd_adapter_ref<TestType>>(&g, 1));
  });

  // Adapter forward/backward: the first call grows the workspace, later calls allocate nothing.
  adapter_case<TestType> c(700, 500, 64, 200, kind::row_major, kind::row_major, kind::row_major, rng);
  adapter_case<TestType> s(300, 200, 16, 50, kind::padded, kind::no_unit_stride, kind::no_unit_stride, rng);
  const adalora::adapter_scale<TestType> scale(16.0, 64);
  for (auto* cs : {&c, &s}) {
    adalora::adapter_workspace<TestType> ws;
    adalora::eigen_adapter_forward<TestType>(cs->params(), scale, cs->x.cview(), cs->y.view(), ws);
    adalora::eigen_adapter_backward<TestType>(cs->params(), scale, cs->x.cview(), cs->dy.cview(),
                                              cs->grads(), ws, cs->dx.view());
    require_no_allocation([&] {
      adalora::eigen_adapter_forward<TestType>(cs->params(), scale, cs->x.cview(), cs->y.view(), ws);
      adalora::eigen_adapter_backward<TestType>(cs->params(), scale, cs->x.cview(),
                                                cs->dy.cview(), cs->grads(), ws, cs->dx.view());
    });
  }
}

}  // namespace
