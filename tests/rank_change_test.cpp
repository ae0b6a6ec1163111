// rank_change.hpp and svd_adapter::change_rank: the triplet maps, their validation, compaction in
// place on every layout a user's tensors may have (row-major, column-major as Eigen stores by
// default, padded and interleaved strides), out-of-place remap with growth, and an owning adapter
// whose rank changes. Expected values come from an index formula of the ORIGINAL positions
// (element (i, j) holds 100·i + j + 1), so a gathered element is checked against where it came
// from, not against another run of the code under test.

#include <catch2/catch.hpp>

#include <Eigen/Core>

#include <array>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "adalora/integrations/eigen.hpp"

namespace {

using adalora::index_t;
using adalora::matrix_view;
using adalora::new_triplet;
using adalora::triplet_map;
using adalora::vector_view;

constexpr float sentinel = -7.0f;

/// The value element (i, j) had before any move: exact in float, distinct per position.
float value_at(index_t i, index_t j) { return static_cast<float>(100 * i + j + 1); }

/// A buffer that holds one rows × cols matrix in the layout `kind` names, with every element
/// outside the matrix set to a sentinel, so that a write outside the view shows up.
struct strided_matrix {
  std::vector<float> buffer;
  matrix_view<float> view;
};

strided_matrix make_strided(index_t rows, index_t cols, const std::string& kind) {
  index_t rs = 0, cs = 0, size = 0;
  if (kind == "row-major") {
    rs = cols, cs = 1, size = rows * cols;
  } else if (kind == "column-major") {  // Eigen's default storage
    rs = 1, cs = rows, size = rows * cols;
  } else if (kind == "padded rows") {  // a block of a wider row-major matrix
    rs = cols + 3, cs = 1, size = rows * (cols + 3);
  } else if (kind == "padded columns") {  // a block of a taller column-major matrix
    rs = 1, cs = rows + 2, size = (rows + 2) * cols;
  } else {  // "interleaved": neither stride is 1
    rs = 2 * cols + 1, cs = 2, size = rows * (2 * cols + 1);
  }
  strided_matrix m{std::vector<float>(static_cast<std::size_t>(size), sentinel), {}};
  m.view = matrix_view<float>(m.buffer.data(), rows, cols, rs, cs);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) m.view(i, j) = value_at(i, j);
  return m;
}

const std::vector<std::string> layouts = {"row-major", "column-major", "padded rows",
                                          "padded columns", "interleaved"};

/// Counts buffer elements outside the ORIGINAL view's footprint that are no longer the sentinel.
int writes_outside(const strided_matrix& m, index_t rows, index_t cols, index_t rs, index_t cs) {
  std::vector<bool> inside(m.buffer.size(), false);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) inside[static_cast<std::size_t>(i * rs + j * cs)] = true;
  int bad = 0;
  for (std::size_t k = 0; k < m.buffer.size(); ++k)
    if (!inside[k] && m.buffer[k] != sentinel) ++bad;
  return bad;
}

triplet_map map_of(index_t old_rank, std::vector<index_t> source) { return {old_rank, std::move(source)}; }

/// Maps that drop: some, none, all, the first only, the last only.
const std::vector<triplet_map> drops = {
    map_of(6, {0, 2, 3, 5}), map_of(6, {0, 1, 2, 3, 4, 5}), map_of(6, {}), map_of(6, {0}),
    map_of(6, {5}), map_of(6, {1, 4})};

}  // namespace

TEST_CASE("triplet_map::keeping and ::appending build the maps they name", "[rank_change]") {
  const triplet_map m = triplet_map::keeping(std::vector<bool>{true, false, true, true, false});
  CHECK(m.old_rank == 5);
  CHECK(m.source == std::vector<index_t>{0, 2, 3});
  CHECK(m.new_rank() == 3);
  CHECK(m.added() == 0);
  CHECK(m.dropped() == 2);
  CHECK_FALSE(m.identity());

  // The allocator's own mask type (std::uint8_t per triplet) and a std::array.
  const std::vector<std::uint8_t> bytes{0, 0, 1};
  CHECK(triplet_map::keeping(bytes).source == std::vector<index_t>{2});
  const std::array<bool, 3> all{true, true, true};
  CHECK(triplet_map::keeping(all).identity());
  CHECK(triplet_map::keeping(std::vector<bool>(4, false)).new_rank() == 0);
  CHECK(triplet_map::keeping(std::vector<bool>(4, false)).dropped() == 4);
  CHECK(triplet_map::keeping(std::vector<bool>{}).identity());

  const triplet_map g = triplet_map::appending(3, 2);
  CHECK(g.old_rank == 3);
  CHECK(g.source == std::vector<index_t>{0, 1, 2, new_triplet, new_triplet});
  CHECK(g.new_rank() == 5);
  CHECK(g.added() == 2);
  CHECK(g.dropped() == 0);
  CHECK_FALSE(g.identity());
  CHECK(triplet_map::appending(4, 0).identity());
  CHECK(triplet_map::appending(0, 2).source == std::vector<index_t>{new_triplet, new_triplet});

  // Dropping and adding at once: one kept, one dropped, one added.
  const triplet_map both = map_of(2, {1, new_triplet});
  CHECK(both.added() == 1);
  CHECK(both.dropped() == 1);
  CHECK_FALSE(both.identity());
}

TEST_CASE("invalid maps are refused before anything moves", "[rank_change][errors]") {
  auto a = make_strided(3, 4, "row-major");
  std::vector<float> e{1, 2, 3};
  const vector_view<float> ev(e.data(), 3);
  auto b = make_strided(5, 3, "row-major");
  const std::vector<float> a0 = a.buffer, b0 = b.buffer;

  // Out of order, repeated, out of range, a negative index that is not new_triplet.
  REQUIRE_THROWS_WITH(adalora::compact_rows(a.view, map_of(3, {2, 1})),
                      Catch::Contains("compact_rows") && Catch::Contains("must increase") &&
                          Catch::Contains("got 1 at 1 after 2"));
  REQUIRE_THROWS_WITH(adalora::compact_entries(ev, map_of(3, {1, 1})),
                      Catch::Contains("compact_entries") && Catch::Contains("must increase"));
  REQUIRE_THROWS_WITH(adalora::compact_columns(b.view, map_of(3, {0, 3})),
                      Catch::Contains("compact_columns") && Catch::Contains("[0, 3)") &&
                          Catch::Contains("got 3"));
  REQUIRE_THROWS_WITH(adalora::compact_rows(a.view, map_of(3, {-2})),
                      Catch::Contains("compact_rows") && Catch::Contains("got -2"));
  REQUIRE_THROWS_WITH(adalora::compact_rows(a.view, map_of(-1, {})),
                      Catch::Contains("old rank must be >= 0") && Catch::Contains("got -1"));
  // New triplets must come last.
  std::vector<float> to(3 * 4);
  REQUIRE_THROWS_WITH(adalora::remap_rows<float>(a.view, map_of(3, {new_triplet, 0, 1}),
                                                 adalora::make_matrix_view(to.data(), 3, 4)),
                      Catch::Contains("remap_rows") &&
                          Catch::Contains("old triplets must come before new ones"));
  // Compaction is in place and only drops: a new triplet is refused, pointing to remap.
  REQUIRE_THROWS_WITH(adalora::compact_rows(a.view, triplet_map::appending(3, 1)),
                      Catch::Contains("compact_rows") && Catch::Contains("only drops") &&
                          Catch::Contains("remap"));
  REQUIRE_THROWS_WITH(adalora::compact_entries(ev, triplet_map::appending(3, 1)),
                      Catch::Contains("only drops"));
  REQUIRE_THROWS_WITH(adalora::compact_columns(b.view, triplet_map::appending(3, 1)),
                      Catch::Contains("only drops"));
  // Tensors of another rank than the map's old rank.
  REQUIRE_THROWS_WITH(adalora::compact_rows(a.view, map_of(4, {0})),
                      Catch::Contains("must have 4 rows") && Catch::Contains("got 3"));
  REQUIRE_THROWS_WITH(adalora::compact_entries(ev, map_of(2, {0})),
                      Catch::Contains("must have 2 entries") && Catch::Contains("got 3"));
  REQUIRE_THROWS_WITH(adalora::compact_columns(b.view, map_of(5, {0})),
                      Catch::Contains("must have 5 columns") && Catch::Contains("got 3"));
  // An adapter whose three tensors disagree on the rank.
  adalora::svd_adapter_ref<float> mixed{a.view, vector_view<float>(e.data(), 2), b.view};
  REQUIRE_THROWS_WITH(adalora::compact(mixed, map_of(3, {0})),
                      Catch::Contains("compact") && Catch::Contains("E.size() = 2"));
  // Remap into tensors of the wrong size.
  std::vector<float> small(2 * 4);
  REQUIRE_THROWS_WITH(adalora::remap_rows<float>(a.view, triplet_map::appending(3, 1),
                                                 adalora::make_matrix_view(small.data(), 2, 4)),
                      Catch::Contains("remap_rows") && Catch::Contains("expected 3 x n into 4 x n") &&
                          Catch::Contains("got 3 x 4 into 2 x 4"));
  std::vector<float> e2(2);
  REQUIRE_THROWS_WITH(adalora::remap_entries<float>(ev, triplet_map::appending(3, 0),
                                                    vector_view<float>(e2.data(), 2)),
                      Catch::Contains("remap_entries") && Catch::Contains("got 3 into 2"));
  std::vector<float> bt(4 * 4);
  REQUIRE_THROWS_WITH(adalora::remap_columns<float>(b.view, triplet_map::appending(3, 1),
                                                    adalora::make_matrix_view(bt.data(), 4, 4)),
                      Catch::Contains("remap_columns") && Catch::Contains("got 5 x 3 into 4 x 4"));

  CHECK(a.buffer == a0);  // nothing moved
  CHECK(b.buffer == b0);
  CHECK(e == std::vector<float>{1, 2, 3});
}

TEST_CASE("compact_rows gathers the kept rows of A in place, whatever the strides", "[rank_change]") {
  const index_t r = 6, in = 5;
  for (const std::string& kind : layouts)
    for (const triplet_map& m : drops) {
      CAPTURE(kind, m.source);
      auto a = make_strided(r, in, kind);
      const index_t rs = a.view.row_stride(), cs = a.view.col_stride();
      const matrix_view<float> got = adalora::compact_rows(a.view, m);
      // Same memory, same strides, the kept rank.
      CHECK(got.data() == a.buffer.data());
      CHECK(got.rows() == m.new_rank());
      CHECK(got.cols() == in);
      CHECK(got.row_stride() == rs);
      CHECK(got.col_stride() == cs);
      int wrong = 0;
      for (index_t i = 0; i < m.new_rank(); ++i)
        for (index_t j = 0; j < in; ++j)  // read through the buffer, not through the new view
          if (a.buffer[static_cast<std::size_t>(i * rs + j * cs)] !=
              value_at(m.source[static_cast<std::size_t>(i)], j))
            ++wrong;
      CHECK(wrong == 0);
      CHECK(writes_outside(a, r, in, rs, cs) == 0);
    }
}

TEST_CASE("compact_columns gathers the kept columns of B; row-major B stays contiguous",
          "[rank_change]") {
  const index_t out = 4, r = 6;
  for (const std::string& kind : layouts)
    for (const triplet_map& m : drops) {
      CAPTURE(kind, m.source);
      auto b = make_strided(out, r, kind);
      const index_t rs = b.view.row_stride(), cs = b.view.col_stride();
      const matrix_view<float> got = adalora::compact_columns(b.view, m);
      const index_t k = m.new_rank();
      CHECK(got.data() == b.buffer.data());
      CHECK(got.rows() == out);
      CHECK(got.cols() == k);
      // A row-major contiguous B is repacked to out × k row-major; other layouts keep strides.
      const bool repacked = kind == "row-major";
      const index_t nrs = repacked ? k : rs, ncs = repacked ? 1 : cs;
      CHECK(got.row_stride() == nrs);
      CHECK(got.col_stride() == ncs);
      if (repacked) CHECK(got.is_row_major_contiguous());
      int wrong = 0;
      for (index_t o = 0; o < out; ++o)
        for (index_t i = 0; i < k; ++i)
          if (b.buffer[static_cast<std::size_t>(o * nrs + i * ncs)] !=
              value_at(o, m.source[static_cast<std::size_t>(i)]))
            ++wrong;
      CHECK(wrong == 0);
      CHECK(writes_outside(b, out, r, rs, cs) == 0);
    }

  // One row: row-major contiguous and column-major at once; compacted where it lies.
  auto one = make_strided(1, r, "row-major");
  const matrix_view<float> got = adalora::compact_columns(one.view, map_of(r, {1, 3}));
  REQUIRE(got.cols() == 2);
  CHECK(got(0, 0) == value_at(0, 1));
  CHECK(got(0, 1) == value_at(0, 3));
  CHECK(one.buffer[0] == value_at(0, 1));
  CHECK(one.buffer[1] == value_at(0, 3));
}

TEST_CASE("compact_entries gathers E, contiguous or strided", "[rank_change]") {
  for (index_t stride : {1, 3})
    for (const triplet_map& m : drops) {
      CAPTURE(stride, m.source);
      std::vector<float> e(static_cast<std::size_t>(6 * stride), sentinel);
      for (index_t i = 0; i < 6; ++i) e[static_cast<std::size_t>(i * stride)] = value_at(i, 0);
      const vector_view<float> got = adalora::compact_entries(vector_view<float>(e.data(), 6, stride), m);
      CHECK(got.data() == e.data());
      CHECK(got.size() == m.new_rank());
      CHECK(got.stride() == stride);
      for (index_t i = 0; i < m.new_rank(); ++i)
        CHECK(e[static_cast<std::size_t>(i * stride)] == value_at(m.source[static_cast<std::size_t>(i)], 0));
      for (std::size_t k = 0; k < e.size(); ++k)
        if (k % static_cast<std::size_t>(stride) != 0) CHECK(e[k] == sentinel);
    }
}

TEST_CASE("compaction of Eigen matrices, read back through Eigen", "[rank_change][eigen]") {
  const index_t r = 6, in = 5, out = 4;
  const triplet_map m = map_of(r, {0, 2, 3, 5});
  const index_t k = m.new_rank();
  auto src = [&](index_t i) { return m.source[static_cast<std::size_t>(i)]; };

  // Column-major (Eigen's default) A and B: compacted where they lie, strides kept, so the kept
  // triplets are A.topRows(k) and B.leftCols(k).
  Eigen::MatrixXf A(r, in), B(out, r);
  Eigen::VectorXf E(r);
  for (index_t i = 0; i < r; ++i) {
    E(i) = value_at(i, 0);
    for (index_t j = 0; j < in; ++j) A(i, j) = value_at(i, j);
    for (index_t o = 0; o < out; ++o) B(o, i) = value_at(o, i);
  }
  const adalora::svd_adapter_ref<float> ref{adalora::as_matrix(A), adalora::as_vector(E),
                                            adalora::as_matrix(B)};
  const auto got = adalora::compact(ref, m);
  CHECK(got.rank() == k);
  CHECK(got.A.data() == A.data());
  CHECK(got.B.data() == B.data());
  for (index_t i = 0; i < k; ++i) {
    CHECK(E(i) == value_at(src(i), 0));
    for (index_t j = 0; j < in; ++j) CHECK(A(i, j) == value_at(src(i), j));
    for (index_t o = 0; o < out; ++o) CHECK(B(o, i) == value_at(o, src(i)));
  }

  // Row-major B is repacked: the kept triplets are the first out × k elements, row-major.
  using row_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  row_major Br(out, r);
  for (index_t o = 0; o < out; ++o)
    for (index_t i = 0; i < r; ++i) Br(o, i) = value_at(o, i);
  adalora::compact_columns(adalora::as_matrix(Br), m);
  const Eigen::Map<row_major> packed(Br.data(), out, k);
  for (index_t o = 0; o < out; ++o)
    for (index_t i = 0; i < k; ++i) CHECK(packed(o, i) == value_at(o, src(i)));

  // A block of a wider row-major matrix (row stride > cols).
  row_major wide(r, in + 4);
  wide.setConstant(sentinel);
  for (index_t i = 0; i < r; ++i)
    for (index_t j = 0; j < in; ++j) wide(i, j) = value_at(i, j);
  adalora::compact_rows(adalora::as_matrix(wide.leftCols(in)), m);
  for (index_t i = 0; i < k; ++i) {
    for (index_t j = 0; j < in; ++j) CHECK(wide(i, j) == value_at(src(i), j));
    for (index_t j = in; j < in + 4; ++j) CHECK(wide(i, j) == sentinel);
  }
}

TEST_CASE("remap copies into new tensors, new triplets get the fill", "[rank_change]") {
  const index_t r = 3, in = 4, out = 5;
  auto a = make_strided(r, in, "column-major");
  auto b = make_strided(out, r, "padded rows");
  std::vector<float> e{value_at(0, 0), value_at(1, 0), value_at(2, 0)};
  const adalora::svd_adapter_ref<const float> from{a.view, vector_view<const float>(e.data(), r), b.view};

  for (const float fill : {0.0f, 9.5f})
    for (const triplet_map& m :
         {triplet_map::appending(r, 2), map_of(r, {0, 2, new_triplet}), map_of(r, {1}),
          map_of(r, {new_triplet, new_triplet}), triplet_map::appending(r, 0)}) {
      CAPTURE(fill, m.source);
      const index_t k = m.new_rank();
      // Destinations in other layouts than the sources: row-major A, column-major B, strided E.
      std::vector<float> ta(static_cast<std::size_t>(k * in)), tb(static_cast<std::size_t>(out * k)),
          te(static_cast<std::size_t>(2 * k));
      const adalora::svd_adapter_ref<float> to{
          adalora::make_matrix_view(ta.data(), k, in), vector_view<float>(te.data(), k, 2),
          adalora::make_matrix_view(tb.data(), out, k, adalora::layout::col_major)};
      adalora::remap(from, m, to, fill);
      for (index_t i = 0; i < k; ++i) {
        const index_t s = m.source[static_cast<std::size_t>(i)];
        CHECK(te[static_cast<std::size_t>(2 * i)] == (s == new_triplet ? fill : value_at(s, 0)));
        for (index_t j = 0; j < in; ++j)
          CHECK(ta[static_cast<std::size_t>(i * in + j)] == (s == new_triplet ? fill : value_at(s, j)));
        for (index_t o = 0; o < out; ++o)
          CHECK(tb[static_cast<std::size_t>(i * out + o)] == (s == new_triplet ? fill : value_at(o, s)));
      }
    }

  // Growth from rank 0: every triplet new.
  std::vector<float> ta(2 * in, sentinel), te(2, sentinel), tb(out * 2, sentinel);
  const adalora::svd_adapter_ref<const float> empty{matrix_view<const float>(nullptr, 0, in, in, 1),
                                                    vector_view<const float>(nullptr, 0),
                                                    matrix_view<const float>(nullptr, out, 0, 0, 1)};
  adalora::remap(empty, triplet_map::appending(0, 2),
                 adalora::svd_adapter_ref<float>{adalora::make_matrix_view(ta.data(), 2, in),
                                                 vector_view<float>(te.data(), 2),
                                                 adalora::make_matrix_view(tb.data(), out, 2)});
  for (float x : ta) CHECK(x == 0.0f);
  for (float x : te) CHECK(x == 0.0f);
  for (float x : tb) CHECK(x == 0.0f);
}

namespace {

/// Sets params and grads of `ad` from the original-position formula (grads offset by 0.5).
void fill_by_position(adalora::svd_adapter<float>& ad) {
  for (const bool grad : {false, true}) {
    const auto t = grad ? ad.grads() : ad.params();
    const float off = grad ? 0.5f : 0.0f;
    for (index_t i = 0; i < ad.rank(); ++i) {
      t.E[i] = value_at(i, 0) + off;
      for (index_t j = 0; j < ad.in_features(); ++j) t.A(i, j) = value_at(i, j) + off;
      for (index_t o = 0; o < ad.out_features(); ++o) t.B(o, i) = value_at(o, i) + off;
    }
  }
}

/// Every triplet i of `ad` is old triplet m.source[i] by the formula, or zero where new.
int mismatches_after(const adalora::svd_adapter<float>& ad, const triplet_map& m) {
  int bad = 0;
  if (ad.rank() != m.new_rank()) return -1;
  for (const bool grad : {false, true}) {
    const auto t = grad ? ad.grads() : ad.params();
    const float off = grad ? 0.5f : 0.0f;
    for (index_t i = 0; i < ad.rank(); ++i) {
      const index_t s = m.source[static_cast<std::size_t>(i)];
      auto want = [&](index_t x, index_t y) { return s == new_triplet ? 0.0f : value_at(x, y) + off; };
      bad += t.E[i] != want(s, 0);
      for (index_t j = 0; j < ad.in_features(); ++j) bad += t.A(i, j) != want(s, j);
      for (index_t o = 0; o < ad.out_features(); ++o) bad += t.B(o, i) != want(o, s);
    }
  }
  return bad;
}

struct tensor_pointers {
  const float *A, *E, *B, *gA, *gE, *gB;
  bool operator==(const tensor_pointers&) const = default;
};
tensor_pointers pointers(const adalora::svd_adapter<float>& ad) {
  return {ad.params().A.data(), ad.params().E.data(), ad.params().B.data(),
          ad.grads().A.data(),  ad.grads().E.data(),  ad.grads().B.data()};
}

}  // namespace

TEST_CASE("svd_adapter::change_rank drops in place and grows into reserved memory",
          "[rank_change][svd_adapter]") {
  const index_t in = 5, out = 4, r = 6;

  SECTION("dropping keeps the memory and gathers params and grads") {
    for (const triplet_map& m : drops) {
      CAPTURE(m.source);
      adalora::svd_adapter<float> ad(in, out, r, 3.0);
      fill_by_position(ad);
      const tensor_pointers before = pointers(ad);
      ad.change_rank(m);
      CHECK(mismatches_after(ad, m) == 0);
      CHECK(ad.r_init() == r);  // the scale stays the initial rank's
      if (m.new_rank() > 0) CHECK(pointers(ad) == before);
    }
  }
  SECTION("growing within reserve_rank keeps the memory; new triplets are zero") {
    adalora::svd_adapter<float> ad(in, out, r, 3.0);
    ad.reserve_rank(9);
    fill_by_position(ad);
    const tensor_pointers before = pointers(ad);
    const triplet_map m = triplet_map::appending(r, 3);
    ad.change_rank(m);
    CHECK(ad.rank() == 9);
    CHECK(mismatches_after(ad, m) == 0);
    CHECK(pointers(ad) == before);
    CHECK(ad.r_init() == r);
  }
  SECTION("growing beyond the reserve, and dropping and adding at once") {
    for (const triplet_map& m : {triplet_map::appending(r, 4), map_of(r, {1, 4, new_triplet}),
                                 map_of(r, {new_triplet})}) {
      CAPTURE(m.source);
      adalora::svd_adapter<float> ad(in, out, r, 3.0);
      fill_by_position(ad);
      ad.change_rank(m);
      CHECK(mismatches_after(ad, m) == 0);
    }
  }
  SECTION("a map of another rank is refused and nothing changes") {
    adalora::svd_adapter<float> ad(in, out, r, 3.0);
    fill_by_position(ad);
    REQUIRE_THROWS_WITH(ad.change_rank(map_of(5, {0})),
                        Catch::Contains("svd_adapter::change_rank") &&
                            Catch::Contains("adapter's rank 6") && Catch::Contains("got 5"));
    REQUIRE_THROWS_WITH(ad.change_rank(map_of(6, {3, 2})),
                        Catch::Contains("svd_adapter::change_rank") && Catch::Contains("increase"));
    CHECK(mismatches_after(ad, triplet_map::appending(r, 0)) == 0);
  }
}

TEST_CASE("a compacted adapter computes what its masked twin computes, bit for bit",
          "[rank_change][svd_adapter]") {
  const index_t in = 13, out = 11, r = 8, n = 7;
  for (const std::vector<bool>& keep :
       {std::vector<bool>{true, false, true, true, false, false, true, false},
        std::vector<bool>{false, false, false, false, false, false, false, true},
        std::vector<bool>(8, true)}) {
    CAPTURE(keep);
    std::mt19937_64 rng(11);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    adalora::svd_adapter<float> masked(in, out, r, 5.0);
    masked.initialize(rng);
    for (index_t i = 0; i < r; ++i) masked.params().E[i] = normal(rng);
    adalora::svd_adapter<float> compacted = masked;
    masked.mask(keep);
    const triplet_map m = triplet_map::keeping(keep);
    compacted.change_rank(m);
    REQUIRE(compacted.rank() == m.new_rank());

    std::vector<float> x(n * in), dy(n * out);
    for (float& v : x) v = normal(rng);
    for (float& v : dy) v = normal(rng);
    // The outputs are added into a nonzero y, as a base layer's would be.
    std::vector<float> y1(n * out, 0.25f), y2 = y1, dx1(n * in, -0.5f), dx2 = dx1;
    const auto xv = adalora::make_matrix_view<const float>(x.data(), n, in);
    const auto dyv = adalora::make_matrix_view<const float>(dy.data(), n, out);
    masked.forward(xv, adalora::make_matrix_view(y1.data(), n, out));
    compacted.forward(xv, adalora::make_matrix_view(y2.data(), n, out));
    CHECK(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)) == 0);

    masked.backward(xv, dyv, adalora::make_matrix_view(dx1.data(), n, in));
    compacted.backward(xv, dyv, adalora::make_matrix_view(dx2.data(), n, in));
    CHECK(std::memcmp(dx1.data(), dx2.data(), dx1.size() * sizeof(float)) == 0);
    // The kept triplets' gradients, gathered from the masked adapter by the mask itself.
    int differ = 0;
    index_t d = 0;
    for (index_t i = 0; i < r; ++i) {
      if (!keep[static_cast<std::size_t>(i)]) continue;
      differ += masked.grads().E[i] != compacted.grads().E[d];
      for (index_t j = 0; j < in; ++j) differ += masked.grads().A(i, j) != compacted.grads().A(d, j);
      for (index_t o = 0; o < out; ++o) differ += masked.grads().B(o, i) != compacted.grads().B(o, d);
      ++d;
    }
    CHECK(differ == 0);

    std::vector<float> w1(out * in), w2(out * in);
    masked.delta_weight(adalora::make_matrix_view(w1.data(), out, in));
    compacted.delta_weight(adalora::make_matrix_view(w2.data(), out, in));
    CHECK(std::memcmp(w1.data(), w2.data(), w1.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("rank 0: every triplet dropped, the adapter still works, and grows again",
          "[rank_change][svd_adapter]") {
  const index_t in = 6, out = 5, n = 3;
  std::mt19937_64 rng(3);
  adalora::svd_adapter<float> ad(in, out, 4, 2.0);
  ad.initialize(rng);
  ad.change_rank(triplet_map::keeping(std::vector<bool>(4, false)));
  REQUIRE(ad.rank() == 0);
  CHECK(ad.params().A.rows() == 0);
  CHECK(ad.params().B.cols() == 0);

  std::vector<float> x(n * in, 1.5f), y(n * out, 0.75f), dx(n * in, -0.25f);
  ad.forward(adalora::make_matrix_view<const float>(x.data(), n, in),
             adalora::make_matrix_view(y.data(), n, out));
  for (float v : y) CHECK(v == 0.75f);  // nothing added
  ad.backward(adalora::make_matrix_view<const float>(x.data(), n, in),
              adalora::make_matrix_view<const float>(y.data(), n, out),
              adalora::make_matrix_view(dx.data(), n, in));
  for (float v : dx) CHECK(v == -0.25f);
  std::vector<float> w(out * in, 3.0f), delta(out * in, 3.0f);
  ad.delta_weight(adalora::make_matrix_view(delta.data(), out, in));
  for (float v : delta) CHECK(v == 0.0f);
  ad.merge(adalora::make_matrix_view(w.data(), out, in));
  for (float v : w) CHECK(v == 3.0f);

  // The same through the free functions, on empty views with null data.
  const adalora::svd_adapter_ref<const float> empty{matrix_view<const float>(nullptr, 0, in, in, 1),
                                                    vector_view<const float>(nullptr, 0),
                                                    matrix_view<const float>(nullptr, out, 0, 0, 1)};
  adalora::adapter_workspace<float> ws;
  adalora::adapter_forward(empty, ad.scale(), adalora::make_matrix_view<const float>(x.data(), n, in),
                           adalora::make_matrix_view(y.data(), n, out), ws);
  for (float v : y) CHECK(v == 0.75f);

  // Growth from rank 0: new triplets start at zero, so the function is still the identity.
  ad.change_rank(triplet_map::appending(0, 2));
  REQUIRE(ad.rank() == 2);
  for (index_t i = 0; i < 2; ++i) {
    CHECK(ad.params().E[i] == 0.0f);
    for (index_t j = 0; j < in; ++j) CHECK(ad.params().A(i, j) == 0.0f);
    for (index_t o = 0; o < out; ++o) CHECK(ad.params().B(o, i) == 0.0f);
  }
  CHECK(ad.r_init() == 4);
}
