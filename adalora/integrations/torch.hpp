#pragma once
// Zero-copy adalora views of libtorch tensors (CPU, strided, float32 / float64) and of their
// gradients. Opt-in: the core never includes this header; depend on
// //adalora/integrations:torch (the system libtorch, Debian's libtorch-dev).
//
//   auto A = torch::randn({r, in}, torch::requires_grad());     // lora_A
//   auto E = torch::zeros({r, 1}, torch::requires_grad());      // lora_E, PEFT's (r, 1) column
//   auto B = torch::randn({out, r}, torch::requires_grad());    // lora_B
//   ... loss.backward(); optimizer.step();
//   adalora::adapter_tensors<float> t = adalora::torch_adapter_tensors<float>(A, E, B);
//   allocator.step(step, tensors);   // reads A, E, B and their .grad(); zeroes pruned E in place
//
// Or, once for the whole run, a named adapter_set of such views (see add_torch_adapter for the
// one rule that keeps its gradient views valid: create each .grad() up front, clear it in place):
//
//   for (auto* p : {&A, &E, &B}) p->mutable_grad() = torch::zeros_like(*p);
//   adalora::adapter_set<float> set;
//   adalora::add_torch_adapter(set, "layers.0.attn.q", A, E, B);
//   ... orth.value_and_gradient(set); optimizer.step(); allocator.step(step, set);
//   for (auto* p : {&A, &E, &B}) p->mutable_grad().zero_();   // not zero_grad(set_to_none)
//
// Why explicit functions and no view_traits<torch::Tensor>: a torch::Tensor's element type is a
// run-time property, while an adalora view's is a compile-time one. The caller states T
// (`torch_matrix_view<float>(t)`), and the dtype is checked against it when the view is made.
//
// What is refused, with std::invalid_argument naming the function, the argument, what was
// expected and what was given:
//  - undefined tensors (a default-constructed Tensor, or a .grad() that does not exist yet because
//    backward() has not run, or was cleared with zero_grad(set_to_none));
//  - tensors not on the CPU (the view is a host pointer), and non-strided layouts (sparse,
//    mkldnn);
//  - a dtype other than T (float <-> kFloat32, double <-> kFloat64): no silent conversion, which
//    would be a copy;
//  - the wrong number of dimensions: a matrix view needs 2; a vector view takes 1, or 2 with one
//    column or one row (lora_E is (r, 1) in PEFT and loralib);
//  - by default (torch_layout::contiguous) a tensor that is not contiguous, as is_contiguous()
//    says. torch_layout::strided accepts any strided tensor instead (a transpose, a slice:
//    torch's strides are in elements, like adalora's), except that a view of mutable elements
//    refuses a tensor whose elements overlap in memory (an expand()ed tensor, stride 0), because
//    adalora writes through such views and every write would land on several elements.
//
// What a view does NOT do: it does not bump the tensor's autograd version counter. Write through
// a mutable view only when no autograd graph still needs the old values, as the allocator does
// (after optimizer.step(), like PEFT's in-place `masked_fill_` under no_grad). A view is valid
// while the tensor's storage is: until the tensor is resized, replaced (`p.grad() = ...`), or freed.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "adalora/adapter_set.hpp"
#include "adalora/config.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/adapter_shape.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

/// Which memory layouts torch_matrix_view / torch_vector_view accept.
enum class torch_layout {
  contiguous,  ///< only tensors with is_contiguous() (the default)
  strided,     ///< any strided CPU tensor; mutable views refuse overlapping elements
};

namespace detail::torch {

template <class T>
constexpr c10::ScalarType scalar_type_of() noexcept {
  using V = std::remove_cv_t<T>;
  static_assert(std::is_same_v<V, float> || std::is_same_v<V, double>,
                "adalora::torch_*_view<T>: T must be float or double (optionally const)");
  return std::is_same_v<V, float> ? c10::ScalarType::Float : c10::ScalarType::Double;
}

inline std::string shape_of(const at::Tensor& t) {
  std::string s = "(";
  for (std::int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

/// The checks every view needs; returns the typed data pointer (storage offset included).
template <class T>
T* checked_data(const at::Tensor& t, const char* where, const char* argument, torch_layout layout) {
  ADALORA_REQUIRE(t.defined(), where, argument,
                  " is an undefined tensor (for a .grad(): backward() has not run yet, or the "
                  "gradients were cleared with set_to_none)");
  ADALORA_REQUIRE(t.layout() == c10::kStrided, where, argument,
                  " must be a strided (dense) tensor, got layout ", t.layout());
  ADALORA_REQUIRE(t.device().is_cpu(), where, argument,
                  " must be a CPU tensor (adalora views host memory), got device ", t.device(),
                  "; copy it with .cpu() or keep the adapters on the CPU");
  ADALORA_REQUIRE(t.scalar_type() == scalar_type_of<T>(), where, argument, " must have dtype ",
                  c10::toString(scalar_type_of<T>()), " to match the view's element type, got ",
                  c10::toString(t.scalar_type()));
  ADALORA_REQUIRE(layout == torch_layout::strided || t.is_contiguous(), where, argument,
                  " must be contiguous, got shape ", shape_of(t), " with strides ", t.strides(),
                  " (call .contiguous() on it, or ask for torch_layout::strided)");
  return static_cast<T*>(t.data_ptr());
}

/// For a mutable view: two elements of a matrix with these extents and strides never share an
/// address (torch strides are >= 0; sort the two axes by stride and check that each axis steps
/// over the whole extent of the smaller one).
inline bool overlapping(std::int64_t rows, std::int64_t cols, std::int64_t rs, std::int64_t cs) {
  if (rows <= 1) rs = 0, rows = 1;
  if (cols <= 1) cs = 0, cols = 1;
  if (rows == 1 && cols == 1) return false;
  if (rows == 1) return cs == 0;
  if (cols == 1) return rs == 0;
  const bool rows_outer = rs >= cs;
  const std::int64_t inner_stride = rows_outer ? cs : rs;
  const std::int64_t inner_extent = rows_outer ? cols : rows;
  const std::int64_t outer_stride = rows_outer ? rs : cs;
  return inner_stride == 0 || outer_stride < inner_stride * inner_extent;
}

}  // namespace detail::torch

/// A zero-copy view of a 2-D CPU tensor of dtype T: element (i, j) is t[i][j], whatever the
/// strides. T may be const (`torch_matrix_view<const float>`) for read-only use. `argument`
/// names the tensor in error messages. See the header comment for what is refused.
template <class T>
matrix_view<T> torch_matrix_view(const at::Tensor& t, const char* argument = "tensor",
                                 torch_layout layout = torch_layout::contiguous) {
  constexpr const char* where = "torch_matrix_view";
  T* data = detail::torch::checked_data<T>(t, where, argument, layout);
  ADALORA_REQUIRE(t.dim() == 2, where, argument, " must be 2-D, got ", t.dim(), "-D with shape ",
                  detail::torch::shape_of(t));
  const index_t rows = t.size(0), cols = t.size(1), rs = t.stride(0), cs = t.stride(1);
  if constexpr (!std::is_const_v<T>)
    ADALORA_REQUIRE(!detail::torch::overlapping(rows, cols, rs, cs), where, argument,
                    " has elements that share memory (shape ", detail::torch::shape_of(t),
                    ", strides ", t.strides(), ", e.g. from expand()); a mutable view would "
                    "write each of them several times (use a const view, or .contiguous())");
  return matrix_view<T>(data, rows, cols, rs, cs);
}

/// A zero-copy view of a 1-D CPU tensor of dtype T, or of a 2-D one with one column or one row
/// (lora_E is (r, 1)). See torch_matrix_view.
template <class T>
vector_view<T> torch_vector_view(const at::Tensor& t, const char* argument = "tensor",
                                 torch_layout layout = torch_layout::contiguous) {
  constexpr const char* where = "torch_vector_view";
  T* data = detail::torch::checked_data<T>(t, where, argument, layout);
  index_t size = 0, stride = 1;
  if (t.dim() == 1) {
    size = t.size(0);
    stride = t.stride(0);
  } else {
    ADALORA_REQUIRE(t.dim() == 2 && (t.size(1) == 1 || t.size(0) == 1), where, argument,
                    " must be 1-D, or 2-D with one column or one row (like lora_E's (r, 1)), got ",
                    t.dim(), "-D with shape ", detail::torch::shape_of(t));
    const bool column = t.size(1) == 1;
    size = column ? t.size(0) : t.size(1);
    stride = column ? t.stride(0) : t.stride(1);
  }
  if constexpr (!std::is_const_v<T>)
    ADALORA_REQUIRE(size <= 1 || stride != 0, where, argument,
                    " has elements that share memory (stride 0, e.g. from expand()); a mutable "
                    "view would write each of them several times");
  return vector_view<T>(data, size, stride);
}

/// Views of an adapter's three tensors: A = lora_A (r × in), E = lora_E ((r, 1) or (r)),
/// B = lora_B (out × r). Throws if their shapes do not fit together.
template <class T>
svd_adapter_ref<T> torch_adapter_ref(const at::Tensor& A, const at::Tensor& E, const at::Tensor& B,
                                     torch_layout layout = torch_layout::contiguous) {
  svd_adapter_ref<T> ref{torch_matrix_view<T>(A, "lora_A", layout),
                         torch_vector_view<T>(E, "lora_E", layout),
                         torch_matrix_view<T>(B, "lora_B", layout)};
  ref.check_shapes("torch_adapter_ref");
  return ref;
}

/// Views of the gradients of an adapter's tensors (A.grad(), E.grad(), B.grad()). Throws, naming
/// the tensor, when a gradient does not exist (call after backward() and before the gradients
/// are cleared).
template <class T>
svd_adapter_ref<T> torch_adapter_grad_ref(const at::Tensor& A, const at::Tensor& E,
                                          const at::Tensor& B,
                                          torch_layout layout = torch_layout::contiguous) {
  for (const auto* t : {&A, &E, &B})
    ADALORA_REQUIRE(t->defined(), "torch_adapter_grad_ref",
                    "a parameter (lora_A, lora_E or lora_B) is an undefined tensor");
  svd_adapter_ref<T> ref{torch_matrix_view<T>(A.grad(), "lora_A.grad()", layout),
                         torch_vector_view<T>(E.grad(), "lora_E.grad()", layout),
                         torch_matrix_view<T>(B.grad(), "lora_B.grad()", layout)};
  ref.check_shapes("torch_adapter_grad_ref", "gradients");
  return ref;
}

/// What rank_allocator::step needs of one adapter held in torch tensors: views of the
/// parameters (E is written: pruned singular values are zeroed) and of their gradients.
template <class T>
adapter_tensors<T> torch_adapter_tensors(const at::Tensor& A, const at::Tensor& E,
                                         const at::Tensor& B,
                                         torch_layout layout = torch_layout::contiguous) {
  static_assert(!std::is_const_v<T>, "adalora::torch_adapter_tensors: T must not be const");
  const svd_adapter_ref<T> params = torch_adapter_ref<T>(A, E, B, layout);
  const svd_adapter_ref<T> grads = torch_adapter_grad_ref<T>(A, E, B, layout);
  check_same_shapes(params, grads, "torch_adapter_tensors");
  return {params, grads};
}

/// Adds an adapter held in torch tensors to `set` under `name` (the module path that keys the
/// rank pattern): views of A = lora_A, E = lora_E and B = lora_B (the allocator writes E) and of
/// their .grad() (the regularizer adds into them), as torch_adapter_ref and
/// torch_adapter_grad_ref make them. Throws as they do (e.g. when a .grad() does not exist yet),
/// and as adapter_set::add (an empty or repeated name).
///
/// The set keeps these views for as long as it lives, so each .grad() must stay the same tensor.
/// torch makes a .grad() only at the first backward(): give each parameter one before the set is
/// made (`p.mutable_grad() = torch::zeros_like(p)`). backward() then accumulates into it in place
/// (without create_graph), and the loop must clear it in place too (`p.mutable_grad().zero_()`),
/// never with zero_grad(set_to_none), which drops it (PyTorch 2's default in Python). Where a
/// .grad() may be replaced, make a new set after each backward() instead: the allocator only
/// checks that a step's views have its adapters' shapes.
template <class T>
adapter_set<T>& add_torch_adapter(adapter_set<T>& set, std::string name, const at::Tensor& A,
                                  const at::Tensor& E, const at::Tensor& B,
                                  torch_layout layout = torch_layout::contiguous) {
  // Parameters first, so that a wrong tensor is named the same way with every compiler.
  const svd_adapter_ref<T> params = torch_adapter_ref<T>(A, E, B, layout);
  const svd_adapter_ref<T> grads = torch_adapter_grad_ref<T>(A, E, B, layout);
  return set.add(std::move(name), params, grads);
}

}  // namespace adalora
