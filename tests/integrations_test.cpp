// Eigen and xtensor integrations: every accepted kind is viewed zero-copy (the view's element
// (i, j) IS the tensor's element (i, j), same address), writes go through, lazy expressions and
// wrong ranks are refused. Compile-time refusals with their messages are in compile_fail_test.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <xtensor/xadapt.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xbuilder.hpp>
#include <xtensor/xfixed.hpp>
#include <xtensor/xmanipulation.hpp>
#include <xtensor/xtensor.hpp>
#include <xtensor/xview.hpp>

#include <array>
#include <complex>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "adalora/integrations/eigen.hpp"
#include "adalora/integrations/xtensor.hpp"

using adalora::index_t;
using adalora::matrix_view;
using adalora::vector_view;

namespace {

// A distinct, exactly representable value per position, so a transposed or shifted view would
// show up as a value mismatch as well as an address mismatch.
template <class T>
T value_at(index_t i, index_t j) {
  return static_cast<T>(100 * i + j + 1);
}

// Counts positions where the view and the tensor disagree, by address (zero-copy) or by value.
// `at(i, j)` returns a reference to the tensor's own element.
template <class View, class At>
int mismatches(const View& view, index_t rows, index_t cols, At&& at) {
  if (view.rows() != rows || view.cols() != cols) return -1;
  int bad = 0;
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) {
      const auto& expected = at(i, j);
      if (&view(i, j) != &expected || view(i, j) != expected) ++bad;
    }
  return bad;
}

template <class View, class At>
int vector_mismatches(const View& view, index_t size, At&& at) {
  if (view.size() != size) return -1;
  int bad = 0;
  for (index_t k = 0; k < size; ++k) {
    const auto& expected = at(k);
    if (&view[k] != &expected || view[k] != expected) ++bad;
  }
  return bad;
}

template <class M>
void fill_eigen(M& m) {
  using T = typename M::Scalar;
  for (index_t i = 0; i < m.rows(); ++i)
    for (index_t j = 0; j < m.cols(); ++j) m(i, j) = value_at<T>(i, j);
}

template <class X>
void fill_xtensor(X& x) {
  using T = typename X::value_type;
  for (std::size_t i = 0; i < x.shape()[0]; ++i)
    for (std::size_t j = 0; j < x.shape()[1]; ++j)
      x(i, j) = value_at<T>(static_cast<index_t>(i), static_cast<index_t>(j));
}

template <class T, int Options>
using eigen_dyn = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Options>;

}  // namespace

// ---- Eigen --------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("Eigen matrices and arrays are viewed in place, either storage order",
                   "[integrations][eigen]", float, double) {
  using T = TestType;
  SECTION("dynamic column-major matrix") {
    eigen_dyn<T, Eigen::ColMajor> m(3, 4);
    fill_eigen(m);
    const auto v = adalora::as_matrix(m);
    STATIC_REQUIRE(std::is_same_v<decltype(v), const matrix_view<T>>);
    REQUIRE(v.data() == m.data());
    REQUIRE(v.row_stride() == 1);
    REQUIRE(v.col_stride() == 3);
    REQUIRE(v.is_col_major_contiguous());
    REQUIRE(mismatches(v, 3, 4, [&](index_t i, index_t j) -> const T& { return m(i, j); }) == 0);
  }
  SECTION("dynamic row-major matrix") {
    eigen_dyn<T, Eigen::RowMajor> m(3, 4);
    fill_eigen(m);
    const auto v = adalora::as_matrix(m);
    REQUIRE(v.data() == m.data());
    REQUIRE(v.row_stride() == 4);
    REQUIRE(v.col_stride() == 1);
    REQUIRE(v.is_row_major_contiguous());
    REQUIRE(mismatches(v, 3, 4, [&](index_t i, index_t j) -> const T& { return m(i, j); }) == 0);
  }
  SECTION("fixed-size matrices, both orders") {
    Eigen::Matrix<T, 2, 3> c;
    Eigen::Matrix<T, 2, 3, Eigen::RowMajor> r;
    fill_eigen(c);
    fill_eigen(r);
    const auto vc = adalora::as_matrix(c);
    const auto vr = adalora::as_matrix(r);
    REQUIRE(vc.data() == c.data());
    REQUIRE(vr.data() == r.data());
    REQUIRE((vc.row_stride() == 1 && vc.col_stride() == 2));
    REQUIRE((vr.row_stride() == 3 && vr.col_stride() == 1));
    REQUIRE(mismatches(vc, 2, 3, [&](index_t i, index_t j) -> const T& { return c(i, j); }) == 0);
    REQUIRE(mismatches(vr, 2, 3, [&](index_t i, index_t j) -> const T& { return r(i, j); }) == 0);
  }
  SECTION("arrays") {
    Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> a(2, 5);
    fill_eigen(a);
    const auto v = adalora::as_matrix(a);
    REQUIRE(v.data() == a.data());
    REQUIRE(mismatches(v, 2, 5, [&](index_t i, index_t j) -> const T& { return a(i, j); }) == 0);
    // .matrix() on an array (and .array() on a matrix) wraps the same memory.
    REQUIRE(adalora::as_matrix(a.matrix()).data() == a.data());
  }
  SECTION("a const matrix gives a view of const elements") {
    eigen_dyn<T, Eigen::ColMajor> m(2, 2);
    fill_eigen(m);
    const auto& cm = m;
    const auto v = adalora::as_matrix(cm);
    STATIC_REQUIRE(std::is_same_v<decltype(v), const matrix_view<const T>>);
    STATIC_REQUIRE(std::is_same_v<adalora::matrix_element_t<const eigen_dyn<T, 0>>, const T>);
    REQUIRE(v.data() == m.data());
  }
}

TEMPLATE_TEST_CASE("Eigen maps keep their strides", "[integrations][eigen]", float, double) {
  using T = TestType;
  std::vector<T> buffer(40);
  for (std::size_t k = 0; k < buffer.size(); ++k) buffer[k] = static_cast<T>(k);

  SECTION("column-major map with an outer stride (a sub-matrix of a taller buffer)") {
    Eigen::Map<eigen_dyn<T, Eigen::ColMajor>, 0, Eigen::OuterStride<>> m(buffer.data(), 3, 4,
                                                                         Eigen::OuterStride<>(5));
    const auto v = adalora::as_matrix(m);
    REQUIRE(v.data() == buffer.data());
    REQUIRE((v.row_stride() == 1 && v.col_stride() == 5));
    REQUIRE(mismatches(v, 3, 4, [&](index_t i, index_t j) -> const T& {
              return buffer[static_cast<std::size_t>(i + 5 * j)];
            }) == 0);
  }
  SECTION("row-major map with an outer stride") {
    Eigen::Map<eigen_dyn<T, Eigen::RowMajor>, 0, Eigen::OuterStride<>> m(buffer.data(), 3, 4,
                                                                         Eigen::OuterStride<>(6));
    const auto v = adalora::as_matrix(m);
    REQUIRE((v.row_stride() == 6 && v.col_stride() == 1));
    REQUIRE(mismatches(v, 3, 4, [&](index_t i, index_t j) -> const T& {
              return buffer[static_cast<std::size_t>(6 * i + j)];
            }) == 0);
  }
  SECTION("map with both strides, and a vector map with an inner stride") {
    using stride = Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>;
    Eigen::Map<eigen_dyn<T, Eigen::ColMajor>, 0, stride> m(buffer.data() + 1, 3, 2, stride(9, 2));
    const auto v = adalora::as_matrix(m);
    REQUIRE(v.data() == buffer.data() + 1);
    REQUIRE((v.row_stride() == 2 && v.col_stride() == 9));
    REQUIRE(mismatches(v, 3, 2, [&](index_t i, index_t j) -> const T& { return m(i, j); }) == 0);

    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>, 0, Eigen::InnerStride<3>> s(buffer.data(), 4);
    const auto sv = adalora::as_vector(s);
    REQUIRE(sv.data() == buffer.data());
    REQUIRE(sv.stride() == 3);
    REQUIRE(vector_mismatches(sv, 4, [&](index_t k) -> const T& { return s(k); }) == 0);
  }
  SECTION("a map of const gives a view of const elements, and rvalue maps are accepted") {
    const std::vector<T>& cbuffer = buffer;
    const auto v =
        adalora::as_matrix(Eigen::Map<const eigen_dyn<T, Eigen::RowMajor>>(cbuffer.data(), 2, 3));
    STATIC_REQUIRE(std::is_same_v<decltype(v), const matrix_view<const T>>);
    REQUIRE(v.data() == buffer.data());
    REQUIRE(v(1, 2) == buffer[5]);
  }
}

TEMPLATE_TEST_CASE(
    "Eigen blocks, rows, columns, transposes, diagonals and Refs are viewed in place",
    "[integrations][eigen]", float, double) {
  using T = TestType;
  eigen_dyn<T, Eigen::ColMajor> c(5, 6);
  eigen_dyn<T, Eigen::RowMajor> r(5, 6);
  fill_eigen(c);
  fill_eigen(r);

  SECTION("blocks of either storage order") {
    auto bc = c.block(1, 2, 3, 2);
    auto br = r.block(1, 2, 3, 2);
    const auto vc = adalora::as_matrix(bc);
    const auto vr = adalora::as_matrix(br);
    REQUIRE(vc.data() == &c(1, 2));
    REQUIRE(vr.data() == &r(1, 2));
    REQUIRE((vc.row_stride() == 1 && vc.col_stride() == 5));
    REQUIRE((vr.row_stride() == 6 && vr.col_stride() == 1));
    REQUIRE(mismatches(vc, 3, 2,
                       [&](index_t i, index_t j) -> const T& { return c(1 + i, 2 + j); }) == 0);
    REQUIRE(mismatches(vr, 3, 2,
                       [&](index_t i, index_t j) -> const T& { return r(1 + i, 2 + j); }) == 0);
    // A block of a block, and a block of a strided map, compose their offsets and strides.
    REQUIRE(adalora::as_matrix(bc.block(1, 1, 2, 1)).data() == &c(2, 3));
    Eigen::Map<eigen_dyn<T, Eigen::ColMajor>, 0, Eigen::OuterStride<>> m(c.data(), 3, 3,
                                                                         Eigen::OuterStride<>(10));
    const auto vm = adalora::as_matrix(m.block(1, 1, 2, 2));
    REQUIRE(vm.data() == c.data() + 11);
    REQUIRE(vm.col_stride() == 10);
  }
  SECTION("rows and columns are vectors with the right stride") {
    const auto row_of_c = adalora::as_vector(c.row(2));
    const auto col_of_r = adalora::as_vector(r.col(3));
    REQUIRE(row_of_c.stride() == 5);
    REQUIRE(col_of_r.stride() == 6);
    REQUIRE(vector_mismatches(row_of_c, 6, [&](index_t k) -> const T& { return c(2, k); }) == 0);
    REQUIRE(vector_mismatches(col_of_r, 5, [&](index_t k) -> const T& { return r(k, 3); }) == 0);
    REQUIRE(adalora::as_vector(c.col(1).segment(1, 3)).data() == &c(1, 1));
  }
  SECTION("transposes and diagonals have direct access through strides") {
    const auto t = adalora::as_matrix(c.transpose());
    REQUIRE(t.data() == c.data());
    REQUIRE(mismatches(t, 6, 5, [&](index_t i, index_t j) -> const T& { return c(j, i); }) == 0);
    const auto d = adalora::as_vector(r.diagonal());
    REQUIRE(d.stride() == 7);
    REQUIRE(vector_mismatches(d, 5, [&](index_t k) -> const T& { return r(k, k); }) == 0);
  }
  SECTION("real() and imag() of complex storage step over the other half") {
    Eigen::Matrix<std::complex<T>, Eigen::Dynamic, Eigen::Dynamic> z(2, 3);
    for (index_t i = 0; i < 2; ++i)
      for (index_t j = 0; j < 3; ++j) z(i, j) = {value_at<T>(i, j), -value_at<T>(i, j)};
    // std::complex<T> is laid out as T[2] (real, imaginary), which the standard guarantees.
    const auto part = [&](index_t i, index_t j, int k) -> const T& {
      return reinterpret_cast<const T*>(&z(i, j))[k];
    };
    const auto re = adalora::as_matrix(z.real());
    const auto im = adalora::as_matrix(z.imag());
    REQUIRE((re.row_stride() == 2 && re.col_stride() == 4));
    const auto real_part = [&](index_t i, index_t j) -> const T& { return part(i, j, 0); };
    const auto imag_part = [&](index_t i, index_t j) -> const T& { return part(i, j, 1); };
    REQUIRE(mismatches(re, 2, 3, real_part) == 0);
    REQUIRE(mismatches(im, 2, 3, imag_part) == 0);
  }
  SECTION("Ref of a non-const matrix") {
    Eigen::Ref<eigen_dyn<T, Eigen::ColMajor>> ref(c);
    const auto v = adalora::as_matrix(ref);
    REQUIRE(v.data() == c.data());
    REQUIRE(mismatches(v, 5, 6, [&](index_t i, index_t j) -> const T& { return c(i, j); }) == 0);
    Eigen::Ref<const eigen_dyn<T, Eigen::ColMajor>> cref(c);
    REQUIRE(adalora::as_matrix(cref).data() == c.data());
  }
  SECTION("vector types") {
    Eigen::Matrix<T, Eigen::Dynamic, 1> col(4);
    Eigen::Matrix<T, 1, Eigen::Dynamic> row(3);
    const auto vc = adalora::as_vector(col);
    const auto vr = adalora::as_vector(row);
    REQUIRE((vc.data() == col.data() && vc.size() == 4 && vc.stride() == 1));
    REQUIRE((vr.data() == row.data() && vr.size() == 3 && vr.stride() == 1));
    // A vector is also a one-column matrix.
    const auto mc = adalora::as_matrix(col);
    REQUIRE((mc.rows() == 4 && mc.cols() == 1));
    // A dynamic matrix that happens to have one column goes through as_vector's runtime check.
    eigen_dyn<T, Eigen::ColMajor> one_col(3, 1);
    REQUIRE(adalora::as_vector(one_col).data() == one_col.data());
    REQUIRE_THROWS_WITH(adalora::as_vector(c), Catch::Contains("as_vector"));
  }
}

TEMPLATE_TEST_CASE("writes through Eigen views land in the Eigen object", "[integrations][eigen]",
                   float, double) {
  using T = TestType;
  eigen_dyn<T, Eigen::RowMajor> m = eigen_dyn<T, Eigen::RowMajor>::Zero(3, 4);
  adalora::as_matrix(m)(1, 2) = T(7);
  adalora::as_matrix(m.block(1, 1, 2, 2))(1, 0) = T(8);  // element (2, 1)
  adalora::as_matrix(m.transpose())(3, 0) = T(9);        // element (0, 3)
  adalora::as_vector(m.col(0))[2] = T(10);               // element (2, 0)
  std::vector<T> buffer(12, T(0));
  Eigen::Map<eigen_dyn<T, Eigen::ColMajor>> map(buffer.data(), 3, 4);
  adalora::as_matrix(map)(2, 3) = T(11);
  REQUIRE(m(1, 2) == T(7));
  REQUIRE(m(2, 1) == T(8));
  REQUIRE(m(0, 3) == T(9));
  REQUIRE(m(2, 0) == T(10));
  REQUIRE(buffer[11] == T(11));
  REQUIRE(m.sum() == T(7 + 8 + 9 + 10));
}

TEMPLATE_TEST_CASE("which Eigen types are viewable, at compile time", "[integrations][eigen]",
                   float, double) {
  using T = TestType;
  using mat = eigen_dyn<T, Eigen::ColMajor>;
  using rmat = eigen_dyn<T, Eigen::RowMajor>;
  using vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  using rvec = Eigen::Matrix<T, 1, Eigen::Dynamic>;
  mat a(2, 2);
  vec v(2);

  // Accepted: memory with strides.
  STATIC_REQUIRE(adalora::MatrixViewable<mat>);
  STATIC_REQUIRE(adalora::MatrixViewable<const mat>);
  STATIC_REQUIRE(adalora::MatrixViewable<rmat>);
  STATIC_REQUIRE(adalora::MatrixViewable<Eigen::Matrix<T, 3, 3>>);
  STATIC_REQUIRE(adalora::MatrixViewable<Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic>>);
  STATIC_REQUIRE(adalora::MatrixViewable<Eigen::Map<mat, 0, Eigen::OuterStride<>>>);
  STATIC_REQUIRE(adalora::MatrixViewable<Eigen::Map<const rmat>>);
  STATIC_REQUIRE(adalora::MatrixViewable<Eigen::Ref<mat>>);
  STATIC_REQUIRE(adalora::MatrixViewable<decltype(a.block(0, 0, 1, 1))>);
  STATIC_REQUIRE(adalora::MatrixViewable<decltype(a.transpose())>);
  STATIC_REQUIRE(adalora::VectorViewable<vec>);
  STATIC_REQUIRE(adalora::VectorViewable<rvec>);
  STATIC_REQUIRE(adalora::VectorViewable<decltype(a.col(0))>);
  STATIC_REQUIRE(adalora::VectorViewable<decltype(a.row(0))>);
  STATIC_REQUIRE(adalora::VectorViewable<decltype(a.diagonal())>);
  STATIC_REQUIRE(adalora::VectorViewable<Eigen::Map<vec, 0, Eigen::InnerStride<>>>);
  // A general matrix is not a vector at compile time (as_vector checks its shape at run time).
  STATIC_REQUIRE(!adalora::VectorViewable<mat>);

  // Refused: lazy expressions, which have no memory.
  STATIC_REQUIRE(!adalora::MatrixViewable<decltype(T(2) * a)>);
  STATIC_REQUIRE(!adalora::MatrixViewable<decltype(a + a)>);
  STATIC_REQUIRE(!adalora::MatrixViewable<decltype(a * a)>);
  STATIC_REQUIRE(!adalora::MatrixViewable<decltype(mat::Identity(2, 2))>);
  STATIC_REQUIRE(!adalora::MatrixViewable<decltype((a + a).transpose())>);
  STATIC_REQUIRE(!adalora::MatrixViewable<decltype((a + a).block(0, 0, 1, 1))>);
  STATIC_REQUIRE(!adalora::VectorViewable<decltype(T(2) * v)>);
  STATIC_REQUIRE(!adalora::VectorViewable<decltype(v + v)>);
  STATIC_REQUIRE(!adalora::VectorViewable<decltype(v.reverse())>);
  STATIC_REQUIRE(adalora::view_traits<std::remove_cvref_t<decltype(a + a)>>::lazy_expression);

  // Owning types refuse to be viewed as rvalues; maps, blocks and mutable Refs do not.
  STATIC_REQUIRE(adalora::view_traits<mat>::owns_memory);
  STATIC_REQUIRE(adalora::view_traits<Eigen::Array<T, 2, 2>>::owns_memory);
  STATIC_REQUIRE(adalora::view_traits<Eigen::Ref<const mat>>::owns_memory);
  STATIC_REQUIRE(!adalora::view_traits<Eigen::Ref<mat>>::owns_memory);
  STATIC_REQUIRE(!adalora::view_traits<Eigen::Map<mat>>::owns_memory);
  STATIC_REQUIRE(
      !adalora::view_traits<std::remove_cvref_t<decltype(a.block(0, 0, 1, 1))>>::owns_memory);

  // The element type is the scalar: no silent float <-> double conversion of a view.
  STATIC_REQUIRE(std::is_same_v<adalora::matrix_element_t<mat>, T>);
  STATIC_REQUIRE(!std::is_convertible_v<matrix_view<double>, matrix_view<float>>);
  STATIC_REQUIRE(!std::is_convertible_v<matrix_view<float>, matrix_view<double>>);
  STATIC_REQUIRE(
      !std::is_convertible_v<decltype(adalora::as_matrix(std::declval<Eigen::MatrixXd&>())),
                             matrix_view<float>>);
  STATIC_REQUIRE(!std::is_convertible_v<vector_view<double>, vector_view<float>>);
  STATIC_REQUIRE(!std::is_convertible_v<matrix_view<const T>, matrix_view<T>>);
  STATIC_REQUIRE(std::is_convertible_v<matrix_view<T>, matrix_view<const T>>);
}

// ---- xtensor ------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("xtensor containers are viewed in place, either layout",
                   "[integrations][xtensor]", float, double) {
  using T = TestType;
  SECTION("xtensor<T, 2>, row-major") {
    xt::xtensor<T, 2> x = xt::zeros<T>({3, 4});
    fill_xtensor(x);
    const auto v = adalora::as_matrix(x);
    STATIC_REQUIRE(std::is_same_v<decltype(v), const matrix_view<T>>);
    REQUIRE(v.data() == x.data());
    REQUIRE((v.row_stride() == 4 && v.col_stride() == 1));
    REQUIRE(mismatches(v, 3, 4, [&](index_t i, index_t j) -> const T& { return x(i, j); }) == 0);
  }
  SECTION("xtensor<T, 2>, column-major") {
    xt::xtensor<T, 2, xt::layout_type::column_major> x = xt::zeros<T>({3, 4});
    fill_xtensor(x);
    const auto v = adalora::as_matrix(x);
    REQUIRE(v.data() == x.data());
    REQUIRE((v.row_stride() == 1 && v.col_stride() == 3));
    REQUIRE(mismatches(v, 3, 4, [&](index_t i, index_t j) -> const T& { return x(i, j); }) == 0);
  }
  SECTION("xarray of rank 2, both layouts") {
    xt::xarray<T> x = xt::zeros<T>({2, 5});
    xt::xarray<T, xt::layout_type::column_major> y = xt::zeros<T>({2, 5});
    fill_xtensor(x);
    fill_xtensor(y);
    const auto vx = adalora::as_matrix(x);
    const auto vy = adalora::as_matrix(y);
    REQUIRE((vx.data() == x.data() && vy.data() == y.data()));
    REQUIRE((vx.row_stride() == 5 && vy.col_stride() == 2));
    REQUIRE(mismatches(vx, 2, 5, [&](index_t i, index_t j) -> const T& { return x(i, j); }) == 0);
    REQUIRE(mismatches(vy, 2, 5, [&](index_t i, index_t j) -> const T& { return y(i, j); }) == 0);
  }
  SECTION("xtensor_fixed") {
    xt::xtensor_fixed<T, xt::xshape<2, 3>> x;
    fill_xtensor(x);
    const auto v = adalora::as_matrix(x);
    REQUIRE(v.data() == x.data());
    REQUIRE(mismatches(v, 2, 3, [&](index_t i, index_t j) -> const T& { return x(i, j); }) == 0);
  }
  SECTION("a const container gives a view of const elements") {
    const xt::xtensor<T, 2> x = xt::ones<T>({2, 2});
    STATIC_REQUIRE(std::is_same_v<decltype(adalora::as_matrix(x)), matrix_view<const T>>);
    REQUIRE(adalora::as_matrix(x).data() == x.data());
  }
  SECTION("vectors: xtensor<T, 1>, xarray of rank 1, and xarray 1 x n or n x 1") {
    xt::xtensor<T, 1> t = xt::arange<T>(5);
    const auto vt = adalora::as_vector(t);
    REQUIRE((vt.data() == t.data() && vt.stride() == 1));
    REQUIRE(vector_mismatches(vt, 5, [&](index_t k) -> const T& { return t(k); }) == 0);
    xt::xarray<T> a = xt::arange<T>(4);
    REQUIRE(vector_mismatches(adalora::as_vector(a), 4,
                              [&](index_t k) -> const T& { return a(k); }) == 0);
    xt::xarray<T> row = xt::zeros<T>({1, 3});
    xt::xarray<T, xt::layout_type::column_major> col = xt::zeros<T>({3, 1});
    fill_xtensor(row);
    fill_xtensor(col);
    REQUIRE(vector_mismatches(adalora::as_vector(row), 3,
                              [&](index_t k) -> const T& { return row(0, k); }) == 0);
    REQUIRE(vector_mismatches(adalora::as_vector(col), 3,
                              [&](index_t k) -> const T& { return col(k, 0); }) == 0);
  }
}

TEMPLATE_TEST_CASE("xtensor size-1 axes (stride 0 in xtensor) index right and look dense",
                   "[integrations][xtensor]", float, double) {
  using T = TestType;
  xt::xtensor<T, 2> row = xt::zeros<T>({1, 4});
  xt::xtensor<T, 2> col = xt::zeros<T>({4, 1});
  xt::xtensor<T, 2, xt::layout_type::column_major> ccol = xt::zeros<T>({4, 1});
  xt::xtensor<T, 2> one = xt::zeros<T>({1, 1});
  REQUIRE(row.strides()[0] == 0);  // the xtensor convention this test is about
  fill_xtensor(row);
  fill_xtensor(col);
  fill_xtensor(ccol);
  const auto vr = adalora::as_matrix(row);
  const auto vc = adalora::as_matrix(col);
  const auto vcc = adalora::as_matrix(ccol);
  const auto v1 = adalora::as_matrix(one);
  REQUIRE(mismatches(vr, 1, 4, [&](index_t i, index_t j) -> const T& { return row(i, j); }) == 0);
  REQUIRE(mismatches(vc, 4, 1, [&](index_t i, index_t j) -> const T& { return col(i, j); }) == 0);
  REQUIRE(mismatches(vcc, 4, 1, [&](index_t i, index_t j) -> const T& { return ccol(i, j); }) == 0);
  REQUIRE((vr.row_stride() == 4 && vr.col_stride() == 1));
  REQUIRE((vc.row_stride() == 1 && vc.col_stride() == 4));
  REQUIRE((v1.row_stride() == 1 && v1.col_stride() == 1));
  for (const auto& v : {vr, vc, vcc, v1})
    REQUIRE((v.is_row_major_contiguous() && v.is_col_major_contiguous()));
  // Viewed as vectors they step along the non-unit axis.
  REQUIRE(adalora::as_vector(row).stride() == 1);
  REQUIRE(adalora::as_vector(col).stride() == 1);
  REQUIRE(adalora::as_vector(one).stride() == 1);
}

TEMPLATE_TEST_CASE("xt::adapt of raw buffers and std::vector is viewed in place",
                   "[integrations][xtensor]", float, double) {
  using T = TestType;
  std::vector<T> buffer(12);
  for (std::size_t k = 0; k < buffer.size(); ++k) buffer[k] = static_cast<T>(k);
  T* p = buffer.data();

  SECTION("raw pointer, no ownership, static-rank shape (xtensor_adaptor)") {
    const std::array<std::size_t, 2> shape = {3, 4};
    auto a = xt::adapt(p, buffer.size(), xt::no_ownership(), shape);
    const auto v = adalora::as_matrix(a);
    REQUIRE(v.data() == buffer.data());
    REQUIRE(mismatches(v, 3, 4, [&](index_t i, index_t j) -> const T& {
              return buffer[static_cast<std::size_t>(4 * i + j)];
            }) == 0);
    // A non-owning adaptor may be viewed as a temporary: the memory is the caller's.
    REQUIRE(adalora::as_matrix(xt::adapt(p, buffer.size(), xt::no_ownership(), shape)).data() == p);
    STATIC_REQUIRE(!adalora::view_traits<decltype(a)>::owns_memory);
  }
  SECTION("raw pointer, no ownership, dynamic shape, column-major (xarray_adaptor)") {
    const std::vector<std::size_t> shape = {4, 3};
    auto a = xt::adapt<xt::layout_type::column_major>(p, buffer.size(), xt::no_ownership(), shape);
    const auto v = adalora::as_matrix(a);
    REQUIRE(v.data() == buffer.data());
    REQUIRE((v.row_stride() == 1 && v.col_stride() == 4));
    REQUIRE(mismatches(v, 4, 3, [&](index_t i, index_t j) -> const T& {
              return buffer[static_cast<std::size_t>(i + 4 * j)];
            }) == 0);
  }
  SECTION("std::vector lvalue (adaptor holds a reference) and an owning adaptor") {
    auto a = xt::adapt(buffer, std::array<std::size_t, 2>{2, 6});
    REQUIRE(adalora::as_matrix(a).data() == buffer.data());
    STATIC_REQUIRE(!adalora::view_traits<decltype(a)>::owns_memory);
    using owning = decltype(xt::adapt(std::vector<T>(4), std::array<std::size_t, 2>{2, 2}));
    STATIC_REQUIRE(adalora::view_traits<owning>::owns_memory);
  }
}

TEMPLATE_TEST_CASE("strided xtensor views are viewed in place", "[integrations][xtensor]", float,
                   double) {
  using T = TestType;
  xt::xtensor<T, 2> x = xt::zeros<T>({5, 6});
  xt::xtensor<T, 2, xt::layout_type::column_major> c = xt::zeros<T>({5, 6});
  fill_xtensor(x);
  fill_xtensor(c);

  SECTION("ranges, with a step") {
    auto w = xt::view(x, xt::range(1, 4), xt::range(0, 6, 2));
    const auto v = adalora::as_matrix(w);
    REQUIRE(v.data() == &x(1, 0));
    REQUIRE((v.row_stride() == 6 && v.col_stride() == 2));
    REQUIRE(mismatches(v, 3, 3,
                       [&](index_t i, index_t j) -> const T& { return x(1 + i, 2 * j); }) == 0);
    const auto vc = adalora::as_matrix(xt::view(c, xt::range(2, 5), xt::all()));
    REQUIRE(vc.data() == &c(2, 0));
    REQUIRE(mismatches(vc, 3, 6, [&](index_t i, index_t j) -> const T& { return c(2 + i, j); }) ==
            0);
  }
  SECTION("integer indices give rank-1 views: rows and columns as vectors") {
    const auto r = adalora::as_vector(xt::view(c, 3, xt::all()));
    const auto k = adalora::as_vector(xt::view(x, xt::all(), 4));
    REQUIRE(r.stride() == 5);
    REQUIRE(k.stride() == 6);
    REQUIRE(vector_mismatches(r, 6, [&](index_t j) -> const T& { return c(3, j); }) == 0);
    REQUIRE(vector_mismatches(k, 5, [&](index_t i) -> const T& { return x(i, 4); }) == 0);
  }
  SECTION("transpose (an xstrided_view)") {
    const auto t = adalora::as_matrix(xt::transpose(x));
    REQUIRE(t.data() == x.data());
    REQUIRE(mismatches(t, 6, 5, [&](index_t i, index_t j) -> const T& { return x(j, i); }) == 0);
  }
  SECTION("a view of a const tensor gives const elements") {
    const auto& cx = x;
    STATIC_REQUIRE(std::is_same_v<decltype(adalora::as_matrix(xt::view(cx, xt::all(), xt::all()))),
                                  matrix_view<const T>>);
  }
}

TEMPLATE_TEST_CASE("writes through xtensor views land in the tensor", "[integrations][xtensor]",
                   float, double) {
  using T = TestType;
  xt::xtensor<T, 2> x = xt::zeros<T>({3, 4});
  xt::xarray<T, xt::layout_type::column_major> y = xt::zeros<T>({3, 4});
  adalora::as_matrix(x)(1, 2) = T(7);
  adalora::as_matrix(y)(2, 3) = T(8);
  adalora::as_matrix(xt::view(x, xt::range(1, 3), xt::range(1, 4)))(1, 2) = T(9);  // (2, 3)
  adalora::as_vector(xt::view(x, xt::all(), 0))[2] = T(10);                        // (2, 0)
  std::vector<T> buffer(6, T(0));
  adalora::as_matrix(xt::adapt(buffer.data(), 6, xt::no_ownership(),
                               std::array<std::size_t, 2>{2, 3}))(1, 1) = T(11);
  REQUIRE(x(1, 2) == T(7));
  REQUIRE(y(2, 3) == T(8));
  REQUIRE(x(2, 3) == T(9));
  REQUIRE(x(2, 0) == T(10));
  REQUIRE(buffer[4] == T(11));
}

TEMPLATE_TEST_CASE("xarray of the wrong rank throws, naming the function and the rank",
                   "[integrations][xtensor]", float, double) {
  using T = TestType;
  xt::xarray<T> x3 = xt::zeros<T>({2, 3, 4});
  REQUIRE_THROWS_AS(adalora::as_matrix(x3), std::invalid_argument);
  REQUIRE_THROWS_WITH(adalora::as_matrix(x3), Catch::Contains("adalora::as_matrix") &&
                                                  Catch::Contains("rank 3") &&
                                                  Catch::Contains("(2, 3, 4)"));
  REQUIRE_THROWS_WITH(adalora::as_vector(x3),
                      Catch::Contains("adalora::as_vector") && Catch::Contains("rank 3"));
  xt::xarray<T> x1 = xt::zeros<T>({4});
  REQUIRE_THROWS_WITH(adalora::as_matrix(x1),
                      Catch::Contains("adalora::as_matrix") && Catch::Contains("rank 1"));
  xt::xarray<T> x2 = xt::zeros<T>({2, 3});
  REQUIRE_THROWS_WITH(adalora::as_vector(x2),
                      Catch::Contains("adalora::as_vector") && Catch::Contains("(2, 3)"));
}

TEMPLATE_TEST_CASE("which xtensor types are viewable, at compile time", "[integrations][xtensor]",
                   float, double) {
  using T = TestType;
  xt::xtensor<T, 2> a = xt::zeros<T>({2, 2});
  xt::xtensor<T, 1> v = xt::zeros<T>({2});

  STATIC_REQUIRE(adalora::MatrixViewable<xt::xtensor<T, 2>>);
  STATIC_REQUIRE(adalora::MatrixViewable<const xt::xtensor<T, 2>>);
  STATIC_REQUIRE(adalora::MatrixViewable<xt::xtensor<T, 2, xt::layout_type::column_major>>);
  STATIC_REQUIRE(adalora::MatrixViewable<xt::xarray<T>>);  // rank checked at run time
  STATIC_REQUIRE(adalora::MatrixViewable<xt::xtensor_fixed<T, xt::xshape<2, 3>>>);
  STATIC_REQUIRE(adalora::MatrixViewable<decltype(xt::view(a, xt::range(0, 1), xt::all()))>);
  STATIC_REQUIRE(adalora::MatrixViewable<decltype(xt::transpose(a))>);
  STATIC_REQUIRE(adalora::VectorViewable<xt::xtensor<T, 1>>);
  STATIC_REQUIRE(adalora::VectorViewable<xt::xarray<T>>);  // rank checked at run time
  STATIC_REQUIRE(adalora::VectorViewable<decltype(xt::view(a, 0, xt::all()))>);
  // Static ranks are checked at compile time.
  STATIC_REQUIRE(!adalora::MatrixViewable<xt::xtensor<T, 1>>);
  STATIC_REQUIRE(!adalora::MatrixViewable<xt::xtensor<T, 3>>);
  STATIC_REQUIRE(!adalora::VectorViewable<xt::xtensor<T, 2>>);  // as_vector checks its shape
  STATIC_REQUIRE(!adalora::VectorViewable<xt::xtensor<T, 3>>);

  // Refused: lazy expressions and views without strided memory.
  STATIC_REQUIRE(!adalora::MatrixViewable<decltype(T(2) * a)>);
  STATIC_REQUIRE(!adalora::MatrixViewable<decltype(a + a)>);
  STATIC_REQUIRE(!adalora::MatrixViewable<decltype(xt::ones<T>({2, 2}))>);
  STATIC_REQUIRE(!adalora::MatrixViewable<decltype(xt::view(a + a, xt::all(), xt::all()))>);
  STATIC_REQUIRE(!adalora::MatrixViewable<decltype(xt::view(a, xt::keep(0, 1), xt::all()))>);
  STATIC_REQUIRE(!adalora::VectorViewable<decltype(T(2) * v)>);
  STATIC_REQUIRE(!adalora::VectorViewable<decltype(v + v)>);
  STATIC_REQUIRE(adalora::view_traits<std::remove_cvref_t<decltype(a + a)>>::lazy_expression);

  // Owning types refuse to be viewed as rvalues; views of lvalues do not.
  STATIC_REQUIRE(adalora::view_traits<xt::xtensor<T, 2>>::owns_memory);
  STATIC_REQUIRE(adalora::view_traits<xt::xarray<T>>::owns_memory);
  STATIC_REQUIRE(!adalora::view_traits<decltype(xt::view(a, xt::all(), xt::all()))>::owns_memory);
  STATIC_REQUIRE(!adalora::view_traits<decltype(xt::transpose(a))>::owns_memory);
  STATIC_REQUIRE(
      adalora::view_traits<decltype(xt::view(xt::xtensor<T, 2>(), xt::all()))>::owns_memory);

  STATIC_REQUIRE(std::is_same_v<adalora::matrix_element_t<xt::xtensor<T, 2>>, T>);
}
