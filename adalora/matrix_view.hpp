#pragma once
// Non-owning views that every adalora kernel computes on.
//
// A view is a pointer plus extents plus strides (in elements), the shape of a rank-2 / rank-1
// std::mdspan with layout_stride. Kernels are written once per element type against these views,
// not once per backend; Eigen, xtensor, libtorch or raw buffers only have to produce a view of
// their memory (see backend.hpp). A view never allocates and never owns.

#include <cstddef>
#include <limits>
#include <type_traits>

#include "adalora/config.hpp"

namespace adalora {

using index_t = std::ptrdiff_t;

template <class T>
class vector_view;

/// A strided rank-2 view: element (i, j) lives at data()[i * row_stride() + j * col_stride()].
/// `T` may be const-qualified; a view of T converts implicitly to a view of const T.
template <class T>
class matrix_view {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;

  constexpr matrix_view() noexcept = default;

  /// Unchecked constructor for code that already knows the extents are valid; use
  /// make_matrix_view() for user-supplied numbers.
  constexpr matrix_view(T* data, index_t rows, index_t cols, index_t row_stride,
                        index_t col_stride) noexcept
      : data_(data), rows_(rows), cols_(cols), row_stride_(row_stride), col_stride_(col_stride) {}

  template <class U>
    requires(!std::is_same_v<U, T> && std::is_convertible_v<U (*)[], T (*)[]>)
  constexpr matrix_view(const matrix_view<U>& other) noexcept  // NOLINT: implicit by design
      : data_(other.data()),
        rows_(other.rows()),
        cols_(other.cols()),
        row_stride_(other.row_stride()),
        col_stride_(other.col_stride()) {}

  constexpr T* data() const noexcept { return data_; }
  constexpr index_t rows() const noexcept { return rows_; }
  constexpr index_t cols() const noexcept { return cols_; }
  constexpr index_t row_stride() const noexcept { return row_stride_; }
  constexpr index_t col_stride() const noexcept { return col_stride_; }
  constexpr index_t size() const noexcept { return rows_ * cols_; }
  constexpr bool empty() const noexcept { return rows_ == 0 || cols_ == 0; }

  constexpr T& operator()(index_t i, index_t j) const noexcept {
    return data_[i * row_stride_ + j * col_stride_];
  }

  /// True when rows are contiguous and follow each other without gaps (C order).
  constexpr bool is_row_major_contiguous() const noexcept {
    return (cols_ <= 1 || col_stride_ == 1) && (rows_ <= 1 || row_stride_ == cols_);
  }
  /// True when columns are contiguous and follow each other without gaps (Fortran order).
  constexpr bool is_col_major_contiguous() const noexcept {
    return (rows_ <= 1 || row_stride_ == 1) && (cols_ <= 1 || col_stride_ == rows_);
  }

  constexpr matrix_view transposed() const noexcept {
    return {data_, cols_, rows_, col_stride_, row_stride_};
  }
  /// Rows [row0, row0 + nrows) and columns [col0, col0 + ncols); unchecked.
  constexpr matrix_view block(index_t row0, index_t col0, index_t nrows,
                              index_t ncols) const noexcept {
    return {data_ + row0 * row_stride_ + col0 * col_stride_, nrows, ncols, row_stride_,
            col_stride_};
  }
  constexpr vector_view<T> row(index_t i) const noexcept {
    return {data_ + i * row_stride_, cols_, col_stride_};
  }
  constexpr vector_view<T> col(index_t j) const noexcept {
    return {data_ + j * col_stride_, rows_, row_stride_};
  }

 private:
  T* data_ = nullptr;
  index_t rows_ = 0;
  index_t cols_ = 0;
  index_t row_stride_ = 0;
  index_t col_stride_ = 0;
};

/// A strided rank-1 view: element i lives at data()[i * stride()].
template <class T>
class vector_view {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;

  constexpr vector_view() noexcept = default;
  constexpr vector_view(T* data, index_t size, index_t stride = 1) noexcept
      : data_(data), size_(size), stride_(stride) {}

  template <class U>
    requires(!std::is_same_v<U, T> && std::is_convertible_v<U (*)[], T (*)[]>)
  constexpr vector_view(const vector_view<U>& other) noexcept  // NOLINT: implicit by design
      : data_(other.data()), size_(other.size()), stride_(other.stride()) {}

  constexpr T* data() const noexcept { return data_; }
  constexpr index_t size() const noexcept { return size_; }
  constexpr index_t stride() const noexcept { return stride_; }
  constexpr bool empty() const noexcept { return size_ == 0; }
  constexpr bool is_contiguous() const noexcept { return size_ <= 1 || stride_ == 1; }

  constexpr T& operator[](index_t i) const noexcept { return data_[i * stride_]; }

  /// The same elements as a (size × 1) column.
  constexpr matrix_view<T> as_column() const noexcept { return {data_, size_, 1, stride_, 1}; }

 private:
  T* data_ = nullptr;
  index_t size_ = 0;
  index_t stride_ = 1;
};

template <class U>
vector_view(U*, index_t, index_t) -> vector_view<U>;
template <class U>
vector_view(U*, index_t) -> vector_view<U>;

enum class layout { row_major, col_major };

namespace detail {

/// Refuses extents that are negative or whose product (the element count) does not fit in
/// index_t; checked by division, so that the check itself cannot overflow.
inline void check_matrix_extents(const void* data, index_t rows, index_t cols) {
  ADALORA_REQUIRE(rows >= 0 && cols >= 0, "make_matrix_view", "extents must be >= 0, got ",
                  rows, " x ", cols);
  ADALORA_REQUIRE(rows == 0 || cols <= std::numeric_limits<index_t>::max() / rows,
                  "make_matrix_view", "a ", rows, " x ", cols,
                  " matrix has more elements than index_t can count");
  ADALORA_REQUIRE(data != nullptr || rows == 0 || cols == 0, "make_matrix_view",
                  "data is null for a non-empty ", rows, " x ", cols, " matrix");
}

}  // namespace detail

/// A checked view of a dense buffer of rows × cols elements.
template <class T>
matrix_view<T> make_matrix_view(T* data, index_t rows, index_t cols,
                                layout order = layout::row_major) {
  detail::check_matrix_extents(data, rows, cols);
  return order == layout::row_major ? matrix_view<T>(data, rows, cols, cols, 1)
                                    : matrix_view<T>(data, rows, cols, 1, rows);
}

namespace detail {

/// True if |(n - 1) · stride| + base fits in index_t (n >= 1), checked without overflowing: the
/// farthest element of a strided walk must have an offset the kernels can compute.
constexpr bool offset_fits(index_t n, index_t stride, index_t base = 0) noexcept {
  constexpr index_t max = std::numeric_limits<index_t>::max();
  if (stride == std::numeric_limits<index_t>::min()) return n <= 1 && base >= 0;
  const index_t s = stride < 0 ? -stride : stride;
  if (n <= 1 || s == 0) return true;
  return n - 1 <= (max - base) / s;
}

}  // namespace detail

/// A checked strided view (strides in elements, not bytes). The farthest element's offset must
/// fit in index_t.
template <class T>
matrix_view<T> make_matrix_view(T* data, index_t rows, index_t cols, index_t row_stride,
                                index_t col_stride) {
  detail::check_matrix_extents(data, rows, cols);
  if (rows > 0 && cols > 0) {
    // offset_fits(cols, ...) first, so that the row check's base is computed only when it fits.
    const bool fits =
        detail::offset_fits(cols, col_stride) &&
        detail::offset_fits(rows, row_stride,
                            cols == 1 ? 0 : (cols - 1) * (col_stride < 0 ? -col_stride : col_stride));
    ADALORA_REQUIRE(fits, "make_matrix_view", "a ", rows, " x ", cols, " view with strides ",
                    row_stride, " and ", col_stride,
                    " reaches elements whose offset index_t cannot hold");
  }
  return matrix_view<T>(data, rows, cols, row_stride, col_stride);
}

/// A checked view of `size` elements spaced `stride` apart; the last one's offset must fit in
/// index_t.
template <class T>
vector_view<T> make_vector_view(T* data, index_t size, index_t stride = 1) {
  ADALORA_REQUIRE(size >= 0, "make_vector_view", "size must be >= 0, got ", size);
  ADALORA_REQUIRE(data != nullptr || size == 0, "make_vector_view",
                  "data is null for a vector of size ", size);
  ADALORA_REQUIRE(detail::offset_fits(size, stride), "make_vector_view", "a vector of size ", size,
                  " with stride ", stride, " reaches elements whose offset index_t cannot hold");
  return vector_view<T>(data, size, stride);
}

namespace detail {

/// True when consecutive elements of a row of `m` are closer in memory than consecutive rows, so
/// kernels walk rows (dot products) rather than columns (rank-1 updates).
template <class T>
constexpr bool rows_are_contiguous(const matrix_view<T>& m) noexcept {
  const index_t cs = m.col_stride() < 0 ? -m.col_stride() : m.col_stride();
  const index_t rs = m.row_stride() < 0 ? -m.row_stride() : m.row_stride();
  return cs <= rs;
}

}  // namespace detail

}  // namespace adalora
