#pragma once
// The one customization point that turns a user's tensor into an adalora view, zero-copy.
//
// Two tiers, as in fmt:
//  1. For a type you own, write free functions that ADL finds, in your type's namespace:
//         adalora::matrix_view<float>       adalora_matrix_view(my_tensor& t);
//         adalora::matrix_view<const float> adalora_matrix_view(const my_tensor& t);
//     (and/or adalora_vector_view for rank-1 tensors).
//  2. For a type you do not own, specialise adalora::view_traits<X> with static functions
//         matrix(X&) / matrix(const X&)   -> matrix_view<...>
//         vector(X&) / vector(const X&)   -> vector_view<...>          (either or both)
//     and `static constexpr bool owns_memory` (true for containers, false for maps/views),
//     or mark a lazy-expression type with `static constexpr bool lazy_expression = true`.
//  Integrations for Eigen and xtensor live in adalora/integrations/ and are opt-in headers; this
//  header depends on the standard library only.
//
// as_matrix(x) / as_vector(x) pick whichever exists and refuse, at compile time,
//  - lazy expressions (2*A, A+B, xt::xfunction): they have no memory to view;
//  - temporaries that own their memory (the view would dangle).

#include <array>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "adalora/config.hpp"
#include "adalora/matrix_view.hpp"

namespace adalora {

/// Trait for tensor types adalora does not own; see the header comment. Undefined by default.
template <class X>
struct view_traits;

namespace detail {

template <class X>
concept has_traits_matrix = requires(X& x) { view_traits<std::remove_cvref_t<X>>::matrix(x); };
template <class X>
concept has_traits_vector = requires(X& x) { view_traits<std::remove_cvref_t<X>>::vector(x); };
template <class X>
concept has_adl_matrix = requires(X& x) { adalora_matrix_view(x); };
template <class X>
concept has_adl_vector = requires(X& x) { adalora_vector_view(x); };

template <class X>
constexpr bool is_lazy_expression() {
  if constexpr (requires { view_traits<std::remove_cvref_t<X>>::lazy_expression; })
    return view_traits<std::remove_cvref_t<X>>::lazy_expression;
  else
    return false;
}

template <class X>
constexpr bool owns_memory() {
  if constexpr (requires { view_traits<std::remove_cvref_t<X>>::owns_memory; })
    return view_traits<std::remove_cvref_t<X>>::owns_memory;
  else
    return false;
}

template <class V>
struct is_matrix_view : std::false_type {};
template <class T>
struct is_matrix_view<matrix_view<T>> : std::true_type {};
template <class V>
struct is_vector_view : std::false_type {};
template <class T>
struct is_vector_view<vector_view<T>> : std::true_type {};

}  // namespace detail

/// X (an lvalue of it) can be viewed as a matrix without copying.
template <class X>
concept MatrixViewable = detail::has_adl_matrix<X> || detail::has_traits_matrix<X>;

/// X (an lvalue of it) can be viewed as a vector without copying.
template <class X>
concept VectorViewable = detail::has_adl_vector<X> || detail::has_traits_vector<X>;

/// A zero-copy matrix view of `x`.
template <class X>
constexpr auto as_matrix(X&& x) {
  static_assert(!detail::is_lazy_expression<X>(),
                "adalora::as_matrix: this is a lazy expression (such as 2*A, A+B or an "
                "xt::xfunction) with no memory to view; evaluate it into a matrix first");
  static_assert(detail::is_lazy_expression<X>() || MatrixViewable<X>,
                "adalora::as_matrix: no view for this type; include its integration header "
                "(adalora/integrations/eigen.hpp, .../xtensor.hpp), specialise "
                "adalora::view_traits<T>, or provide adalora_matrix_view(T&) found by ADL");
  static_assert(std::is_lvalue_reference_v<X> || !detail::owns_memory<X>(),
                "adalora::as_matrix: refusing to view a temporary that owns its memory (the "
                "view would dangle); keep the tensor in a named variable");
  if constexpr (detail::has_adl_matrix<X>)
    return adalora_matrix_view(x);
  else if constexpr (detail::has_traits_matrix<X>)
    return view_traits<std::remove_cvref_t<X>>::matrix(x);
  else
    return matrix_view<float>();  // unreachable: a static_assert above has already failed
}

/// A zero-copy vector view of `x`. A matrix with one column or one row is accepted as a vector
/// (PEFT stores lora_E as an (r, 1) column); any other matrix shape throws.
template <class X>
constexpr auto as_vector(X&& x) {
  static_assert(!detail::is_lazy_expression<X>(),
                "adalora::as_vector: this is a lazy expression (such as 2*v, a+b or an "
                "xt::xfunction) with no memory to view; evaluate it first");
  static_assert(detail::is_lazy_expression<X>() || VectorViewable<X> || MatrixViewable<X>,
                "adalora::as_vector: no view for this type; include its integration header "
                "(adalora/integrations/eigen.hpp, .../xtensor.hpp), specialise "
                "adalora::view_traits<T>, or provide adalora_vector_view(T&) found by ADL");
  static_assert(std::is_lvalue_reference_v<X> || !detail::owns_memory<X>(),
                "adalora::as_vector: refusing to view a temporary that owns its memory (the "
                "view would dangle); keep the tensor in a named variable");
  if constexpr (detail::has_adl_vector<X>) {
    return adalora_vector_view(x);
  } else if constexpr (detail::has_traits_vector<X>) {
    return view_traits<std::remove_cvref_t<X>>::vector(x);
  } else if constexpr (MatrixViewable<X>) {
    const auto m = as_matrix(std::forward<X>(x));
    ADALORA_REQUIRE(m.cols() == 1 || m.rows() == 1, "as_vector",
                    "a matrix viewed as a vector must have one column or one row, got ",
                    m.rows(), " x ", m.cols());
    return m.cols() == 1 ? m.col(0) : m.row(0);
  } else {
    return vector_view<float>();  // unreachable: a static_assert above has already failed
  }
}

/// Element type of the view of X, e.g. `const float` for a const Eigen::MatrixXf.
template <class X>
using matrix_element_t = typename decltype(as_matrix(std::declval<X&>()))::element_type;

// ---- the standard library's own types ---------------------------------------------------------

template <class T>
struct view_traits<matrix_view<T>> {
  static constexpr bool owns_memory = false;
  static constexpr matrix_view<T> matrix(const matrix_view<T>& v) noexcept { return v; }
};

template <class T>
struct view_traits<vector_view<T>> {
  static constexpr bool owns_memory = false;
  static constexpr vector_view<T> vector(const vector_view<T>& v) noexcept { return v; }
};

template <class T, std::size_t N>
struct view_traits<std::span<T, N>> {
  static constexpr bool owns_memory = false;
  static constexpr vector_view<T> vector(const std::span<T, N>& s) noexcept {
    return {s.data(), static_cast<index_t>(s.size())};
  }
};

template <class T, class Alloc>
struct view_traits<std::vector<T, Alloc>> {
  static constexpr bool owns_memory = true;
  static vector_view<T> vector(std::vector<T, Alloc>& v) noexcept {
    return {v.data(), static_cast<index_t>(v.size())};
  }
  static vector_view<const T> vector(const std::vector<T, Alloc>& v) noexcept {
    return {v.data(), static_cast<index_t>(v.size())};
  }
};

template <class T, std::size_t N>
struct view_traits<std::array<T, N>> {
  static constexpr bool owns_memory = true;
  static vector_view<T> vector(std::array<T, N>& v) noexcept {
    return {v.data(), static_cast<index_t>(N)};
  }
  static vector_view<const T> vector(const std::array<T, N>& v) noexcept {
    return {v.data(), static_cast<index_t>(N)};
  }
};

}  // namespace adalora
