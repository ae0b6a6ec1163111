// Tests of the GramKernel extension point of adalora/orthogonality.hpp: which types satisfy the
// concept (one near-miss type per requirement), and that a user-written kernel (the skeleton of
// docs/orthogonality_kernels.md, examples/custom_gram_kernel/naive_gram_kernel.hpp) plugged into
// orthogonality_regularizer reproduces the portable kernel's value, per-matrix norms and gradients bit for bit, on strided and transposed views.
#include <catch2/catch.hpp>
#include <cstddef>
#include <random>
#include <span>
#include <vector>

#include "adalora/integrations/eigen_gram_kernel.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/orthogonality.hpp"
#include "adalora/svd_adapter_ref.hpp"
#include "examples/custom_gram_kernel/naive_gram_kernel.hpp"

namespace {

using adalora::index_t;
using adalora::matrix_view;

// ---- near misses: each type breaks exactly one requirement -------------------------------------

using view_f = matrix_view<const float>;
using mut_view_f = matrix_view<float>;

struct no_accumulator {
  void reserve(index_t) {}
  double gram_minus_identity(view_f, double*) noexcept { return 0; }
  void add_scaled_product(const double*, double, view_f, mut_view_f) noexcept {}
};
struct integer_accumulator {
  using accumulator_type = long;
  void reserve(index_t) {}
  long gram_minus_identity(view_f, long*) noexcept { return 0; }
  void add_scaled_product(const long*, long, view_f, mut_view_f) noexcept {}
};
struct const_accumulator {
  using accumulator_type = const double;
  void reserve(index_t) {}
  double gram_minus_identity(view_f, const double*) noexcept { return 0; }
  void add_scaled_product(const double*, double, view_f, mut_view_f) noexcept {}
};
struct not_default_constructible {
  using accumulator_type = double;
  explicit not_default_constructible(int) {}
  void reserve(index_t) {}
  double gram_minus_identity(view_f, double*) noexcept { return 0; }
  void add_scaled_product(const double*, double, view_f, mut_view_f) noexcept {}
};
struct no_reserve {
  using accumulator_type = double;
  double gram_minus_identity(view_f, double*) noexcept { return 0; }
  void add_scaled_product(const double*, double, view_f, mut_view_f) noexcept {}
};
struct gram_returns_element_type {
  using accumulator_type = double;
  void reserve(index_t) {}
  float gram_minus_identity(view_f, double*) noexcept { return 0; }
  void add_scaled_product(const double*, double, view_f, mut_view_f) noexcept {}
};
struct no_add_scaled_product {
  using accumulator_type = double;
  void reserve(index_t) {}
  double gram_minus_identity(view_f, double*) noexcept { return 0; }
};
struct may_throw {
  using accumulator_type = double;
  void reserve(index_t) {}
  double gram_minus_identity(view_f, double*) { return 0; }
  void add_scaled_product(const double*, double, view_f, mut_view_f) noexcept {}
};

}  // namespace

TEST_CASE("GramKernel: the built-in kernels and the docs' skeleton satisfy it", "[gram_kernel]") {
  STATIC_REQUIRE(adalora::GramKernel<adalora::portable_gram_kernel<float>, float>);
  STATIC_REQUIRE(adalora::GramKernel<adalora::portable_gram_kernel<double>, double>);
  STATIC_REQUIRE(adalora::GramKernel<adalora::eigen_gram_kernel<float>, float>);
  STATIC_REQUIRE(adalora::GramKernel<adalora::eigen_gram_kernel<float, double>, float>);
  STATIC_REQUIRE(adalora::GramKernel<adalora::eigen_gram_kernel<double>, double>);
  STATIC_REQUIRE(adalora::GramKernel<naive_gram_kernel<float>, float>);
  STATIC_REQUIRE(adalora::GramKernel<naive_gram_kernel<double>, double>);
  STATIC_REQUIRE(adalora::check_gram_kernel<naive_gram_kernel<float>, float>());
  // A kernel is written for one element type: views never convert between element types.
  STATIC_REQUIRE(!adalora::GramKernel<adalora::portable_gram_kernel<float>, double>);
  STATIC_REQUIRE(!adalora::GramKernel<naive_gram_kernel<double>, float>);
}

TEST_CASE("GramKernel: each near miss fails it", "[gram_kernel]") {
  STATIC_REQUIRE(!adalora::GramKernel<no_accumulator, float>);
  STATIC_REQUIRE(!adalora::GramKernel<integer_accumulator, float>);
  STATIC_REQUIRE(!adalora::GramKernel<const_accumulator, float>);
  STATIC_REQUIRE(!adalora::GramKernel<not_default_constructible, float>);
  STATIC_REQUIRE(!adalora::GramKernel<no_reserve, float>);
  STATIC_REQUIRE(!adalora::GramKernel<gram_returns_element_type, float>);
  STATIC_REQUIRE(!adalora::GramKernel<no_add_scaled_product, float>);
  STATIC_REQUIRE(!adalora::GramKernel<may_throw, float>);
  STATIC_REQUIRE(!adalora::GramKernel<int, float>);
}

namespace {

/// One adapter's buffers, A viewed in one of three ways (row-major, column-major, or a block of
/// a wider row-major buffer, so that rows are not back to back), B row- or column-major.
template <class T>
struct adapter_buffers {
  index_t r, in, out;
  int a_kind;  // 0: row-major, 1: column-major, 2: block of an (r + 2) × (in + 5) buffer
  adalora::layout b_layout;
  std::vector<T> a, e, b;

  adapter_buffers(index_t r_, index_t in_, index_t out_, int a_kind_, adalora::layout b_layout_,
                  std::mt19937& rng)
      : r(r_), in(in_), out(out_), a_kind(a_kind_), b_layout(b_layout_) {
    std::uniform_real_distribution<double> u(-0.4, 0.4);
    a.resize(static_cast<std::size_t>((r + 2) * (in + 5)));
    e.resize(static_cast<std::size_t>(r));
    b.resize(static_cast<std::size_t>(out * r));
    for (auto& x : a) x = static_cast<T>(u(rng));
    for (auto& x : e) x = static_cast<T>(u(rng));
    for (auto& x : b) x = static_cast<T>(u(rng));
  }

  adalora::svd_adapter_ref<T> ref() {
    matrix_view<T> av = a_kind == 0   ? adalora::make_matrix_view(a.data(), r, in)
                        : a_kind == 1 ? adalora::make_matrix_view(a.data(), r, in,
                                                                  adalora::layout::col_major)
                                      : adalora::make_matrix_view(a.data() + (in + 5) + 2, r, in,
                                                                  in + 5, 1);
    return {av, adalora::make_vector_view(e.data(), r),
            adalora::make_matrix_view(b.data(), out, r, b_layout)};
  }
};

template <class T>
std::vector<adapter_buffers<T>> make_adapters(unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<adapter_buffers<T>> v;
  v.emplace_back(4, 70, 9, 0, adalora::layout::row_major, rng);  // n > 64: two column blocks
  v.emplace_back(3, 5, 130, 1, adalora::layout::col_major, rng);
  v.emplace_back(6, 11, 7, 2, adalora::layout::row_major, rng);
  v.emplace_back(0, 4, 6, 0, adalora::layout::row_major, rng);  // rank 0: f = 0, still counted
  return v;
}

template <class T>
std::vector<adalora::svd_adapter_ref<const T>> params_of(std::vector<adapter_buffers<T>>& xs) {
  std::vector<adalora::svd_adapter_ref<const T>> v;
  for (auto& x : xs) v.push_back(x.ref());
  return v;
}
template <class T>
std::vector<adalora::svd_adapter_ref<T>> grads_of(std::vector<adapter_buffers<T>>& xs) {
  std::vector<adalora::svd_adapter_ref<T>> v;
  for (auto& x : xs) v.push_back(x.ref());
  return v;
}

/// Elements of `a` and `b` (same shapes and layouts) that differ in any bit of their value.
template <class T>
int count_differences(std::vector<adapter_buffers<T>>& a, std::vector<adapter_buffers<T>>& b) {
  int differences = 0;
  for (std::size_t k = 0; k < a.size(); ++k) {
    auto x = a[k].ref();
    auto y = b[k].ref();
    for (index_t i = 0; i < x.A.rows(); ++i)
      for (index_t j = 0; j < x.A.cols(); ++j) differences += x.A(i, j) != y.A(i, j);
    for (index_t i = 0; i < x.B.rows(); ++i)
      for (index_t j = 0; j < x.B.cols(); ++j) differences += x.B(i, j) != y.B(i, j);
  }
  return differences;
}

}  // namespace

TEMPLATE_TEST_CASE("a user kernel in orthogonality_regularizer gives the portable kernel's bits",
                   "[gram_kernel]", float, double) {
  using T = TestType;
  const auto form = GENERATE(adalora::orthogonality_form::reference_mean,
                             adalora::orthogonality_form::paper_squared);
  const adalora::orthogonality_options options{.weight = 0.3, .form = form};
  adalora::orthogonality_regularizer<T> portable(options);
  adalora::orthogonality_regularizer<T, naive_gram_kernel<T>> naive(options);

  auto params = make_adapters<T>(7);
  auto grads_portable = make_adapters<T>(8);  // non-zero: gradients are added into them
  auto grads_naive = make_adapters<T>(8);
  const auto p = params_of(params);
  const auto gp = grads_of(grads_portable);
  const auto gn = grads_of(grads_naive);
  std::vector<T> norms_portable(2 * p.size()), norms_naive(2 * p.size());

  const T value_portable = portable.value_and_gradient(p, gp, norms_portable);
  const T value_naive = naive.value_and_gradient(p, gn, norms_naive);

  REQUIRE(value_portable > T(0));  // not a trivial 0 == 0
  CHECK(value_naive == value_portable);
  for (std::size_t i = 0; i < norms_portable.size(); ++i) {
    INFO("matrix " << i);
    CHECK(norms_naive[i] == norms_portable[i]);
  }
  auto untouched = make_adapters<T>(8);
  REQUIRE(count_differences(grads_portable, untouched) > 0);  // the gradient did something
  CHECK(count_differences(grads_naive, grads_portable) == 0);
  // The view of A through a block keeps the buffer outside the block untouched.
  CHECK(grads_naive[2].a[0] == untouched[2].a[0]);
  CHECK(grads_naive[2].a.back() == untouched[2].a.back());
}
