#include <catch2/catch.hpp>

#include <limits>
#include <vector>

#include "adalora/backend.hpp"
#include "adalora/matrix_view.hpp"

using adalora::index_t;

TEMPLATE_TEST_CASE("raw row- and column-major buffers index the same logical matrix", "[view]",
                   float, double) {
  std::vector<TestType> rm = {1, 2, 3, 4, 5, 6};  // 2 x 3, C order
  std::vector<TestType> cm = {1, 4, 2, 5, 3, 6};  // the same matrix, Fortran order
  auto a = adalora::make_matrix_view(rm.data(), 2, 3);
  auto b = adalora::make_matrix_view(cm.data(), 2, 3, adalora::layout::col_major);
  REQUIRE(a.is_row_major_contiguous());
  REQUIRE(b.is_col_major_contiguous());
  for (index_t i = 0; i < 2; ++i)
    for (index_t j = 0; j < 3; ++j) REQUIRE(a(i, j) == b(i, j));
  REQUIRE(a.transposed()(2, 1) == 6);
  REQUIRE(a.row(1)[2] == 6);
  REQUIRE(b.col(2)[0] == 3);
  REQUIRE(a.block(1, 1, 1, 2)(0, 1) == 6);
  adalora::matrix_view<const TestType> c = a;  // const conversion keeps the pointer
  REQUIRE(c.data() == rm.data());
}

TEST_CASE("checked factories reject bad extents with a message naming the function", "[view]") {
  float x = 0;
  REQUIRE_THROWS_WITH(adalora::make_matrix_view(&x, -1, 2),
                      Catch::Contains("make_matrix_view") && Catch::Contains("-1"));
  REQUIRE_THROWS_WITH(adalora::make_matrix_view(static_cast<float*>(nullptr), 2, 2),
                      Catch::Contains("null"));
  REQUIRE_THROWS_WITH(adalora::make_vector_view(&x, -3), Catch::Contains("-3"));
  REQUIRE_NOTHROW(adalora::make_matrix_view(static_cast<float*>(nullptr), 0, 5));
}

TEST_CASE("checked factories refuse extents whose element count overflows index_t",
          "[view][hostile]") {
  // rows * cols was computed in signed arithmetic: 2^62 * 8 overflowed (and wrapped to 0, so a
  // null pointer passed for a "non-empty" matrix).
  constexpr index_t big = index_t{1} << 62;
  float x = 0;
  REQUIRE_THROWS_WITH(adalora::make_matrix_view(static_cast<float*>(nullptr), big, 8),
                      Catch::Contains("make_matrix_view") && Catch::Contains("4611686018427387904 x 8") &&
                          Catch::Contains("more elements than index_t can count"));
  REQUIRE_THROWS_WITH(adalora::make_matrix_view(&x, 8, big, adalora::layout::col_major),
                      Catch::Contains("more elements"));
  REQUIRE_THROWS_WITH(adalora::make_matrix_view(&x, big, 8, 8, 1), Catch::Contains("more elements"));
  const index_t max = std::numeric_limits<index_t>::max();
  REQUIRE_NOTHROW(adalora::make_matrix_view(&x, max, 1));
  REQUIRE_NOTHROW(adalora::make_matrix_view(static_cast<float*>(nullptr), max, 0));
  REQUIRE_THROWS_WITH(adalora::make_matrix_view(&x, max, 2), Catch::Contains("more elements"));
}

TEST_CASE("checked strided factories refuse strides whose farthest offset overflows index_t",
          "[view][hostile]") {
  float x = 0;
  const index_t max = std::numeric_limits<index_t>::max();
  const index_t min = std::numeric_limits<index_t>::min();
  // Farthest offset (rows - 1)·|row_stride| + (cols - 1)·|col_stride|: exactly max fits.
  REQUIRE_NOTHROW(adalora::make_matrix_view(&x, 3, 2, max / 2, 1));
  REQUIRE_THROWS_WITH(adalora::make_matrix_view(&x, 4, 2, max / 2, 1),
                      Catch::Contains("make_matrix_view") && Catch::Contains("offset"));
  REQUIRE_THROWS_WITH(adalora::make_matrix_view(&x, 3, 3, max / 2, 1), Catch::Contains("offset"));
  REQUIRE_NOTHROW(adalora::make_matrix_view(&x, 2, 3, 1, -(max / 2)));  // 1 + 2·(max / 2) = max
  REQUIRE_THROWS_WITH(adalora::make_matrix_view(&x, 2, 4, 1, -(max / 2)), Catch::Contains("offset"));
  REQUIRE_THROWS_WITH(adalora::make_matrix_view(&x, 2, 1, min, 1), Catch::Contains("offset"));
  REQUIRE_NOTHROW(adalora::make_matrix_view(&x, 1, 1, min, min));  // one element: offset 0
  REQUIRE_NOTHROW(adalora::make_matrix_view(&x, max, 1, 0, 0));    // broadcast (xtensor's size-1 axes)
  REQUIRE_NOTHROW(adalora::make_vector_view(&x, 2, max));
  REQUIRE_THROWS_WITH(adalora::make_vector_view(&x, 3, max),
                      Catch::Contains("make_vector_view") && Catch::Contains("offset"));
  REQUIRE_THROWS_WITH(adalora::make_vector_view(&x, 2, min), Catch::Contains("offset"));
  REQUIRE_NOTHROW(adalora::make_vector_view(&x, max, -1));
}

TEST_CASE("std containers are viewed zero-copy as vectors", "[view]") {
  std::vector<double> v(5, 1.0);
  auto view = adalora::as_vector(v);
  REQUIRE(view.data() == v.data());
  REQUIRE(view.size() == 5);
  const std::vector<double>& cv = v;
  STATIC_REQUIRE(std::is_same_v<decltype(adalora::as_vector(cv)), adalora::vector_view<const double>>);
  std::span<double> s(v);
  REQUIRE(adalora::as_vector(s).data() == v.data());
}
