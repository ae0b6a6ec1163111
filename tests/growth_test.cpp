// Growth (adalora/growth.hpp, growth_schedule.hpp): the init policy, the growth policy, the
// redistributor on a real allocator, and the growth schedules.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "adalora/io/checkpoint.hpp"

using namespace adalora;

namespace {

std::vector<float> delta_of(const svd_adapter<float>& a) {
  std::vector<float> d(static_cast<std::size_t>(a.out_features() * a.in_features()));
  a.delta_weight(make_matrix_view(d.data(), a.out_features(), a.in_features()));
  return d;
}

double dot_rows(const matrix_view<float>& m, index_t i, index_t j) {
  double s = 0;
  for (index_t k = 0; k < m.cols(); ++k) s += double(m(i, k)) * double(m(j, k));
  return s;
}

}  // namespace

TEST_CASE("zero_singular_value_init: new triplets leave the output alone and start orthogonal") {
  std::mt19937_64 rng(3);
  svd_adapter<float> a(20, 16, 3, 8.0);
  a.initialize(rng);
  std::vector<float> e = {0.5f, -1.0f, 2.0f};
  std::copy(e.begin(), e.end(), a.params().E.data());
  const std::vector<float> before = delta_of(a);
  const std::vector<float> A_before(a.params().A.data(), a.params().A.data() + 3 * 20);

  const triplet_map m = triplet_map::appending(3, 2);
  a.change_rank(m);
  REQUIRE(a.rank() == 5);
  zero_singular_value_init{}(a.params(), m, rng);

  // E = 0 on the new triplets: ΔW is the same sum with two exact zero terms (portable kernels
  // sum over r in index order), so bit for bit the same.
  const std::vector<float> after = delta_of(a);
  REQUIRE(std::memcmp(before.data(), after.data(), before.size() * sizeof(float)) == 0);
  REQUIRE(a.params().E[3] == 0.0f);
  REQUIRE(a.params().E[4] == 0.0f);
  // Old rows untouched; new rows orthogonal to every other row, and not zero.
  REQUIRE(std::memcmp(A_before.data(), a.params().A.data(), A_before.size() * sizeof(float)) == 0);
  const auto A = a.params().A;
  for (index_t i : {3, 4}) {
    const double ni = std::sqrt(dot_rows(A, i, i));
    REQUIRE(ni > 0.01);
    for (index_t j = 0; j < 5; ++j) {
      if (j == i) continue;
      const double nj = std::sqrt(dot_rows(A, j, j));
      CHECK(std::abs(dot_rows(A, i, j)) <= 1e-5 * ni * nj);
    }
  }
  const auto B = a.params().B;
  for (index_t i : {3, 4})
    for (index_t j = 0; j < 5; ++j) {
      if (j == i) continue;
      double d = 0, ni = 0, nj = 0;
      for (index_t o = 0; o < 16; ++o) {
        d += double(B(o, i)) * double(B(o, j));
        ni += double(B(o, i)) * double(B(o, i));
        nj += double(B(o, j)) * double(B(o, j));
      }
      CHECK(std::abs(d) <= 1e-5 * std::sqrt(ni * nj));
    }
}

TEST_CASE("zero_singular_value_init: with no room left the draw is kept; bad input is refused") {
  std::mt19937_64 rng(4);
  svd_adapter<double> a(2, 3, 2, 1.0);  // in = 2: two rows of A already span everything
  a.initialize(rng);
  const triplet_map m = triplet_map::appending(2, 1);
  a.change_rank(m);
  zero_singular_value_init{}(a.params(), m, rng);
  const auto A = a.params().A;
  REQUIRE(std::hypot(A(2, 0), A(2, 1)) > 0);
  REQUIRE(std::isfinite(A(2, 0)));
  REQUIRE_THROWS_AS((zero_singular_value_init{.init_std = -1}(a.params(), m, rng)), std::invalid_argument);
  REQUIRE_THROWS_AS(zero_singular_value_init{}(a.params(), triplet_map::appending(1, 1), rng),
                    std::invalid_argument);
}

TEST_CASE("saturation_growth ranks adapters by their weakest kept triplet") {
  std::vector<adapter_shape> shapes = {{"a", 8, 8, 3, {}}, {"b", 8, 8, 2, {}}, {"c", 2, 8, 2, {}}, {"d", 8, 8, 0, {}}};
  growth_view v{shapes, {{5, 1, 4}, {3, 2}, {9, 9}, {}}, {{1, 1, 1}, {1, 1}, {1, 1}, {}}};
  // Weakest: a 1, b 2, c 9 (but c is at min(in, out) = 2: capped), d none (last).
  REQUIRE(saturation_growth{}(v, 1) == std::vector<index_t>{0, 1, 0, 0});
  REQUIRE(saturation_growth{}(v, 3) == std::vector<index_t>{1, 1, 0, 1});
  // One each per round: with per_adapter 1 no more than the three that can grow.
  REQUIRE(saturation_growth{}(v, 10) == std::vector<index_t>{1, 1, 0, 1});
  REQUIRE(saturation_growth{.per_adapter = 2}(v, 5) == std::vector<index_t>{2, 2, 0, 1});
  REQUIRE(saturation_growth{.per_adapter = 1, .max_rank = 3}(v, 5) == std::vector<index_t>{0, 1, 1, 1});
  // A pruned triplet does not count as the weakest kept one.
  v.kept[1] = {1, 0};
  REQUIRE(saturation_growth{}(v, 1) == std::vector<index_t>{0, 1, 0, 0});
  v.kept[1] = {0, 0};
  REQUIRE(saturation_growth{}(v, 1) == std::vector<index_t>{1, 0, 0, 0});
  REQUIRE_THROWS_AS(saturation_growth{.per_adapter = 0}(v, 1), std::invalid_argument);
}

TEST_CASE("growth schedules: constant total and rising budgets by their formulas") {
  const constant_total_schedule c = constant_total_schedule({.total_step = 100, .tinit = 10, .tfinal = 20, .delta_t = 5})
                                        .with_initial_budget(12);
  REQUIRE(c.target_budget() == 12);
  REQUIRE(c.at(10) == budget_decision{12, false});
  REQUIRE(c.at(15) == budget_decision{12, true});
  REQUIRE(c.at(16) == budget_decision{12, false});
  REQUIRE(c.at(81) == budget_decision{12, true});
  REQUIRE(c.final_phase_start() == 80);

  const rising_schedule r = rising_schedule({.target_budget = 22, .total_step = 100, .tinit = 10, .tfinal = 20, .delta_t = 5})
                                .with_initial_budget(12);
  REQUIRE(r.at(10) == budget_decision{12, false});
  // (t − tinit) / (T − tfinal − tinit) = 35 / 70: 12 + 10 · 0.5.
  REQUIRE(r.at(45) == budget_decision{17, true});
  REQUIRE(r.at(44).budget == 16);  // 12 + 10 · 34/70 = 16.857..., truncated
  REQUIRE(r.at(80) == budget_decision{22, true});
  REQUIRE(r.at(81) == budget_decision{22, true});
  REQUIRE_THROWS_AS(r.with_initial_budget(23), std::invalid_argument);
  REQUIRE_THROWS_AS(rising_schedule({.target_budget = 5, .total_step = 10, .tinit = 9, .tfinal = 2}),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(constant_total_schedule({.total_step = 10, .delta_t = 0}), std::invalid_argument);
}

namespace {

// Two adapters; adapter "needs" gets large gradients (it has much left to learn), "idle" tiny
// ones. A redistributor at constant total should move rank from idle to needs.
struct two_adapters {
  std::vector<svd_adapter<float>> layers;
  adapter_set<float> set;
  std::mt19937_64 rng{11};

  explicit two_adapters(index_t r) {
    layers.emplace_back(16, 16, r, 4.0);
    layers.emplace_back(16, 16, r, 4.0);
    for (auto& l : layers) {
      l.initialize(rng);
      for (index_t i = 0; i < r; ++i) l.params().E[i] = 0.1f;
    }
    set.add("needs", layers[0]);
    set.add("idle", layers[1]);
  }
  void fake_gradients(std::int64_t t) {
    for (std::size_t a = 0; a < 2; ++a) {
      const float size = a == 0 ? 1.0f : 1e-4f;
      auto g = layers[a].grads();
      const float wobble = 1.0f + 0.1f * static_cast<float>(t % 3);
      for (index_t i = 0; i < g.A.rows(); ++i)
        for (index_t j = 0; j < g.A.cols(); ++j) g.A(i, j) = size * wobble;
      for (index_t i = 0; i < g.E.size(); ++i) g.E[i] = size * wobble;
      for (index_t o = 0; o < g.B.rows(); ++o)
        for (index_t i = 0; i < g.B.cols(); ++i) g.B(o, i) = size * wobble;
    }
  }
};

}  // namespace

TEST_CASE("rank_redistributor moves rank to where it is used, at a constant total") {
  two_adapters m(3);
  rank_allocator<float, smoothed_sensitivity, constant_total_schedule> alloc(
      m.set, constant_total_schedule({.total_step = 100, .tinit = 5, .tfinal = 20, .delta_t = 5}));
  rank_redistributor mover({.interval = 10, .moves = 1});
  int moves = 0;
  for (std::int64_t t = 0; t < 100; ++t) {
    m.fake_gradients(t);
    alloc.step(t, m.set);
    if (auto change = mover.step(t, alloc)) {
      ++moves;
      REQUIRE(change->size() == 2);
      for (std::size_t a = 0; a < 2; ++a) {
        m.layers[a].change_rank((*change)[a]);
        zero_singular_value_init{}(m.layers[a].params(), (*change)[a], m.rng);
        m.set.replace(a, m.layers[a].params(), m.layers[a].grads());
      }
      REQUIRE(alloc.total_rank() == 6);
      REQUIRE(m.set.total_rank() == 6);
      REQUIRE(t < alloc.schedule().final_phase_start());
    }
  }
  REQUIRE(moves >= 2);
  // Every move took the weakest (idle's) and gave it to the saturated one (needs).
  REQUIRE(alloc.shapes()[0].rank == 3 + moves);
  REQUIRE(alloc.shapes()[1].rank == 3 - moves);
  REQUIRE(alloc.last_result().kept_total == 6);
}

TEST_CASE("rank_redistributor adds what a rising budget is missing") {
  two_adapters m(2);
  rank_allocator<float, smoothed_sensitivity, rising_schedule> alloc(
      m.set, rising_schedule({.target_budget = 8, .total_step = 60, .tinit = 5, .tfinal = 10, .delta_t = 5}),
      {}, {.rank_can_grow = true});
  rank_redistributor mover({.interval = 5, .moves = 0});
  for (std::int64_t t = 0; t < 60; ++t) {
    m.fake_gradients(t);
    const auto& r = alloc.step(t, m.set);
    // What the budget asks beyond the total rank, before the final phase (none after: no growth).
    REQUIRE(r.missing == (t < 50 ? std::max<std::int64_t>(0, r.budget - alloc.total_rank()) : 0));
    if (auto change = mover.step(t, alloc))
      for (std::size_t a = 0; a < 2; ++a) {
        m.layers[a].change_rank((*change)[a]);
        zero_singular_value_init{}(m.layers[a].params(), (*change)[a], m.rng);
        m.set.replace(a, m.layers[a].params(), m.layers[a].grads());
      }
  }
  // The budget rises to 8 only in the final phase, where nothing can be added: the last move
  // (step 45, the last mask step before T − tfinal − 1 = 49) adds up to the target.
  REQUIRE(alloc.total_rank() == 8);
  REQUIRE(alloc.shapes()[0].rank > alloc.shapes()[1].rank);
  // Without rank_can_grow a rising budget is a broken schedule.
  two_adapters n(2);
  rank_allocator<float, smoothed_sensitivity, rising_schedule> strict(
      n.set, rising_schedule({.target_budget = 8, .total_step = 60, .tinit = 5, .tfinal = 10, .delta_t = 5}));
  n.fake_gradients(0);
  for (std::int64_t t = 0; t < 6; ++t) strict.step(t, n.set);
  REQUIRE_THROWS_AS(strict.step(30, n.set), std::invalid_argument);  // budget 6 > b0 = 4
}

TEST_CASE("rank_redistributor refuses bad options and keeps min_rank") {
  REQUIRE_THROWS_AS(rank_redistributor<>({.interval = 0}), std::invalid_argument);
  REQUIRE_THROWS_AS(rank_redistributor<>({.moves = -1}), std::invalid_argument);
  REQUIRE_THROWS_AS(rank_redistributor<>({.start = -2}), std::invalid_argument);
  two_adapters m(2);
  rank_allocator<float, smoothed_sensitivity, constant_total_schedule> alloc(
      m.set, constant_total_schedule({.total_step = 200, .tinit = 5, .tfinal = 20, .delta_t = 5}));
  rank_redistributor mover({.interval = 5, .moves = 1, .min_rank = 1});
  for (std::int64_t t = 0; t < 200; ++t) {
    m.fake_gradients(t);
    alloc.step(t, m.set);
    if (auto change = mover.step(t, alloc))
      for (std::size_t a = 0; a < 2; ++a) {
        m.layers[a].change_rank((*change)[a]);
        zero_singular_value_init{}(m.layers[a].params(), (*change)[a], m.rng);
        m.set.replace(a, m.layers[a].params(), m.layers[a].grads());
      }
  }
  REQUIRE(alloc.shapes()[1].rank == 1);
  REQUIRE(alloc.shapes()[0].rank == 3);
}

TEST_CASE("a growth run resumes bit for bit from the allocator's checkpoint and the redistributor's state") {
  using allocator_type = rank_allocator<float, smoothed_sensitivity, constant_total_schedule>;
  const auto schedule = constant_total_schedule({.total_step = 120, .tinit = 5, .tfinal = 20, .delta_t = 5});
  auto train = [&](two_adapters& m, allocator_type& alloc, rank_redistributor<>& mover, std::int64_t from,
                   std::int64_t to, std::vector<float>& trace) {
    for (std::int64_t t = from; t < to; ++t) {
      m.fake_gradients(t);
      const auto& r = alloc.step(t, m.set);
      trace.push_back(static_cast<float>(r.kept_total));
      if (auto change = mover.step(t, alloc))
        for (std::size_t a = 0; a < 2; ++a) {
          m.layers[a].change_rank((*change)[a]);
          zero_singular_value_init{}(m.layers[a].params(), (*change)[a], m.rng);
          m.set.replace(a, m.layers[a].params(), m.layers[a].grads());
        }
      for (const auto& l : m.layers)
        for (index_t i = 0; i < l.rank(); ++i) trace.push_back(l.params().E[i]);
    }
  };
  // Uninterrupted.
  two_adapters whole(3);
  allocator_type alloc_whole(whole.set, schedule);
  rank_redistributor<> mover_whole({.interval = 10, .moves = 1});
  std::vector<float> expected;
  train(whole, alloc_whole, mover_whole, 0, 120, expected);

  // Stopped at step 47 (after moves), saved, and resumed by fresh objects.
  two_adapters first(3);
  allocator_type alloc_first(first.set, schedule);
  rank_redistributor<> mover_first({.interval = 10, .moves = 1});
  std::vector<float> got;
  train(first, alloc_first, mover_first, 0, 47, got);
  REQUIRE(alloc_first.shapes()[0].rank != 3);  // the save is of a grown allocator
  const std::vector<std::uint8_t> bytes = checkpoint_bytes(alloc_first);
  const auto mover_state = mover_first.resumable();

  two_adapters second(3);  // the user's tensors: copied as the user's own checkpoint would
  for (std::size_t a = 0; a < 2; ++a) {
    second.layers[a] = first.layers[a];
    second.set.replace(a, second.layers[a].params(), second.layers[a].grads());
  }
  second.rng = first.rng;
  // The allocator is built as at the start (the construction ranks); the load reshapes it.
  allocator_type alloc_second(std::vector<adapter_shape>{{"needs", 16, 16, 3, {}}, {"idle", 16, 16, 3, {}}}, schedule);
  load_checkpoint_bytes(alloc_second, bytes);
  REQUIRE(alloc_second.shapes()[0].rank == alloc_first.shapes()[0].rank);
  rank_redistributor<> mover_second({.interval = 10, .moves = 1});
  mover_second.restore(mover_state);
  REQUIRE(mover_second.resumable() == mover_state);
  train(second, alloc_second, mover_second, 47, 120, got);
  REQUIRE(got.size() == expected.size());
  REQUIRE(std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)) == 0);

  REQUIRE_THROWS_AS(mover_second.restore({.next_move = -1, .young = {}}), std::invalid_argument);
}
