#pragma once
// A conformance kit for importance metrics: call it from your own unit test to check that a
// metric meets the requirements of the ImportanceMetric concept (importance/metric.hpp) in
// behaviour, not only in signatures.
//
//     auto report = adalora::testing::check_metric_conformance<float>(my_metric{});
//     INFO(report);            // Catch2; or std::cerr << report with any framework
//     REQUIRE(report.ok());
//
// The kit drives the metric on deterministic pseudo-random inputs: the elements of A, E and B of
// a few adapters of different shapes, with zeros, tiny and large magnitudes, over several steps,
// both directly and through a real rank_allocator. It checks (names in `checks::`):
//   output_size         the allocator sees one score per element: b0 triplet scores, r per
//                       adapter, state_size values per element, and its triplet scores equal the
//                       kit's own combination of the metric's per-element scores;
//   finite_nonnegative  every value update() and score() return is finite and >= 0;
//   determinism         two runs on copies of the metric, with the same inputs and zeroed state,
//                       give bit-identical scores and states;
//   inputs_untouched    update() writes only its own element's state_size values, score() writes
//                       nothing, and neither changes the metric object (checked bytewise when the
//                       metric is trivially copyable);
//   state_independence  an element's scores do not depend on which other elements were updated
//                       before it, or in what order (each element run alone = all run together);
//   reset               zeroing the state and replaying the inputs, on the same metric object,
//                       gives the first run's scores again (all state lives in the state span,
//                       so the allocator's reset_state() really resets);
//   score_consistency   score(role, p, state) equals what update() just returned for that p;
//                       and a metric with the block hook (update_block) gets from it, bit for
//                       bit, the scores and states update() gives element by element (and, if
//                       it declares update_block_keeps_non_finite_state, keeps the state of the
//                       NaN/infinite elements it is given);
//   no_allocation       update(), score() and rank_allocator::step() with this metric, in every
//                       phase and both final-phase semantics, make no heap allocation. Needs
//                       ADALORA_TESTING_COUNT_ALLOCATIONS() in the test binary, else "skipped".
// A check that cannot mean anything after another failed is "skipped" with the reason (e.g.
// state_independence when the metric is not deterministic), so that each defect shows up as
// exactly one failed check.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <iomanip>
#include <limits>
#include <optional>
#include <ostream>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/config.hpp"
#include "adalora/importance/metric.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/rank_allocator.hpp"
#include "adalora/svd_adapter_ref.hpp"
#include "adalora/testing/allocation_counter.hpp"
#include "adalora/testing/check_report.hpp"

namespace adalora::testing {

namespace detail {
using ::adalora::detail::concat;
}  // namespace detail

/// The names of the kit's checks, in the order they appear in a report.
namespace checks {
inline constexpr std::string_view output_size = "output_size";
inline constexpr std::string_view finite_nonnegative = "finite_nonnegative";
inline constexpr std::string_view determinism = "determinism";
inline constexpr std::string_view inputs_untouched = "inputs_untouched";
inline constexpr std::string_view state_independence = "state_independence";
inline constexpr std::string_view reset = "reset";
inline constexpr std::string_view score_consistency = "score_consistency";
inline constexpr std::string_view no_allocation = "no_allocation";
}  // namespace checks

/// What check_metric_conformance found: one entry per check, in a fixed order.
struct conformance_report : check_report {
  std::string element_type;  ///< "float" or "double"

  /// One line per check, then a verdict: what a test prints on failure. (Skipped checks do not
  /// fail a report: see conformance_options::require_allocation_check to make an unwired
  /// counter fail.)
  std::string summary() const { return summary_of("importance metric conformance", element_type); }
  friend std::ostream& operator<<(std::ostream& os, const conformance_report& r) {
    return os << r.summary();
  }
};

/// Options of check_metric_conformance. The defaults suit metrics whose scores are finite for
/// parameters and gradients up to `large` in magnitude.
struct conformance_options {
  std::uint64_t seed = 0x5eed'ada1'07a0ULL;  ///< seeds every input; same seed, same inputs
  std::int64_t steps = 12;                   ///< update passes over every element, >= 2
  double tiny = 1e-15;                       ///< magnitude of the "tiny" inputs
  double large = 1e4;                        ///< magnitude of the "large" inputs
  /// Relative tolerance of score() against update()'s return (0: bit-identical, as the allocator
  /// mixes both in one ranking: update()'s values while importance is updated, score()'s in the
  /// final phase).
  double score_tolerance = 0.0;
  /// Make an unwired allocation counter a failure instead of "skipped".
  bool require_allocation_check = false;
  /// The adapters whose elements the kit scores: (name, in, out, rank); their ranks must sum to
  /// at least 1. The defaults cover in = 1, out = 1 and rank 1.
  std::vector<adapter_shape> shapes = {
      {"wide", 5, 3, 3}, {"column", 1, 6, 4}, {"row", 7, 1, 2}, {"square", 4, 4, 1}};
};

namespace detail {

/// The kinds of input an element gets; each role of the default shapes gets every kind.
enum class input_kind : std::uint8_t {
  zero,                   // param = grad = 0 (a dead element)
  zero_grad,              // a parameter that receives no gradient
  zero_param,             // a parameter at exactly zero (E at initialisation, a masked E)
  tiny,                   // both ~ tiny
  normal,                 // both ~ 1
  large,                  // both ~ large
  large_param_tiny_grad,  // mixed magnitudes
  tiny_param_large_grad,
};
inline constexpr int input_kind_count = 8;

inline const char* to_string(input_kind k) noexcept {
  constexpr const char* names[] = {"zero",
                                   "zero_grad",
                                   "zero_param",
                                   "tiny",
                                   "normal",
                                   "large",
                                   "large_param_tiny_grad",
                                   "tiny_param_large_grad"};
  return names[static_cast<int>(k)];
}

/// SplitMix64's finaliser (Steele, Lea, Flood 2014): a stateless, platform-independent hash, so
/// that inputs are the same on every standard library (std:: distributions are not).
constexpr std::uint64_t splitmix64(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
/// Uniform in [-1, 1), from a key of three integers.
constexpr double signed_unit(std::uint64_t seed, std::uint64_t a, std::uint64_t b,
                             std::uint64_t c) noexcept {
  const std::uint64_t h = splitmix64(splitmix64(splitmix64(seed ^ a) ^ b) ^ c);
  return static_cast<double>(h >> 11) * 0x1.0p-52 - 1.0;
}

/// Bit-identical, or both NaN (NaN payloads may legally differ between two computations).
template <class T>
bool same_value(T a, T b) noexcept {
  return std::memcmp(&a, &b, sizeof(T)) == 0 || (std::isnan(a) && std::isnan(b));
}

template <class T>
std::string num(T v) {
  std::ostringstream os;
  os << std::setprecision(std::numeric_limits<T>::max_digits10) << v;
  return os.str();
}

inline const char* role_name(tensor_role r) noexcept {
  return r == tensor_role::A ? "A" : r == tensor_role::E ? "E" : "B";
}

/// One element the kit scores, in the allocator's order: per adapter, A row-major, E, B row-major.
struct kit_element {
  std::size_t adapter;
  tensor_role role;
  index_t row, col;  // E(i) is row i, col 0
  input_kind kind;
};

/// The elements, their inputs at each step, and their state in an arena with guard cells
/// between elements, so that a write past an element's state_size values is seen.
template <class T, class M>
class conformance_harness {
 public:
  static constexpr std::size_t K = M::state_size;
  static constexpr std::size_t guard = 2;

  explicit conformance_harness(const conformance_options& o) : opts_(o) {
    std::size_t counter[3] = {0, 0, 0};
    auto add = [&](std::size_t a, tensor_role role, index_t i, index_t j) {
      const auto ri = static_cast<std::size_t>(role);
      // Each role cycles through the kinds on its own (offset per role), so every role sees
      // every kind once it has 8 elements.
      const auto kind = static_cast<input_kind>((counter[ri]++ + 3 * ri) % input_kind_count);
      elements_.push_back({a, role, i, j, kind});
    };
    for (std::size_t a = 0; a < o.shapes.size(); ++a) {
      const adapter_shape& s = o.shapes[a];
      for (index_t i = 0; i < s.rank; ++i)
        for (index_t j = 0; j < s.in_features; ++j) add(a, tensor_role::A, i, j);
      for (index_t i = 0; i < s.rank; ++i) add(a, tensor_role::E, i, 0);
      for (index_t j = 0; j < s.out_features; ++j)
        for (index_t i = 0; i < s.rank; ++i) add(a, tensor_role::B, j, i);
    }
    arena_.assign(guard + elements_.size() * (K + guard), guard_value());
    zero_states();
  }

  std::size_t size() const noexcept { return elements_.size(); }
  const kit_element& element(std::size_t e) const noexcept { return elements_[e]; }

  /// The (param, grad) of element e at step t: a pure function of the seed, t and e.
  std::pair<T, T> input(std::int64_t t, std::size_t e) const noexcept {
    const auto step = static_cast<std::uint64_t>(t);
    const double u = signed_unit(opts_.seed, step, e, 1);
    const double v = signed_unit(opts_.seed, step, e, 2);
    double p = 0, g = 0;
    switch (elements_[e].kind) {
      case input_kind::zero:
        break;
      case input_kind::zero_grad:
        p = 2 * u;
        break;
      case input_kind::zero_param:
        g = 2 * v;
        break;
      case input_kind::tiny:
        p = opts_.tiny * u;
        g = opts_.tiny * v;
        break;
      case input_kind::normal:
        p = 2 * u;
        g = 2 * v;
        break;
      case input_kind::large:
        p = opts_.large * u;
        g = opts_.large * v;
        break;
      case input_kind::large_param_tiny_grad:
        p = opts_.large * u;
        g = opts_.tiny * v;
        break;
      case input_kind::tiny_param_large_grad:
        p = opts_.tiny * u;
        g = opts_.large * v;
        break;
    }
    return {static_cast<T>(p), static_cast<T>(g)};
  }

  std::span<T, K> state(std::size_t e) noexcept {
    return std::span<T, K>(arena_.data() + guard + e * (K + guard), K);
  }
  std::span<const T, K> cstate(std::size_t e) const noexcept {
    return std::span<const T, K>(arena_.data() + guard + e * (K + guard), K);
  }
  const std::vector<T>& arena() const noexcept { return arena_; }
  std::vector<T>& arena() noexcept { return arena_; }
  bool is_guard(std::size_t cell) const noexcept {
    return cell < guard || (cell - guard) % (K + guard) >= K;
  }
  /// The element that owns arena cell `cell`, or the element just before a guard cell.
  std::size_t owner(std::size_t cell) const noexcept {
    return cell < guard ? 0 : (cell - guard) / (K + guard);
  }
  void zero_states() noexcept {
    for (std::size_t e = 0; e < elements_.size(); ++e)
      std::fill(state(e).begin(), state(e).end(), T(0));
  }

  /// A guard value no metric computes by accident; compared bitwise.
  static T guard_value() noexcept { return static_cast<T>(-987654.3125); }

  std::string describe(std::size_t e) const {
    const kit_element& el = elements_[e];
    const adapter_shape& s = opts_.shapes[el.adapter];
    std::string where = el.role == tensor_role::E
                            ? detail::concat("E(", el.row, ")")
                            : detail::concat(role_name(el.role), "(", el.row, ", ", el.col, ")");
    return detail::concat(where, " of adapter ", el.adapter, " '", s.name, "' (in ", s.in_features,
                          ", out ", s.out_features, ", r ", s.rank, "), ", to_string(el.kind),
                          " inputs");
  }
  std::string describe(std::size_t e, std::int64_t t) const {
    const auto [p, g] = input(t, e);
    return detail::concat(describe(e), ", step ", t, ", param ", num(p), ", grad ", num(g));
  }

  const conformance_options& options() const noexcept { return opts_; }

 private:
  const conformance_options& opts_;
  std::vector<kit_element> elements_;
  std::vector<T> arena_;
};

template <class M>
void begin_step_if_any(M& m, std::int64_t t) {
  if constexpr (adalora::detail::has_begin_step<M>) m.begin_step(t);
}

/// The scores of one run: per step and element, update()'s and score()'s returns, and the final
/// arena.
template <class T>
struct run_record {
  std::vector<T> updated, scored, arena;
};

/// What a watched run saw, first occurrence only (empty when nothing).
struct run_watch {
  std::string out_of_state;    // a write outside the element's own state values
  std::string object_changed;  // a change of the metric object by update() or score()
};

/// Runs `steps` passes over the elements listed in `order` on metric `m`, starting from the
/// harness's current state; per element update() then score() with the same param. With a
/// `watch`, every call is followed by a comparison of the whole arena and of the metric object's
/// bytes (trivially copyable metrics) with their values before the call.
template <class T, class M>
run_record<T> run_pass(conformance_harness<T, M>& h, M& m, std::span<const std::size_t> order,
                       std::int64_t steps, run_watch* watch = nullptr) {
  using harness = conformance_harness<T, M>;
  const std::size_t n = h.size();
  run_record<T> rec;
  rec.updated.assign(static_cast<std::size_t>(steps) * n, std::numeric_limits<T>::quiet_NaN());
  rec.scored = rec.updated;
  std::vector<T> before;
  alignas(M) unsigned char object_before[sizeof(M)] = {};
  // Compares the arena with `before`, except the cells of element `own` (none if own == n).
  auto check_arena = [&](std::size_t own, std::size_t e, std::int64_t t, const char* fn) {
    if (!watch->out_of_state.empty()) return;
    const std::vector<T>& now = h.arena();
    for (std::size_t c = 0; c < now.size(); ++c) {
      if (!h.is_guard(c) && h.owner(c) == own) continue;
      if (std::memcmp(&now[c], &before[c], sizeof(T)) == 0) continue;
      const std::string what =
          !h.is_guard(c)
              ? concat("state value ", (c - harness::guard) % (harness::K + harness::guard),
                       " of another element, ", h.describe(h.owner(c)))
          : c < harness::guard
              ? std::string("the guard cell before the first element's state")
              : concat("the guard cell after the state of ", h.describe(h.owner(c)));
      watch->out_of_state = concat(fn, " on ", h.describe(e, t), " wrote ", num(now[c]), " over ",
                                   num(before[c]), " in ", what);
      return;
    }
  };
  auto check_object = [&](std::size_t e, std::int64_t t, const char* fn) {
    if constexpr (std::is_trivially_copyable_v<M>) {
      if (watch->object_changed.empty() &&
          std::memcmp(object_before, static_cast<const void*>(std::addressof(m)), sizeof(M)) != 0)
        watch->object_changed =
            concat(fn, " on ", h.describe(e, t),
                   " changed the metric object itself (a mutable member?): the allocator calls one "
                   "metric object for every element, so such state is shared by all elements");
    }
  };
  auto snapshot = [&] {
    before = h.arena();
    if constexpr (std::is_trivially_copyable_v<M>)
      std::memcpy(object_before, static_cast<const void*>(std::addressof(m)), sizeof(M));
  };
  for (std::int64_t t = 0; t < steps; ++t) {
    begin_step_if_any(m, t);
    for (std::size_t e : order) {
      const kit_element& el = h.element(e);
      const auto [p, g] = h.input(t, e);
      if (watch != nullptr) snapshot();
      const T u = m.update(el.role, p, g, h.state(e));
      if (watch != nullptr) {
        check_arena(e, e, t, "update()");
        check_object(e, t, "update()");
        snapshot();
      }
      const T s = m.score(el.role, p, h.cstate(e));
      if (watch != nullptr) {
        check_arena(n, e, t, "score()");
        check_object(e, t, "score()");
      }
      rec.updated[static_cast<std::size_t>(t) * n + e] = u;
      rec.scored[static_cast<std::size_t>(t) * n + e] = s;
    }
  }
  rec.arena = h.arena();
  return rec;
}

/// The first (step, element) where two runs' returns differ, restricted to `elements` (all when
/// empty), as a message.
template <class T, class M>
std::optional<std::string> first_difference(const conformance_harness<T, M>& h,
                                            const run_record<T>& want, const run_record<T>& got,
                                            std::int64_t steps, const char* want_name,
                                            const char* got_name,
                                            std::span<const std::size_t> elements = {}) {
  const std::size_t n = h.size();
  auto check_one = [&](std::int64_t t, std::size_t e) -> std::optional<std::string> {
    const std::size_t i = static_cast<std::size_t>(t) * n + e;
    if (!same_value(want.updated[i], got.updated[i]))
      return concat("update() on ", h.describe(e, t), " returned ", num(got.updated[i]), " in ",
                    got_name, " but ", num(want.updated[i]), " in ", want_name);
    if (!same_value(want.scored[i], got.scored[i]))
      return concat("score() on ", h.describe(e, t), " returned ", num(got.scored[i]), " in ",
                    got_name, " but ", num(want.scored[i]), " in ", want_name);
    return std::nullopt;
  };
  for (std::int64_t t = 0; t < steps; ++t) {
    if (elements.empty()) {
      for (std::size_t e = 0; e < n; ++e)
        if (auto d = check_one(t, e)) return d;
    } else {
      for (std::size_t e : elements)
        if (auto d = check_one(t, e)) return d;
    }
  }
  return std::nullopt;
}

/// The first state value (guards excluded) where two arenas differ, as a message.
template <class T, class M>
std::optional<std::string> first_state_difference(const conformance_harness<T, M>& h,
                                                  const std::vector<T>& want,
                                                  const std::vector<T>& got, const char* want_name,
                                                  const char* got_name) {
  for (std::size_t c = 0; c < want.size(); ++c) {
    if (h.is_guard(c) || same_value(want[c], got[c])) continue;
    return concat("the final state of ", h.describe(h.owner(c)), " differs: ", num(got[c]), " in ",
                  got_name, " but ", num(want[c]), " in ", want_name);
  }
  return std::nullopt;
}

/// Row-major buffers for the kit's adapters and the views the allocator takes of them.
template <class T>
struct kit_adapters {
  struct storage {
    std::vector<T> A, E, B, gA, gE, gB;
  };
  std::vector<storage> data;
  std::vector<adapter_tensors<T>> views;

  explicit kit_adapters(std::span<const adapter_shape> shapes) {
    data.resize(shapes.size());
    for (std::size_t a = 0; a < shapes.size(); ++a) {
      const adapter_shape& s = shapes[a];
      storage& d = data[a];
      d.A.assign(static_cast<std::size_t>(s.rank * s.in_features), T(0));
      d.E.assign(static_cast<std::size_t>(s.rank), T(0));
      d.B.assign(static_cast<std::size_t>(s.out_features * s.rank), T(0));
      d.gA = d.A;
      d.gE = d.E;
      d.gB = d.B;
    }
    for (std::size_t a = 0; a < shapes.size(); ++a) {
      const adapter_shape& s = shapes[a];
      storage& d = data[a];
      views.push_back({{matrix_view<T>(d.A.data(), s.rank, s.in_features, s.in_features, 1),
                        vector_view<T>(d.E.data(), s.rank),
                        matrix_view<T>(d.B.data(), s.out_features, s.rank, s.rank, 1)},
                       {matrix_view<const T>(d.gA.data(), s.rank, s.in_features, s.in_features, 1),
                        vector_view<const T>(d.gE.data(), s.rank),
                        matrix_view<const T>(d.gB.data(), s.out_features, s.rank, s.rank, 1)}});
    }
  }

  /// Writes the harness's inputs of step t; allocates nothing.
  template <class M>
  void fill(const conformance_harness<T, M>& h, std::span<const adapter_shape> shapes,
            std::int64_t t) {
    for (std::size_t e = 0; e < h.size(); ++e) {
      const kit_element& el = h.element(e);
      const auto [p, g] = h.input(t, e);
      storage& d = data[el.adapter];
      const index_t r = shapes[el.adapter].rank;
      const index_t in = shapes[el.adapter].in_features;
      std::size_t i = 0;
      if (el.role == tensor_role::A) {
        i = static_cast<std::size_t>(el.row * in + el.col);
        d.A[i] = p;
        d.gA[i] = g;
      } else if (el.role == tensor_role::E) {
        i = static_cast<std::size_t>(el.row);
        d.E[i] = p;
        d.gE[i] = g;
      } else {
        i = static_cast<std::size_t>(el.row * r + el.col);
        d.B[i] = p;
        d.gB[i] = g;
      }
    }
  }
};

/// The schedule of the kit's allocator runs: warm-up, reduction with masks every other step,
/// PEFT's force mask and a final phase; target = half the initial budget.
inline cubic_schedule kit_schedule(std::int64_t b0) {
  return cubic_schedule({.initial_budget = b0,
                         .target_budget = b0 / 2,
                         .total_step = 20,
                         .tinit = 2,
                         .tfinal = 5,
                         .delta_t = 2});
}
inline constexpr std::int64_t kit_allocator_steps = 25;  // past total_step: the final phase runs

// ---- the checks ------------------------------------------------------------------------------

/// What every check reads: the harness, the metric, and the two reference runs.
template <class T, class M>
struct kit_context {
  const M& metric;
  const conformance_options& options;
  conformance_harness<T, M> h;
  std::int64_t b0 = 0;
  std::vector<std::size_t> forward, backward;  // element orders
  std::optional<run_record<T>> first, second;  // watched run on a copy; a run on another copy
  M first_metric;                              // the copy that made `first`, for reset
  run_watch watch;
  std::string run_error;  // what the metric threw in the reference runs
  bool finite = false;
  bool deterministic = false;

  kit_context(const M& m, const conformance_options& o, std::int64_t budget)
      : metric(m), options(o), h(o), b0(budget), first_metric(m) {
    const std::size_t n = h.size();
    forward.resize(n);
    backward.resize(n);
    for (std::size_t e = 0; e < n; ++e) forward[e] = backward[n - 1 - e] = e;
  }
  std::int64_t steps() const noexcept { return options.steps; }
  std::size_t values() const noexcept { return h.size() * static_cast<std::size_t>(options.steps); }
  /// The allocator keeps all elements' state in one unguarded buffer: a metric seen writing
  /// outside its own state would corrupt the allocator's memory, so it is not run there.
  bool allocator_safe() const noexcept { return first.has_value() && watch.out_of_state.empty(); }
  check_result not_run(std::string_view name) const {
    return {std::string(name), check_status::skipped,
            first ? "not run: the metric writes outside its element's state (see "
                    "inputs_untouched), which would corrupt the allocator's memory"
                  : "not run: " + run_error};
  }
};

inline std::string threw(const std::exception& ex) {
  return concat("the metric threw: ", ex.what());
}

/// (b) Every update() and score() return of the reference run is finite and >= 0.
template <class T, class M>
check_result check_finite(kit_context<T, M>& k) {
  const std::size_t n = k.h.size();
  std::size_t bad = 0;
  std::string first_bad;
  for (std::int64_t t = 0; t < k.steps(); ++t)
    for (std::size_t e = 0; e < n; ++e)
      for (int which = 0; which < 2; ++which) {
        const std::size_t i = static_cast<std::size_t>(t) * n + e;
        const T v = which == 0 ? k.first->updated[i] : k.first->scored[i];
        if (std::isfinite(v) && v >= T(0)) continue;
        if (bad++ == 0)
          first_bad = concat(which == 0 ? "update()" : "score()", " returned ", num(v), " for ",
                             k.h.describe(e, t));
      }
  k.finite = bad == 0;
  if (bad != 0)
    return {std::string(checks::finite_nonnegative), check_status::failed,
            concat(bad, " of ", 2 * k.values(),
                   " returned values are NaN, infinite or negative; first: ", first_bad)};
  return {std::string(checks::finite_nonnegative), check_status::passed,
          concat(2 * k.values(), " values of update() and score() over A, E, B with zero, tiny (",
                 k.options.tiny, ") and large (", k.options.large, ") inputs")};
}

/// (c) Two runs on fresh copies of the metric, same inputs, zeroed state: bit-identical.
template <class T, class M>
check_result check_determinism(kit_context<T, M>& k) {
  auto d = first_difference(k.h, *k.first, *k.second, k.steps(), "the first run", "the second run");
  if (!d)
    d = first_state_difference(k.h, k.first->arena, k.second->arena, "the first run",
                               "the second run");
  k.deterministic = !d;
  if (d)
    return {std::string(checks::determinism), check_status::failed,
            *d + " (same inputs, zeroed state, a fresh copy of the metric)"};
  return {std::string(checks::determinism), check_status::passed,
          concat("two runs of ", k.steps(), " steps over ", k.h.size(),
                 " elements are bit-identical (scores and state)")};
}

/// (d) What the watched reference run saw.
template <class T, class M>
check_result check_inputs_untouched(const kit_context<T, M>& k) {
  const std::string& bad =
      !k.watch.out_of_state.empty() ? k.watch.out_of_state : k.watch.object_changed;
  if (!bad.empty()) return {std::string(checks::inputs_untouched), check_status::failed, bad};
  return {std::string(checks::inputs_untouched), check_status::passed,
          std::is_trivially_copyable_v<M>
              ? "update() wrote only its element's state; score() wrote nothing; the metric "
                "object was left unchanged"
              : "update() wrote only its element's state; score() wrote nothing (the metric "
                "object was not compared: not trivially copyable)"};
}

/// (e) Each element alone on a fresh copy, and all elements in reverse order, score as in the
/// reference run.
template <class T, class M>
check_result check_state_independence(kit_context<T, M>& k) {
  const std::string name(checks::state_independence);
  if (!k.deterministic)
    return {name, check_status::skipped,
            "not meaningful: the metric is not deterministic (see determinism)"};
  try {
    std::optional<std::string> d;
    for (std::size_t e = 0; e < k.h.size() && !d; ++e) {
      k.h.zero_states();
      M m = k.metric;
      const std::size_t only[1] = {e};
      const auto alone = run_pass(k.h, m, std::span<const std::size_t>(only), k.steps());
      d = first_difference(k.h, *k.first, alone, k.steps(), "a pass over all elements",
                           "a pass over this element alone", std::span<const std::size_t>(only));
    }
    if (!d) {
      k.h.zero_states();
      M m = k.metric;
      const auto reversed = run_pass(k.h, m, k.backward, k.steps());
      d = first_difference(k.h, *k.first, reversed, k.steps(), "a pass in forward order",
                           "a pass in reverse order");
    }
    if (d) return {name, check_status::failed, *d};
    return {name, check_status::passed,
            concat("each of ", k.h.size(),
                   " elements scores the same alone, among all, and in reverse order")};
  } catch (const std::exception& ex) {
    return {name, check_status::failed, threw(ex)};
  }
}

/// (f) The metric object of the reference run, zeroed state, the same inputs again.
template <class T, class M>
check_result check_reset(kit_context<T, M>& k) {
  const std::string name(checks::reset);
  if (!k.deterministic)
    return {name, check_status::skipped,
            "not meaningful: the metric is not deterministic (see determinism)"};
  try {
    k.h.zero_states();
    const auto again = run_pass(k.h, k.first_metric, k.forward, k.steps());
    const char* what = "the run after zeroing the state";
    auto d = first_difference(k.h, *k.first, again, k.steps(), "the first run", what);
    if (!d) d = first_state_difference(k.h, k.first->arena, again.arena, "the first run", what);
    if (d)
      return {name, check_status::failed,
              *d + " (same metric object: is some state kept outside the state span?)"};
    return {name, check_status::passed,
            "zeroing the state and replaying the inputs on the same metric object gives the "
            "first run's scores"};
  } catch (const std::exception& ex) {
    return {name, check_status::failed, threw(ex)};
  }
}

/// The block hook (update_block, importance/metric.hpp requirement 6) against update(): every
/// step, each role's elements in blocks of metric_block (the last block overlapping the one
/// before when the count is not a multiple), on two copies of the metric and of the state, one
/// driven through update_block and one through update() element by element; scores (in double,
/// as the allocator takes them) and states must be bit-identical. Where the metric declares
/// update_block_keeps_non_finite_state (requirement 7), each block is also given NaN and ±∞ in
/// some lanes (on a copy of its state): those lanes' state must stay as it was, the others' must
/// be update()'s. Returns the first difference, or nothing; `blocks` counts the blocks compared.
template <class T, class M>
std::optional<std::string> block_hook_difference(const kit_context<T, M>& k, std::size_t& blocks) {
  constexpr std::size_t K = M::state_size;
  constexpr std::size_t B = metric_block;
  const conformance_harness<T, M>& h = k.h;
  const std::size_t n = h.size();
  std::vector<T> ref(n * K, T(0)), hook(n * K, T(0));
  M m_ref = k.metric, m_hook = k.metric;
  std::vector<std::vector<std::size_t>> groups;
  for (tensor_role role : {tensor_role::A, tensor_role::E, tensor_role::B}) {
    std::vector<std::size_t> of_role;
    for (std::size_t e = 0; e < n; ++e)
      if (h.element(e).role == role) of_role.push_back(e);
    if (of_role.size() < B) continue;
    for (std::size_t at = 0; at < of_role.size(); at += B) {
      const std::size_t first = std::min(at, of_role.size() - B);
      groups.emplace_back(of_role.begin() + static_cast<std::ptrdiff_t>(first),
                          of_role.begin() + static_cast<std::ptrdiff_t>(first + B));
    }
  }
  constexpr T specials[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                            -std::numeric_limits<T>::infinity()};
  blocks = 0;
  for (std::int64_t t = 0; t < k.steps(); ++t) {
    begin_step_if_any(m_ref, t);
    begin_step_if_any(m_hook, t);
    for (const std::vector<std::size_t>& group : groups) {
      const tensor_role role = h.element(group[0]).role;
      T p[B], g[B], st[B * (K > 0 ? K : 1)];
      double scores[B];
      for (std::size_t l = 0; l < B; ++l) {
        std::tie(p[l], g[l]) = h.input(t, group[l]);
        std::copy_n(hook.begin() + static_cast<std::ptrdiff_t>(group[l] * K), K, st + l * K);
      }
      if constexpr (::adalora::detail::block_keeps_non_finite_state<M>) {
        // NaN or ±∞ in the param or the grad of lanes 1, 4 and 6, on a copy of the state.
        T bad_p[B], bad_g[B], bad_st[B * (K > 0 ? K : 1)];
        double bad_scores[B];
        std::copy_n(p, B, bad_p);
        std::copy_n(g, B, bad_g);
        std::copy_n(st, B * K, bad_st);
        const std::size_t lanes[] = {1, 4, 6};
        for (std::size_t i = 0; i < 3; ++i) {
          const T x = specials[(static_cast<std::size_t>(t) + i) % 3];
          (i % 2 == 0 ? bad_p : bad_g)[lanes[i]] = x;
        }
        m_hook.update_block(role, std::span<const T, B>(bad_p, B), std::span<const T, B>(bad_g, B),
                            std::span<T, B * K>(bad_st, B * K), std::span<double, B>(bad_scores, B));
        for (std::size_t l = 0; l < B; ++l) {
          const bool special = l == 1 || l == 4 || l == 6;
          std::vector<T> want(st + l * K, st + (l + 1) * K);
          if (!special) {
            M m = m_ref;
            static_cast<void>(m.update(role, p[l], g[l], std::span<T, K>(want.data(), K)));
          }
          for (std::size_t c = 0; c < K; ++c)
            if (!same_value(bad_st[l * K + c], want[c]))
              return concat("update_block(), given NaN or infinity in lanes 1, 4 and 6 (it declares "
                            "update_block_keeps_non_finite_state), left state value ", c, " of lane ",
                            l, " at ", num(bad_st[l * K + c]), " where ",
                            special ? "the state before the call" : "update()", " gives ",
                            num(want[c]), "; lane ", l, " is ", h.describe(group[l], t));
        }
      }
      m_hook.update_block(role, std::span<const T, B>(p, B), std::span<const T, B>(g, B),
                          std::span<T, B * K>(st, B * K), std::span<double, B>(scores, B));
      for (std::size_t l = 0; l < B; ++l) {
        T* r = ref.data() + group[l] * K;
        const double want = static_cast<double>(m_ref.update(role, p[l], g[l], std::span<T, K>(r, K)));
        if (!same_value(scores[l], want))
          return concat("update_block() gave score ", num(scores[l]), " in lane ", l,
                        " where update() returns ", num(want), " for ", h.describe(group[l], t));
        for (std::size_t c = 0; c < K; ++c)
          if (!same_value(st[l * K + c], r[c]))
            return concat("update_block() left state value ", c, " at ", num(st[l * K + c]),
                          " in lane ", l, " where update() leaves ", num(r[c]), " for ",
                          h.describe(group[l], t));
        std::copy_n(st + l * K, K, hook.begin() + static_cast<std::ptrdiff_t>(group[l] * K));
      }
      ++blocks;
    }
  }
  return std::nullopt;
}

/// (g) In the reference run, score() right after update() with the same param returns the same;
/// and a block hook (update_block) gives what update() gives, bit for bit.
template <class T, class M>
check_result check_score_consistency(const kit_context<T, M>& k) {
  const double tol = k.options.score_tolerance;
  const std::size_t n = k.h.size();
  std::size_t bad = 0;
  std::string first_bad;
  for (std::int64_t t = 0; t < k.steps(); ++t)
    for (std::size_t e = 0; e < n; ++e) {
      const std::size_t i = static_cast<std::size_t>(t) * n + e;
      const T u = k.first->updated[i], s = k.first->scored[i];
      const double du = static_cast<double>(u), ds = static_cast<double>(s);
      if (same_value(u, s) || (tol > 0 && std::abs(du - ds) <= tol * std::abs(du))) continue;
      if (bad++ == 0)
        first_bad = concat("score() returned ", num(s), " but update() had just returned ", num(u),
                           " for ", k.h.describe(e, t));
    }
  if (bad != 0)
    return {std::string(checks::score_consistency), check_status::failed,
            concat(bad, " of ", k.values(), " disagree; first: ", first_bad)};
  std::string hook;
  if constexpr (::adalora::detail::has_update_block<M, T>) {
    if (!k.deterministic) {
      hook = "; update_block() not compared with update(): the metric is not deterministic (see "
             "determinism)";
    } else {
      std::size_t blocks = 0;
      std::optional<std::string> difference;
      try {
        difference = block_hook_difference(k, blocks);
      } catch (const std::exception& ex) {
        difference = threw(ex);
      }
      if (difference)
        return {std::string(checks::score_consistency), check_status::failed,
                concat("the block hook differs from update(): ", *difference)};
      hook = concat("; update_block() gives update()'s scores and states for all ", blocks,
                    " blocks of ", metric_block, " (bit-identical)",
                    ::adalora::detail::block_keeps_non_finite_state<M>
                        ? " and keeps the state of the NaN/infinite lanes it was given"
                        : "");
    }
  }
  return {std::string(checks::score_consistency), check_status::passed,
          concat("score() equals update()'s return for all ", k.values(), " (element, step) pairs",
                 tol > 0 ? concat(" (relative tolerance ", tol, ")")
                         : std::string(" (bit-identical)"),
                 hook)};
}

/// Position of element e in its tensor's row-major storage (and so in the allocator's state).
template <class T, class M>
std::size_t local_index(const conformance_harness<T, M>& h, std::size_t e) {
  const kit_element& el = h.element(e);
  const adapter_shape& s = h.options().shapes[el.adapter];
  if (el.role == tensor_role::A) return static_cast<std::size_t>(el.row * s.in_features + el.col);
  if (el.role == tensor_role::E) return static_cast<std::size_t>(el.row);
  return static_cast<std::size_t>(el.row * s.rank + el.col);
}

/// (a) A rank_allocator over the kit's adapters: its sizes, and (for a deterministic metric) its
/// state and triplet scores against a per-element replay of the metric in the allocator's order.
template <class T, class M>
check_result check_output_size(kit_context<T, M>& k) {
  const std::string name(checks::output_size);
  if (!k.allocator_safe()) return k.not_run(name);
  const conformance_options& o = k.options;
  const std::size_t n = k.h.size();
  constexpr std::size_t K = M::state_size;
  try {
    kit_adapters<T> buffers(o.shapes);
    rank_allocator<T, M, cubic_schedule> alloc(o.shapes, kit_schedule(k.b0), k.metric);
    conformance_harness<T, M> replay(o);
    M mr = k.metric;
    std::vector<T> element_score(n);
    std::vector<std::size_t> offset(o.shapes.size() + 1, 0);  // first triplet of each adapter
    for (std::size_t a = 0; a < o.shapes.size(); ++a)
      offset[a + 1] = offset[a] + static_cast<std::size_t>(o.shapes[a].rank);
    const std::size_t b0 = offset.back();
    std::vector<double> sum_a(b0), sum_b(b0), s_e(b0);
    int masks_compared = 0;

    for (std::int64_t t = 0; t < kit_allocator_steps; ++t) {
      buffers.fill(replay, o.shapes, t);
      const step_result<T>& res = alloc.step(t, buffers.views);

      if (alloc.triplet_scores().size() != b0)
        return {name, check_status::failed,
                concat("triplet_scores() has ", alloc.triplet_scores().size(),
                       " entries, expected the initial budget ", b0)};
      for (std::size_t a = 0; a < o.shapes.size(); ++a) {
        const adapter_shape& s = o.shapes[a];
        const auto r = static_cast<std::size_t>(s.rank);
        const std::size_t want[3] = {r * static_cast<std::size_t>(s.in_features) * K, r * K,
                                     r * static_cast<std::size_t>(s.out_features) * K};
        for (tensor_role role : {tensor_role::A, tensor_role::E, tensor_role::B})
          if (alloc.state(a, role).size() != want[static_cast<int>(role)])
            return {name, check_status::failed,
                    concat("the allocator's state of ", role_name(role), " of adapter ", a, " has ",
                           alloc.state(a, role).size(), " values, expected ",
                           want[static_cast<int>(role)])};
        if (alloc.triplet_scores(a).size() != r)
          return {name, check_status::failed,
                  concat("adapter ", a, " has ", alloc.triplet_scores(a).size(),
                         " triplet scores, expected its rank ", r)};
      }
      if (!k.deterministic) continue;  // a replay cannot match a metric that differs from itself

      if (res.importance_updated) {
        begin_step_if_any(mr, t);
        for (std::size_t e = 0; e < n; ++e) {
          const auto [p, g] = replay.input(t, e);
          element_score[e] = mr.update(replay.element(e).role, p, g, replay.state(e));
        }
        for (std::size_t e = 0; e < n; ++e) {
          const kit_element& el = replay.element(e);
          const std::span<const T> st = alloc.state(el.adapter, el.role);
          const std::size_t at = local_index(replay, e) * K;
          for (std::size_t i = 0; i < K; ++i)
            if (!same_value(st[at + i], replay.cstate(e)[i]))
              return {
                  name, check_status::failed,
                  concat("after step ", t, " the allocator holds state value ", num(st[at + i]),
                         " for ", replay.describe(e), " where calling update() per element gives ",
                         num(replay.cstate(e)[i]))};
        }
      } else if (res.action == mask_action::threshold) {  // frozen scores: the final phase
        for (std::size_t e = 0; e < n; ++e)
          element_score[e] =
              mr.score(replay.element(e).role, replay.input(t, e).first, replay.cstate(e));
      }
      if (res.action != mask_action::threshold) continue;

      // Triplet score = s(E) + (mean s(A row) + mean s(B column)), each mean rounded to T.
      std::fill(sum_a.begin(), sum_a.end(), 0.0);
      std::fill(sum_b.begin(), sum_b.end(), 0.0);
      for (std::size_t e = 0; e < n; ++e) {
        const kit_element& el = replay.element(e);
        const double v = static_cast<double>(element_score[e]);
        const std::size_t base = offset[el.adapter];
        if (el.role == tensor_role::A)
          sum_a[base + static_cast<std::size_t>(el.row)] += v;
        else if (el.role == tensor_role::E)
          s_e[base + static_cast<std::size_t>(el.row)] = v;
        else
          sum_b[base + static_cast<std::size_t>(el.col)] += v;
      }
      for (std::size_t a = 0; a < o.shapes.size(); ++a)
        for (std::size_t i = offset[a]; i < offset[a + 1]; ++i) {
          const T e = static_cast<T>(s_e[i]);
          const T ma = static_cast<T>(sum_a[i] / static_cast<double>(o.shapes[a].in_features));
          const T mb = static_cast<T>(sum_b[i] / static_cast<double>(o.shapes[a].out_features));
          const T want = e + (ma + mb);
          const T got = alloc.triplet_scores()[i];
          // A few ulps: the allocator may sum a row in another order than the kit.
          const T tol = T(8) * std::numeric_limits<T>::epsilon() *
                        (std::abs(e) + std::abs(ma) + std::abs(mb));
          if (!(std::abs(got - want) <= tol) && !same_value(got, want))
            return {name, check_status::failed,
                    concat("at step ", t, " the allocator's score of triplet ", i - offset[a],
                           " of adapter ", a, " is ", num(got),
                           " but the metric's element scores combine to ", num(want),
                           " (s(E) + (mean s(A row) + mean s(B column)))")};
        }
      ++masks_compared;
    }
    if (!k.deterministic)
      return {name, check_status::passed,
              concat("sizes only (", n, " elements, ", b0,
                     " triplet scores): values not compared, the metric is not deterministic "
                     "(see determinism)")};
    return {name, check_status::passed,
            concat(n, " elements scored, ", b0, " triplet scores in ", o.shapes.size(),
                   " adapters; the allocator's state and ", masks_compared,
                   " mask events' triplet scores match the metric's per-element scores")};
  } catch (const std::domain_error& ex) {
    if (!k.finite)
      return {name, check_status::skipped,
              "the allocator rejects the metric's non-finite scores (see finite_nonnegative)"};
    return {name, check_status::failed, concat("rank_allocator::step threw: ", ex.what())};
  } catch (const std::exception& ex) {
    return {name, check_status::failed,
            concat("rank_allocator with this metric threw: ", ex.what())};
  }
}

/// (h) Counted windows around update()/score() calls and around rank_allocator::step through
/// every phase, for both final-phase semantics. Everything is allocated before a window opens.
template <class T, class M>
check_result check_no_allocation(kit_context<T, M>& k) {
  const std::string name(checks::no_allocation);
  if (!allocation_counter::wired())
    return {name, k.options.require_allocation_check ? check_status::failed : check_status::skipped,
            "not wired: put ADALORA_TESTING_COUNT_ALLOCATIONS(); at global scope in one .cpp of "
            "the test binary (adalora/testing/allocation_counter.hpp)"};
  if (!k.allocator_safe()) return k.not_run(name);
  const std::size_t n = k.h.size();
  try {
    k.h.zero_states();
    M m = k.metric;
    std::int64_t before = allocation_counter::count();
    for (std::int64_t t = 0; t < k.steps(); ++t) {
      begin_step_if_any(m, t);
      for (std::size_t e = 0; e < n; ++e) {
        const auto [p, g] = k.h.input(t, e);
        const tensor_role role = k.h.element(e).role;
        static_cast<void>(m.update(role, p, g, k.h.state(e)));
        static_cast<void>(m.score(role, p, k.h.cstate(e)));
      }
    }
    std::int64_t made = allocation_counter::count() - before;
    if (made != 0)
      return {name, check_status::failed,
              concat(made, " heap allocations in ", k.values(),
                     " calls of update() and score() (expected none: the allocator calls them "
                     "for every element at every step)")};
    for (final_phase_rule semantics : {final_phase_rule::peft, final_phase_rule::loralib}) {
      kit_adapters<T> buffers(k.options.shapes);
      rank_allocator<T, M, cubic_schedule> alloc(k.options.shapes, kit_schedule(k.b0), k.metric,
                                                 {.final_phase = semantics});
      before = allocation_counter::count();
      for (std::int64_t t = 0; t < kit_allocator_steps; ++t) {
        buffers.fill(k.h, k.options.shapes, t);
        static_cast<void>(alloc.step(t, buffers.views));
      }
      made = allocation_counter::count() - before;
      if (made != 0)
        return {name, check_status::failed,
                concat(made, " heap allocations in ", kit_allocator_steps,
                       " rank_allocator::step calls (",
                       semantics == final_phase_rule::peft ? "PEFT" : "loralib",
                       " final-phase semantics); update() and score() alone made none")};
    }
    return {name, check_status::passed,
            concat("none in ", k.values(), " update()/score() calls and 2 x ", kit_allocator_steps,
                   " rank_allocator steps (warm-up, reduction, final phase; PEFT and loralib "
                   "semantics)")};
  } catch (const std::domain_error& ex) {
    if (!k.finite)
      return {name, check_status::skipped,
              "update() and score() alone made no allocation, but the allocator rejects the "
              "metric's non-finite scores (see finite_nonnegative)"};
    return {name, check_status::failed, concat("rank_allocator::step threw: ", ex.what())};
  } catch (const std::exception& ex) {
    return {name, check_status::failed, threw(ex)};
  }
}

}  // namespace detail

/// Runs the conformance checks (see the header comment) on `metric` with element type T and
/// returns the report. A misbehaving metric never makes it throw: a metric that throws fails
/// the check that called it. Compile-time requirements come first, from
/// check_importance_metric<M, T>(), whose static_assert names the missing member.
/// Throws std::invalid_argument for invalid options (steps < 2, no triplet in `shapes`).
template <class T, class M>
conformance_report check_metric_conformance(const M& metric,
                                            const conformance_options& options = {}) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "adalora::testing::check_metric_conformance: T must be float or double");
  static_assert(check_importance_metric<M, T>());
  static_assert(std::is_copy_constructible_v<M>,
                "adalora::testing::check_metric_conformance: the metric must be "
                "copy-constructible (the kit and rank_allocator hold copies)");
  conformance_report report;
  report.element_type = std::is_same_v<T, float> ? "float" : "double";
  if constexpr (ImportanceMetric<M, T> && std::is_copy_constructible_v<M>) {
    constexpr const char* where = "testing::check_metric_conformance";
    ADALORA_REQUIRE(options.steps >= 2, where, "options.steps must be >= 2, got ", options.steps);
    std::int64_t b0 = 0;
    for (const adapter_shape& s : options.shapes) {
      ADALORA_REQUIRE(s.in_features >= 1 && s.out_features >= 1 && s.rank >= 0, where,
                      "options.shapes: adapter '", s.name,
                      "' needs in, out >= 1 and rank >= 0, got in ", s.in_features, ", out ",
                      s.out_features, ", rank ", s.rank);
      b0 += s.rank;
    }
    ADALORA_REQUIRE(b0 >= 1, where,
                    "options.shapes must hold at least one triplet, got ranks summing to ", b0);

    detail::kit_context<T, M> k(metric, options, b0);
    // The reference run (watched) and a second one on another fresh copy, for determinism.
    try {
      k.first = detail::run_pass(k.h, k.first_metric, k.forward, k.steps(), &k.watch);
      k.h.zero_states();
      M m2 = metric;
      k.second = detail::run_pass(k.h, m2, k.forward, k.steps());
    } catch (const std::exception& ex) {
      k.run_error = detail::threw(ex);
    }

    // Finiteness and determinism run first: later checks ask whether they are meaningful. The
    // report lists the checks in the documented order regardless.
    std::vector<check_result>& c = report.checks;
    if (!k.first) {
      for (std::string_view name :
           {checks::finite_nonnegative, checks::determinism, checks::inputs_untouched,
            checks::state_independence, checks::reset, checks::score_consistency})
        c.push_back({std::string(name), check_status::failed, k.run_error});
    } else {
      c.push_back(detail::check_finite(k));
      c.push_back(k.second ? detail::check_determinism(k)
                           : check_result{std::string(checks::determinism), check_status::failed,
                                          k.run_error});
      c.push_back(detail::check_inputs_untouched(k));
      c.push_back(detail::check_state_independence(k));
      c.push_back(detail::check_reset(k));
      c.push_back(detail::check_score_consistency(k));
    }
    c.insert(c.begin(), detail::check_output_size(k));
    c.push_back(detail::check_no_allocation(k));
  }
  return report;
}

}  // namespace adalora::testing
