#pragma once
// A conformance kit for budget schedules: call it from your own unit test to check that a
// schedule meets the BudgetSchedule requirements (budget_schedule.hpp) in behaviour, not only in
// signatures.
//
//     auto report = adalora::testing::check_schedule_conformance(my_schedule(...),
//                                                                {.warm_up_end = 10,
//                                                                 .non_increasing = true});
//     INFO(report);            // Catch2; or std::cerr << report with any framework
//     REQUIRE(report.ok());
//
// The kit calls at(t) for every step t from 0 to options.last_step (by default 32 steps into the
// final phase) and checks (names in `schedule_checks::`):
//   budget_range         initial_budget() >= 1, target_budget() in [0, initial_budget()],
//                        final_phase_start() >= 0, and every budget in [0, initial_budget()]:
//                        never above the initial budget (the allocator prunes
//                        initial_budget() - budget triplets) and never negative;
//   determinism          at(t) is a function of t alone: called again, called from the last step
//                        down, and called on a copy, it gives the same decisions (an allocator
//                        resumed from a checkpoint starts asking at the resumed step);
//   final_phase          at(final_phase_start()) gives target_budget(), and every later step
//                        gives {target_budget(), mask}: the final phase holds the target and
//                        masks every step;
//   warm_up              (when options.warm_up_end >= 0) every step in [0, warm_up_end] gives
//                        {initial_budget(), no mask};
//   non_increasing       (when options.non_increasing) the budget never grows from a step to the
//                        next;
//   with_initial_budget  (when the schedule has the optional hook) with_initial_budget(b0) for a
//                        few b0 reports initial_budget() == b0, keeps target_budget() and
//                        final_phase_start(), keeps its budgets in [0, b0] and its final phase;
//                        with the schedule's own b0 it decides exactly as the schedule; and it
//                        leaves the schedule it is called on unchanged;
//   allocator            a real rank_allocator over adapters whose ranks add up to the initial
//                        budget (filled in by the allocator when the schedule reports
//                        budget_from_adapters) follows the schedule: each step's budget and mask
//                        flag are the schedule's, and after every mask it keeps exactly the
//                        budget (exact_budget ties), the target from final_phase_start() on
//                        (initial budgets up to 4096; the first 20 000 steps checked and those
//                        around the final phase's start).
// A schedule that reports budget_from_adapters is checked as the allocator would use it:
// through with_initial_budget(options.adapters_budget). A check that cannot mean anything after
// another failed is "skipped" with the reason, so each defect shows up as one failed check.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <optional>
#include <ostream>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "adalora/adapter_shape.hpp"
#include "adalora/budget_schedule.hpp"
#include "adalora/config.hpp"
#include "adalora/importance/magnitude.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/rank_allocator.hpp"
#include "adalora/testing/check_report.hpp"

namespace adalora::testing {

/// The names of the schedule kit's checks, in the order they appear in a report.
namespace schedule_checks {
inline constexpr std::string_view budget_range = "budget_range";
inline constexpr std::string_view determinism = "determinism";
inline constexpr std::string_view final_phase = "final_phase";
inline constexpr std::string_view warm_up = "warm_up";
inline constexpr std::string_view non_increasing = "non_increasing";
inline constexpr std::string_view with_initial_budget = "with_initial_budget";
inline constexpr std::string_view allocator = "allocator";
}  // namespace schedule_checks

/// Options of check_schedule_conformance: what the kit may expect beyond the requirements.
struct schedule_conformance_options {
  /// The last step checked (from step 0); -1: final_phase_start() + 32. Up to 10^6 steps are
  /// checked one by one; beyond, the first and the last 10^5 and 10^5 evenly spaced between.
  std::int64_t last_step = -1;
  /// Your schedule's warm-up [0, warm_up_end]: budget == initial_budget() and no mask there
  /// (-1: no warm-up to check).
  std::int64_t warm_up_end = -1;
  /// The budget must never increase from one step to the next.
  bool non_increasing = false;
  /// The initial budget the kit gives, through with_initial_budget, a schedule that reports
  /// budget_from_adapters (as a rank allocator gives it the sum of its adapters' ranks).
  std::int64_t adapters_budget = 48;
};

/// What check_schedule_conformance found: one entry per check, in a fixed order.
struct schedule_report : check_report {
  std::string schedule;  ///< what was checked: budgets, final phase, steps

  /// One line per check, then a verdict: what a test prints on failure.
  std::string summary() const { return summary_of("budget schedule conformance", schedule); }
  friend std::ostream& operator<<(std::ostream& os, const schedule_report& r) {
    return os << r.summary();
  }
};

namespace detail {

using ::adalora::detail::concat;

inline std::string describe(const budget_decision& d) {
  return concat("{budget ", d.budget, ", ", d.mask ? "mask" : "no mask", "}");
}

/// The steps the kit checks, in increasing order: all of [0, last] when there are at most 10^6,
/// else the first and the last 10^5 and 10^5 evenly spaced steps in between.
inline std::vector<std::int64_t> checked_steps(std::int64_t last) {
  constexpr std::int64_t all = 1'000'000, edge = 100'000, middle = 100'000;
  std::vector<std::int64_t> steps;
  if (last < all) {
    steps.resize(static_cast<std::size_t>(last + 1));
    for (std::int64_t t = 0; t <= last; ++t) steps[static_cast<std::size_t>(t)] = t;
    return steps;
  }
  steps.reserve(static_cast<std::size_t>(2 * edge + middle));
  for (std::int64_t t = 0; t < edge; ++t) steps.push_back(t);
  const std::int64_t stride = (last - 2 * edge) / middle + 1;
  for (std::int64_t t = edge; t <= last - edge; t += stride) steps.push_back(t);
  for (std::int64_t t = std::max(steps.back() + 1, last - edge + 1); t <= last; ++t)
    steps.push_back(t);
  return steps;
}

/// at(t) over `steps`; the first exception is kept with its step.
template <class S>
struct decision_run {
  std::vector<budget_decision> at;  // one per step, up to the throw
  std::string error;

  decision_run(const S& s, std::span<const std::int64_t> steps, bool backwards = false) {
    at.resize(steps.size(), budget_decision{-1, false});
    std::size_t k = 0;
    try {
      for (; k < steps.size(); ++k) {
        const std::size_t i = backwards ? steps.size() - 1 - k : k;
        at[i] = s.at(steps[i]);
      }
    } catch (const std::exception& ex) {
      const std::size_t i = backwards ? steps.size() - 1 - k : k;
      error = concat("at(", steps[i], ") threw: ", ex.what());
    }
  }
};

/// What every check reads.
template <class S>
struct schedule_context {
  explicit schedule_context(const schedule_conformance_options& o) : options(o) {}

  const schedule_conformance_options& options;
  std::optional<S> schedule;  // the schedule as the allocator would use it (b0 resolved)
  std::string resolve_error;  // why there is none
  bool from_adapters = false;
  std::int64_t b0 = 0, bt = 0, final_start = 0, last = 0;
  std::vector<std::int64_t> steps;
  std::optional<decision_run<S>> first;
  std::vector<std::string> failed;  // the checks failed so far

  bool usable() const noexcept { return first.has_value() && first->error.empty(); }
  /// The checks the later ones build on (a rebuilt schedule repeats their defects; an allocator
  /// would only restate them).
  std::optional<check_result> needs(std::string_view name,
                                    std::initializer_list<std::string_view> basis) const {
    if (!usable()) return not_run(name);
    for (std::string_view b : basis)
      if (std::find(failed.begin(), failed.end(), b) != failed.end())
        return check_result{std::string(name), check_status::skipped,
                            concat("not run: ", b, " failed")};
    return std::nullopt;
  }
  check_result not_run(std::string_view name) const {
    return {std::string(name), check_status::skipped,
            schedule ? concat("not run: ", first->error, " (see budget_range)")
                     : concat("not run: ", resolve_error, " (see budget_range)")};
  }
};

template <class S>
check_result check_budget_range(const schedule_context<S>& k) {
  const std::string name(schedule_checks::budget_range);
  if (!k.schedule) return {name, check_status::failed, k.resolve_error};
  if (k.b0 < 1)
    return {
        name, check_status::failed,
        concat("initial_budget() must be >= 1, got ", k.b0,
               k.b0 == budget_from_adapters
                   ? " (budget_from_adapters: the schedule has no with_initial_budget to set it)"
                   : "")};
  if (k.bt < 0 || k.bt > k.b0)
    return {name, check_status::failed,
            concat("target_budget() must be in [0, initial_budget() = ", k.b0, "], got ", k.bt)};
  if (k.final_start < 0)
    return {name, check_status::failed,
            concat("final_phase_start() must be >= 0, got ", k.final_start)};
  if (!k.first->error.empty()) return {name, check_status::failed, k.first->error};
  for (std::size_t i = 0; i < k.steps.size(); ++i) {
    const budget_decision& d = k.first->at[i];
    if (d.budget < 0)
      return {name, check_status::failed,
              concat("at(", k.steps[i], ") returned ", describe(d), ": a budget must be >= 0")};
    if (d.budget > k.b0)
      return {
          name, check_status::failed,
          concat("at(", k.steps[i], ") returned ", describe(d), ", above initial_budget() = ", k.b0,
                 ": the allocator prunes initial_budget() - budget triplets and "
                 "cannot add any")};
  }
  return {name, check_status::passed,
          concat("b0 = ", k.b0, " >= 1, bT = ", k.bt, " in [0, b0], and all ", k.steps.size(),
                 " budgets in [0, b0]")};
}

template <class S>
check_result check_determinism(const schedule_context<S>& k) {
  const std::string name(schedule_checks::determinism);
  if (!k.usable()) return k.not_run(name);
  const S copy = *k.schedule;
  const decision_run<S> again(*k.schedule, k.steps);
  const decision_run<S> backwards(copy, k.steps, true);
  const std::pair<const decision_run<S>*, const char*> runs[] = {
      {&again, "called again in the same order"},
      {&backwards, "called on a copy from the last step down"}};
  for (const auto& [run, how] : runs) {
    if (!run->error.empty())
      return {name, check_status::failed,
              concat(run->error, " when ", how, ", but not the first time")};
    for (std::size_t i = 0; i < k.steps.size(); ++i)
      if (run->at[i] != k.first->at[i])
        return {
            name, check_status::failed,
            concat("at(", k.steps[i], ") gave ", describe(k.first->at[i]),
                   " when called in order from step 0, but ", describe(run->at[i]), " when ", how,
                   ": at(t) must depend on t alone (an allocator resumed from a "
                   "checkpoint asks from the resumed step on)")};
  }
  return {name, check_status::passed,
          concat("the same ", k.steps.size(),
                 " decisions in order, again, and on a copy from the "
                 "last step down")};
}

template <class S>
check_result check_final_phase(const schedule_context<S>& k) {
  const std::string name(schedule_checks::final_phase);
  if (!k.usable()) return k.not_run(name);
  if (k.last <= k.final_start)
    return {name, check_status::skipped,
            concat("options.last_step = ", k.last,
                   " ends before the final phase (after "
                   "final_phase_start() = ",
                   k.final_start, ")")};
  std::size_t in_final = 0;
  for (std::size_t i = 0; i < k.steps.size(); ++i) {
    const std::int64_t t = k.steps[i];
    const budget_decision& d = k.first->at[i];
    if (t == k.final_start && d.budget != k.bt)
      return {name, check_status::failed,
              concat("at(final_phase_start() = ", t, ") returned ", describe(d),
                     ": the budget must reach target_budget() = ", k.bt,
                     " there (the allocator stores the final rank pattern at that step)")};
    if (t <= k.final_start) continue;
    ++in_final;
    if (d.budget != k.bt || !d.mask)
      return {name, check_status::failed,
              concat("at(", t, ") returned ", describe(d),
                     " in the final phase (after "
                     "final_phase_start() = ",
                     k.final_start,
                     "): every step there must be "
                     "{budget ",
                     k.bt, " (target_budget()), mask}")};
  }
  return {name, check_status::passed,
          concat("target ", k.bt, " at final_phase_start() = ", k.final_start,
                 ", then held and "
                 "masked at all ",
                 in_final, " steps checked after it")};
}

template <class S>
check_result check_warm_up(const schedule_context<S>& k) {
  const std::string name(schedule_checks::warm_up);
  if (k.options.warm_up_end < 0)
    return {name, check_status::skipped, "no warm-up declared (options.warm_up_end)"};
  if (!k.usable()) return k.not_run(name);
  std::size_t checked = 0;
  for (std::size_t i = 0; i < k.steps.size() && k.steps[i] <= k.options.warm_up_end; ++i, ++checked)
    if (k.first->at[i] != budget_decision{k.b0, false})
      return {name, check_status::failed,
              concat("at(", k.steps[i], ") returned ", describe(k.first->at[i]),
                     " in the declared warm-up [0, ", k.options.warm_up_end, "]: expected {budget ",
                     k.b0, " (initial_budget()), no mask}")};
  return {name, check_status::passed,
          concat("{budget ", k.b0, ", no mask} at all ", checked, " steps of [0, ",
                 k.options.warm_up_end, "]")};
}

template <class S>
check_result check_non_increasing(const schedule_context<S>& k) {
  const std::string name(schedule_checks::non_increasing);
  if (!k.options.non_increasing)
    return {name, check_status::skipped, "not requested (options.non_increasing)"};
  if (!k.usable()) return k.not_run(name);
  for (std::size_t i = 1; i < k.steps.size(); ++i)
    if (k.first->at[i].budget > k.first->at[i - 1].budget)
      return {name, check_status::failed,
              concat("the budget grows from ", k.first->at[i - 1].budget, " at step ",
                     k.steps[i - 1], " to ", k.first->at[i].budget, " at step ", k.steps[i],
                     " (options.non_increasing asks that it never does)")};
  return {name, check_status::passed,
          concat("the budget never grows over the ", k.steps.size(), " steps checked")};
}

template <class S>
check_result check_with_initial_budget(const schedule_context<S>& k) {
  const std::string name(schedule_checks::with_initial_budget);
  if constexpr (!::adalora::detail::has_with_initial_budget<S>) {
    return {name, check_status::skipped,
            "the schedule has no with_initial_budget (optional): its initial_budget() must then "
            "equal the sum of the adapters' ranks"};
  } else {
    if (auto skip = k.needs(name, {schedule_checks::budget_range, schedule_checks::determinism,
                                   schedule_checks::final_phase}))
      return *skip;
    const S& s = *k.schedule;
    std::vector<std::int64_t> budgets = {k.b0, k.bt + 1, k.bt + 2, 2 * k.b0 + 3};
    std::sort(budgets.begin(), budgets.end());
    budgets.erase(std::unique(budgets.begin(), budgets.end()), budgets.end());
    for (std::int64_t b : budgets) {
      if (b < 1) continue;
      const std::string call = concat("with_initial_budget(", b, ")");
      std::optional<S> r;
      try {
        r.emplace(s.with_initial_budget(b));
      } catch (const std::exception& ex) {
        return {name, check_status::failed,
                concat(call, " threw: ", ex.what(), " (target_budget() = ", k.bt, ")")};
      }
      if (r->initial_budget() != b)
        return {name, check_status::failed,
                concat(call, ".initial_budget() is ", r->initial_budget(), ", expected ", b)};
      if (r->target_budget() != k.bt || r->final_phase_start() != k.final_start)
        return {name, check_status::failed,
                concat(call, " changed target_budget() from ", k.bt, " to ", r->target_budget(),
                       " or final_phase_start() from ", k.final_start, " to ",
                       r->final_phase_start(), ": only the initial budget may change")};
      const decision_run<S> run(*r, k.steps);
      if (!run.error.empty()) return {name, check_status::failed, concat(call, ".", run.error)};
      for (std::size_t i = 0; i < k.steps.size(); ++i) {
        const std::int64_t t = k.steps[i];
        const budget_decision& d = run.at[i];
        if (b == k.b0 && d != k.first->at[i])
          return {name, check_status::failed,
                  concat(call, ".at(", t, ") gave ", describe(d), " but the schedule itself ",
                         describe(k.first->at[i]),
                         ": with its own initial budget the rebuilt "
                         "schedule must decide as the schedule")};
        if (d.budget < 0 || d.budget > b)
          return {name, check_status::failed,
                  concat(call, ".at(", t, ") returned ", describe(d), ", outside [0, ", b, "]")};
        if (t > k.final_start && (d.budget != k.bt || !d.mask))
          return {name, check_status::failed,
                  concat(call, ".at(", t, ") returned ", describe(d),
                         " in the final phase: "
                         "expected {budget ",
                         k.bt, ", mask}")};
      }
    }
    const decision_run<S> after(s, k.steps);
    for (std::size_t i = 0; i < k.steps.size(); ++i)
      if (!after.error.empty() || after.at[i] != k.first->at[i])
        return {name, check_status::failed,
                concat("calling with_initial_budget changed the schedule it was called on: at(",
                       k.steps[i], ") now gives ",
                       after.error.empty() ? describe(after.at[i]) : after.error, ", before ",
                       describe(k.first->at[i]))};
    std::string list;
    for (std::int64_t b : budgets)
      if (b >= 1) list += concat(list.empty() ? "" : ", ", b);
    return {name, check_status::passed,
            concat("b0 = ", list,
                   ": initial_budget() set, target and final phase kept, budgets "
                   "in [0, b0]; the schedule's own b0 reproduces it; the schedule unchanged")};
  }
}

/// The allocator check's adapters stay small: it is about the schedule, not about memory.
inline constexpr std::int64_t kit_max_allocator_budget = 4096;
inline constexpr std::size_t kit_max_allocator_steps = 20'000;

template <class S>
check_result check_allocator(const schedule_context<S>& k, const S& original) {
  const std::string name(schedule_checks::allocator);
  if (auto skip =
          k.needs(name, {schedule_checks::budget_range, schedule_checks::determinism,
                         schedule_checks::final_phase, schedule_checks::warm_up,
                         schedule_checks::non_increasing, schedule_checks::with_initial_budget}))
    return *skip;
  if (k.b0 < 1 || k.b0 > kit_max_allocator_budget)
    return {name, check_status::skipped,
            concat("initial budget ", k.b0, " outside [1, ", kit_max_allocator_budget,
                   "] (the kit's adapters have that many triplets)")};
  // Two adapters (in 2, out 3) whose ranks add up to b0; E holds distinct magnitudes, so that
  // the magnitude metric ranks every triplet apart.
  const index_t r1 = static_cast<index_t>(k.b0 / 2), r2 = static_cast<index_t>(k.b0) - r1;
  const std::vector<adapter_shape> shapes = {{"first", 2, 3, r1, {}}, {"second", 2, 3, r2, {}}};
  struct buffers {
    std::vector<double> A, E, B, gA, gE, gB;
  };
  std::vector<buffers> data(2);
  std::vector<adapter_tensors<double>> views;
  for (std::size_t a = 0; a < 2; ++a) {
    const index_t r = shapes[a].rank;
    buffers& d = data[a];
    d.A.assign(static_cast<std::size_t>(2 * r), 0.5);
    d.B.assign(static_cast<std::size_t>(3 * r), 0.5);
    d.E.resize(static_cast<std::size_t>(r));
    for (index_t i = 0; i < r; ++i)
      d.E[static_cast<std::size_t>(i)] = static_cast<double>(2 * i + static_cast<index_t>(a) + 1);
    d.gA.assign(d.A.size(), 0.0);
    d.gE.assign(d.E.size(), 0.0);
    d.gB.assign(d.B.size(), 0.0);
    views.push_back({{make_matrix_view(d.A.data(), r, 2), vector_view<double>(d.E.data(), r),
                      make_matrix_view(d.B.data(), 3, r)},
                     {make_matrix_view<const double>(d.gA.data(), r, 2),
                      vector_view<const double>(d.gE.data(), r),
                      make_matrix_view<const double>(d.gB.data(), 3, r)}});
  }
  // Every step up to a bound, then the steps around the final phase's start.
  std::vector<std::size_t> picked;
  for (std::size_t i = 0; i < k.steps.size(); ++i)
    if (i < kit_max_allocator_steps ||
        (k.steps[i] >= k.final_start - 1 && k.steps[i] <= k.final_start + 64))
      picked.push_back(i);
  std::size_t masks = 0;
  try {
    rank_allocator<double, magnitude, S> alloc(shapes, original, magnitude{},
                                               {.ties = tie_policy::exact_budget});
    for (std::size_t i : picked) {
      const std::int64_t t = k.steps[i];
      const budget_decision& want = k.first->at[i];
      const step_result<double>& r = alloc.step(t, views);
      if (r.budget != want.budget || r.mask_due != want.mask)
        return {
            name, check_status::failed,
            concat("at step ", t, " the allocator used {budget ", r.budget, ", ",
                   r.mask_due ? "mask" : "no mask", "} where at(", t, ") gives ", describe(want))};
      if (r.action == mask_action::threshold) {
        ++masks;
        if (r.kept_total != want.budget)
          return {name, check_status::failed,
                  concat("at step ", t, " the allocator kept ", r.kept_total,
                         " triplets after masking to budget ", want.budget)};
      }
      if (t > k.final_start && r.kept_total != k.bt)
        return {name, check_status::failed,
                concat("at step ", t, " (final phase) the allocator keeps ", r.kept_total,
                       " triplets, not target_budget() = ", k.bt)};
    }
  } catch (const std::exception& ex) {
    return {name, check_status::failed,
            concat("rank_allocator with this schedule threw: ", ex.what())};
  }
  return {name, check_status::passed,
          concat("rank_allocator over adapters of ranks ", r1, " + ", r2,
                 k.from_adapters ? " (b0 filled in from them)" : "", " followed ", picked.size(),
                 " steps, ", masks, " masks, each keeping exactly the budget")};
}

}  // namespace detail

/// Runs the schedule checks (see the header comment) on `schedule` and returns the report. A
/// misbehaving schedule never makes it throw: a schedule that throws fails the check that called
/// it. Compile-time requirements come first, from check_budget_schedule<S>(), whose
/// static_assert names the missing member. Throws std::invalid_argument for invalid options.
template <class S>
schedule_report check_schedule_conformance(const S& schedule,
                                           const schedule_conformance_options& options = {}) {
  static_assert(check_budget_schedule<S>());
  static_assert(std::is_copy_constructible_v<S>,
                "adalora::testing::check_schedule_conformance: the schedule must be "
                "copy-constructible (the kit and rank_allocator hold copies)");
  schedule_report report;
  if constexpr (BudgetSchedule<S> && std::is_copy_constructible_v<S>) {
    namespace d = detail;
    constexpr const char* where = "testing::check_schedule_conformance";
    ADALORA_REQUIRE(options.last_step >= -1, where, "options.last_step must be >= 0 (or -1), got ",
                    options.last_step);
    ADALORA_REQUIRE(options.warm_up_end >= -1, where,
                    "options.warm_up_end must be >= 0 (or -1), got ", options.warm_up_end);
    ADALORA_REQUIRE(options.adapters_budget >= 1, where,
                    "options.adapters_budget must be >= 1, got ", options.adapters_budget);

    d::schedule_context<S> k(options);
    try {
      if (schedule.initial_budget() == budget_from_adapters) {
        k.from_adapters = true;
        if constexpr (::adalora::detail::has_with_initial_budget<S>)
          k.schedule.emplace(schedule.with_initial_budget(options.adapters_budget));
        else
          k.schedule.emplace(schedule);
      } else {
        k.schedule.emplace(schedule);
      }
      k.b0 = k.schedule->initial_budget();
      k.bt = k.schedule->target_budget();
      k.final_start = k.schedule->final_phase_start();
    } catch (const std::exception& ex) {
      k.schedule.reset();
      k.resolve_error = ::adalora::detail::concat("with_initial_budget(", options.adapters_budget,
                                                  ") or the budget accessors threw: ", ex.what());
    }
    k.last =
        options.last_step >= 0 ? options.last_step : std::max<std::int64_t>(k.final_start, 0) + 32;
    report.schedule = ::adalora::detail::concat(
        "b0 = ", k.b0, k.from_adapters ? " (budget_from_adapters, set by the kit)" : "",
        ", bT = ", k.bt, ", final phase from step ", k.final_start, ", steps 0 to ", k.last);
    const bool valid = k.schedule && k.b0 >= 1 && k.bt >= 0 && k.bt <= k.b0 && k.final_start >= 0;
    if (valid) {
      k.steps = d::checked_steps(k.last);
      k.first.emplace(*k.schedule, k.steps);
    } else if (k.schedule) {
      k.first.emplace(*k.schedule, std::span<const std::int64_t>());
      k.first->error = "the budgets or the final phase's start are invalid";
    }
    auto add = [&](check_result r) {
      if (r.failed()) k.failed.push_back(r.name);
      report.checks.push_back(std::move(r));
    };
    add(d::check_budget_range(k));
    add(d::check_determinism(k));
    add(d::check_final_phase(k));
    add(d::check_warm_up(k));
    add(d::check_non_increasing(k));
    add(d::check_with_initial_budget(k));
    add(d::check_allocator(k, schedule));
  }
  return report;
}

}  // namespace adalora::testing
