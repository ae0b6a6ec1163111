// A custom communicator under the sharded rank allocator: three participants (threads), each
// holding a shard of every adapter, all-reduce their partial score sums through
// ring_communicator (ring_communicator.hpp) and must reach exactly the decisions of one process
// holding everything: the same thresholds, triplet scores and masks, bit for bit, at every step,
// for each of shard_shapes' layouts.
//
//   bazel run //examples/custom_communicator
//
// With your own communicator: replace example::ring_communicator by it (participants that are
// threads here are processes in your job), and copy ring_communicator_test.cpp for its unit test.

#include <cstdint>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "adalora/adalora.hpp"
#include "examples/custom_communicator/ring_communicator.hpp"

namespace {

using adalora::index_t;

const std::vector<adalora::adapter_shape> shapes = {
    {"q", 600, 300, 6, {}}, {"up", 300, 700, 4, {}}, {"down", 700, 260, 3, {}}};
constexpr std::int64_t steps = 30;
constexpr int participants = 3;

adalora::cubic_schedule schedule() {
  return adalora::cubic_schedule(
      {.target_budget = 5, .total_step = 24, .tinit = 3, .tfinal = 6, .delta_t = 3});
}

/// Whole tensors of every adapter: each participant has its own copy, as each process of a real
/// job computes its own; the allocator sees only the participant's shard of them.
struct model {
  struct tensors {
    std::vector<double> A, E, B, gA, gE, gB;
  };
  std::vector<tensors> t;

  model() {
    for (const adalora::adapter_shape& s : shapes) {
      tensors x;
      x.A.assign(static_cast<std::size_t>(s.rank * s.in_features), 0.01);
      x.E.assign(static_cast<std::size_t>(s.rank), 0.0);
      x.B.assign(static_cast<std::size_t>(s.out_features * s.rank), 0.01);
      x.gA.resize(x.A.size());
      x.gE.resize(x.E.size());
      x.gB.resize(x.B.size());
      t.push_back(std::move(x));
    }
  }

  /// Step t's gradients (the same on every participant: stand-ins for backprop) and SGD.
  void train_step(std::int64_t step) {
    std::uint64_t x = 0x9e3779b97f4a7c15ULL ^ static_cast<std::uint64_t>(step);
    auto next = [&] {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      return static_cast<double>(static_cast<std::int64_t>(x >> 44) - (1 << 19)) / (1 << 22);
    };
    for (tensors& a : t) {
      for (std::vector<double>* g : {&a.gA, &a.gE, &a.gB})
        for (double& v : *g) v = next();
      for (std::size_t i = 0; i < a.A.size(); ++i) a.A[i] -= 0.125 * a.gA[i];
      for (std::size_t i = 0; i < a.E.size(); ++i) a.E[i] -= 0.125 * a.gE[i];
      for (std::size_t i = 0; i < a.B.size(); ++i) a.B[i] -= 0.125 * a.gB[i];
    }
  }

  /// The views the allocator steps on: the shard each shape names, cut out of the whole tensors.
  std::vector<adalora::adapter_tensors<double>> views(
      const std::vector<adalora::adapter_shape>& mine) {
    std::vector<adalora::adapter_tensors<double>> v;
    for (std::size_t a = 0; a < mine.size(); ++a) {
      const adalora::adapter_shape& s = mine[a];
      tensors& x = t[a];
      const adalora::svd_adapter_ref<double> params{
          adalora::make_matrix_view(x.A.data(), s.rank, s.in_features),
          adalora::vector_view<double>(x.E.data(), s.rank),
          adalora::make_matrix_view(x.B.data(), s.out_features, s.rank)};
      const adalora::svd_adapter_ref<const double> grads{
          adalora::make_matrix_view<const double>(x.gA.data(), s.rank, s.in_features),
          adalora::vector_view<const double>(x.gE.data(), s.rank),
          adalora::make_matrix_view<const double>(x.gB.data(), s.out_features, s.rank)};
      v.push_back({adalora::shard_view(params, s.shard), adalora::shard_view(grads, s.shard)});
    }
    return v;
  }
};

/// Everything a run decided, step by step: thresholds, kept counts, scores at mask events, and
/// the kept masks. Two runs decided alike iff their traces are equal.
using trace = std::vector<double>;

template <class Comm>
trace run(const std::vector<adalora::adapter_shape>& mine, Comm comm) {
  model m;
  const auto views = m.views(mine);
  adalora::rank_allocator<double, adalora::smoothed_sensitivity, adalora::cubic_schedule, Comm>
      allocator(mine, schedule(), {}, {}, comm);
  trace out;
  for (std::int64_t t = 0; t < steps; ++t) {
    m.train_step(t);
    const auto& r = allocator.step(t, views);  // collective at mask events
    out.push_back(r.threshold);
    out.push_back(static_cast<double>(r.kept_total));
    if (r.action == adalora::mask_action::threshold)
      for (double s : allocator.triplet_scores()) out.push_back(s);
    for (std::size_t a = 0; a < mine.size(); ++a)
      for (auto k : allocator.kept_mask(a)) out.push_back(k);
  }
  return out;
}

}  // namespace

int main() {
  const trace single = run(shapes, adalora::single_process{});
  const std::pair<adalora::shard_layout, const char*> layouts[] = {
      {adalora::shard_layout::triplets, "triplets"},
      {adalora::shard_layout::blocks, "blocks"},
      {adalora::shard_layout::adapters, "adapters"}};
  bool all_equal = true;
  for (const auto& [layout, name] : layouts) {
    example::ring ring(participants);
    std::vector<trace> traces(participants);
    std::vector<std::thread> threads;
    for (int p = 0; p < participants; ++p)
      threads.emplace_back([&, p] {
        const auto mine = adalora::shard_shapes(shapes, layout, p, participants);
        traces[static_cast<std::size_t>(p)] = run(mine, example::ring_communicator(ring, p));
      });
    for (std::thread& th : threads) th.join();
    int equal = 0;
    for (const trace& t : traces) equal += t == single ? 1 : 0;
    std::printf("layout %-8s: %d of %d participants decided as one process (%zu values compared)\n",
                name, equal, participants, single.size());
    all_equal = all_equal && equal == participants;
  }
  if (!all_equal) {
    std::printf("a sharded allocator over ring_communicator differed from one process\n");
    return 1;
  }
  std::printf(
      "%d participants over ring_communicator matched the single-process allocator bit "
      "for bit at all %lld steps, in every layout\n",
      participants, static_cast<long long>(steps));
  return 0;
}
