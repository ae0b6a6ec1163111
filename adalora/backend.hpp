#pragma once
// The one customization point that turns a user's tensor into an adalora view, zero-copy.
//
// Two tiers, as in fmt (docs/views.md walks through both, with examples/own_tensor_type/):
//  1. For a type you own, write free functions that ADL finds, in your type's namespace:
//         adalora::matrix_view<float>       adalora_matrix_view(my_tensor& t);
//         adalora::matrix_view<const float> adalora_matrix_view(const my_tensor& t);
//     (and/or adalora_vector_view for rank-1 tensors).
//  2. For a type you do not own, specialise adalora::view_traits<X> with static functions
//         matrix(X&) / matrix(const X&)   -> matrix_view<...>
//         vector(X&) / vector(const X&)   -> vector_view<...>          (either or both)
//     and `static constexpr bool owns_memory` (true for containers, false for maps/views),
//     or mark a lazy-expression type with `static constexpr bool lazy_expression = true`.
//  When both tiers exist for a type, the ADL function wins. Raw buffers need no hook at all:
//  make_matrix_view / make_vector_view (matrix_view.hpp). Integrations for Eigen and xtensor live
//  in adalora/integrations/ and are opt-in headers; this header depends on the standard library
//  only.
//
// Requirements on a hook (the MatrixViewable / VectorViewable concepts; as_matrix and as_vector
// name each one that fails in its own static_assert):
//  R1. The hook returns an adalora::matrix_view<E> (matrix hooks) or vector_view<E> (vector
//      hooks), not a type that merely converts to one.
//  R2. A view_traits specialisation that gives views declares `owns_memory`.
//  R3. The view of a const tensor that owns its memory has const elements (E = const float):
//      adalora writes through views of mutable elements.
//  R4. as_matrix / as_vector of a temporary needs a type that does not own its memory:
//      view_traits<X>::owns_memory == false. A type without that declaration (an ADL-tier type
//      that has no view_traits) is taken to own its memory, as std::ranges takes a range not to
//      be borrowed unless told; a non-owning view type of your own says so with a view_traits
//      specialisation that holds just `static constexpr bool owns_memory = false;`.
//  Lazy expressions (2*A, A+B, xt::xfunction) are refused: they have no memory to view.

#include <array>
#include <concepts>
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
concept has_matrix_hook = has_adl_matrix<X> || has_traits_matrix<X>;
template <class X>
concept has_vector_hook = has_adl_vector<X> || has_traits_vector<X>;

template <class X>
constexpr bool is_lazy_expression() {
  if constexpr (requires { view_traits<std::remove_cvref_t<X>>::lazy_expression; })
    return view_traits<std::remove_cvref_t<X>>::lazy_expression;
  else
    return false;
}

template <class X>
concept declares_ownership = requires {
  { view_traits<std::remove_cvref_t<X>>::owns_memory } -> std::convertible_to<bool>;
};

/// Whether the memory a view of X points into may die with X (R4): as view_traits declares it,
/// and true when nothing is declared.
template <class X>
constexpr bool may_own_memory() {
  if constexpr (declares_ownership<X>)
    return view_traits<std::remove_cvref_t<X>>::owns_memory;
  else
    return true;
}

/// R2: a type viewed through view_traits says whether it owns its memory.
template <class X>
concept traits_declare_ownership =
    !(has_traits_matrix<X> || has_traits_vector<X>) || declares_ownership<X>;

template <class V>
struct is_matrix_view : std::false_type {};
template <class T>
struct is_matrix_view<matrix_view<T>> : std::true_type {};
template <class V>
struct is_vector_view : std::false_type {};
template <class T>
struct is_vector_view<vector_view<T>> : std::true_type {};

/// The hook as_matrix / as_vector calls: the ADL function if there is one, else view_traits.
template <class X>
constexpr auto matrix_hook(X& x) {
  if constexpr (has_adl_matrix<X>)
    return adalora_matrix_view(x);
  else
    return view_traits<std::remove_cvref_t<X>>::matrix(x);
}
template <class X>
constexpr auto vector_hook(X& x) {
  if constexpr (has_adl_vector<X>)
    return adalora_vector_view(x);
  else
    return view_traits<std::remove_cvref_t<X>>::vector(x);
}

/// R1.
template <class X>
concept matrix_hook_returns_view =
    has_matrix_hook<X> && is_matrix_view<decltype(matrix_hook(std::declval<X&>()))>::value;
template <class X>
concept vector_hook_returns_view =
    has_vector_hook<X> && is_vector_view<decltype(vector_hook(std::declval<X&>()))>::value;

/// R3 (for a view type, const is shallow, as for std::span: its elements stay mutable).
template <class View, class X>
inline constexpr bool const_correct_view =
    !std::is_const_v<std::remove_reference_t<X>> || !may_own_memory<X>() ||
    std::is_const_v<typename View::element_type>;
template <class X>
concept matrix_hook_const_correct =
    matrix_hook_returns_view<X> &&
    const_correct_view<decltype(matrix_hook(std::declval<X&>())), X>;
template <class X>
concept vector_hook_const_correct =
    vector_hook_returns_view<X> &&
    const_correct_view<decltype(vector_hook(std::declval<X&>())), X>;

/// R1 to R3 for the matrix hook of X, each with its own message.
template <class X>
consteval bool check_matrix_hook() {
  if constexpr (has_adl_matrix<X>)
    static_assert(matrix_hook_returns_view<X>,
                  "adalora: adalora_matrix_view(x), found by ADL for this type, must return an "
                  "adalora::matrix_view<E> (E = the element type, const-qualified for a const "
                  "tensor), not a type that converts to one");
  else
    static_assert(matrix_hook_returns_view<X>,
                  "adalora: view_traits<T>::matrix(x) must return an adalora::matrix_view<E> (E "
                  "= the element type, const-qualified for a const tensor)");
  static_assert(traits_declare_ownership<X>,
                "adalora: a view_traits<T> specialisation that gives views must declare `static "
                "constexpr bool owns_memory` (true if T owns its elements, like a container; "
                "false if it refers to memory it does not own, like a map or a slice), so that "
                "temporaries whose views would dangle can be refused");
  if constexpr (matrix_hook_returns_view<X>)
    static_assert(matrix_hook_const_correct<X>,
                  "adalora: the view of a const tensor that owns its memory must have const "
                  "elements: give the hook for `const T&` the return type "
                  "adalora::matrix_view<const E>");
  return true;
}

/// R1 to R3 for the vector hook of X, each with its own message.
template <class X>
consteval bool check_vector_hook() {
  if constexpr (has_adl_vector<X>)
    static_assert(vector_hook_returns_view<X>,
                  "adalora: adalora_vector_view(x), found by ADL for this type, must return an "
                  "adalora::vector_view<E> (E = the element type, const-qualified for a const "
                  "tensor), not a type that converts to one");
  else
    static_assert(vector_hook_returns_view<X>,
                  "adalora: view_traits<T>::vector(x) must return an adalora::vector_view<E> (E "
                  "= the element type, const-qualified for a const tensor)");
  static_assert(traits_declare_ownership<X>,
                "adalora: a view_traits<T> specialisation that gives views must declare `static "
                "constexpr bool owns_memory` (true if T owns its elements, like a container; "
                "false if it refers to memory it does not own, like a map or a slice), so that "
                "temporaries whose views would dangle can be refused");
  if constexpr (vector_hook_returns_view<X>)
    static_assert(vector_hook_const_correct<X>,
                  "adalora: the view of a const tensor that owns its memory must have const "
                  "elements: give the hook for `const T&` the return type "
                  "adalora::vector_view<const E>");
  return true;
}

}  // namespace detail

/// X (an lvalue of it) can be viewed as a matrix without copying: it has a matrix hook (ADL
/// function or view_traits) that meets R1 to R3 of the header comment.
template <class X>
concept MatrixViewable = detail::has_matrix_hook<X> && detail::matrix_hook_returns_view<X> &&
                         detail::traits_declare_ownership<X> &&
                         detail::matrix_hook_const_correct<X>;

/// X (an lvalue of it) can be viewed as a vector without copying, by a vector hook that meets
/// R1 to R3. (as_vector also takes a MatrixViewable X with one column or one row.)
template <class X>
concept VectorViewable = detail::has_vector_hook<X> && detail::vector_hook_returns_view<X> &&
                         detail::traits_declare_ownership<X> &&
                         detail::vector_hook_const_correct<X>;

/// Names each requirement that keeps as_matrix from viewing an X, at compile time. X is as
/// as_matrix(X&&) deduces it: T& for an lvalue, T for a temporary (R4).
template <class X>
consteval bool check_matrix_viewable() {
  constexpr bool lazy = detail::is_lazy_expression<X>();
  static_assert(!lazy,
                "adalora::as_matrix: this is a lazy expression (such as 2*A, A+B or an "
                "xt::xfunction) with no memory to view; evaluate it into a matrix first");
  if constexpr (!lazy) {
    static_assert(detail::has_matrix_hook<X>,
                  "adalora::as_matrix: no view for this type; include its integration header "
                  "(adalora/integrations/eigen.hpp, .../xtensor.hpp), specialise "
                  "adalora::view_traits<T>, or provide adalora_matrix_view(T&) in T's own "
                  "namespace, where argument-dependent lookup finds it");
    if constexpr (detail::has_matrix_hook<X>) {
      detail::check_matrix_hook<X>();
      static_assert(std::is_lvalue_reference_v<X> || !detail::may_own_memory<X>(),
                    "adalora::as_matrix: refusing to view a temporary that owns its memory (the "
                    "view would dangle); keep the tensor in a named variable. (A type without "
                    "view_traits<T>::owns_memory = false is taken to own its memory.)");
    }
  }
  return true;
}

/// The same for as_vector: a vector hook, or else a matrix hook (one column or one row).
template <class X>
consteval bool check_vector_viewable() {
  constexpr bool lazy = detail::is_lazy_expression<X>();
  static_assert(!lazy,
                "adalora::as_vector: this is a lazy expression (such as 2*v, a+b or an "
                "xt::xfunction) with no memory to view; evaluate it first");
  if constexpr (!lazy) {
    constexpr bool hooked = detail::has_vector_hook<X> || detail::has_matrix_hook<X>;
    static_assert(hooked,
                  "adalora::as_vector: no view for this type; include its integration header "
                  "(adalora/integrations/eigen.hpp, .../xtensor.hpp), specialise "
                  "adalora::view_traits<T>, or provide adalora_vector_view(T&) in T's own "
                  "namespace, where argument-dependent lookup finds it");
    if constexpr (detail::has_vector_hook<X>)
      detail::check_vector_hook<X>();
    else if constexpr (detail::has_matrix_hook<X>)
      detail::check_matrix_hook<X>();
    if constexpr (hooked)
      static_assert(std::is_lvalue_reference_v<X> || !detail::may_own_memory<X>(),
                    "adalora::as_vector: refusing to view a temporary that owns its memory (the "
                    "view would dangle); keep the tensor in a named variable. (A type without "
                    "view_traits<T>::owns_memory = false is taken to own its memory.)");
  }
  return true;
}

/// A zero-copy matrix view of `x`.
template <class X>
constexpr auto as_matrix(X&& x) {
  static_assert(check_matrix_viewable<X>());
  if constexpr (detail::has_matrix_hook<X> && !detail::is_lazy_expression<X>())
    return detail::matrix_hook(x);
  else
    return matrix_view<float>();  // unreachable: a static_assert above has already failed
}

/// A zero-copy vector view of `x`. A matrix with one column or one row is accepted as a vector
/// (PEFT stores lora_E as an (r, 1) column); any other matrix shape throws.
template <class X>
constexpr auto as_vector(X&& x) {
  static_assert(check_vector_viewable<X>());
  if constexpr (detail::is_lazy_expression<X>()) {
    return vector_view<float>();  // unreachable: a static_assert above has already failed
  } else if constexpr (detail::has_vector_hook<X>) {
    return detail::vector_hook(x);
  } else if constexpr (detail::has_matrix_hook<X>) {
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
