// Tests of the view customization points of adalora/backend.hpp, tier by tier (docs/views.md):
//  1. the ADL hook (adalora_matrix_view / adalora_vector_view next to a type you own), for an
//     owning type and for a non-owning view type that declares so;
//  2. a view_traits specialisation, for types you do not own;
//  and which tier wins when both exist, the standard library's types, raw buffers, the
//  requirements R1 to R4 (types that must not be viewable), and an end-to-end use: the
//  orthogonality regularizer over adapters held in a user's padded tensor gives the bits it gives
//  over dense copies of them.
#include <catch2/catch.hpp>
#include <array>
#include <cstddef>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "adalora/backend.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/orthogonality.hpp"
#include "adalora/svd_adapter_ref.hpp"

using adalora::index_t;

// ---- tier 1, an owning type: a row-major grid whose rows are padded to a pitch ------------------

namespace user {

struct grid {
  index_t rows, cols, pitch;  // element (i, j) at values[i * pitch + j]; pitch >= cols
  std::vector<float> values;
  grid(index_t r, index_t c, index_t p)
      : rows(r), cols(c), pitch(p), values(static_cast<std::size_t>(r * p), -1.0f) {}
  float& at(index_t i, index_t j) { return values[static_cast<std::size_t>(i * pitch + j)]; }
};

adalora::matrix_view<float> adalora_matrix_view(grid& g) {
  return adalora::make_matrix_view(g.values.data(), g.rows, g.cols, g.pitch, index_t{1});
}
adalora::matrix_view<const float> adalora_matrix_view(const grid& g) {
  return adalora::make_matrix_view(g.values.data(), g.rows, g.cols, g.pitch, index_t{1});
}

/// Interleaved storage (x0 y0 x1 y1 ...): the x channel is a vector of stride 2.
struct interleaved {
  std::vector<double> values;
};
adalora::vector_view<double> adalora_vector_view(interleaved& s) {
  return adalora::make_vector_view(s.values.data(), static_cast<index_t>(s.values.size() / 2),
                                   index_t{2});
}

// ---- tier 1, a non-owning view type: the transpose of a grid, cheap to pass as a temporary ----

struct transposed_ref {
  grid* g;
};
inline transposed_ref transpose(grid& g) { return {&g}; }
// Shallow const, like std::span: a const transposed_ref still refers to mutable elements.
adalora::matrix_view<float> adalora_matrix_view(const transposed_ref& t) {
  return adalora_matrix_view(*t.g).transposed();
}

}  // namespace user

// It says that it does not own its memory, so that temporaries of it may be viewed (R4).
template <>
struct adalora::view_traits<user::transposed_ref> {
  static constexpr bool owns_memory = false;
};

// ---- tier 2: "third-party" types, viewed through view_traits -----------------------------------

namespace vendor {

/// A column-major image: pixel (i, j) at data[i + j * height].
class image {
 public:
  image(index_t h, index_t w) : h_(h), w_(w), data_(static_cast<std::size_t>(h * w)) {}
  index_t height() const { return h_; }
  index_t width() const { return w_; }
  float* pixels() { return data_.data(); }
  const float* pixels() const { return data_.data(); }

 private:
  index_t h_, w_;
  std::vector<float> data_;
};

/// A 1-D signal stored back to front: sample k at data[size - 1 - k].
struct reversed_signal {
  std::vector<float> data;
};

}  // namespace vendor

template <>
struct adalora::view_traits<vendor::image> {
  static constexpr bool owns_memory = true;
  static matrix_view<float> matrix(vendor::image& x) {
    return make_matrix_view(x.pixels(), x.height(), x.width(), layout::col_major);
  }
  static matrix_view<const float> matrix(const vendor::image& x) {
    return make_matrix_view(x.pixels(), x.height(), x.width(), layout::col_major);
  }
};

template <>
struct adalora::view_traits<vendor::reversed_signal> {
  static constexpr bool owns_memory = true;
  static vector_view<float> vector(vendor::reversed_signal& x) {
    const auto n = static_cast<index_t>(x.data.size());
    return make_vector_view(x.data.data() + (n > 0 ? n - 1 : 0), n, index_t{-1});
  }
};

// ---- both tiers for one type: the ADL function wins ---------------------------------------------

namespace both {
struct square {
  std::array<float, 6> values{};  // 2 × 3 row-major
};
adalora::matrix_view<float> adalora_matrix_view(square& s) {
  return {s.values.data(), 2, 3, 3, 1};
}
}  // namespace both

template <>
struct adalora::view_traits<both::square> {
  static constexpr bool owns_memory = true;
  static matrix_view<float> matrix(both::square& s) {  // a 3 × 2 view: must not be picked
    return {s.values.data(), 3, 2, 1, 3};
  }
};

// ---- near misses: each breaks one requirement, so none is viewable ------------------------------

namespace bad {

struct returns_pointer {
  std::vector<float> v;
};
float* adalora_matrix_view(returns_pointer& x) { return x.v.data(); }  // R1: not a view

struct my_view {  // converts to a view, but is not one
  float* p;
  operator adalora::matrix_view<float>() const { return {p, 1, 1, 1, 1}; }
};
struct returns_convertible {
  float x;
};
my_view adalora_matrix_view(returns_convertible& x) { return {&x.x}; }  // R1

struct leaky_const {  // owns its element; its const hook hands out a mutable view (R3)
  float x = 0;
};
adalora::matrix_view<float> adalora_matrix_view(const leaky_const& x) {
  return {const_cast<float*>(&x.x), 1, 1, 1, 1};
}

struct mutable_only {  // a hook for non-const tensors only
  float x = 0;
};
adalora::matrix_view<float> adalora_matrix_view(mutable_only& x) { return {&x.x, 1, 1, 1, 1}; }

struct undeclared {  // viewed through view_traits that forgets owns_memory (R2)
  float x = 0;
};

struct lost {  // its hook lives in another namespace, where ADL does not look
  float x = 0;
};

}  // namespace bad

namespace elsewhere {
adalora::matrix_view<float> adalora_matrix_view(bad::lost& x) { return {&x.x, 1, 1, 1, 1}; }
}  // namespace elsewhere

template <>
struct adalora::view_traits<bad::undeclared> {
  static matrix_view<float> matrix(bad::undeclared& x) { return {&x.x, 1, 1, 1, 1}; }
};

// ---- the tests ---------------------------------------------------------------------------------

TEST_CASE("ADL tier: an owning type is viewed in place, padding and all", "[views][adl]") {
  user::grid g(3, 4, 6);
  for (index_t i = 0; i < 3; ++i)
    for (index_t j = 0; j < 4; ++j) g.at(i, j) = float(10 * i + j);

  const auto v = adalora::as_matrix(g);
  STATIC_REQUIRE(std::is_same_v<decltype(v), const adalora::matrix_view<float>>);
  CHECK(v.data() == g.values.data());
  CHECK(v.rows() == 3);
  CHECK(v.cols() == 4);
  CHECK(v.row_stride() == 6);
  CHECK(v.col_stride() == 1);
  CHECK(v(2, 3) == 23.0f);
  CHECK(v(1, 0) == 10.0f);
  v(2, 1) = 99.0f;  // writes land in the grid
  CHECK(g.at(2, 1) == 99.0f);
  CHECK(g.values[4] == -1.0f);  // the padding is neither seen nor touched
  CHECK(g.values[5] == -1.0f);

  const user::grid& cg = g;
  const auto cv = adalora::as_matrix(cg);
  STATIC_REQUIRE(std::is_same_v<decltype(cv), const adalora::matrix_view<const float>>);
  CHECK(cv.data() == g.values.data());
  CHECK(cv(0, 3) == 3.0f);

  STATIC_REQUIRE(adalora::MatrixViewable<user::grid>);
  STATIC_REQUIRE(adalora::MatrixViewable<const user::grid>);
  STATIC_REQUIRE(!adalora::VectorViewable<user::grid>);  // no vector hook ...
  STATIC_REQUIRE(adalora::detail::may_own_memory<user::grid>());  // ... and taken to own memory
}

TEST_CASE("ADL tier: as_vector falls back to a one-column matrix hook", "[views][adl]") {
  user::grid column(3, 1, 2);
  column.at(0, 0) = 1.0f, column.at(1, 0) = 2.0f, column.at(2, 0) = 3.0f;
  const auto v = adalora::as_vector(column);
  CHECK(v.data() == column.values.data());
  CHECK(v.size() == 3);
  CHECK(v.stride() == 2);
  CHECK(v[2] == 3.0f);

  user::grid wide(2, 3, 3);
  try {
    (void)adalora::as_vector(wide);
    FAIL("as_vector of a 2 x 3 grid did not throw");
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    CHECK(what.find("one column or one row") != std::string::npos);
    CHECK(what.find("2 x 3") != std::string::npos);
  }
}

TEST_CASE("ADL tier: a vector hook with a stride", "[views][adl]") {
  user::interleaved s{{0.5, -1.0, 1.5, -2.0, 2.5, -3.0}};
  const auto v = adalora::as_vector(s);
  STATIC_REQUIRE(std::is_same_v<decltype(v), const adalora::vector_view<double>>);
  STATIC_REQUIRE(adalora::VectorViewable<user::interleaved>);
  STATIC_REQUIRE(!adalora::MatrixViewable<user::interleaved>);
  CHECK(v.data() == s.values.data());
  CHECK(v.size() == 3);
  CHECK(v.stride() == 2);
  CHECK(v[0] == 0.5);
  CHECK(v[1] == 1.5);
  CHECK(v[2] == 2.5);
}

TEST_CASE("ADL tier: a non-owning view type may be viewed as a temporary", "[views][adl]") {
  user::grid g(2, 3, 3);
  for (index_t i = 0; i < 2; ++i)
    for (index_t j = 0; j < 3; ++j) g.at(i, j) = float(10 * i + j);

  const auto t = adalora::as_matrix(user::transpose(g));  // a temporary: allowed, it owns nothing
  CHECK(t.data() == g.values.data());
  CHECK(t.rows() == 3);
  CHECK(t.cols() == 2);
  CHECK(t.row_stride() == 1);
  CHECK(t.col_stride() == 3);
  CHECK(t(2, 1) == 12.0f);
  CHECK(t(0, 1) == 10.0f);

  STATIC_REQUIRE(!adalora::detail::may_own_memory<user::transposed_ref>());
  STATIC_REQUIRE(adalora::MatrixViewable<user::transposed_ref>);
  // Shallow const is fine for a type that owns nothing.
  STATIC_REQUIRE(adalora::MatrixViewable<const user::transposed_ref>);
}

TEST_CASE("view_traits tier: a column-major image and a reversed signal", "[views][traits]") {
  vendor::image img(2, 3);
  for (index_t k = 0; k < 6; ++k) img.pixels()[k] = float(k);  // (i, j) = i + 2j
  const auto v = adalora::as_matrix(img);
  CHECK(v.data() == img.pixels());
  CHECK(v.rows() == 2);
  CHECK(v.cols() == 3);
  CHECK(v.row_stride() == 1);
  CHECK(v.col_stride() == 2);
  CHECK(v(1, 2) == 5.0f);
  CHECK(v(0, 1) == 2.0f);
  const vendor::image& cimg = img;
  STATIC_REQUIRE(std::is_same_v<adalora::matrix_element_t<const vendor::image>, const float>);
  CHECK(adalora::as_matrix(cimg)(1, 0) == 1.0f);
  STATIC_REQUIRE(adalora::MatrixViewable<vendor::image>);
  STATIC_REQUIRE(adalora::MatrixViewable<const vendor::image>);
  STATIC_REQUIRE(adalora::detail::may_own_memory<vendor::image>());

  vendor::reversed_signal s{{1.0f, 2.0f, 3.0f, 4.0f}};
  const auto sv = adalora::as_vector(s);
  CHECK(sv.data() == s.data.data() + 3);
  CHECK(sv.size() == 4);
  CHECK(sv.stride() == -1);
  CHECK(sv[0] == 4.0f);
  CHECK(sv[3] == 1.0f);
  STATIC_REQUIRE(adalora::VectorViewable<vendor::reversed_signal>);
  // No const overload was written, so a const signal is not viewable (and not silently mutable).
  STATIC_REQUIRE(!adalora::VectorViewable<const vendor::reversed_signal>);
}

TEST_CASE("both tiers for one type: the ADL function is used", "[views]") {
  both::square s;
  const auto v = adalora::as_matrix(s);
  CHECK(v.rows() == 2);
  CHECK(v.cols() == 3);
  CHECK(v.row_stride() == 3);
}

TEST_CASE("standard library types and adalora's own views", "[views][std]") {
  std::vector<float> vec{1.0f, 2.0f, 3.0f};
  const auto v = adalora::as_vector(vec);
  CHECK(v.data() == vec.data());
  CHECK(v.size() == 3);
  const std::vector<float>& cvec = vec;
  STATIC_REQUIRE(
      std::is_same_v<decltype(adalora::as_vector(cvec)), adalora::vector_view<const float>>);

  std::array<double, 2> arr{4.0, 5.0};
  CHECK(adalora::as_vector(arr).data() == arr.data());

  const auto s = adalora::as_vector(std::span<float>(vec));  // a temporary span owns nothing
  CHECK(s.data() == vec.data());
  CHECK(s.size() == 3);

  const auto m = adalora::make_matrix_view(vec.data(), 1, 3);
  const auto same = adalora::as_matrix(m);
  CHECK(same.data() == vec.data());
  CHECK(same.cols() == 3);

  STATIC_REQUIRE(adalora::detail::may_own_memory<std::vector<float>>());
  STATIC_REQUIRE(!adalora::detail::may_own_memory<std::span<float>>());
  STATIC_REQUIRE(!adalora::detail::may_own_memory<adalora::matrix_view<float>>());
}

TEST_CASE("raw buffers need no hook: make_matrix_view and its checks", "[views][raw]") {
  std::vector<float> buffer(6);
  const auto v = adalora::make_matrix_view(buffer.data(), 2, 3, adalora::layout::col_major);
  CHECK(v.row_stride() == 1);
  CHECK(v.col_stride() == 2);
  CHECK_THROWS_AS(adalora::make_matrix_view(buffer.data(), -1, 3), std::invalid_argument);
  CHECK_THROWS_AS(adalora::make_matrix_view<float>(nullptr, 2, 3), std::invalid_argument);
}

TEST_CASE("requirements R1 to R3: near misses are not viewable", "[views][concepts]") {
  STATIC_REQUIRE(!adalora::MatrixViewable<bad::returns_pointer>);      // R1
  STATIC_REQUIRE(!adalora::MatrixViewable<bad::returns_convertible>);  // R1
  STATIC_REQUIRE(!adalora::MatrixViewable<bad::undeclared>);           // R2
  STATIC_REQUIRE(!adalora::MatrixViewable<const bad::leaky_const>);    // R3
  STATIC_REQUIRE(adalora::MatrixViewable<bad::leaky_const>);  // the non-const use is fine
  STATIC_REQUIRE(adalora::MatrixViewable<bad::mutable_only>);
  STATIC_REQUIRE(!adalora::MatrixViewable<const bad::mutable_only>);  // no const hook
  STATIC_REQUIRE(!adalora::MatrixViewable<bad::lost>);  // ADL looks in bad, not in elsewhere
  STATIC_REQUIRE(!adalora::MatrixViewable<int>);
}

TEST_CASE("end to end: the regularizer over padded user tensors gives the dense copies' bits",
          "[views][orth]") {
  // Two adapters, A (r × in) and B (out × r) in padded grids, E in a std::vector.
  struct held {
    user::grid A, B;
    std::vector<float> E;
  };
  std::vector<held> adapters;
  adapters.push_back({user::grid(3, 7, 9), user::grid(5, 3, 4), std::vector<float>(3)});
  adapters.push_back({user::grid(2, 4, 4), user::grid(6, 2, 5), std::vector<float>(2)});
  float seed = 0.1f;
  auto next = [&seed] { return seed = seed * 1.37f - float(int(seed * 1.37f)) - 0.3f; };
  std::vector<adalora::svd_adapter_ref<const float>> padded, dense;
  std::vector<std::vector<float>> copies;
  copies.reserve(4);
  for (auto& a : adapters) {
    for (index_t i = 0; i < a.A.rows; ++i)
      for (index_t j = 0; j < a.A.cols; ++j) a.A.at(i, j) = next();
    for (index_t i = 0; i < a.B.rows; ++i)
      for (index_t j = 0; j < a.B.cols; ++j) a.B.at(i, j) = next();
    padded.push_back({adalora::as_matrix(a.A), adalora::as_vector(a.E), adalora::as_matrix(a.B)});
    // Dense row-major copies through the views' own indexing.
    for (const auto* g : {&a.A, &a.B}) {
      const auto v = adalora::as_matrix(*g);
      std::vector<float> c(static_cast<std::size_t>(v.size()));
      for (index_t i = 0; i < v.rows(); ++i)
        for (index_t j = 0; j < v.cols(); ++j)
          c[static_cast<std::size_t>(i * v.cols() + j)] = v(i, j);
      copies.push_back(std::move(c));
    }
    const auto& ca = copies[copies.size() - 2];
    const auto& cb = copies.back();
    dense.push_back({adalora::make_matrix_view(ca.data(), a.A.rows, a.A.cols),
                     adalora::as_vector(std::as_const(a.E)),
                     adalora::make_matrix_view(cb.data(), a.B.rows, a.B.cols)});
  }
  adalora::orthogonality_regularizer<float> orth;
  std::vector<float> norms_padded(4), norms_dense(4);
  const float r_padded = orth.value(padded, norms_padded);
  const float r_dense = orth.value(dense, norms_dense);
  REQUIRE(r_dense > 0.0f);
  CHECK(r_padded == r_dense);
  CHECK(norms_padded == norms_dense);
}
