// The allocator's vectorised paths (detail/score_kernels.hpp, detail/sensitivity_simd.hpp) give
// bit for bit what the plain element loop gives: the same state, the same triplet scores, the
// same masks. The reference is the same metric behind another type, which the allocator runs
// through its generic element loop; the shapes cover every path (run lengths around the
// 16-element blocks, B rows of widths that are and are not multiples of 8, odd row counts,
// strided views) and the values every fallback (NaN, infinity, products beyond float's range).

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/rank_allocator.hpp"

namespace {

using adalora::index_t;
using adalora::tensor_role;

/// smoothed_sensitivity behind another type: the allocator has no vectorised path for it.
struct plain_sensitivity {
  static constexpr std::size_t state_size = 2;
  adalora::smoothed_sensitivity inner;
  template <class T>
  double update(tensor_role role, T p, T g, std::span<T, 2> s) const {
    return inner.update(role, p, g, s);
  }
  template <class T>
  double score(tensor_role role, T p, std::span<const T, 2> s) const {
    return inner.score(role, p, s);
  }
};

/// Masks at every step to half the initial budget.
struct every_step {
  std::int64_t b0;
  adalora::budget_decision at(std::int64_t) const { return {b0 / 2, true}; }
  std::int64_t initial_budget() const { return b0; }
  std::int64_t target_budget() const { return b0 / 2; }
  std::int64_t final_phase_start() const { return 1'000'000; }
};

/// One adapter's tensors, row-major or (col_major) with A and B stored column by column.
struct storage {
  adalora::adapter_shape shape;
  bool col_major;
  std::vector<float> A, E, B, gA, gE, gB;

  storage(adalora::adapter_shape s, bool cm) : shape(std::move(s)), col_major(cm) {
    const auto a = static_cast<std::size_t>(shape.rank * shape.in_features);
    const auto b = static_cast<std::size_t>(shape.out_features * shape.rank);
    A.resize(a), gA.resize(a), B.resize(b), gB.resize(b);
    E.resize(static_cast<std::size_t>(shape.rank)), gE.resize(E.size());
  }
  adalora::matrix_view<float> view(std::vector<float>& x, index_t rows, index_t cols) {
    return col_major ? adalora::matrix_view<float>(x.data(), rows, cols, 1, rows)
                     : adalora::matrix_view<float>(x.data(), rows, cols, cols, 1);
  }
  adalora::adapter_tensors<float> tensors() {
    const index_t r = shape.rank, in = shape.in_features, out = shape.out_features;
    return {{view(A, r, in), adalora::vector_view<float>(E.data(), r), view(B, out, r)},
            {view(gA, r, in), adalora::vector_view<const float>(gE.data(), r), view(gB, out, r)}};
  }
};

/// Fills every tensor with values of a model in training; with `hostile`, about one value in
/// 300 is NaN, ±infinity, or a pair of finite values whose product overflows float.
void fill(std::vector<storage>& s, std::mt19937& rng, bool hostile) {
  std::normal_distribution<float> w(0.0f, 0.05f), dw(0.0f, 1e-3f);
  std::uniform_int_distribution<int> pick(0, 299);
  constexpr float inf = std::numeric_limits<float>::infinity();
  for (auto& a : s)
    for (auto [x, dx] : {std::pair{&a.A, &a.gA}, std::pair{&a.E, &a.gE}, std::pair{&a.B, &a.gB}})
      for (std::size_t i = 0; i < x->size(); ++i) {
        (*x)[i] = w(rng);
        (*dx)[i] = dw(rng);
        if (!hostile) continue;
        switch (pick(rng)) {
          case 0: (*x)[i] = std::nanf(""); break;
          case 1: (*dx)[i] = -inf; break;
          case 2: (*x)[i] = 3e30f, (*dx)[i] = -2e20f; break;  // |p·g| = 6e50 > FLT_MAX
          case 3: (*dx)[i] = std::nanf(""); break;
          default: break;
        }
      }
}

template <class Metric>
using alloc_t = adalora::rank_allocator<float, Metric, every_step>;

void check_same(const alloc_t<adalora::smoothed_sensitivity>& fast,
                const alloc_t<plain_sensitivity>& plain, const std::string& what) {
  INFO(what);
  const auto f = fast.resumable();
  const auto p = plain.resumable();
  REQUIRE(f.metric_state.size() == p.metric_state.size());
  std::size_t state_diff = 0;
  for (std::size_t i = 0; i < f.metric_state.size(); ++i)
    state_diff += std::bit_cast<std::uint32_t>(f.metric_state[i]) !=
                  std::bit_cast<std::uint32_t>(p.metric_state[i]);
  CHECK(state_diff == 0);
  std::size_t score_diff = 0;
  for (std::size_t i = 0; i < f.scores.size(); ++i)
    score_diff += std::bit_cast<std::uint64_t>(f.scores[i]) != std::bit_cast<std::uint64_t>(p.scores[i]);
  CHECK(score_diff == 0);
  CHECK(std::vector<std::uint8_t>(f.kept.begin(), f.kept.end()) ==
        std::vector<std::uint8_t>(p.kept.begin(), p.kept.end()));
  CHECK(f.last->non_finite == p.last->non_finite);
  CHECK(f.last->threshold == p.last->threshold);
}

}  // namespace

TEST_CASE("the vectorised update, sums and column sums equal the plain element loop bit for bit",
          "[allocator][kernels]") {
  // in: run lengths below, at and around the 16-element blocks and the 256-element sum blocks;
  // r (the width of B's rows): multiples of 4 (the column kernel: 4 to 72, 8 and 12 held in
  // registers) and not (5, 3, 1); out: odd and even row counts, below and across a 256-row block.
  const std::vector<adalora::adapter_shape> shapes = {
      {"a", 300, 257, 8},  {"b", 16, 33, 16},  {"c", 17, 19, 24}, {"d", 768, 40, 12},
      {"e", 15, 513, 64},  {"f", 31, 7, 5},    {"g", 1, 1, 3},    {"h", 256, 300, 72},
      {"i", 40, 9, 8},     {"j", 33, 600, 1},   {"k", 20, 13, 12}, {"l", 9, 11, 4},
      {"m", 24, 301, 12},  {"n", 8, 5, 20}};
  std::int64_t b0 = 0;
  for (const auto& s : shapes) b0 += s.rank;

  for (bool col_major : {false, true})
    for (bool hostile : {false, true}) {
      const std::string what = std::string(col_major ? "column-major" : "row-major") +
                               (hostile ? ", with NaN, infinities and overflowing products" : "");
      std::vector<storage> s_fast, s_plain;
      for (const auto& sh : shapes) s_fast.emplace_back(sh, col_major), s_plain.emplace_back(sh, col_major);
      alloc_t<adalora::smoothed_sensitivity> fast(shapes, every_step{b0});
      alloc_t<plain_sensitivity> plain(shapes, every_step{b0});
      std::mt19937 rng_fast(7), rng_plain(7);
      for (std::int64_t t = 0; t < 4; ++t) {
        fill(s_fast, rng_fast, hostile);
        fill(s_plain, rng_plain, hostile);
        std::vector<adalora::adapter_tensors<float>> vf, vp;
        for (auto& a : s_fast) vf.push_back(a.tensors());
        for (auto& a : s_plain) vp.push_back(a.tensors());
        const auto& rf = fast.step(t, vf);
        plain.step(t, vp);
        if (hostile) REQUIRE(rf.non_finite > 0);
        check_same(fast, plain, what + ", step " + std::to_string(t));
      }
    }
}
