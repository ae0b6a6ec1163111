// Under mpirun: data-parallel and sharded allocators decide exactly as one process.
//
// Every rank first runs the single-process reference itself (one allocator over whole adapters,
// full-batch gradients), then the same problem in each multi-process mode, and compares at EVERY
// step of a full schedule (warm-up, reduction, final phase), for both final-phase semantics and
// in float and double, bit for bit: the step results (budget, k, threshold, kept counts), the
// triplet scores at each mask event, the kept masks, and the singular values E it holds.
//
//  * data-parallel: each rank sums the per-example gradients of its share of a batch of 7 (shares
//    of 3/4 or 3/2/2 examples), gradient_all_reducer sums them over ranks and divides by 7, and a
//    single_process allocator runs on every replica. Per-example gradients are small integers
//    times 2^-16, so every sum is exact in any order and the all-reduced gradient equals the
//    one-process gradient bit for bit: the test then checks that the allocator adds no drift.
//  * sharded: each rank gives an mpi_communicator allocator views of its slice (by triplets; by
//    256-blocks of A's columns and B's rows with E replicated and scored by rank 0 alone; by
//    whole adapters), also with each rank's allocator state saved and restored into a fresh
//    allocator mid-run (a per-rank checkpoint).
//
// Rank 0 prints PASS/FAIL per case and "N passed, N failed", and writes a JUnit report to
// $XML_OUTPUT_FILE under Bazel; the exit status is non-zero if any case failed on any rank.
//
//   mpirun -np 3 --oversubscribe bazel-bin/tests/mpi/mpi_allocator_test

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/integrations/mpi.hpp"
#include "adalora/rank_allocator.hpp"

namespace {

using adalora::index_t;

// Adapters of several sizes: 1 to 3 blocks of 256 along in/out, a tiny one (fewer triplets
// than ranks, one block), and one of rank 0.
const std::vector<adalora::adapter_shape> whole_shapes = {
    {"q", 600, 300, 5, {}},  {"up", 300, 700, 4, {}},  {"down", 700, 260, 3, {}},
    {"tiny", 20, 12, 2, {}}, {"empty", 40, 30, 0, {}},
};
constexpr std::int64_t b0 = 14;
constexpr std::int64_t steps = 22;  // total_step 20 plus two steps into the final phase's tail
constexpr index_t batch = 7;        // uneven shares on 2 and 3 ranks
const std::vector<std::int64_t> restart_after = {7, 16};  // reduction; final phase after PEFT's force mask

adalora::cubic_schedule schedule() {
  return adalora::cubic_schedule(
      {.initial_budget = b0, .target_budget = 6, .total_step = 20, .tinit = 3, .tfinal = 5, .delta_t = 2});
}

std::uint64_t mix(std::uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/// A small integer in [-lim, lim) from a key.
std::int64_t small_int(std::uint64_t key, std::int64_t lim) {
  return static_cast<std::int64_t>(mix(key) % static_cast<std::uint64_t>(2 * lim)) - lim;
}

/// Whole row-major tensors of every adapter, as each process of the test holds them.
template <class T>
struct model {
  struct tensors {
    std::vector<T> A, E, B, gA, gE, gB;
  };
  std::vector<tensors> t;

  model() {
    for (std::size_t a = 0; a < whole_shapes.size(); ++a) {
      const auto& s = whole_shapes[a];
      tensors x;
      x.A.resize(static_cast<std::size_t>(s.rank * s.in_features));
      x.E.resize(static_cast<std::size_t>(s.rank));
      x.B.resize(static_cast<std::size_t>(s.out_features * s.rank));
      for (std::size_t i = 0; i < x.A.size(); ++i) x.A[i] = T(small_int(a * 1000003 + i, 64)) / T(256);
      for (std::size_t i = 0; i < x.E.size(); ++i) x.E[i] = T(1 + i % 8) / T(16);
      for (std::size_t i = 0; i < x.B.size(); ++i) x.B[i] = T(small_int(a * 7000003 + i, 64)) / T(256);
      x.gA.assign(x.A.size(), T(0));
      x.gE.assign(x.E.size(), T(0));
      x.gB.assign(x.B.size(), T(0));
      t.push_back(std::move(x));
    }
  }

  adalora::svd_adapter_ref<T> params(std::size_t a) {
    const auto& s = whole_shapes[a];
    auto& x = t[a];
    return {adalora::make_matrix_view(x.A.data(), s.rank, s.in_features),
            adalora::vector_view<T>(x.E.data(), s.rank),
            adalora::make_matrix_view(x.B.data(), s.out_features, s.rank)};
  }
  adalora::svd_adapter_ref<T> grads(std::size_t a) {
    const auto& s = whole_shapes[a];
    auto& x = t[a];
    return {adalora::make_matrix_view(x.gA.data(), s.rank, s.in_features),
            adalora::vector_view<T>(x.gE.data(), s.rank),
            adalora::make_matrix_view(x.gB.data(), s.out_features, s.rank)};
  }

  /// Every parameter, concatenated (A, E, B per adapter).
  std::vector<T> flat_params() const {
    std::vector<T> out;
    for (const auto& x : t) {
      out.insert(out.end(), x.A.begin(), x.A.end());
      out.insert(out.end(), x.E.begin(), x.E.end());
      out.insert(out.end(), x.B.begin(), x.B.end());
    }
    return out;
  }
};

/// The SUM of the gradients of examples [first, first + count) at step t. One example's
/// gradient of an element is an integer in [-512, 512) times 2^-16, weighted by 1 + (its
/// triplet mod 3) so that some triplets matter more: every partial sum is an integer times
/// 2^-16 below 2^24 · 2^-16, exact in float, in any order.
template <class T>
void sum_example_grads(model<T>& m, std::int64_t t, index_t first, index_t count) {
  for (std::size_t a = 0; a < whole_shapes.size(); ++a) {
    const auto& s = whole_shapes[a];
    auto& x = m.t[a];
    auto fill = [&](std::vector<T>& g, int tensor, auto triplet_of) {
      for (std::size_t i = 0; i < g.size(); ++i) {
        // One hash per element and step; one multiply per example (the test must stay fast in
        // an unoptimised build).
        const std::uint64_t h =
            mix(((static_cast<std::uint64_t>(t) * 8 + a) * 4 + static_cast<std::uint64_t>(tensor)) << 32 | i);
        std::int64_t sum = 0;
        for (index_t e = first; e < first + count; ++e)
          sum += static_cast<std::int64_t>(
                     ((h + static_cast<std::uint64_t>(e) * 0x9e3779b97f4a7c15ULL) * 0xd1342543de82ef95ULL) >>
                     54) -
                 512;
        g[i] = T(sum * (1 + triplet_of(i) % 3)) / T(65536);
      }
    };
    fill(x.gA, 0, [&](std::size_t i) { return static_cast<index_t>(i) / s.in_features; });
    fill(x.gE, 1, [](std::size_t i) { return static_cast<index_t>(i); });
    fill(x.gB, 2, [&](std::size_t i) { return static_cast<index_t>(i) % s.rank; });
  }
}

template <class T>
void divide_grads(model<T>& m, T d) {
  for (auto& x : m.t)
    for (auto* g : {&x.gA, &x.gE, &x.gB})
      for (T& v : *g) v /= d;
}

template <class T>
void sgd(model<T>& m) {
  const T lr = T(0.25);
  for (auto& x : m.t) {
    for (std::size_t i = 0; i < x.A.size(); ++i) x.A[i] -= lr * x.gA[i];
    for (std::size_t i = 0; i < x.E.size(); ++i) x.E[i] -= lr * x.gE[i];
    for (std::size_t i = 0; i < x.B.size(); ++i) x.B[i] -= lr * x.gB[i];
  }
}

enum class mode { single, data_parallel, sharded };

struct run_config {
  mode how = mode::single;
  adalora::shard_layout layout = adalora::shard_layout::replicated;
  unsigned threads = 1;
  bool restart = false;  // save and restore each rank's allocator state after the restart_after steps
  adalora::final_phase_rule final_phase = adalora::final_phase_rule::peft;
};

/// What a run decided and did.
template <class T>
struct outcome {
  std::vector<std::uint64_t> decisions;      // per step: result fields, masks, scores
  std::vector<std::vector<T>> e_history;     // per step: every adapter's whole E, concatenated
  std::vector<T> final_params;               // whole model after the last step
  std::vector<adalora::adapter_shape> mine;  // the shards this rank held
};

std::uint64_t bits(double x) { return std::bit_cast<std::uint64_t>(x); }

template <class T, class Comm>
void record(
    outcome<T>& out,
    const adalora::rank_allocator<T, adalora::smoothed_sensitivity, adalora::cubic_schedule, Comm>& alloc,
    const adalora::step_result<T>& r, const model<T>& m) {
  auto& d = out.decisions;
  for (std::int64_t v : {r.step, r.budget, std::int64_t(r.mask_due), std::int64_t(r.importance_updated),
                         std::int64_t(r.forced), std::int64_t(r.action), std::int64_t(r.skipped), r.prune_count,
                         std::int64_t(r.kept_total)})
    d.push_back(static_cast<std::uint64_t>(v));
  d.push_back(bits(r.threshold));
  for (index_t k : r.kept) d.push_back(static_cast<std::uint64_t>(k));
  for (std::size_t a = 0; a < alloc.num_adapters(); ++a)
    for (std::uint8_t k : alloc.kept_mask(a)) d.push_back(k);
  if (r.action == adalora::mask_action::threshold)
    for (double s : alloc.triplet_scores()) d.push_back(bits(s));
  std::vector<T> e;
  for (const auto& x : m.t) e.insert(e.end(), x.E.begin(), x.E.end());
  out.e_history.push_back(std::move(e));
}

template <class T, class Comm>
outcome<T> run_with(const run_config& c, const adalora::mpi_communicator& world, Comm comm) {
  using alloc_t = adalora::rank_allocator<T, adalora::smoothed_sensitivity, adalora::cubic_schedule, Comm>;
  const int P = world.size(), p = world.rank();
  outcome<T> out;
  out.mine = c.how == mode::sharded ? adalora::shard_shapes(whole_shapes, c.layout, world) : whole_shapes;
  const adalora::allocator_options options{.final_phase = c.final_phase, .threads = c.threads};
  std::optional<alloc_t> alloc;
  alloc.emplace(out.mine, schedule(), adalora::smoothed_sensitivity{}, options, comm);

  model<T> m;
  std::vector<adalora::adapter_tensors<T>> views;
  std::vector<adalora::svd_adapter_ref<T>> grads;
  for (std::size_t a = 0; a < whole_shapes.size(); ++a) {
    const auto h = out.mine[a].shard;
    views.push_back({adalora::shard_view(m.params(a), h), adalora::shard_view(m.grads(a), h)});
    grads.push_back(m.grads(a));
  }
  adalora::gradient_all_reducer<T> reduce(world);

  for (std::int64_t t = 0; t < steps; ++t) {
    if (c.how == mode::data_parallel) {
      const adalora::index_slice share = adalora::even_slice(batch, p, P);
      sum_example_grads(m, t, share.begin, share.count);
      reduce(grads, double(batch));  // sum over ranks, / 7
    } else {
      sum_example_grads(m, t, 0, batch);
      divide_grads(m, T(batch));
    }
    sgd(m);
    record(out, *alloc, alloc->step(t, views), m);
    if (c.restart && std::find(restart_after.begin(), restart_after.end(), t) != restart_after.end()) {
      // Each rank keeps its own slice: the resumable state, copied out as a checkpoint would
      // hold it; a fresh allocator over the same shards restores it and carries on.
      // (adalora/io/checkpoint.hpp format 1 stores whole shapes, not shards, so it cannot load a
      // shard's state yet; see docs/scale_out.md.)
      const auto st = alloc->resumable();
      const std::vector<T> state(st.metric_state.begin(), st.metric_state.end());
      const std::vector<std::uint8_t> kept(st.kept.begin(), st.kept.end());
      const std::vector<double> scores(st.scores.begin(), st.scores.end());
      const adalora::step_result<T> last = *st.last;
      const std::int64_t last_step = st.last_step;
      const bool force_masked = st.force_masked;
      alloc.reset();
      alloc.emplace(out.mine, schedule(), adalora::smoothed_sensitivity{}, options, comm);
      alloc->restore({last_step, force_masked, state, kept, scores, &last});
    }
  }
  out.final_params = m.flat_params();
  return out;
}

template <class T>
outcome<T> run(const run_config& c, const adalora::mpi_communicator& world) {
  if (c.how == mode::sharded) return run_with<T>(c, world, world);
  return run_with<T>(c, world, adalora::single_process{});
}

template <class T>
bool same_bits(const std::vector<T>& x, const std::vector<T>& y) {
  return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(T)) == 0);
}

/// Compares a run with the reference; returns "" or what differs.
template <class T>
std::string compare(const outcome<T>& got, const outcome<T>& ref, mode how) {
  if (got.decisions != ref.decisions) {
    std::size_t i = 0;
    while (i < got.decisions.size() && i < ref.decisions.size() && got.decisions[i] == ref.decisions[i]) ++i;
    return "decisions differ at entry " + std::to_string(i) + " of " + std::to_string(ref.decisions.size());
  }
  if (got.e_history.size() != ref.e_history.size()) return "step counts differ";
  for (std::size_t t = 0; t < ref.e_history.size(); ++t) {
    // A data-parallel replica holds every E; a shard only the entries of its triplets.
    std::size_t offset = 0;
    for (std::size_t a = 0; a < whole_shapes.size(); ++a) {
      const auto& h = got.mine[a].shard;
      for (index_t i = h.triplet_begin; i < h.triplet_begin + h.triplet_count; ++i) {
        const T x = got.e_history[t][offset + static_cast<std::size_t>(i)];
        const T y = ref.e_history[t][offset + static_cast<std::size_t>(i)];
        if (std::memcmp(&x, &y, sizeof(T)) != 0)
          return "E of adapter " + std::to_string(a) + " triplet " + std::to_string(i) + " differs at step " +
                 std::to_string(t);
      }
      offset += static_cast<std::size_t>(whole_shapes[a].rank);
    }
  }
  if (how == mode::data_parallel && !same_bits(got.final_params, ref.final_params))
    return "the replica's parameters differ from one process's after the last step";
  return "";
}

/// PASS/FAIL bookkeeping agreed over all ranks.
struct report {
  const adalora::mpi_communicator& world;
  std::vector<std::pair<std::string, std::string>> cases;  // name, failure ("" = passed)
  int passed = 0, failed = 0;

  void check(const std::string& name, const std::string& local_failure) {
    if (!local_failure.empty())
      std::fprintf(stderr, "rank %d: %s: %s\n", world.rank(), name.c_str(), local_failure.c_str());
    int bad = local_failure.empty() ? 0 : 1;
    MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_SUM, world.comm());
    const std::string failure = bad == 0 ? ""
                                         : std::to_string(bad) + " rank(s) failed" +
                                               (local_failure.empty() ? "" : ": " + local_failure);
    (bad == 0 ? passed : failed) += 1;
    cases.emplace_back(name, failure);
    if (world.rank() == 0) {
      std::printf("%s  %s%s\n", bad == 0 ? "PASS" : "FAIL", name.c_str(),
                  bad == 0 ? "" : (" (" + failure + ")").c_str());
      std::fflush(stdout);
    }
  }

  static std::string xml_escaped(const std::string& text) {
    std::string out;
    for (char ch : text) {
      switch (ch) {
        case '&':
          out += "&amp;";
          break;
        case '<':
          out += "&lt;";
          break;
        case '>':
          out += "&gt;";
          break;
        case '"':
          out += "&quot;";
          break;
        default:
          out += ch;
      }
    }
    return out;
  }

  void write_junit() const {
    const char* xml = std::getenv("XML_OUTPUT_FILE");
    if (world.rank() != 0 || xml == nullptr || *xml == '\0') return;
    std::ofstream f(xml);
    f << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n<testsuite name=\"mpi_allocator_test (np "
      << world.size() << ")\" tests=\"" << cases.size() << "\" failures=\"" << failed << "\" errors=\"0\">\n";
    for (const auto& [name, failure] : cases) {
      f << "  <testcase classname=\"mpi\" name=\"" << xml_escaped(name) << "\"";
      if (failure.empty())
        f << "/>\n";
      else
        f << "><failure message=\"" << xml_escaped(failure) << "\"/></testcase>\n";
    }
    f << "</testsuite>\n</testsuites>\n";
  }
};

const char* name_of(adalora::shard_layout l) {
  switch (l) {
    case adalora::shard_layout::triplets:
      return "by triplets";
    case adalora::shard_layout::blocks:
      return "by 256-blocks of in/out, E replicated and scored once";
    case adalora::shard_layout::adapters:
      return "by adapter";
    default:
      return "replicated";
  }
}

template <class T>
void allocator_cases(report& rep, const adalora::mpi_communicator& world) {
  const char* type = sizeof(T) == 4 ? "f32" : "f64";
  for (auto semantics : {adalora::final_phase_rule::peft, adalora::final_phase_rule::loralib}) {
    const std::string suffix =
        std::string(", ") + type +
        (semantics == adalora::final_phase_rule::peft ? ", PEFT final phase" : ", loralib final phase");
    const outcome<T> ref = run<T>({.final_phase = semantics}, world);
    std::vector<std::pair<std::string, run_config>> configs = {
        {"data-parallel", {.how = mode::data_parallel, .final_phase = semantics}},
        {"data-parallel, 2 allocator threads",
         {.how = mode::data_parallel, .threads = 2, .final_phase = semantics}},
    };
    for (auto layout :
         {adalora::shard_layout::triplets, adalora::shard_layout::blocks, adalora::shard_layout::adapters}) {
      // Threads on one layout: results must not depend on them either.
      const unsigned threads = layout == adalora::shard_layout::triplets ? 2 : 1;
      configs.push_back(
          {std::string("sharded ") + name_of(layout) + (threads > 1 ? ", 2 allocator threads" : ""),
           {.how = mode::sharded, .layout = layout, .threads = threads, .final_phase = semantics}});
      configs.push_back({std::string("sharded ") + name_of(layout) +
                             ", each rank's state saved and restored in a new allocator at steps 7 and 16",
                         {.how = mode::sharded, .layout = layout, .restart = true, .final_phase = semantics}});
    }
    for (const auto& [name, config] : configs) {
      const outcome<T> got = run<T>(config, world);
      std::string failure = compare(got, ref, config.how);
      // The decisions must also agree across ranks (implied by the above; checks the helper).
      const bool agree = adalora::same_on_all_ranks(world, std::span<const std::uint64_t>(got.decisions));
      if (failure.empty() && !agree) failure = "ranks disagree";
      rep.check(name + suffix, failure);
    }
  }
}

void unit_cases(report& rep, const adalora::mpi_communicator& world) {
  const int P = world.size(), p = world.rank();
  {  // all_reduce_sum, whole and in chunks smaller than the buffer
    std::vector<double> v(10), w(10);
    for (int i = 0; i < 10; ++i) v[i] = w[i] = (p + 1) * (i + 0.5);
    world.all_reduce_sum(v);
    adalora::detail::mpi::all_reduce_sum(world.comm(), std::span<double>(w), "test", 3);
    std::string failure;
    for (int i = 0; i < 10; ++i)
      if (v[i] != P * (P + 1) / 2 * (i + 0.5) || w[i] != v[i]) failure = "wrong sum at " + std::to_string(i);
    rep.check("mpi_communicator::all_reduce_sum sums over ranks (whole and in chunks)", failure);
  }
  {  // errors carry MPI's error string
    std::string failure = "no exception";
    try {
      adalora::detail::mpi::check(MPI_ERR_COMM, "mpi_communicator::all_reduce_sum", "MPI_Allreduce");
    } catch (const adalora::mpi_error& e) {
      const std::string what = e.what();
      failure = e.code() == MPI_ERR_COMM && what.find("MPI_Allreduce failed") != std::string::npos &&
                        what.find("communicator") != std::string::npos
                    ? ""
                    : "unexpected message: " + what;
    }
    try {
      adalora::mpi_communicator bad(MPI_COMM_NULL);
      failure += "; MPI_COMM_NULL accepted";
    } catch (const std::invalid_argument&) {
    }
    rep.check("MPI errors throw adalora::mpi_error with MPI's message; MPI_COMM_NULL is refused", failure);
  }
  {  // shard layouts hold every element exactly once, aligned to sum_block
    std::string failure;
    for (auto layout :
         {adalora::shard_layout::triplets, adalora::shard_layout::blocks, adalora::shard_layout::adapters})
      for (int parts = 1; parts <= 5; ++parts)
        for (std::size_t a = 0; a < whole_shapes.size(); ++a) {
          const auto& s = whole_shapes[a];
          // How many parts hold each element of A (r x in) and B (out x r), and score each E.
          std::vector<int> a_hits(static_cast<std::size_t>(s.rank * s.in_features)),
              b_hits(static_cast<std::size_t>(s.out_features * s.rank)),
              e_scores(static_cast<std::size_t>(s.rank));
          for (int q = 0; q < parts; ++q) {
            const auto h = adalora::shard_shapes(whole_shapes, layout, q, parts)[a].shard;
            if (h.in_begin % 256 || h.out_begin % 256 || h.triplet_count < 0 || h.in_count < 0 ||
                h.out_count < 0)
              failure = std::string(name_of(layout)) + ": unaligned or unresolved shard";
            for (index_t i = h.triplet_begin; i < h.triplet_begin + h.triplet_count; ++i) {
              for (index_t j = h.in_begin; j < h.in_begin + h.in_count; ++j)
                ++a_hits[static_cast<std::size_t>(i * s.in_features + j)];
              for (index_t j = h.out_begin; j < h.out_begin + h.out_count; ++j)
                ++b_hits[static_cast<std::size_t>(j * s.rank + i)];
              e_scores[static_cast<std::size_t>(i)] += h.scores_e ? 1 : 0;
            }
          }
          for (auto* hits : {&a_hits, &b_hits, &e_scores})
            for (int h : *hits)
              if (h != 1)
                failure = std::string(name_of(layout)) + ": an element held or scored " + std::to_string(h) +
                          " times";
        }
    rep.check("shard_shapes: every element held once, E scored once, slices start on 256-blocks", failure);
  }
  {  // gradient_all_reducer on strided views leaves the gaps alone
    // B column-major inside a padded buffer; A is a block of a wider matrix.
    std::vector<float> a(3 * 10, -1.0f), e(4, 0.0f), b(2 * 8, -1.0f);
    auto A = adalora::make_matrix_view(a.data(), 3, 10).block(0, 2, 3, 5);
    adalora::matrix_view<float> B(b.data(), 5, 3, 1, 5);  // 5 x 3, column-major, stride 5
    adalora::svd_adapter_ref<float> g{A, adalora::vector_view<float>(e.data(), 3), B};
    for (index_t i = 0; i < 3; ++i)
      for (index_t j = 0; j < 5; ++j) A(i, j) = B(j, i) = float(p + 1);
    for (index_t i = 0; i < 3; ++i) e[static_cast<std::size_t>(i)] = float(2 * (p + 1));
    adalora::gradient_all_reducer<float> reduce(world);
    reduce(std::vector<adalora::svd_adapter_ref<float>>{g});  // mean over ranks
    const float mean = float(P * (P + 1) / 2) / float(P);
    std::string failure;
    for (index_t i = 0; i < 3; ++i)
      for (index_t j = 0; j < 10; ++j) {
        const float want = (j >= 2 && j < 7) ? mean : -1.0f;
        if (a[static_cast<std::size_t>(i * 10 + j)] != want) failure = "A wrong or its gap touched";
      }
    for (index_t i = 0; i < 3; ++i)
      for (index_t j = 0; j < 5; ++j)
        if (B(j, i) != mean) failure = "B wrong";
    if (b[15] != -1.0f || e[0] != 2 * mean || e[3] != 0.0f) failure = "B's gap or E wrong";
    // The flat-buffer and one-shot forms: sum / divisor.
    std::vector<double> flat = {double(p), 1.0};
    adalora::all_reduce_gradients(world, std::span<double>(flat), 2.0);
    if (flat[0] != double(P * (P - 1) / 2) / 2.0 || flat[1] != double(P) / 2.0) failure = "flat buffer wrong";
    adalora::all_reduce_gradients(world, std::vector<adalora::svd_adapter_ref<float>>{g}, 1.0);
    if (e[0] != float(P) * 2 * mean) failure = "one-shot form wrong";
    rep.check("gradient_all_reducer and all_reduce_gradients average strided views in place, gaps untouched",
              failure);
  }
  {  // same_on_all_ranks
    const std::vector<int> same = {1, 2, 3}, differs = {1, 2, p};
    const bool ok1 = adalora::same_on_all_ranks(world, std::span<const int>(same));
    const bool ok2 = adalora::same_on_all_ranks(world, std::span<const int>(differs));
    rep.check("same_on_all_ranks tells identical from differing data",
              ok1 && ok2 == (P == 1) ? "" : "wrong answer");
  }
}

}  // namespace

int main(int argc, char** argv) {
  adalora::mpi_environment env(argc, argv);
  // The test's own communicator, returning errors rather than aborting (see mpi.hpp).
  MPI_Comm comm = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  int status = 0;
  {
    const adalora::mpi_communicator world(comm);
    report rep{world, {}};
    if (world.rank() == 0) std::printf("mpi_allocator_test on %d ranks\n", world.size());
    try {
      unit_cases(rep, world);
      allocator_cases<float>(rep, world);
      allocator_cases<double>(rep, world);
    } catch (const std::exception& e) {
      // The other ranks may be waiting in a collective: abort them all.
      std::fprintf(stderr, "rank %d: unexpected exception: %s\n", world.rank(), e.what());
      MPI_Abort(MPI_COMM_WORLD, 2);
    }
    rep.write_junit();
    if (world.rank() == 0) std::printf("%d passed, %d failed\n", rep.passed, rep.failed);
    status = rep.failed == 0 ? 0 : 1;
  }
  MPI_Comm_free(&comm);
  return status;
}
