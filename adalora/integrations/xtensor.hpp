#pragma once
// Zero-copy adalora views of xtensor containers, adaptors and strided views. Opt-in: the core
// never includes this header; include it (and depend on //adalora/integrations:xtensor) to pass
// xtensor objects to adalora.
//
// What is accepted, and why
//  Any xtensor expression that has strided memory: x.data() points to its value_type, and
//  x.data_offset() and x.strides() (in elements) say where element (i, j) lives. That covers
//    - xt::xtensor<T, 2> (matrix) and xt::xtensor<T, 1> (vector), row- or column-major;
//    - xt::xarray<T>, whose rank is known only at run time: as_matrix needs rank 2; as_vector
//      needs rank 1, or rank 2 with a size-1 axis; otherwise std::invalid_argument naming the
//      function and the rank (or the shape);
//    - xt::xtensor_adaptor / xt::xarray_adaptor from xt::adapt, over a raw pointer
//      (`xt::adapt(ptr, n, xt::no_ownership(), shape)`), a std::vector, or an owned buffer;
//    - xt::xtensor_fixed, xt::view with ranges / all() / integers (a strided xview), and
//      xt::strided_view / xt::transpose of the above.
//  The view's element type is value_type, const-qualified for a const object or a view of a
//  const expression. Rank is checked at compile time where xtensor knows it: a rank-2 type has
//  matrix(), a rank-1 type has vector(), other static ranks have neither.
//
// What is refused, at compile time
//  - Expressions without memory (xt::xfunction such as 2*a or a+b, generators such as
//    xt::ones, broadcasts, reducers, and views that are not strided such as xt::keep): they are
//    lazy, and a view would have to be a silent copy. view_traits marks them `lazy_expression`,
//    so as_matrix / as_vector fail with "lazy expression ... evaluate it first"
//    (xt::eval(e) or assigning to an xt::xtensor) and MatrixViewable / VectorViewable are false.
//  - Temporaries that own their memory (xtensor, xarray, xtensor_fixed, an adaptor that owns its
//    buffer, a view that holds a temporary by value): the view would dangle. Non-owning adaptors
//    and views of named tensors are fine as rvalues: `as_matrix(xt::adapt(p, n, no_ownership(),
//    shape))`.
//
// Size-1 axes: xtensor stores a stride of 0 for every axis of extent 1 (so that the axis
// broadcasts). The index on such an axis is always 0, so indexing is right either way, but we
// replace that 0 with the stride a dense layout would have, so that contiguity checks and
// leading dimensions downstream (is_row_major_contiguous, a BLAS lda) see an ordinary matrix.

#include <xtensor/xbuffer_adaptor.hpp>
#include <xtensor/xexpression.hpp>
#include <xtensor/xshape.hpp>
#include <xtensor/xstrided_view.hpp>
#include <xtensor/xtensor_forward.hpp>
#include <xtensor/xview.hpp>

#include <cstddef>
#include <cstdlib>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#include "adalora/backend.hpp"
#include "adalora/config.hpp"
#include "adalora/matrix_view.hpp"

namespace adalora {
namespace detail::xtensor_backend {

/// X derives from xt::xexpression (containers, adaptors, views, functions, generators, ...).
template <class X>
concept expression = xt::is_xexpression<X>::value;

/// X exposes a data() member at all (memory, perhaps of a different type than value_type).
template <class X>
concept has_data = expression<X> && requires(X& x) { x.data(); };

template <class X>
using data_pointer_t = decltype(std::declval<X&>().data());

/// X's elements live at data() + data_offset() + sum(index * stride), and data() points to
/// value_type (this excludes xoptional containers and functor views, whose data() does not).
template <class X>
concept strided_memory =
    has_data<X> && std::is_pointer_v<data_pointer_t<X>> &&
    std::is_same_v<std::remove_cv_t<std::remove_pointer_t<data_pointer_t<X>>>,
                   typename X::value_type> &&
    requires(X& x) {
      x.data_offset();
      x.strides();
      x.shape();
      x.dimension();
    };

/// Rank known at compile time, or -1 when it is known only at run time (xarray).
template <class X>
inline constexpr std::ptrdiff_t static_rank =
    xt::static_dimension<std::decay_t<decltype(std::declval<const X&>().shape())>>::value;

// ---- ownership: may an rvalue of X be viewed? -------------------------------------------------

/// A storage type owns its elements unless it is a reference (xt::adapt of an lvalue container)
/// or a buffer adaptor created with xt::no_ownership().
template <class EC>
inline constexpr bool storage_owns = !std::is_reference_v<EC>;
template <class CP, class A>
inline constexpr bool storage_owns<xt::xbuffer_adaptor<CP, xt::no_ownership, A>> = false;

// Types not listed here (containers, and any strided type we have not reviewed) are treated as
// owning: an lvalue still works, an rvalue is refused rather than risk a dangling view.
template <class X>
struct owns : std::true_type {};

template <class X>
inline constexpr bool closure_owns = !std::is_reference_v<X> && owns<std::remove_cv_t<X>>::value;

template <class EC, xt::layout_type L, class SC, class Tag>
struct owns<xt::xarray_adaptor<EC, L, SC, Tag>> : std::bool_constant<storage_owns<EC>> {};
template <class EC, std::size_t N, xt::layout_type L, class Tag>
struct owns<xt::xtensor_adaptor<EC, N, L, Tag>> : std::bool_constant<storage_owns<EC>> {};
template <class EC, std::size_t N, xt::layout_type L, class Tag>
struct owns<xt::xtensor_view<EC, N, L, Tag>> : std::bool_constant<storage_owns<EC>> {};
template <class EC, class S, xt::layout_type L, bool Sharable, class Tag>
struct owns<xt::xfixed_adaptor<EC, S, L, Sharable, Tag>> : std::bool_constant<storage_owns<EC>> {};
// Views hold their underlying expression by reference when it was an lvalue, by value otherwise.
template <class CT, class... S>
struct owns<xt::xview<CT, S...>> : std::bool_constant<closure_owns<CT>> {};
template <class CT, class S, xt::layout_type L, class FST>
struct owns<xt::xstrided_view<CT, S, L, FST>> : std::bool_constant<closure_owns<CT>> {};

// ---- building views ---------------------------------------------------------------------------

/// The stride to report for an axis: xtensor's 0 on a size-1 axis becomes the dense stride
/// (the other axis' extent times its stride), or 1 when that is 0 too.
inline index_t dense_stride(index_t extent, index_t stride, index_t other_extent,
                            index_t other_stride) noexcept {
  if (extent != 1 || stride != 0) return stride;
  const index_t dense = other_extent * std::abs(other_stride);
  return dense != 0 ? dense : 1;
}

template <class X>
auto first_element(X& x) noexcept {
  return x.data() + static_cast<std::ptrdiff_t>(x.data_offset());
}

template <class X>
std::string shape_string(const X& x) {
  std::ostringstream out;
  out << '(';
  for (std::size_t k = 0; k < x.dimension(); ++k) out << (k ? ", " : "") << x.shape()[k];
  out << ')';
  return out.str();
}

// X may be const-qualified; data() then points to const and so does the view.
template <class X>
auto matrix_of(X& x) {
  using element = std::remove_pointer_t<decltype(x.data())>;
  if constexpr (static_rank<std::remove_cv_t<X>> < 0)
    ADALORA_REQUIRE(x.dimension() == 2, "as_matrix",
                    "an xtensor expression viewed as a matrix must have rank 2, got rank ",
                    x.dimension(), " (shape ", shape_string(x), ")");
  const auto rows = static_cast<index_t>(x.shape()[0]);
  const auto cols = static_cast<index_t>(x.shape()[1]);
  const auto row_stride = static_cast<index_t>(x.strides()[0]);
  const auto col_stride = static_cast<index_t>(x.strides()[1]);
  return matrix_view<element>(first_element(x), rows, cols,
                              dense_stride(rows, row_stride, cols, col_stride),
                              dense_stride(cols, col_stride, rows, row_stride));
}

template <class X>
auto vector_of(X& x) {
  using element = std::remove_pointer_t<decltype(x.data())>;
  // Which axis carries the elements: the only one, or the non-unit one of a rank-2 shape.
  std::size_t axis = 0;
  if constexpr (static_rank<std::remove_cv_t<X>> < 0) {
    const std::size_t rank = x.dimension();
    ADALORA_REQUIRE(rank == 1 || rank == 2, "as_vector",
                    "an xtensor expression viewed as a vector must have rank 1, or rank 2 with "
                    "a size-1 axis; got rank ",
                    rank, " (shape ", shape_string(x), ")");
    if (rank == 2) {
      ADALORA_REQUIRE(x.shape()[0] == 1 || x.shape()[1] == 1, "as_vector",
                      "a rank-2 xtensor expression viewed as a vector must have a size-1 axis, "
                      "got shape ",
                      shape_string(x));
      axis = x.shape()[0] == 1 ? 1 : 0;
    }
  }
  const auto size = static_cast<index_t>(x.shape()[axis]);
  const auto stride = static_cast<index_t>(x.strides()[axis]);
  return vector_view<element>(first_element(x), size, size == 1 && stride == 0 ? 1 : stride);
}

}  // namespace detail::xtensor_backend

/// xtensor expressions with strided memory: zero-copy views (see the header comment).
template <class X>
  requires detail::xtensor_backend::strided_memory<X>
struct view_traits<X> {
  static constexpr std::ptrdiff_t rank = detail::xtensor_backend::static_rank<X>;
  static constexpr bool owns_memory = detail::xtensor_backend::owns<X>::value;

  static auto matrix(X& x)
    requires(rank == 2 || rank < 0)
  {
    return detail::xtensor_backend::matrix_of(x);
  }
  static auto matrix(const X& x)
    requires(rank == 2 || rank < 0)
  {
    return detail::xtensor_backend::matrix_of(x);
  }

  static auto vector(X& x)
    requires(rank == 1 || rank < 0)
  {
    return detail::xtensor_backend::vector_of(x);
  }
  static auto vector(const X& x)
    requires(rank == 1 || rank < 0)
  {
    return detail::xtensor_backend::vector_of(x);
  }
};

/// xtensor expressions without memory (xfunction, generators, broadcasts, non-strided views):
/// lazy. No matrix()/vector() on purpose, so MatrixViewable / VectorViewable are false for them.
template <class X>
  requires(detail::xtensor_backend::expression<X> && !detail::xtensor_backend::has_data<X>)
struct view_traits<X> {
  static constexpr bool lazy_expression = true;
  static constexpr bool owns_memory = false;
};

}  // namespace adalora
