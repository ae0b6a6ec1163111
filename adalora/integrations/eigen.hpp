#pragma once
// Zero-copy adalora views of Eigen dense objects. Opt-in: the core never includes this header;
// include it (and depend on //adalora/integrations:eigen) to pass Eigen objects to adalora.
//
// What is accepted, and why
//  as_matrix(x) / as_vector(x) view x's own memory when Eigen says x has direct access
//  (Eigen::DirectAccessBit in its flags): then x.data(), x.rowStride() and x.colStride() describe
//  exactly where element (i, j) lives, whatever the storage order or stride. That covers
//    - Matrix and Array, row- or column-major, fixed or dynamic size;
//    - Map with any Stride / InnerStride / OuterStride, and Map<const T>;
//    - Ref<T> and Ref<const T>;
//    - Block, row(), col(), segment(), head(), tail() of any of the above;
//    - transpose() and diagonal() of any of the above (they have direct access through strides),
//      .array() / .matrix() wrappers, and real()/imag() of complex storage.
//  Compile-time vectors (exactly one column or one row at compile time: VectorXf, RowVector3d,
//  m.col(j), m.row(i), m.diagonal()) are also vectors; any other shape goes through as_vector's
//  runtime one-column-or-one-row check.
//  The view's element type is the object's Scalar, const-qualified when Eigen gives only
//  read access (a const object, Map<const T>, Block<const T>, Ref<const T>).
//
// What is refused, at compile time
//  - Dense expressions without direct access (2*A, A+B, A*B, Identity(), A.reverse(),
//    (A+B).block(...)): they are lazy, have no memory of their own, and a view would have to be a
//    silent copy. view_traits marks them `lazy_expression`, so as_matrix/as_vector fail with
//    "lazy expression ... evaluate it first" and MatrixViewable / VectorViewable are false.
//  - Temporaries that own their memory: Matrix and Array rvalues, and Ref<const T> rvalues
//    (a Ref<const T> built from a non-matching expression holds a private copy). The view would
//    dangle, so as_matrix refuses them with "temporary". Maps, Blocks and other expressions that
//    refer to someone else's memory are fine as rvalues: `as_matrix(A.block(0, 0, 2, 2))`.
//  - Sparse matrices, Eigen::Tensor and other non-dense types get no view_traits at all.

#include <Eigen/Core>

#include <type_traits>

#include "adalora/backend.hpp"
#include "adalora/matrix_view.hpp"

namespace adalora {
namespace detail::eigen {

// Deduction against a base class reference finds the CRTP base without instantiating anything
// for non-Eigen types, so the concepts below are safe to evaluate for any X.
template <class Derived>
void dense_probe(const Eigen::DenseBase<Derived>&);
template <class Derived>
void plain_object_probe(const Eigen::PlainObjectBase<Derived>&);

/// X is an Eigen dense object or expression (anything derived from Eigen::DenseBase).
template <class X>
concept dense = requires(const X& x) { detail::eigen::dense_probe(x); };

/// X is a dense Eigen object whose coefficients live in memory at data() + strides.
template <class X>
concept direct_access = dense<X> &&
    ((static_cast<unsigned>(X::Flags) & Eigen::DirectAccessBit) != 0);

template <class X>
struct is_const_ref : std::false_type {};
template <class Plain, int Options, class Stride>
struct is_const_ref<Eigen::Ref<const Plain, Options, Stride>> : std::true_type {};

/// X is a Matrix or an Array (anything derived from Eigen::PlainObjectBase).
template <class X>
concept plain_object = requires(const X& x) { detail::eigen::plain_object_probe(x); };

/// Matrix and Array own their coefficients; a Ref<const T> may own a private copy of them.
template <class X>
inline constexpr bool owns_memory = plain_object<X> || is_const_ref<X>::value;

// X may be const-qualified here; Eigen's data() then returns a pointer to const.
template <class X>
auto matrix_of(X& x) noexcept {
  using element = std::remove_pointer_t<decltype(x.data())>;
  static_assert(std::is_same_v<std::remove_cv_t<element>, typename std::remove_cv_t<X>::Scalar>,
                "adalora: Eigen object whose data() does not point to its Scalar");
  return matrix_view<element>(x.data(), static_cast<index_t>(x.rows()),
                              static_cast<index_t>(x.cols()), static_cast<index_t>(x.rowStride()),
                              static_cast<index_t>(x.colStride()));
}

template <class X>
auto vector_of(X& x) noexcept {
  using element = std::remove_pointer_t<decltype(x.data())>;
  // A compile-time column steps by its row stride; a compile-time row by its column stride.
  const auto stride = std::remove_cv_t<X>::ColsAtCompileTime == 1 ? x.rowStride() : x.colStride();
  return vector_view<element>(x.data(), static_cast<index_t>(x.size()),
                              static_cast<index_t>(stride));
}

}  // namespace detail::eigen

/// Eigen dense objects with direct access: zero-copy views (see the header comment).
template <class X>
  requires detail::eigen::direct_access<X>
struct view_traits<X> {
  static constexpr bool owns_memory = detail::eigen::owns_memory<X>;

  static auto matrix(X& x) noexcept { return detail::eigen::matrix_of(x); }
  static auto matrix(const X& x) noexcept { return detail::eigen::matrix_of(x); }

  static auto vector(X& x) noexcept
    requires(X::IsVectorAtCompileTime != 0)
  {
    return detail::eigen::vector_of(x);
  }
  static auto vector(const X& x) noexcept
    requires(X::IsVectorAtCompileTime != 0)
  {
    return detail::eigen::vector_of(x);
  }
};

/// Eigen dense expressions without direct access (2*A, A+B, A*B, ...): lazy, no memory to view.
/// No matrix()/vector() on purpose, so MatrixViewable / VectorViewable are false for them.
template <class X>
  requires(detail::eigen::dense<X> && !detail::eigen::direct_access<X>)
struct view_traits<X> {
  static constexpr bool lazy_expression = true;
  static constexpr bool owns_memory = false;
};

}  // namespace adalora
