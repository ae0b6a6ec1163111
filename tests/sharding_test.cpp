// Sharded allocators reach exactly the decisions of one process.
//
// Several "processes" are threads here, each with its own copy of the parameters and its own
// rank_allocator over a shard of every adapter; the shipped in-process communicator
// (adalora/testing/in_process_communicator.hpp) sums their partial sums. Whatever the sharding
// (by triplets, by columns of A / rows of B, by adapter), every shard must see the same
// thresholds, scores and masks, bit for bit, as a single process.

#include <catch2/catch.hpp>

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/io/checkpoint.hpp"
#include "adalora/rank_allocator.hpp"
#include "adalora/sharding.hpp"
#include "adalora/testing/in_process_communicator.hpp"

namespace {

using adalora::index_t;

using adalora::testing::in_process_communicator;
using adalora::testing::in_process_group;

/// Full-size row-major tensors of every adapter (one copy per simulated process).
struct model {
  struct tensors {
    std::vector<double> A, E, B, gA, gE, gB;
  };
  std::vector<tensors> t;
};

const std::vector<adalora::adapter_shape> shapes = {
    {"q", 600, 300, 5, {}}, {"up", 300, 700, 4, {}}, {"down", 700, 260, 3, {}}};
constexpr std::int64_t steps = 14;

model make_model() {
  model m;
  for (const auto& s : shapes) {
    model::tensors t;
    t.A.assign(static_cast<std::size_t>(s.rank * s.in_features), 0.01);
    t.E.assign(static_cast<std::size_t>(s.rank), 0.0);
    t.B.assign(static_cast<std::size_t>(s.out_features * s.rank), 0.01);
    t.gA.resize(t.A.size());
    t.gE.resize(t.E.size());
    t.gB.resize(t.B.size());
    m.t.push_back(std::move(t));
  }
  return m;
}

/// Deterministic gradients of step t and an SGD step (identical in every process).
void sgd_step(model& m, std::int64_t t) {
  std::uint64_t x = 0x9e3779b97f4a7c15ULL ^ static_cast<std::uint64_t>(t);
  auto next = [&] {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    return double(std::int64_t(x >> 44) - (1 << 19)) / double(1 << 22);
  };
  for (auto& a : m.t) {
    for (auto* pair : {&a.gA, &a.gE, &a.gB})
      for (auto& g : *pair) g = next();
    for (std::size_t i = 0; i < a.A.size(); ++i) a.A[i] -= 0.125 * a.gA[i];
    for (std::size_t i = 0; i < a.E.size(); ++i) a.E[i] -= 0.125 * a.gE[i];
    for (std::size_t i = 0; i < a.B.size(); ++i) a.B[i] -= 0.125 * a.gB[i];
  }
}

/// Views of the part of every adapter that `shard` describes.
std::vector<adalora::adapter_tensors<double>> views_of(model& m, const std::vector<adalora::adapter_shape>& sh) {
  std::vector<adalora::adapter_tensors<double>> v;
  for (std::size_t a = 0; a < sh.size(); ++a) {
    const auto& s = sh[a];
    const auto& h = s.shard;
    auto& t = m.t[a];
    auto full_A = adalora::make_matrix_view(t.A.data(), s.rank, s.in_features);
    auto full_B = adalora::make_matrix_view(t.B.data(), s.out_features, s.rank);
    auto full_gA = adalora::make_matrix_view<const double>(t.gA.data(), s.rank, s.in_features);
    auto full_gB = adalora::make_matrix_view<const double>(t.gB.data(), s.out_features, s.rank);
    v.push_back({{full_A.block(h.triplet_begin, h.in_begin, h.triplet_count, h.in_count),
                  adalora::vector_view<double>(t.E.data() + h.triplet_begin, h.triplet_count),
                  full_B.block(h.out_begin, h.triplet_begin, h.out_count, h.triplet_count)},
                 {full_gA.block(h.triplet_begin, h.in_begin, h.triplet_count, h.in_count),
                  adalora::vector_view<const double>(t.gE.data() + h.triplet_begin, h.triplet_count),
                  full_gB.block(h.out_begin, h.triplet_begin, h.out_count, h.triplet_count)}});
  }
  return v;
}

/// What a run decided: per step the threshold, all scores, and the kept masks.
using trace = std::vector<double>;

/// With restart_at >= 0, each process saves its own slice to a checkpoint after that step and
/// goes on with a fresh allocator loaded from it.
trace run(const std::vector<adalora::adapter_shape>& sh, in_process_communicator comm,
          adalora::final_phase_rule semantics,
          std::int64_t restart_at = -1) {
  model m = make_model();
  std::vector<adalora::adapter_shape> resolved = sh;
  for (std::size_t a = 0; a < resolved.size(); ++a) {  // resolve -1 counts for the views
    auto& h = resolved[a].shard;
    if (h.triplet_count < 0) h.triplet_count = resolved[a].rank - h.triplet_begin;
    if (h.in_count < 0) h.in_count = resolved[a].in_features - h.in_begin;
    if (h.out_count < 0) h.out_count = resolved[a].out_features - h.out_begin;
  }
  using alloc_t = adalora::rank_allocator<double, adalora::smoothed_sensitivity,
                                          adalora::cubic_schedule, in_process_communicator>;
  auto make = [&] {
    return std::make_unique<alloc_t>(
        sh,
        adalora::cubic_schedule({.initial_budget = 12, .target_budget = 5, .total_step = 12,
                                 .tinit = 2, .tfinal = 3, .delta_t = 2}),
        adalora::smoothed_sensitivity{}, adalora::allocator_options{.final_phase = semantics}, comm);
  };
  auto owner = make();
  auto views = views_of(m, resolved);
  trace out;
  for (std::int64_t t = 0; t < steps; ++t) {
    sgd_step(m, t);
    alloc_t& alloc = *owner;
    const auto& r = alloc.step(t, views);
    out.push_back(r.threshold);
    out.push_back(double(r.kept_total));
    if (r.action == adalora::mask_action::threshold)
      for (double s : alloc.triplet_scores()) out.push_back(s);
    for (std::size_t a = 0; a < sh.size(); ++a)
      for (auto k : alloc.kept_mask(a)) out.push_back(k);
    if (t == restart_at) {
      const auto bytes = adalora::checkpoint_bytes(alloc);
      owner = make();
      adalora::load_checkpoint_bytes(*owner, bytes);
    }
  }
  return out;
}

/// Runs one allocator per shard layout, each a participant of an in-process group on its own
/// thread; returns each one's trace.
std::vector<trace> run_sharded(const std::vector<std::vector<adalora::adapter_shape>>& layouts,
                               adalora::final_phase_rule semantics, std::int64_t restart_at = -1) {
  in_process_group group(static_cast<int>(layouts.size()));
  std::vector<trace> traces(layouts.size());
  group.run([&](in_process_communicator comm) {
    const auto p = static_cast<std::size_t>(comm.rank());
    traces[p] = run(layouts[p], comm, semantics, restart_at);
  });
  return traces;
}

std::vector<adalora::adapter_shape> with_shards(std::vector<adalora::adapter_shard> shards) {
  auto sh = shapes;
  for (std::size_t a = 0; a < sh.size(); ++a) sh[a].shard = shards[a];
  return sh;
}

}  // namespace

TEST_CASE("sharded allocators decide exactly as one process", "[allocator][sharding]") {
  const std::vector<std::pair<const char*, std::vector<std::vector<adalora::adapter_shape>>>> layouts = {
      {"by triplets (rows of A, entries of E, columns of B)",
       {with_shards({{0, 2}, {0, 1}, {0, 3}}), with_shards({{2, -1}, {1, 2}, {0, 0}}),
        with_shards({{0, 0}, {3, -1}, {0, 0}})}},
      {"by columns of A and rows of B, E replicated and scored once",
       {with_shards({{0, -1, 0, 256, 0, 256, true}, {0, -1, 0, 256, 0, 512, true}, {0, -1, 0, 512, 0, -1, true}}),
        with_shards({{0, -1, 256, -1, 256, -1, false}, {0, -1, 256, -1, 512, -1, false},
                     {0, -1, 512, -1, 0, 0, false}})}},
      {"by adapter", {with_shards({{0, -1}, {0, 0}, {0, -1}}), with_shards({{0, 0}, {0, -1}, {0, 0}})}},
  };
  for (auto semantics : {adalora::final_phase_rule::peft, adalora::final_phase_rule::loralib}) {
    const trace single = run(shapes, in_process_group(1).communicator(0), semantics);
    REQUIRE(single.size() > 100);
    for (const auto& [name, layout] : layouts) {
      INFO(name << (semantics == adalora::final_phase_rule::peft ? " (PEFT)" : " (loralib)"));
      const auto traces = run_sharded(layout, semantics);
      for (const auto& t : traces) REQUIRE(t == single);
      // Each process checkpoints its own slice and resumes from it, in the reduction phase and
      // in the final phase.
      for (std::int64_t k : {5, 10}) {
        const auto resumed = run_sharded(layout, semantics, k);
        for (const auto& t : resumed) REQUIRE(t == single);
      }
    }
  }
}

TEST_CASE("shard_shapes' layouts over in-process participants decide as one process",
          "[allocator][sharding]") {
  const auto semantics = adalora::final_phase_rule::peft;
  const trace single = run(shapes, in_process_group(1).communicator(0), semantics);
  for (auto layout : {adalora::shard_layout::triplets, adalora::shard_layout::blocks,
                      adalora::shard_layout::adapters}) {
    for (int parts : {2, 3}) {
      INFO("layout " << static_cast<int>(layout) << ", " << parts << " participants");
      std::vector<std::vector<adalora::adapter_shape>> layouts;
      for (int p = 0; p < parts; ++p)
        layouts.push_back(adalora::shard_shapes(shapes, layout, p, parts));
      for (const auto& t : run_sharded(layouts, semantics)) REQUIRE(t == single);
    }
  }
}

TEST_CASE("a shard's checkpoint loads only into the same shard layout", "[allocator][sharding][checkpoint]") {
  auto sched = adalora::cubic_schedule({.initial_budget = 12, .target_budget = 5, .total_step = 12});
  using alloc_t = adalora::rank_allocator<double>;
  alloc_t first(with_shards({{0, 2}, {0, 1}, {0, 3}}), sched);
  alloc_t other(with_shards({{2, -1}, {1, 2}, {0, 0}}), sched);
  const auto bytes = adalora::checkpoint_bytes(first);
  REQUIRE_THROWS_WITH(adalora::load_checkpoint_bytes(other, bytes),
                      Catch::Contains("'q'") && Catch::Contains("holds shard triplets [0, +2)") &&
                          Catch::Contains("same layout"));
  alloc_t same(with_shards({{0, 2}, {0, 1}, {0, 3}}), sched);
  REQUIRE_NOTHROW(adalora::load_checkpoint_bytes(same, bytes));
}

TEST_CASE("shards are validated against the adapter's shape", "[allocator][sharding][errors]") {
  auto sched = adalora::cubic_schedule({.initial_budget = 12, .target_budget = 5, .total_step = 12});
  using alloc_t = adalora::rank_allocator<double>;
  REQUIRE_THROWS_WITH(alloc_t(with_shards({{0, 9}, {}, {}}), sched),
                      Catch::Contains("'q'") && Catch::Contains("triplets [0, 9)") &&
                          Catch::Contains("[0, 5]"));
  REQUIRE_THROWS_WITH(alloc_t(with_shards({{0, -1, 100, -1}, {}, {}}), sched),
                      Catch::Contains("multiples of 256") && Catch::Contains("got 100"));
  REQUIRE_THROWS_WITH(alloc_t(with_shards({{}, {0, -1, 0, -1, 512, 512}, {}}), sched),
                      Catch::Contains("'up'") && Catch::Contains("out rows [512, 1024)"));
}
