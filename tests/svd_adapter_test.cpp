// Tests of adalora/svd_adapter.hpp: golden replay of the reference forward/delta/merge numbers,
// finite-difference checks of the backward, layouts, zero ranks and input validation.
//
// Expected values come from tests/data/forward_*.json (torch 1.13 running PEFT and loralib) or
// from mathematics stated next to each check, never from the code under test.
#include "adalora/svd_adapter.hpp"

#include <array>
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tests/golden.hpp"

using adalora::index_t;
using adalora::matrix_view;
using adalora::svd_adapter_ref;
using adalora::vector_view;

namespace {

template <class T>
const char* forward_file() {
  return sizeof(T) == 4 ? "forward_f32.json" : "forward_f64.json";
}

template <class T>
matrix_view<T> view(golden::matrix<T>& m) {
  return adalora::make_matrix_view(m.data.data(), m.rows, m.cols);
}

template <class T>
golden::matrix<T> zeros(index_t rows, index_t cols) {
  return {rows, cols, std::vector<T>(static_cast<std::size_t>(rows * cols), T(0))};
}

/// Distance in units in the last place (0 means bit-identical up to the sign of zero).
template <class T>
std::int64_t ulp_distance(T a, T b) {
  using bits_t = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;
  if (a == b) return 0;
  auto ordered = [](T v) {
    const auto i = std::bit_cast<bits_t>(v);
    return i < 0 ? static_cast<std::int64_t>(std::numeric_limits<bits_t>::min()) -
                       static_cast<std::int64_t>(i)
                 : static_cast<std::int64_t>(i);
  };
  const std::int64_t d = ordered(a) - ordered(b);
  return d < 0 ? -d : d;
}

/// Largest ulp distance between a computed matrix (any view) and a golden one.
template <class T>
std::int64_t max_ulps(matrix_view<const T> got, const golden::matrix<T>& want) {
  REQUIRE(got.rows() == want.rows);
  REQUIRE(got.cols() == want.cols);
  std::int64_t worst = 0;
  for (index_t i = 0; i < want.rows; ++i)
    for (index_t j = 0; j < want.cols; ++j)
      worst = std::max(worst, ulp_distance(got(i, j), want(i, j)));
  return worst;
}

/// One case of forward_*.json with its inputs decoded (values are int · value_scale, exact).
template <class T>
struct golden_case {
  nlohmann::json json;
  index_t in = 0, out = 0, r = 0;
  double alpha = 0;
  golden::matrix<T> W, A, B, x;
  std::vector<T> b, E;

  explicit golden_case(const nlohmann::json& c) : json(c) {
    in = c["in"].get<index_t>();
    out = c["out"].get<index_t>();
    r = c["r"].get<index_t>();
    alpha = c["lora_alpha"].get<double>();
    const double s = c["value_scale"].get<double>();
    const auto& i = c["inputs"];
    W = golden::to_matrix<T>(i["W_int"], s);
    A = golden::to_matrix<T>(i["A_int"], s);
    B = golden::to_matrix<T>(i["B_int"], s);
    x = golden::to_matrix<T>(i["x_int"], s);
    b = golden::to_vector<T>(i["b_int"], s);
    E = golden::to_vector<T>(i["E_int"], s);
  }
  std::string name() const { return json["name"].get<std::string>(); }
  double number(const char* key) const { return json["expected"][key].get<double>(); }
  golden::matrix<T> expected(const char* key) const {
    return golden::to_matrix<T>(json["expected"][key]);
  }
  svd_adapter_ref<T> adapter() {
    return {view(A), vector_view<T>(E.data(), static_cast<index_t>(E.size())), view(B)};
  }
  adalora::adapter_scale<T> scale() const { return {alpha, r}; }
};

/// The base layer x · Wᵀ + b that the goldens include. Sequential dot products, the bias added
/// last: this reproduced torch's addmm bit for bit on every golden input (float and double).
template <class T>
golden::matrix<T> base_output(golden::matrix<T>& x, matrix_view<const T> W,
                              const std::vector<T>& b) {
  auto y = zeros<T>(x.rows, W.rows());
  for (index_t k = 0; k < x.rows; ++k)
    for (index_t o = 0; o < W.rows(); ++o) {
      T acc = 0;
      for (index_t j = 0; j < x.cols; ++j) acc += x(k, j) * W(o, j);
      y(k, o) = acc + b[static_cast<std::size_t>(o)];
    }
  return y;
}

/// A copy of m stored column-major, viewed with the same logical indices.
template <class T>
struct col_major_copy {
  std::vector<T> data;
  matrix_view<T> v;
  explicit col_major_copy(matrix_view<const T> m)
      : data(static_cast<std::size_t>(m.rows() * m.cols())) {
    v = adalora::make_matrix_view(data.data(), m.rows(), m.cols(), adalora::layout::col_major);
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t j = 0; j < m.cols(); ++j) v(i, j) = m(i, j);
  }
};

template <class T>
std::vector<golden_case<T>> load_cases() {
  const auto file = golden::load(forward_file<T>());
  std::vector<golden_case<T>> cases;
  for (const auto& c : file["cases"]) cases.emplace_back(c);
  REQUIRE(cases.size() == 3);
  return cases;
}

/// A random adapter, row-major, with entries N(0, 1) and the E entries listed in `zero_e` masked.
template <class T>
struct random_adapter {
  golden::matrix<T> A, B;
  std::vector<T> E;
  random_adapter(index_t in, index_t out, index_t r, std::mt19937_64& rng,
                 const std::vector<index_t>& zero_e = {}) {
    std::normal_distribution<T> normal(T(0), T(1));
    A = zeros<T>(r, in);
    B = zeros<T>(out, r);
    E.assign(static_cast<std::size_t>(r), T(0));
    for (auto& v : A.data) v = normal(rng);
    for (auto& v : B.data) v = normal(rng);
    for (auto& v : E) v = normal(rng);
    for (index_t i : zero_e) E[static_cast<std::size_t>(i)] = T(0);
  }
  svd_adapter_ref<T> ref() {
    return {view(A), vector_view<T>(E.data(), static_cast<index_t>(E.size())), view(B)};
  }
};

template <class T>
golden::matrix<T> random_matrix(index_t rows, index_t cols, std::mt19937_64& rng) {
  std::normal_distribution<T> normal(T(0), T(1));
  auto m = zeros<T>(rows, cols);
  for (auto& v : m.data) v = normal(rng);
  return m;
}

}  // namespace

// ---- scale --------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("adapter_scale: scaling = alpha or r_init, rn = r_init + 1e-5 in T", "[adapter]",
                   float, double) {
  for (auto& c : load_cases<TestType>()) {
    INFO(c.name());
    const auto s = c.scale();
    // Exact: both are single roundings of the same real numbers torch rounded.
    REQUIRE(s.scaling() == static_cast<TestType>(c.number("scaling")));
    REQUIRE(s.rn() == static_cast<TestType>(c.number("ranknum_plus_eps")));
  }
  // docs/algorithm.md §2 / the golden ranknum_plus_eps: float(8) + float(1e-5) = 8 + 10 ulp.
  if constexpr (std::is_same_v<TestType, float>)
    REQUIRE(adalora::adapter_scale<float>(16, 8).rn() == 8.000009536743164f);
  const adalora::adapter_scale<TestType> zero_alpha(0.0, 6);
  REQUIRE(zero_alpha.scaling() == TestType(6));
  REQUIRE(zero_alpha.r_init() == 6);
  REQUIRE(adalora::adapter_scale<TestType>(0.5, 4).scaling() == TestType(0.5));
}

// ---- golden replay ------------------------------------------------------------------------------
//
// Tolerance: exact (0 ulp). The references' BLAS summed each dot product sequentially in T
// without fused multiply-add on these shapes: an FMA variant of the same loops misses 18 of the
// 30 float y values of case alpha16_r8, the sequential one misses none. With -ffp-contract=off
// the library performs the same roundings in the same order, so any difference is a bug.

TEMPLATE_TEST_CASE("forward, delta, merge and unmerge reproduce the goldens bit for bit",
                   "[adapter][golden]", float, double) {
  for (auto& c : load_cases<TestType>()) {
    INFO(c.name());
    const auto scale = c.scale();
    adalora::adapter_workspace<TestType> ws;

    // y = x·Wᵀ + b + adapter(x)
    auto y = base_output<TestType>(c.x, view(c.W), c.b);
    adalora::adapter_forward(c.adapter(), scale, view(c.x), view(y), ws);
    CHECK(max_ulps<TestType>(view(y), c.expected("y")) == 0);
    CHECK(max_ulps<TestType>(view(y), c.expected("loralib_y")) == 0);

    auto dw = zeros<TestType>(c.out, c.in);
    adalora::delta_weight(c.adapter(), scale, view(dw));
    CHECK(max_ulps<TestType>(view(dw), c.expected("delta_W")) == 0);

    auto W = c.W;
    adalora::merge(c.adapter(), scale, view(W));
    CHECK(max_ulps<TestType>(view(W), c.expected("W_merged")) == 0);
    CHECK(max_ulps<TestType>(view(W), c.expected("loralib_W_merged")) == 0);
    auto y_merged = base_output<TestType>(c.x, view(W), c.b);
    CHECK(max_ulps<TestType>(view(y_merged), c.expected("y_merged")) == 0);

    adalora::unmerge(c.adapter(), scale, view(W));
    CHECK(max_ulps<TestType>(view(W), c.expected("W_after_unmerge")) == 0);
    CHECK(max_ulps<TestType>(view(W), c.expected("loralib_W_after_unmerge")) == 0);
    // The references' own round-trip error, recomputed from their numbers: merge/unmerge is not
    // an exact inverse, and ours loses exactly what theirs lost.
    double worst = 0;
    for (index_t i = 0; i < c.out; ++i)
      for (index_t j = 0; j < c.in; ++j)
        worst = std::max(worst, std::abs(static_cast<double>(W(i, j) - c.W(i, j))));
    CHECK(worst == c.number("max_abs_diff_unmerged_vs_original_W"));

    // safe merge performs the same arithmetic.
    auto W_safe = c.W;
    adalora::merge(c.adapter(), scale, view(W_safe), /*safe_merge=*/true);
    CHECK(max_ulps<TestType>(view(W_safe), c.expected("W_merged")) == 0);
  }
}

TEMPLATE_TEST_CASE("alpha = 0 scales by r (golden case alpha0_r6_scaling_is_r)",
                   "[adapter][golden]", float, double) {
  auto cases = load_cases<TestType>();
  auto& c = cases[1];
  REQUIRE(c.name() == "alpha0_r6_scaling_is_r");
  REQUIRE(c.alpha == 0);
  adalora::adapter_workspace<TestType> ws;
  auto y = base_output<TestType>(c.x, view(c.W), c.b);
  adalora::adapter_forward(c.adapter(), adalora::adapter_scale<TestType>(0.0, c.r), view(c.x),
                           view(y), ws);
  REQUIRE(max_ulps<TestType>(view(y), c.expected("y")) == 0);
  // alpha = r given explicitly is the same adapter, so the same bits (exact).
  auto y2 = base_output<TestType>(c.x, view(c.W), c.b);
  adalora::adapter_forward(c.adapter(), adalora::adapter_scale<TestType>(double(c.r), c.r),
                           view(c.x), view(y2), ws);
  REQUIRE(max_ulps<TestType>(view(y2), y) == 0);
}

TEMPLATE_TEST_CASE("the resized adapter equals the masked one (golden alpha32_r8_masked)",
                   "[adapter][golden]", float, double) {
  auto cases = load_cases<TestType>();
  auto& c = cases[2];
  REQUIRE(c.name() == "alpha32_r8_masked");
  const nlohmann::json& ex = c.json["expected"];
  std::vector<bool> pattern;
  for (const auto& v : ex["rank_pattern"]["layers.0.lora_E.default"])
    pattern.push_back(v.get<bool>());
  REQUIRE(pattern.size() == 8);
  const index_t kept = adalora::kept_rank(pattern);
  REQUIRE(kept == ex["resized_shapes"]["lora_E"][0].get<index_t>());

  // The golden E is already masked: masking again changes nothing.
  const auto E_before = c.E;
  REQUIRE(adalora::mask_singular_values(c.adapter().E, pattern) == kept);
  REQUIRE(c.E == E_before);

  auto A2 = zeros<TestType>(ex["resized_shapes"]["lora_A"][0].get<index_t>(),
                            ex["resized_shapes"]["lora_A"][1].get<index_t>());
  auto B2 = zeros<TestType>(ex["resized_shapes"]["lora_B"][0].get<index_t>(),
                            ex["resized_shapes"]["lora_B"][1].get<index_t>());
  std::vector<TestType> E2(static_cast<std::size_t>(kept));
  const svd_adapter_ref<TestType> small{view(A2), vector_view<TestType>(E2.data(), kept), view(B2)};
  adalora::resize_adapter(c.adapter(), pattern, small);

  // Kept triplets are copied in order (PEFT bool-list indexing).
  index_t d = 0;
  for (index_t i = 0; i < c.r; ++i) {
    if (!pattern[static_cast<std::size_t>(i)]) continue;
    REQUIRE(E2[static_cast<std::size_t>(d)] == c.E[static_cast<std::size_t>(i)]);
    for (index_t j = 0; j < c.in; ++j) REQUIRE(A2(d, j) == c.A(i, j));
    for (index_t o = 0; o < c.out; ++o) REQUIRE(B2(o, d) == c.B(o, i));
    ++d;
  }

  // Same scale (r_init = 8): exact, because dropping zero terms from a sequential sum of
  // products does not change a single rounding (x + 0·y = x), and the golden says diff 0.
  adalora::adapter_workspace<TestType> ws;
  auto y_masked = base_output<TestType>(c.x, view(c.W), c.b);
  adalora::adapter_forward(c.adapter(), c.scale(), view(c.x), view(y_masked), ws);
  auto y_small = base_output<TestType>(c.x, view(c.W), c.b);
  adalora::adapter_forward(small, c.scale(), view(c.x), view(y_small), ws);
  REQUIRE(max_ulps<TestType>(view(y_small), c.expected("y_resized_ranknum_init_r")) == 0);
  REQUIRE(max_ulps<TestType>(view(y_small), y_masked) == 0);
  REQUIRE(ex["max_abs_diff_resized_vs_masked"].get<double>() == 0.0);

  // The owning class does the same and keeps r_init.
  adalora::svd_adapter<TestType> full(c.in, c.out, c.r, c.alpha);
  std::copy(c.A.data.begin(), c.A.data.end(), full.params().A.data());
  std::copy(c.E.begin(), c.E.end(), full.params().E.data());
  std::copy(c.B.data.begin(), c.B.data.end(), full.params().B.data());
  const auto pruned = full.resized(pattern);
  REQUIRE(pruned.rank() == kept);
  REQUIRE(pruned.r_init() == c.r);
  REQUIRE(pruned.scale().rn() == c.scale().rn());
  auto y_class = base_output<TestType>(c.x, view(c.W), c.b);
  auto pruned_mut = pruned;
  pruned_mut.forward(view(c.x), view(y_class));
  REQUIRE(max_ulps<TestType>(view(y_class), c.expected("y_resized_ranknum_init_r")) == 0);
  full.resize(pattern);
  REQUIRE(full.rank() == kept);
  REQUIRE(full.r_init() == c.r);
}

TEMPLATE_TEST_CASE("strided views (column-major, transposed) give the same bits as row-major",
                   "[adapter][golden]", float, double) {
  // Exact: the kernels index through strides but perform the same operations in the same order.
  for (auto& c : load_cases<TestType>()) {
    INFO(c.name());
    const auto scale = c.scale();
    col_major_copy<TestType> A(view(c.A)), B(view(c.B)), x(view(c.x));
    // E with stride 3, inside a larger buffer.
    std::vector<TestType> E3(c.E.size() * 3, TestType(-7));
    for (std::size_t i = 0; i < c.E.size(); ++i) E3[3 * i] = c.E[i];
    const svd_adapter_ref<TestType> p{A.v, vector_view<TestType>(E3.data(), c.r, 3), B.v};

    adalora::adapter_workspace<TestType> ws;
    auto y0 = base_output<TestType>(c.x, view(c.W), c.b);
    col_major_copy<TestType> y(view(y0));
    adalora::adapter_forward(p, scale, x.v, y.v, ws);
    CHECK(max_ulps<TestType>(y.v, c.expected("y")) == 0);

    // fan_in_fan_out storage: the base weight is stored (in × out); pass its transpose.
    auto Wt = zeros<TestType>(c.in, c.out);
    for (index_t o = 0; o < c.out; ++o)
      for (index_t j = 0; j < c.in; ++j) Wt(j, o) = c.W(o, j);
    adalora::merge(p, scale, view(Wt).transposed());
    CHECK(max_ulps<TestType>(view(Wt).transposed(), c.expected("W_merged")) == 0);
    adalora::unmerge(p, scale, view(Wt).transposed());
    CHECK(max_ulps<TestType>(view(Wt).transposed(), c.expected("W_after_unmerge")) == 0);

    col_major_copy<TestType> Wc(view(c.W));
    adalora::merge(p, scale, Wc.v);
    CHECK(max_ulps<TestType>(Wc.v, c.expected("W_merged")) == 0);
    adalora::unmerge(p, scale, Wc.v);
    CHECK(max_ulps<TestType>(Wc.v, c.expected("W_after_unmerge")) == 0);

    col_major_copy<TestType> dw(view(c.W));  // overwritten, old content irrelevant
    adalora::delta_weight(p, scale, dw.v);
    CHECK(max_ulps<TestType>(dw.v, c.expected("delta_W")) == 0);
  }
}

// ---- backward -----------------------------------------------------------------------------------
//
// L(θ) = Σ_{k,o} G(k, o) · adapter(x)(k, o) is affine in every single entry of A, E, B and x
// (each enters the product once), so the central difference (L(θ+h) − L(θ−h)) / 2h has no
// truncation error at all: what is left is rounding, about eps · Σ|terms| / h ≈ 1e-16 · 50 / 0.5,
// far below the 1e-11 used (relative to max(1, |g|)). A wrong index or a missing factor gives
// errors of order 1.

namespace {

double adapter_loss(const svd_adapter_ref<const double>& p, const adalora::adapter_scale<double>& s,
                    const golden::matrix<double>& x, const golden::matrix<double>& G) {
  auto xc = x;
  auto y = zeros<double>(x.rows, G.cols);
  adalora::adapter_workspace<double> ws;
  adalora::adapter_forward(p, s, view(xc), view(y), ws);
  double L = 0;
  for (std::size_t i = 0; i < y.data.size(); ++i) L += G.data[i] * y.data[i];
  return L;
}

template <class Fn>
double central_difference(double& entry, Fn&& loss) {
  const double h = 0.25;  // a power of two: θ ± h is exact
  const double saved = entry;
  entry = saved + h;
  const double up = loss();
  entry = saved - h;
  const double down = loss();
  entry = saved;
  return (up - down) / (2 * h);
}

bool close(double got, double want) {
  return std::abs(got - want) <= 1e-11 * std::max(1.0, std::abs(want));
}

}  // namespace

TEST_CASE("backward matches central differences for A, E, B and x, masked E included",
          "[adapter][backward]") {
  std::mt19937_64 rng(20240601);
  const index_t in = 7, out = 5, r = 4, n = 3;
  random_adapter<double> a(in, out, r, rng, /*zero_e=*/{1});  // triplet 1 pruned
  auto x = random_matrix<double>(n, in, rng);
  const auto G = random_matrix<double>(n, out, rng);
  const adalora::adapter_scale<double> s(12.0, 6);  // r_init != r, like a resized adapter

  auto dA = zeros<double>(r, in), dB = zeros<double>(out, r), dx = zeros<double>(n, in);
  std::vector<double> dE(static_cast<std::size_t>(r), 0.0);
  const svd_adapter_ref<double> grads{view(dA), vector_view<double>(dE.data(), r), view(dB)};
  adalora::adapter_workspace<double> ws;
  auto Gc = G;
  adalora::adapter_backward(a.ref(), s, view(x), view(Gc), grads, ws, view(dx));

  auto loss = [&] { return adapter_loss(a.ref(), s, x, G); };
  for (index_t i = 0; i < r; ++i)
    for (index_t j = 0; j < in; ++j) {
      INFO("dA(" << i << ", " << j << ")");
      CHECK(close(dA(i, j), central_difference(a.A(i, j), loss)));
    }
  for (index_t i = 0; i < r; ++i) {
    INFO("dE(" << i << ")");
    CHECK(close(dE[static_cast<std::size_t>(i)],
                central_difference(a.E[static_cast<std::size_t>(i)], loss)));
  }
  for (index_t o = 0; o < out; ++o)
    for (index_t i = 0; i < r; ++i) {
      INFO("dB(" << o << ", " << i << ")");
      CHECK(close(dB(o, i), central_difference(a.B(o, i), loss)));
    }
  for (index_t k = 0; k < n; ++k)
    for (index_t j = 0; j < in; ++j) {
      INFO("dx(" << k << ", " << j << ")");
      CHECK(close(dx(k, j), central_difference(x(k, j), loss)));
    }
  // A pruned triplet: A's row gets (…)·E_1 = 0 exactly, E_1 itself still gets a gradient (docs/algorithm.md
  // §6: masking is soft, the next step moves E_1 again).
  for (index_t j = 0; j < in; ++j) REQUIRE(dA(1, j) == 0.0);
  REQUIRE(dE[1] != 0.0);
}

TEMPLATE_TEST_CASE("backward accumulates into its outputs and dx is optional",
                   "[adapter][backward]", float, double) {
  std::mt19937_64 rng(7);
  const index_t in = 6, out = 4, r = 3, n = 2;
  random_adapter<TestType> a(in, out, r, rng);
  auto x = random_matrix<TestType>(n, in, rng);
  auto dy = random_matrix<TestType>(n, out, rng);
  const adalora::adapter_scale<TestType> s(8.0, r);
  adalora::adapter_workspace<TestType> ws;

  auto dA = zeros<TestType>(r, in), dB = zeros<TestType>(out, r), dx = zeros<TestType>(n, in);
  std::vector<TestType> dE(static_cast<std::size_t>(r), 0);
  const svd_adapter_ref<TestType> g{view(dA), vector_view<TestType>(dE.data(), r), view(dB)};
  adalora::adapter_backward(a.ref(), s, view(x), view(dy), g, ws, view(dx));
  const auto dA1 = dA, dB1 = dB, dx1 = dx;
  const auto dE1 = dE;

  // Second call without dx: parameter grads double (g + g is exact), dx untouched.
  adalora::adapter_backward(a.ref(), s, view(x), view(dy), g, ws);
  for (std::size_t i = 0; i < dA.data.size(); ++i) REQUIRE(dA.data[i] == 2 * dA1.data[i]);
  for (std::size_t i = 0; i < dB.data.size(); ++i) REQUIRE(dB.data[i] == 2 * dB1.data[i]);
  for (std::size_t i = 0; i < dE.size(); ++i) REQUIRE(dE[i] == 2 * dE1[i]);
  REQUIRE(dx.data == dx1.data);

  // The owning class accumulates the same numbers and zero_grad() clears them.
  adalora::svd_adapter<TestType> owned(in, out, r, 8.0);
  std::copy(a.A.data.begin(), a.A.data.end(), owned.params().A.data());
  std::copy(a.E.begin(), a.E.end(), owned.params().E.data());
  std::copy(a.B.data.begin(), a.B.data.end(), owned.params().B.data());
  auto dx2 = zeros<TestType>(n, in);
  owned.backward(view(x), view(dy), view(dx2));
  REQUIRE(dx2.data == dx1.data);
  for (index_t i = 0; i < r; ++i) REQUIRE(owned.grads().E[i] == dE1[static_cast<std::size_t>(i)]);
  for (index_t i = 0; i < r; ++i)
    for (index_t j = 0; j < in; ++j) REQUIRE(owned.grads().A(i, j) == dA1(i, j));
  owned.zero_grad();
  for (index_t i = 0; i < r; ++i) REQUIRE(owned.grads().E[i] == 0);
}

// ---- merge round trip, zero ranks, owning class -------------------------------------------------

TEMPLATE_TEST_CASE("merge then unmerge restores W to rounding on row- and column-major W",
                   "[adapter][merge]", float, double) {
  std::mt19937_64 rng(11);
  const index_t in = 9, out = 6, r = 5;
  random_adapter<TestType> a(in, out, r, rng, {2});
  const adalora::adapter_scale<TestType> s(16.0, r);
  auto W0 = random_matrix<TestType>(out, in, rng);
  auto dw = zeros<TestType>(out, in);
  adalora::delta_weight(a.ref(), s, view(dw));
  const TestType eps = std::numeric_limits<TestType>::epsilon();
  for (const auto order : {adalora::layout::row_major, adalora::layout::col_major}) {
    std::vector<TestType> buf(W0.data.size());
    auto W = adalora::make_matrix_view(buf.data(), out, in, order);
    for (index_t o = 0; o < out; ++o)
      for (index_t j = 0; j < in; ++j) W(o, j) = W0(o, j);
    adalora::merge(a.ref(), s, W);
    // merge adds exactly the ΔW that delta_weight reports (same computation, one rounding).
    for (index_t o = 0; o < out; ++o)
      for (index_t j = 0; j < in; ++j) REQUIRE(W(o, j) == W0(o, j) + dw(o, j));
    adalora::unmerge(a.ref(), s, W);
    // (W + d) − d: each of the two roundings is at most ½ ulp of a number no larger than
    // (|W| + |d|)(1 + eps), so the total is below eps·(|W| + |d|)(1 + eps); 2·eps leaves slack.
    for (index_t o = 0; o < out; ++o)
      for (index_t j = 0; j < in; ++j)
        REQUIRE(std::abs(W(o, j) - W0(o, j)) <=
                2 * eps * (std::abs(W0(o, j)) + std::abs(dw(o, j))));
  }
}

TEMPLATE_TEST_CASE("zero kept ranks and r = 0 adapters work everywhere", "[adapter][zero]", float,
                   double) {
  std::mt19937_64 rng(3);
  const index_t in = 5, out = 4, r = 3, n = 2;
  random_adapter<TestType> a(in, out, r, rng);
  const adalora::adapter_scale<TestType> s(8.0, r);
  const std::vector<bool> none(static_cast<std::size_t>(r), false);
  REQUIRE(adalora::kept_rank(none) == 0);

  // resize to nothing: empty views, no data needed.
  const svd_adapter_ref<TestType> empty{matrix_view<TestType>(nullptr, 0, in, in, 1),
                                        vector_view<TestType>(nullptr, 0),
                                        matrix_view<TestType>(nullptr, out, 0, 0, 1)};
  adalora::resize_adapter(a.ref(), none, empty);

  auto x = random_matrix<TestType>(n, in, rng);
  auto y = random_matrix<TestType>(n, out, rng);
  const auto y0 = y;
  adalora::adapter_workspace<TestType> ws;
  adalora::adapter_forward(empty, s, view(x), view(y), ws);
  REQUIRE(y.data == y0.data);  // an empty sum is 0 and y + 0 == y

  auto W = random_matrix<TestType>(out, in, rng);
  const auto W0 = W;
  adalora::merge(empty, s, view(W), true);
  REQUIRE(W.data == W0.data);
  auto dw = random_matrix<TestType>(out, in, rng);
  adalora::delta_weight(empty, s, view(dw));
  for (auto v : dw.data) REQUIRE(v == 0);

  auto dy = random_matrix<TestType>(n, out, rng);
  auto dx = random_matrix<TestType>(n, in, rng);
  const auto dx0 = dx;
  adalora::adapter_backward(empty, s, view(x), view(dy), empty, ws, view(dx));
  REQUIRE(dx.data == dx0.data);

  // The owning class: resized to nothing, and created with r = 0.
  adalora::svd_adapter<TestType> owned(in, out, r, 8.0);
  owned.initialize(rng);
  auto pruned = owned.resized(none);
  REQUIRE(pruned.rank() == 0);
  REQUIRE(pruned.r_init() == r);
  pruned.forward(view(x), view(y));
  REQUIRE(y.data == y0.data);
  pruned.backward(view(x), view(dy), view(dx));
  REQUIRE(dx.data == dx0.data);

  adalora::svd_adapter<TestType> zero(in, out, 0, 0.0);
  REQUIRE(zero.scale().scaling() == 0);  // alpha = 0 ⇒ scaling = r = 0
  zero.forward(view(x), view(y));
  REQUIRE(y.data == y0.data);
  zero.delta_weight(view(dw));
  for (auto v : dw.data) REQUIRE(v == 0);
  zero.merge(view(W));
  REQUIRE(W.data == W0.data);
}

TEMPLATE_TEST_CASE("svd_adapter::initialize follows the references' init", "[adapter]", float,
                   double) {
  const index_t in = 64, out = 48, r = 16;
  adalora::svd_adapter<TestType> a(in, out, r, 32.0);
  std::mt19937_64 rng(99);
  a.initialize(rng);
  for (index_t i = 0; i < r; ++i) REQUIRE(a.params().E[i] == 0);
  // Sample standard deviations of 1024 and 768 N(0, 0.02) draws: the standard error of the
  // estimate is about 0.02/sqrt(2N) < 2.6%, so 10% is a 4-sigma band.
  auto stddev = [](matrix_view<const TestType> m) {
    double s2 = 0;
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t j = 0; j < m.cols(); ++j) s2 += double(m(i, j)) * double(m(i, j));
    return std::sqrt(s2 / double(m.size()));
  };
  REQUIRE(std::abs(stddev(a.params().A) - 0.02) < 0.002);
  REQUIRE(std::abs(stddev(a.params().B) - 0.02) < 0.002);
  // E = 0 makes the adapter an identity: ΔW is exactly zero.
  auto dw = zeros<TestType>(out, in);
  dw.data.assign(dw.data.size(), TestType(1));
  a.delta_weight(view(dw));
  for (auto v : dw.data) REQUIRE(v == 0);
}

TEMPLATE_TEST_CASE("a reserved workspace is not reallocated by forward or backward",
                   "[adapter][workspace]", float, double) {
  std::mt19937_64 rng(5);
  const index_t in = 8, out = 6, r = 4, n = 5;
  random_adapter<TestType> a(in, out, r, rng);
  const adalora::adapter_scale<TestType> s(8.0, r);
  adalora::adapter_workspace<TestType> ws;
  ws.reserve(n, in, out, r);
  const auto capacity = ws.capacity();
  const TestType* where = ws.scratch(0);
  auto x = random_matrix<TestType>(n, in, rng);
  auto y = zeros<TestType>(n, out);
  auto dA = zeros<TestType>(r, in), dB = zeros<TestType>(out, r), dx = zeros<TestType>(n, in);
  std::vector<TestType> dE(static_cast<std::size_t>(r), 0);
  const svd_adapter_ref<TestType> g{view(dA), vector_view<TestType>(dE.data(), r), view(dB)};
  for (index_t batch = 0; batch <= n; ++batch) {
    adalora::adapter_forward(a.ref(), s, view(x).block(0, 0, batch, in),
                             view(y).block(0, 0, batch, out), ws);
    adalora::adapter_backward(a.ref(), s, view(x).block(0, 0, batch, in),
                              view(y).block(0, 0, batch, out), g, ws,
                              view(dx).block(0, 0, batch, in));
  }
  REQUIRE(ws.capacity() == capacity);
  REQUIRE(ws.scratch(0) == where);
}

// ---- validation ---------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("bad input throws invalid_argument naming the function, argument and shapes",
                   "[adapter][errors]", float, double) {
  using T = TestType;
  using Catch::Contains;
  std::mt19937_64 rng(1);
  const index_t in = 12, out = 10, r = 8, n = 3;
  random_adapter<T> a(in, out, r, rng);
  const adalora::adapter_scale<T> s(16.0, r);
  adalora::adapter_workspace<T> ws;
  auto x = random_matrix<T>(n, in, rng);
  auto y = zeros<T>(n, out);

  REQUIRE_THROWS_WITH(adalora::adapter_scale<T>(-1.0, 8),
                      Contains("adapter_scale") && Contains("alpha") && Contains("-1"));
  REQUIRE_THROWS_WITH(adalora::adapter_scale<T>(std::nan(""), 8),
                      Contains("adapter_scale") && Contains("alpha"));
  REQUIRE_THROWS_WITH(adalora::adapter_scale<T>(8.0, -2),
                      Contains("adapter_scale") && Contains("r_init") && Contains("-2"));
  REQUIRE_THROWS_AS(adalora::adapter_scale<T>(-0.5, 8), std::invalid_argument);

  auto x_bad = random_matrix<T>(n, in - 1, rng);
  REQUIRE_THROWS_WITH(adalora::adapter_forward(a.ref(), s, view(x_bad), view(y), ws),
                      Contains("adalora::adapter_forward") &&
                          Contains("x must have in_features = 12") && Contains("got 3 x 11"));
  auto y_bad = zeros<T>(n, out - 1);
  REQUIRE_THROWS_WITH(
      adalora::adapter_forward(a.ref(), s, view(x), view(y_bad), ws),
      Contains("adapter_forward") && Contains("y must be 3 x 10") && Contains("got 3 x 9"));

  // Rank mismatch: A has 7 rows while E has 8 singular values.
  auto p = a.ref();
  p.A = view(a.A).block(0, 0, r - 1, in);
  REQUIRE_THROWS_WITH(adalora::adapter_forward(p, s, view(x), view(y), ws),
                      Contains("adapter_forward") && Contains("adapter.A") &&
                          Contains("E.size() = 8") && Contains("got 7 x 12"));
  p = a.ref();
  p.B = view(a.B).block(0, 0, out, r - 2);
  auto dw_ok = zeros<T>(out, in);
  REQUIRE_THROWS_WITH(adalora::delta_weight(p, s, view(dw_ok)),
                      Contains("delta_weight") && Contains("adapter.B") && Contains("got 10 x 6"));
  // A view that claims elements but has no data.
  p = a.ref();
  p.A = matrix_view<T>(nullptr, r, in, in, 1);
  REQUIRE_THROWS_WITH(adalora::adapter_forward(p, s, view(x), view(y), ws),
                      Contains("adapter_forward") && Contains("null data"));

  // Backward: gradient shapes, dy, dx.
  auto dA = zeros<T>(r, in), dB = zeros<T>(out, r), dx = zeros<T>(n, in);
  std::vector<T> dE(static_cast<std::size_t>(r), 0);
  svd_adapter_ref<T> g{view(dA), vector_view<T>(dE.data(), r - 1), view(dB)};
  REQUIRE_THROWS_WITH(adalora::adapter_backward(a.ref(), s, view(x), view(y), g, ws),
                      Contains("adapter_backward") && Contains("gradient of E must have size 8") &&
                          Contains("got 7"));
  g.E = vector_view<T>(dE.data(), r);
  auto dx_bad = zeros<T>(n, in + 1);
  REQUIRE_THROWS_WITH(
      adalora::adapter_backward(a.ref(), s, view(x), view(y), g, ws, view(dx_bad)),
      Contains("adapter_backward") && Contains("dx must be 3 x 12") && Contains("got 3 x 13"));
  REQUIRE_THROWS_WITH(adalora::adapter_backward(a.ref(), s, view(x), view(y_bad), g, ws),
                      Contains("adapter_backward") && Contains("dy must be 3 x 10"));
  // Nothing was written by the failed calls.
  for (auto v : dA.data) REQUIRE(v == 0);
  for (auto v : dx.data) REQUIRE(v == 0);

  // W must be out × in.
  auto W_bad = zeros<T>(in, out);
  REQUIRE_THROWS_WITH(adalora::merge(a.ref(), s, view(W_bad)), Contains("adalora::merge") &&
                                                                   Contains("W must be 10 x 12") &&
                                                                   Contains("got 12 x 10"));
  REQUIRE_THROWS_WITH(adalora::unmerge(a.ref(), s, view(W_bad)),
                      Contains("adalora::unmerge") && Contains("W must be 10 x 12"));
  REQUIRE_THROWS_WITH(adalora::delta_weight(a.ref(), s, view(W_bad)),
                      Contains("delta_weight") && Contains("out must be 10 x 12"));

  // Masks and resize.
  const std::vector<bool> short_mask(static_cast<std::size_t>(r - 1), true);
  REQUIRE_THROWS_WITH(
      adalora::mask_singular_values(a.ref().E, short_mask),
      Contains("mask_singular_values") && Contains("rank = 8") && Contains("got 7 entries"));
  std::vector<bool> mask(static_cast<std::size_t>(r), true);
  mask[0] = mask[5] = false;  // keeps 6
  auto A2 = zeros<T>(6, in), B2 = zeros<T>(out, 5);
  std::vector<T> E2(6);
  const svd_adapter_ref<T> dst_bad{view(A2), vector_view<T>(E2.data(), 6), view(B2)};
  REQUIRE_THROWS_WITH(adalora::resize_adapter(a.ref(), mask, dst_bad),
                      Contains("resize_adapter") && Contains("dst.B") && Contains("E.size() = 6") &&
                          Contains("got 10 x 5"));
  auto A3 = zeros<T>(5, in), B3 = zeros<T>(out, 5);
  std::vector<T> E3(5);
  const svd_adapter_ref<T> dst_rank{view(A3), vector_view<T>(E3.data(), 5), view(B3)};
  REQUIRE_THROWS_WITH(
      adalora::resize_adapter(a.ref(), mask, dst_rank),
      Contains("resize_adapter") && Contains("kept entries of mask = 6") && Contains("got rank 5"));
  REQUIRE_THROWS_WITH(adalora::resize_adapter(a.ref(), short_mask, dst_rank),
                      Contains("resize_adapter") && Contains("mask") && Contains("got 7 entries"));

  // The owning class.
  REQUIRE_THROWS_WITH(adalora::svd_adapter<T>(-1, out, r, 8.0),
                      Contains("svd_adapter") && Contains("-1"));
  REQUIRE_THROWS_WITH(adalora::svd_adapter<T>(in, out, r, -3.0),
                      Contains("adapter_scale") && Contains("-3"));
  adalora::svd_adapter<T> owned(in, out, r, 8.0);
  REQUIRE_THROWS_WITH(owned.forward(view(x_bad), view(y)),
                      Contains("svd_adapter::forward") && Contains("x must have in_features = 12"));
  REQUIRE_THROWS_WITH(owned.resized(short_mask),
                      Contains("svd_adapter::resized") && Contains("got 7 entries"));
  REQUIRE_THROWS_WITH(owned.merge(view(W_bad)), Contains("svd_adapter::merge"));
}

TEMPLATE_TEST_CASE("safe merge refuses non-finite merged weights and leaves W unchanged",
                   "[adapter][errors][merge]", float, double) {
  using T = TestType;
  using Catch::Contains;
  std::mt19937_64 rng(2);
  const index_t in = 6, out = 5, r = 3;
  random_adapter<T> a(in, out, r, rng);
  const adalora::adapter_scale<T> s(8.0, r);
  auto W = random_matrix<T>(out, in, rng);
  const auto W0 = W;

  a.A(1, 4) = std::numeric_limits<T>::quiet_NaN();  // poisons column 4 of ΔW
  REQUIRE_THROWS_WITH(adalora::merge(a.ref(), s, view(W), true),
                      Contains("adalora::merge") && Contains("non-finite") && Contains("W(0, 4)") &&
                          Contains("W is unchanged"));
  REQUIRE(W.data == W0.data);
  REQUIRE_THROWS_AS(adalora::merge(a.ref(), s, view(W), true), std::invalid_argument);

  // An infinite singular value, and an overflow of W + ΔW with a finite ΔW (what PEFT checks is
  // the merged weight, so both are refused).
  a.A(1, 4) = T(0.5);
  a.E[2] = std::numeric_limits<T>::infinity();
  REQUIRE_THROWS_WITH(adalora::merge(a.ref(), s, view(W), true), Contains("non-finite"));
  REQUIRE(W.data == W0.data);
  // Overflow: a 1 × 1 rank-1 adapter with ΔW = (max/2) / (1 + 1e-5), finite, and W = max.
  {
    const T half_max = std::numeric_limits<T>::max() / 2;
    T one_a = 1, one_e = 1, b_val = half_max, w_val = std::numeric_limits<T>::max(), d_val = 0;
    const svd_adapter_ref<T> tiny{matrix_view<T>(&one_a, 1, 1, 1, 1), vector_view<T>(&one_e, 1),
                                  matrix_view<T>(&b_val, 1, 1, 1, 1)};
    const adalora::adapter_scale<T> unit(1.0, 1);
    adalora::delta_weight(tiny, unit, matrix_view<T>(&d_val, 1, 1, 1, 1));
    REQUIRE(std::isfinite(d_val));
    REQUIRE(d_val > half_max / 2);
    REQUIRE_THROWS_WITH(adalora::merge(tiny, unit, matrix_view<T>(&w_val, 1, 1, 1, 1), true),
                        Contains("non-finite") && Contains("W(0, 0)"));
    REQUIRE(w_val == std::numeric_limits<T>::max());
  }

  // Without safe_merge the same merge goes through (PEFT's default) and writes the non-finite.
  a.E[2] = std::numeric_limits<T>::infinity();
  auto W2 = W0;
  REQUIRE_NOTHROW(adalora::merge(a.ref(), s, view(W2)));
  bool any_nonfinite = false;
  for (auto v : W2.data) any_nonfinite = any_nonfinite || !std::isfinite(v);
  REQUIRE(any_nonfinite);
}
