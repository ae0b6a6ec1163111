// The allocator's vectorised paths (detail/score_kernels.hpp, and smoothed_sensitivity's block
// hook, detail/sensitivity_simd.hpp) give bit for bit what the plain element loop gives: the same
// state, the same triplet scores, the same masks. The reference is the same metric behind another
// type without the hook, which the allocator runs through its generic element loop; the shapes
// cover every path (run lengths around the 8-element groups and 16-element blocks, B rows of
// widths that are and are not multiples of 4, odd row counts, strided views) and the values every
// fallback (NaN, infinity, products beyond float's range). tests/metric_hook_test.cpp does the
// same for users' metrics with the hook, in float and double.

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
#include "tests/allocator_fixtures.hpp"

namespace {

using adalora::index_t;
using adalora::tensor_role;

/// smoothed_sensitivity behind another type without its block hook: the generic element loop.
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


using storage = fixtures::storage<float>;
using fixtures::every_step;

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
