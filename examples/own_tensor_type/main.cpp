// Your own tensor type, made viewable by adalora through the ADL hook (docs/views.md, tier 1).
//
// mylib::tensor stands for a tensor class of your own code base: float, rank 1 or 2, stored
// column-major (Fortran order, as a BLAS-style library would). Two pairs of free functions in
// its namespace, adalora_matrix_view and adalora_vector_view, are all it takes: adalora finds
// them by argument-dependent lookup, and as_matrix / as_vector then view a mylib::tensor in
// place, strides and all, without a copy and without any change to adalora.
//
// The example trains one SVD adapter (A 4 × 10, E 4, B 8 × 4) whose parameters and gradients
// are mylib::tensors: adalora's adapter forward and backward and its orthogonality regularizer
// compute through the views, the SGD step is written against mylib's own API, and the update it
// learns is checked against a planted rank-2 one.
//
//   bazel run //examples/own_tensor_type

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "adalora/backend.hpp"
#include "adalora/orthogonality.hpp"
#include "adalora/svd_adapter.hpp"

namespace mylib {

/// A user's own little tensor: rank 1 (n) or rank 2 (rows × cols), column-major, owns its
/// elements. Nothing in it knows about adalora.
class tensor {
 public:
  explicit tensor(std::size_t n) : rank_(1), rows_(n), cols_(1), values_(n, 0.0f) {}
  tensor(std::size_t rows, std::size_t cols)
      : rank_(2), rows_(rows), cols_(cols), values_(rows * cols, 0.0f) {}

  int rank() const { return rank_; }
  std::size_t rows() const { return rows_; }
  std::size_t cols() const { return cols_; }
  std::size_t size() const { return values_.size(); }
  float* data() { return values_.data(); }
  const float* data() const { return values_.data(); }

  float& operator()(std::size_t i, std::size_t j) { return values_[i + j * rows_]; }
  float operator()(std::size_t i, std::size_t j) const { return values_[i + j * rows_]; }
  float& operator[](std::size_t i) { return values_[i]; }

  void fill(float x) { values_.assign(values_.size(), x); }

 private:
  int rank_;
  std::size_t rows_, cols_;
  std::vector<float> values_;
};

// ---- the ADL hook: in mylib, next to tensor, so that adalora's unqualified calls find it ----

// Column-major: element (i, j) lives at i + j·rows, i.e. row stride 1, column stride rows.
// make_matrix_view checks the extents; layout::col_major sets those strides.
inline adalora::matrix_view<float> adalora_matrix_view(tensor& t) {
  return adalora::make_matrix_view(t.data(), static_cast<adalora::index_t>(t.rows()),
                                   static_cast<adalora::index_t>(t.cols()),
                                   adalora::layout::col_major);
}
// A const tensor gives a view of const elements (adalora refuses a mutable one at compile time).
inline adalora::matrix_view<const float> adalora_matrix_view(const tensor& t) {
  return adalora::make_matrix_view(t.data(), static_cast<adalora::index_t>(t.rows()),
                                   static_cast<adalora::index_t>(t.cols()),
                                   adalora::layout::col_major);
}

// Only a rank-1 tensor is a vector; the hook says so at run time, as adalora's own hooks do.
inline adalora::vector_view<float> adalora_vector_view(tensor& t) {
  if (t.rank() != 1)
    throw std::invalid_argument("mylib::adalora_vector_view: a rank-1 tensor is needed, got a " +
                                std::to_string(t.rows()) + " x " + std::to_string(t.cols()) +
                                " matrix");
  return adalora::make_vector_view(t.data(), static_cast<adalora::index_t>(t.size()));
}
inline adalora::vector_view<const float> adalora_vector_view(const tensor& t) {
  if (t.rank() != 1)
    throw std::invalid_argument("mylib::adalora_vector_view: a rank-1 tensor is needed, got a " +
                                std::to_string(t.rows()) + " x " + std::to_string(t.cols()) +
                                " matrix");
  return adalora::make_vector_view(t.data(), static_cast<adalora::index_t>(t.size()));
}

}  // namespace mylib

// What the hook buys, checked at compile time: the concepts hold, and a const tensor's view
// is read-only.
static_assert(adalora::MatrixViewable<mylib::tensor>);
static_assert(adalora::VectorViewable<mylib::tensor>);
static_assert(std::is_same_v<adalora::matrix_element_t<const mylib::tensor>, const float>);

namespace {

/// One adapter's parameters or gradients, as the user's own tensors.
struct adapter_tensors {
  mylib::tensor A, E, B;  // r × in, r, out × r
  adapter_tensors(std::size_t r, std::size_t in, std::size_t out) : A(r, in), E(r), B(out, r) {}

  /// The adalora view of all three: no copy, the views point into A, E and B.
  adalora::svd_adapter_ref<float> view() {
    return {adalora::as_matrix(A), adalora::as_vector(E), adalora::as_matrix(B)};
  }
};

}  // namespace

int main() {
  constexpr std::size_t in = 10, out = 8, r = 4, batch = 32;
  constexpr int steps = 1000;
  constexpr float lr = 0.1f;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);

  // The update to learn: a rank-2 map out × in, singular values about 2 and 1.
  mylib::tensor target(out, in);
  for (float s : {2.0f, 1.0f}) {
    std::vector<float> u(out), v(in);
    for (auto& x : u) x = normal(rng) / std::sqrt(float(out));
    for (auto& x : v) x = normal(rng) / std::sqrt(float(in));
    for (std::size_t o = 0; o < out; ++o)
      for (std::size_t j = 0; j < in; ++j) target(o, j) += s * u[o] * v[j];
  }

  adapter_tensors params(r, in, out), grads(r, in, out);
  for (std::size_t i = 0; i < r; ++i)
    for (std::size_t j = 0; j < in; ++j) params.A(i, j) = 0.3f * normal(rng);
  for (std::size_t o = 0; o < out; ++o)
    for (std::size_t i = 0; i < r; ++i) params.B(o, i) = 0.3f * normal(rng);
  // E = 0, as the references initialise it: the adapter starts as the identity update.

  const adalora::svd_adapter_ref<float> p = params.view();
  const adalora::svd_adapter_ref<float> g = grads.view();
  std::printf("A is seen as a %td x %td view with strides (%td, %td), at the tensor's own "
              "memory: %s\n",
              p.A.rows(), p.A.cols(), p.A.row_stride(), p.A.col_stride(),
              p.A.data() == params.A.data() ? "yes" : "NO");
  if (p.A.data() != params.A.data() || p.A.row_stride() != 1 ||
      p.A.col_stride() != static_cast<adalora::index_t>(r))
    return 1;

  const adalora::adapter_scale<float> scale(/*alpha=*/double(r), /*r_init=*/r);
  adalora::adapter_workspace<float> ws;
  adalora::orthogonality_regularizer<float> orth(
      {.weight = 0.1, .form = adalora::orthogonality_form::paper_squared});
  const adalora::svd_adapter_ref<const float> params_c[] = {p};
  const adalora::svd_adapter_ref<float> grads_v[] = {g};

  mylib::tensor x(batch, in), y(batch, out), dy(batch, out);
  double first_loss = 0.0, loss = 0.0;
  for (int t = 0; t < steps; ++t) {
    for (std::size_t k = 0; k < x.size(); ++k) x.data()[k] = normal(rng);
    y.fill(0.0f);
    adalora::adapter_forward<float>(p, scale, adalora::as_matrix(std::as_const(x)),
                                    adalora::as_matrix(y), ws);
    loss = 0.0;
    for (std::size_t b = 0; b < batch; ++b)  // ½ mean ||y − target·x||², and its gradient
      for (std::size_t o = 0; o < out; ++o) {
        float want = 0.0f;
        for (std::size_t j = 0; j < in; ++j) want += target(o, j) * x(b, j);
        const float err = y(b, o) - want;
        loss += 0.5 * double(err) * double(err) / batch;
        dy(b, o) = err / float(batch);
      }
    if (t == 0) first_loss = loss;
    adalora::adapter_backward<float>(p, scale, adalora::as_matrix(std::as_const(x)),
                                     adalora::as_matrix(std::as_const(dy)), g, ws);
    orth.value_and_gradient(params_c, grads_v);  // adds ∂R/∂A, ∂R/∂B into grads.A, grads.B

    // SGD in mylib's own terms: the views above wrote straight into these tensors.
    for (auto [w, dw] : {std::pair{&params.A, &grads.A}, std::pair{&params.E, &grads.E},
                         std::pair{&params.B, &grads.B}}) {
      for (std::size_t k = 0; k < w->size(); ++k) w->data()[k] -= lr * dw->data()[k];
      dw->fill(0.0f);
    }
  }

  // The learned update ΔW = B·diag(E)·A·scaling/rn, written by adalora into a mylib::tensor.
  mylib::tensor delta(out, in);
  adalora::delta_weight<float>(p, scale, adalora::as_matrix(delta));
  double err2 = 0.0, norm2 = 0.0;
  for (std::size_t o = 0; o < out; ++o)
    for (std::size_t j = 0; j < in; ++j) {
      err2 += std::pow(double(delta(o, j)) - double(target(o, j)), 2);
      norm2 += std::pow(double(target(o, j)), 2);
    }
  const double relative_error = std::sqrt(err2 / norm2);
  std::printf("loss %.4f -> %.2g; learned update vs planted: relative error %.1e\n", first_loss,
              loss, relative_error);
  std::printf("E (the singular values, through mylib's own indexing):");
  for (std::size_t i = 0; i < r; ++i) std::printf(" %.3f", double(params.E[i]));
  std::printf("\n");

  if (!(loss < first_loss / 1000 && relative_error < 0.01)) {
    std::printf("the adapter did not learn the planted update\n");
    return 1;
  }
  std::printf("mylib::tensor trained through adalora views, with no copy of its data\n");
  return 0;
}
