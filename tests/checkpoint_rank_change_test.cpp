// Checkpoints of an allocator whose rank changed (rank_allocator::compact, grow): they record the
// ranks now and at construction, load into an allocator built with the original arguments (which
// the load reshapes), and the run resumes bit for bit. Version 1 files (before rank could change)
// still load. A sharded or multi-process allocator cannot change rank: it refuses the change and
// such a checkpoint, saying why.

#include <catch2/catch.hpp>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/io/checkpoint.hpp"
#include "adalora/rank_allocator.hpp"
#include "adalora/rank_change.hpp"
#include "adalora/sharding.hpp"
#include "adalora/svd_adapter.hpp"
#include "adalora/testing/in_process_communicator.hpp"
#include "tests/checkpoint_run.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace {

using adalora::index_t;
using bytes_t = std::vector<std::uint8_t>;
using kind = adalora::checkpoint_error::kind;

using namespace checkpoint_run;

const std::vector<index_t> run_ranks = {4, 4, 3, 0};  // run_shapes' ranks

/// Calls f(x, i) for every element x of an adapter's tensor `role` (0 A, 1 E, 2 B), i its
/// row-major index.
template <class T, class F>
void for_each(const adalora::svd_adapter_ref<T>& t, int role, F f) {
  const index_t r = t.E.size();
  if (role == 0)
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < t.A.cols(); ++j) f(t.A(i, j), i * t.A.cols() + j);
  else if (role == 1)
    for (index_t i = 0; i < r; ++i) f(t.E[i], i);
  else
    for (index_t o = 0; o < t.B.rows(); ++o)
      for (index_t i = 0; i < r; ++i) f(t.B(o, i), o * r + i);
}

/// The user's side of the run: one svd_adapter per adapter, gradients from a generator (a pure
/// function of step, adapter, tensor and index: nothing to resume), SGD; it follows every rank
/// change of the allocator, as a training loop must.
template <class T>
struct model {
  std::vector<adalora::svd_adapter<T>> layers;

  model() {
    for (std::size_t a = 0; a < run_shapes.size(); ++a) {
      const auto& s = run_shapes[a];
      layers.emplace_back(s.in_features, s.out_features, s.rank, double(s.rank));
      for (int role = 0; role < 3; ++role)
        for_each(layers[a].params(), role,
                 [&](T& x, index_t i) { x = T(noise(0, a, role, static_cast<std::uint64_t>(i))); });
    }
  }
  void train_step(std::int64_t t) {
    for (std::size_t a = 0; a < layers.size(); ++a) {
      auto g = layers[a].grads();
      auto p = layers[a].params();
      for (int role = 0; role < 3; ++role) {
        for_each(g, role, [&](T& x, index_t i) {
          x = T(noise(static_cast<std::uint64_t>(t) + 1, a, role, static_cast<std::uint64_t>(i)));
        });
        std::vector<T> step;
        for_each(g, role, [&](T& x, index_t) { step.push_back(T(0.125) * x); });
        for_each(p, role, [&](T& x, index_t i) { x = x - step[static_cast<std::size_t>(i)]; });
      }
    }
  }
  void apply(const adalora::rank_change& change) {
    for (std::size_t a = 0; a < layers.size(); ++a) layers[a].change_rank(change[a]);
  }
  std::vector<adalora::adapter_tensors<T>> views() {
    std::vector<adalora::adapter_tensors<T>> v;
    for (auto& l : layers) v.push_back({l.params(), l.grads()});
    return v;
  }
  std::vector<index_t> ranks() const {
    std::vector<index_t> r;
    for (const auto& l : layers) r.push_back(l.rank());
    return r;
  }
};

/// What a run does to the rank besides stepping.
struct plan {
  adalora::allocator_options options = {};
  std::int64_t grow_after = -1;  // grow(add) right after this step
  std::vector<index_t> add = {};
  bool compact = false;          // compact() after the first step where the pattern is final
};

/// Steps [from, to) of the plan, appending to `trace` what each step did (the allocator's
/// snapshot, the model's ranks and every E value). Whether to compact is read off the allocator
/// (pattern final, something pruned), so that a resumed run decides as the straight one did.
template <class T>
void run(const plan& p, allocator_t<T>& alloc, model<T>& m, std::int64_t from, std::int64_t to,
         std::vector<std::uint64_t>& trace) {
  for (std::int64_t t = from; t < to; ++t) {
    m.train_step(t);
    alloc.step(t, m.views());
    if (t == p.grow_after) m.apply(alloc.grow(p.add));
    if (p.compact && alloc.pattern_final() && alloc.last_result().kept_total < alloc.total_rank())
      m.apply(alloc.compact());
    REQUIRE(m.ranks() == std::vector<index_t>([&] {
              std::vector<index_t> r;
              for (const auto& s : alloc.shapes()) r.push_back(s.rank);
              return r;
            }()));
    const auto s = snapshot(alloc);
    trace.insert(trace.end(), s.begin(), s.end());
    for (auto& l : m.layers)
      for_each(l.params(), 1, [&](T& e, index_t) { trace.push_back(bits(e)); });
  }
}

std::filesystem::path temp_dir(const std::string& name) {
  const char* bazel = std::getenv("TEST_TMPDIR");
  const auto base = bazel ? std::filesystem::path(bazel) : std::filesystem::temp_directory_path();
  const auto dir = base / ("adalora_checkpoint_rank_change_test_" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

bytes_t file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in);
  return bytes_t(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// The plan's run straight, and again as k steps, save, load into a fresh allocator built with
/// the original arguments, the rest: the two traces must agree bit for bit. Returns the ranks at
/// the save.
template <class T>
std::vector<index_t> check_resume(const plan& p, std::int64_t k, via how) {
  std::vector<std::uint64_t> straight, resumed;
  {
    model<T> m;
    auto alloc = make_allocator<T>(p.options);
    run(p, alloc, m, 0, total_steps, straight);
  }
  model<T> m;  // the training loop's own checkpoint carries the tensors over
  bytes_t saved;
  std::vector<std::uint64_t> at_save;
  std::vector<index_t> ranks_at_save;
  const std::string path = (temp_dir("resume") / "allocator.ckpt").string();
  {
    auto first = make_allocator<T>(p.options);
    run(p, first, m, 0, k, resumed);
    at_save = snapshot(first);
    ranks_at_save = m.ranks();
    saved = save_via(how, first, path);
  }  // the first allocator is gone
  auto resume = [&](allocator_t<T>& second) {
    load_via(how, second, saved, path);
    // Reshaped to the saved ranks (the model's), its ranks at construction unchanged.
    REQUIRE(first_difference(snapshot(second), at_save) == -1);
    REQUIRE(std::vector<index_t>(second.initial_ranks().begin(), second.initial_ranks().end()) == run_ranks);
    run(p, second, m, k, total_steps, resumed);
  };
  if (how == via::file_and_config) {
    // The configuration has the ranks at construction, whose sum is the schedule's b0.
    auto c = adalora::read_checkpoint_config<T>(path);
    std::vector<index_t> ranks;
    for (const auto& s : c.shapes) ranks.push_back(s.rank);
    REQUIRE(ranks == run_ranks);
    REQUIRE(c.schedule.initial_budget() == 11);
    REQUIRE(c.options.rank_can_grow == p.options.rank_can_grow);
    allocator_t<T> second(c.shapes, c.schedule, c.metric, c.options);
    resume(second);
  } else {
    auto second = make_allocator<T>(p.options);
    resume(second);
  }
  INFO("first difference at trace entry " << first_difference(straight, resumed) << " of "
                                          << straight.size());
  REQUIRE(first_difference(straight, resumed) == -1);
  return ranks_at_save;
}

const char* name(adalora::final_phase_rule f) {
  return f == adalora::final_phase_rule::peft ? "peft" : "loralib";
}

}  // namespace

TEMPLATE_TEST_CASE("a compacted run resumes bit for bit from a checkpoint", "[checkpoint][rank_change]",
                   float, double) {
  using T = TestType;
  const via hows[] = {via::bytes, via::file_and_config, via::stream};
  for (auto semantics : {adalora::final_phase_rule::peft, adalora::final_phase_rule::loralib}) {
    const plan p{.options = {.final_phase = semantics}, .compact = true};
    // Before the compaction (full ranks), right after it (PEFT compacts after step 23, loralib
    // after 24), and later in the final phase.
    const std::int64_t ks[] = {20, 25, 29};
    for (std::size_t i = 0; i < std::size(ks); ++i) {
      INFO(name(semantics) << ", k = " << ks[i]);
      const auto ranks = check_resume<T>(p, ks[i], hows[i % std::size(hows)]);
      if (ks[i] > 24) {
        // Compacted to the kept triplets: the total is at most the final budget.
        index_t total = 0;
        for (index_t r : ranks) total += r;
        CHECK(total <= run_schedule.target_budget);
        CHECK(total > 0);
      }
    }
  }
}

TEMPLATE_TEST_CASE("a grown run resumes bit for bit, also after it is compacted",
                   "[checkpoint][rank_change]", float, double) {
  using T = TestType;
  // Growth after step 10 (inside the reduction), into the rank-0 adapter too; then compaction in
  // the final phase. Saved before the growth, after it, and after the compaction.
  for (auto semantics : {adalora::final_phase_rule::peft, adalora::final_phase_rule::loralib}) {
    for (bool can_grow : {false, true}) {
      const plan p{.options = {.final_phase = semantics, .ties = adalora::tie_policy::exact_budget,
                               .rank_can_grow = can_grow},
                   .grow_after = 10, .add = {1, 0, 1, 2}, .compact = true};
      INFO(name(semantics) << (can_grow ? ", rank_can_grow" : ""));
      CHECK(check_resume<T>(p, 8, via::bytes) == run_ranks);
      CHECK(check_resume<T>(p, 14, via::file_and_config) == std::vector<index_t>{5, 4, 4, 2});
      const auto late = check_resume<T>(p, 27, via::stream);
      index_t total = 0;
      for (index_t r : late) total += r;
      CHECK(total <= run_schedule.target_budget);
    }
  }
}

TEST_CASE("a checkpoint records the ranks now and at construction, as documented",
          "[checkpoint][rank_change][format]") {
  model<float> m;
  auto alloc = make_allocator<float>({});
  std::vector<std::uint64_t> trace;
  run<float>({.compact = true}, alloc, m, 0, 25, trace);
  const bytes_t b = adalora::checkpoint_bytes(alloc);
  REQUIRE(b[8] == 2);  // format version 2
  // Payload: element type (1), writer (u32 length + bytes), adapter count (u32), then adapter 0:
  // name (u32 + bytes), in_features, out_features, rank now, rank at construction (i64 each).
  auto u64_at = [&](std::size_t at) {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < 8; ++i) v |= std::uint64_t{b[at + i]} << (8 * i);
    return v;
  };
  const std::size_t writer = b[33] | (std::size_t{b[34]} << 8);
  const std::size_t adapter0 = 32 + 1 + 4 + writer + 4;
  REQUIRE(b[adapter0] == run_shapes[0].name.size());
  const std::size_t fields = adapter0 + 4 + run_shapes[0].name.size();
  CHECK(u64_at(fields) == 6);  // in_features
  CHECK(u64_at(fields + 8) == 5);  // out_features
  CHECK(u64_at(fields + 16) == static_cast<std::uint64_t>(alloc.shapes()[0].rank));
  CHECK(u64_at(fields + 24) == 4);
  REQUIRE(alloc.total_rank() < alloc.initial_budget());  // it was compacted
  const auto im = adalora::detail::ckpt::parse<float>(b);
  for (std::size_t a = 0; a < run_shapes.size(); ++a) {
    CHECK(im.shapes[a].rank == alloc.shapes()[a].rank);
    CHECK(im.shapes[a].shard.triplet_count == alloc.shapes()[a].rank);
    CHECK(im.initial_ranks[a] == run_ranks[a]);
  }
  // The state follows the ranks now: 2 values per element, a mask entry and a score per triplet.
  std::size_t elements = 0;
  for (const auto& s : alloc.shapes())
    elements += static_cast<std::size_t>(s.rank * (s.in_features + 1 + s.out_features));
  CHECK(im.metric_state.size() == 2 * elements);
  CHECK(im.kept.size() == static_cast<std::size_t>(alloc.total_rank()));
  CHECK(im.scores.size() == static_cast<std::size_t>(alloc.total_rank()));
}

TEST_CASE("a live allocator loads a checkpoint of other ranks, also one to grow back in the final phase",
          "[checkpoint][rank_change]") {
  // A run that was compacted (final phase) goes back to a checkpoint from before the compaction:
  // the load grows it back to full ranks, which change_rank alone refuses in the final phase.
  const plan p{.compact = true};
  std::vector<std::uint64_t> straight;
  model<float> m;
  auto alloc = make_allocator<float>({});
  run(p, alloc, m, 0, 12, straight);
  const bytes_t at_12 = adalora::checkpoint_bytes(alloc);
  const model<float> m_12 = m;
  run(p, alloc, m, 12, total_steps, straight);
  REQUIRE(alloc.total_rank() < alloc.initial_budget());
  REQUIRE_THROWS_WITH(alloc.change_rank({adalora::triplet_map::appending(alloc.shapes()[0].rank, 1),
                                         adalora::triplet_map::appending(alloc.shapes()[1].rank, 0),
                                         adalora::triplet_map::appending(alloc.shapes()[2].rank, 0),
                                         adalora::triplet_map::appending(alloc.shapes()[3].rank, 0)}),
                      Catch::Contains("no triplet can be added from the final phase on"));

  adalora::load_checkpoint_bytes(alloc, at_12);
  REQUIRE(alloc.total_rank() == 11);
  REQUIRE(alloc.last_step() == 11);
  std::vector<std::uint64_t> again;
  m = m_12;
  run(p, alloc, m, 12, total_steps, again);
  const std::vector<std::uint64_t> tail(straight.end() - static_cast<std::ptrdiff_t>(again.size()),
                                        straight.end());
  REQUIRE(first_difference(tail, again) == -1);
}

namespace {

/// A version 1 file of the fuzz configuration after `steps` steps, checked against today's run.
template <class T>
void check_version_1(const std::string& file, std::int64_t steps, adalora::allocator_options o) {
  INFO(file);
  const bytes_t v1 = file_bytes("tests/fuzz/corpus/checkpoint_fuzz/" + file);
  REQUIRE(v1[8] == 1);
  auto make = [&] {
    return adalora::rank_allocator<T>(fuzz::shapes(), adalora::cubic_schedule(fuzz::schedule_options()),
                                      {}, o);
  };
  auto today = make();
  fuzz::tensors<T> t(fuzz::shapes());
  for (std::int64_t s = 0; s < steps; ++s) {
    t.set_gradients(s);
    today.step(s, t.views);
  }
  auto loaded = make();
  adalora::load_checkpoint_bytes(loaded, v1);
  const bytes_t resaved = adalora::checkpoint_bytes(loaded);
  REQUIRE(resaved[8] == 2);
  REQUIRE(resaved == adalora::checkpoint_bytes(today));
  const auto c = adalora::read_checkpoint_config_bytes<T>(v1);
  REQUIRE(c.shapes.size() == 3);
  CHECK(c.shapes[0].rank == 3);
  CHECK(!c.options.rank_can_grow);
  // Resumed on the same tensors (the user's checkpoint: E as masked so far), both go on alike.
  fuzz::tensors<T> u(fuzz::shapes());
  for (std::size_t a = 0; a < u.E.size(); ++a) std::copy(t.E[a].begin(), t.E[a].end(), u.E[a].begin());
  for (std::int64_t s = steps; s < 14; ++s) {
    t.set_gradients(s);
    u.set_gradients(s);
    today.step(s, t.views);
    loaded.step(s, u.views);
    REQUIRE(first_difference(snapshot(loaded), snapshot(today)) == -1);
    REQUIRE(u.E == t.E);
  }
}

}  // namespace

TEST_CASE("version 1 checkpoints (before rank could change) still load and resume",
          "[checkpoint][rank_change][compatibility]") {
  // Files written by the version 1 writer, kept in the fuzz corpus (v1_*.ckpt): the configuration
  // of tests/fuzz/fuzz_support.hpp stepped 0, 5, 10 and 12 times. Each loads into that
  // configuration, holds what today's run of as many steps holds (the same bytes, once saved as
  // version 2), and resumes as that run goes on.
  for (int steps : {0, 5, 10, 12}) {
    const std::string n = std::to_string(steps);
    check_version_1<float>("v1_f32_peft_" + n + ".ckpt", steps,
                           {.final_phase = adalora::final_phase_rule::peft});
    check_version_1<double>("v1_f64_loralib_" + n + ".ckpt", steps,
                            {.final_phase = adalora::final_phase_rule::loralib,
                             .non_finite = adalora::non_finite_policy::skip_step});
  }
}

namespace {

using mp_allocator = adalora::rank_allocator<float, adalora::smoothed_sensitivity, adalora::cubic_schedule,
                                             adalora::testing::in_process_communicator>;

/// What a refused call says (std::invalid_argument), or "" if it did not throw.
template <class F>
std::string refusal(F f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

/// A checkpoint_error's kind and message from loading `bytes` into `alloc`, which must be
/// unchanged after it.
template <class A>
std::pair<kind, std::string> load_refusal(A& alloc, const bytes_t& bytes) {
  const auto before = snapshot(alloc);
  std::pair<kind, std::string> out{kind::io, "loaded"};
  try {
    adalora::load_checkpoint_bytes(alloc, bytes);
  } catch (const adalora::checkpoint_error& e) {
    out = {e.error_kind(), e.what()};
  }
  CHECK(first_difference(snapshot(alloc), before) == -1);
  return out;
}

/// The checkpoint of the run after `steps` steps of plan `p`.
bytes_t checkpoint_after(const plan& p, std::int64_t steps) {
  model<float> m;
  auto alloc = make_allocator<float>(p.options);
  std::vector<std::uint64_t> trace;
  run(p, alloc, m, 0, steps, trace);
  return adalora::checkpoint_bytes(alloc);
}

}  // namespace

TEST_CASE("a multi-process allocator refuses compact() and grow(), saying why",
          "[checkpoint][rank_change][sharded]") {
  // Two processes (threads), each holding half of every adapter's triplets, step into the final
  // phase; neither can change its rank, which would need every process to change its shards at
  // once.
  struct outcome {
    std::string grow, compact;
    bool final_pattern = false;
    std::int64_t rank_before = -1, rank_after = -1;
  };
  std::vector<outcome> out(2);
  adalora::testing::in_process_group group(2);
  group.run([&](adalora::testing::in_process_communicator comm) {
    const auto mine =
        adalora::shard_shapes(run_shapes, adalora::shard_layout::triplets, comm.rank(), comm.size());
    mp_allocator alloc(mine, adalora::cubic_schedule(run_schedule), {}, {}, comm);
    outcome& o = out[static_cast<std::size_t>(comm.rank())];
    const std::vector<index_t> add = {1, 0, 0, 1};
    o.grow = refusal([&] { alloc.grow(add); });
    fuzz::tensors<float> t(mine);
    for (std::int64_t s = 0; s < 25; ++s) {
      t.set_gradients(s);
      alloc.step(s, t.views);
    }
    o.final_pattern = alloc.pattern_final();
    o.rank_before = alloc.total_rank();
    o.compact = refusal([&] { alloc.compact(); });
    o.rank_after = alloc.total_rank();
  });
  for (const outcome& o : out) {
    CHECK_THAT(o.grow, Catch::StartsWith("adalora::rank_allocator::change_rank: the rank of a multi-process "
                                         "allocator cannot change") &&
                           Catch::Contains("docs/scale_out.md"));
    REQUIRE(o.final_pattern);
    CHECK_THAT(o.compact, Catch::Contains("the rank of a multi-process allocator cannot change"));
    CHECK(o.rank_before == 11);
    CHECK(o.rank_after == 11);
  }
}

TEST_CASE("a sharded allocator refuses compact() and grow(), naming the adapter",
          "[checkpoint][rank_change][sharded]") {
  const auto mine = adalora::shard_shapes(run_shapes, adalora::shard_layout::triplets, 0, 2);
  allocator_t<float> alloc(mine, adalora::cubic_schedule(run_schedule));
  const std::vector<index_t> add = {1, 0, 0, 0};
  CHECK_THAT(refusal([&] { alloc.grow(add); }),
             Catch::Contains("adapter 0 ('layers.0.q') is sharded; a sharded adapter's rank cannot change"));
  fuzz::tensors<float> t(mine);
  for (std::int64_t s = 0; s < 25; ++s) {
    t.set_gradients(s);
    alloc.step(s, t.views);
  }
  REQUIRE(alloc.pattern_final());
  CHECK_THAT(refusal([&] { alloc.compact(); }),
             Catch::Contains("is sharded; a sharded adapter's rank cannot change"));
  CHECK(alloc.total_rank() == 11);
}

TEST_CASE("a checkpoint whose rank changed is refused where the allocator cannot follow, saying why",
          "[checkpoint][rank_change][errors]") {
  const plan compacting{.compact = true};
  const bytes_t compacted = checkpoint_after(compacting, 26);
  const bytes_t full = checkpoint_after(compacting, 20);
  const auto im = adalora::detail::ckpt::parse<float>(compacted);
  REQUIRE(im.shapes[0].rank < 4);  // adapter 0 lost triplets: the first difference is there

  SECTION("a multi-process allocator") {
    adalora::testing::in_process_group group(2);
    mp_allocator mp(run_shapes, adalora::cubic_schedule(run_schedule),
                    adalora::smoothed_sensitivity({.beta1 = 0.85, .beta2 = 0.85}), {}, group.communicator(0));
    const auto [k, what] = load_refusal(mp, compacted);
    CHECK(k == kind::mismatch);
    CHECK_THAT(what, Catch::StartsWith("adalora::load_checkpoint_bytes: adapter 0 ('layers.0.q') has rank " +
                                       std::to_string(im.shapes[0].rank) +
                                       " in the checkpoint (4 at construction), 4 in the allocator, "
                                       "which cannot be reshaped to it: a multi-process allocator's "
                                       "rank cannot change"));
    // The same run before its rank changed loads (the layout is the same).
    adalora::load_checkpoint_bytes(mp, full);
    CHECK(mp.last_step() == 19);
  }
  SECTION("a sharded allocator") {
    const auto mine = adalora::shard_shapes(run_shapes, adalora::shard_layout::triplets, 0, 2);
    allocator_t<float> sharded(mine, adalora::cubic_schedule(run_schedule),
                               adalora::smoothed_sensitivity({.beta1 = 0.85, .beta2 = 0.85}));
    const auto [k, what] = load_refusal(sharded, compacted);
    CHECK(k == kind::mismatch);
    CHECK_THAT(what, Catch::Contains("adapter 0 ('layers.0.q') has rank " +
                                     std::to_string(im.shapes[0].rank) +
                                     " in the checkpoint (4 at construction), 4 in the allocator, "
                                     "which cannot be reshaped to it: a sharded adapter's rank "
                                     "cannot change"));
    // Another adapter sharded is enough: change_rank() changes no rank of a sharded allocator.
    auto one_sharded = run_shapes;
    one_sharded[1].shard = {.in_count = 1};
    allocator_t<float> partly(one_sharded, adalora::cubic_schedule(run_schedule),
                              adalora::smoothed_sensitivity({.beta1 = 0.85, .beta2 = 0.85}));
    CHECK_THAT(load_refusal(partly, compacted).second,
               Catch::Contains("adapter 0 ('layers.0.q') has rank " + std::to_string(im.shapes[0].rank) +
                               " in the checkpoint (4 at construction), 4 in the allocator, which cannot be "
                               "reshaped to it: adapter 1 ('layers.0.v') is sharded, and a sharded "
                               "allocator's rank cannot change"));
  }
  SECTION("an allocator built with the ranks now instead of those at construction") {
    std::vector<adalora::adapter_shape> now = run_shapes;
    std::int64_t b0 = 0;
    for (std::size_t a = 0; a < now.size(); ++a) b0 += now[a].rank = im.shapes[a].rank;
    auto o = run_schedule;
    o.initial_budget = b0;
    REQUIRE(b0 >= 2);
    o.target_budget = b0 - 1;
    allocator_t<float> wrong(now, adalora::cubic_schedule(o),
                             adalora::smoothed_sensitivity({.beta1 = 0.85, .beta2 = 0.85}));
    const auto [k, what] = load_refusal(wrong, compacted);
    CHECK(k == kind::mismatch);
    CHECK_THAT(what, Catch::Contains("adapter 0 ('layers.0.q') has in_features 6, out_features 5, rank 4 "
                                     "in the checkpoint, 6, 5, " +
                                     std::to_string(im.shapes[0].rank) +
                                     " in the allocator (ranks at construction") &&
                         Catch::Contains("read_checkpoint_config returns them, and loading reshapes it"));
  }
  SECTION("another rank_can_grow") {
    auto fresh = make_allocator<float>({});
    const bytes_t growing = checkpoint_after({.options = {.rank_can_grow = true}}, 3);
    const auto [k, what] = load_refusal(fresh, growing);
    CHECK(k == kind::mismatch);
    CHECK_THAT(what, Catch::Contains("allocator options: the checkpoint has rank_can_grow = true, the "
                                     "allocator rank_can_grow = false"));
  }
}

TEST_CASE("a load reshapes no adapter beyond full rank, or its rank now or at construction",
          "[checkpoint][rank_change][hostile]") {
  // layers.0.v is 3 x 7 at rank 4: full rank is 3, so 4 (its rank at construction) is the most a
  // fresh allocator is reshaped to. One grown to 5 loads into the allocator that grew it only.
  const plan p{.grow_after = 2, .add = {0, 1, 0, 0}};
  model<float> m;
  auto grown = make_allocator<float>(p.options);
  std::vector<std::uint64_t> trace;
  run(p, grown, m, 0, 4, trace);
  REQUIRE(grown.shapes()[1].rank == 5);
  const bytes_t b = adalora::checkpoint_bytes(grown);
  auto fresh = make_allocator<float>({});
  const auto [k, what] = load_refusal(fresh, b);
  CHECK(k == kind::mismatch);
  CHECK_THAT(what, Catch::Contains("adapter 1 ('layers.0.v') has rank 5 in the checkpoint, more than the "
                                   "4 this allocator loads (full rank 3 = min(in_features, "
                                   "out_features), or its rank now or at construction where larger)"));
  adalora::load_checkpoint_bytes(grown, b);  // its own
  // A file is refused before it is read past what the allocator can load; its own is not.
  const auto path = (temp_dir("bound") / "grown.ckpt").string();
  adalora::save_checkpoint(grown, path);
  REQUIRE_NOTHROW(adalora::load_checkpoint(grown, path));
  REQUIRE_THROWS_WITH(adalora::load_checkpoint(fresh, path), Catch::Contains("has rank 5 in the checkpoint"));
}

TEST_CASE("a hostile checkpoint cannot change a sharded adapter's rank",
          "[checkpoint][rank_change][hostile]") {
  const auto mine = adalora::shard_shapes(run_shapes, adalora::shard_layout::triplets, 0, 2);
  allocator_t<float> sharded(mine, adalora::cubic_schedule(run_schedule));
  auto im = adalora::detail::ckpt::parse<float>(adalora::checkpoint_bytes(sharded));
  im.initial_ranks[0] = 3;
  const auto [k, what] = load_refusal(sharded, adalora::detail::ckpt::encode(im));
  CHECK(k == kind::malformed);
  CHECK_THAT(what, Catch::Contains("adapter 0 ('layers.0.q') is sharded but has rank 4 and initial rank 3; a "
                                   "sharded adapter's rank cannot change"));
  // A rank that changed while another adapter is sharded (what a fuzzer found: its configuration
  // read, and the allocator built from it refused the reshape).
  auto shapes = run_shapes;
  shapes[2].shard = {.out_count = 3};
  allocator_t<float> partly(shapes, adalora::cubic_schedule(run_schedule));
  auto changed = adalora::detail::ckpt::parse<float>(adalora::checkpoint_bytes(partly));
  changed.shapes[3].rank = changed.shapes[3].shard.triplet_count = 1;
  changed.initial_ranks[3] = 0;
  const bytes_t b = adalora::detail::ckpt::encode(changed);
  CHECK_THAT(load_refusal(partly, b).second,
             Catch::Contains("adapter 3 ('layers.1.v') has rank 1 and initial rank 0, but adapter 2 "
                             "('layers.1.q') is sharded; a sharded allocator's rank cannot change"));
  REQUIRE_THROWS_WITH(adalora::read_checkpoint_config_bytes<float>(b),
                      Catch::Contains("but adapter 2 ('layers.1.q') is sharded"));
  im.initial_ranks[0] = -1;
  CHECK_THAT(load_refusal(sharded, adalora::detail::ckpt::encode(im)).second,
             Catch::Contains("adapter 0 ('layers.0.q') has initial rank -1; it must be >= 0"));
}
