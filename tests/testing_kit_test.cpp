// The testing kit for custom importance metrics (adalora/testing/): the built-in metrics pass
// the conformance checks, deliberately broken metrics fail exactly the check that names their
// defect, and the planted-rank problem tells a good metric from a bad one.

#include <algorithm>
#include <bit>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "adalora/importance/magnitude.hpp"
#include "adalora/importance/metric.hpp"
#include "adalora/importance/sensitivity.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/testing/conformance.hpp"
#include "adalora/testing/planted_rank.hpp"

// This binary counts its heap allocations, so the kit's no_allocation check runs.
ADALORA_TESTING_COUNT_ALLOCATIONS();

namespace {

using adalora::tensor_role;
namespace at = adalora::testing;

// ---- deliberately broken metrics: each breaks exactly one requirement -------------------------

/// "Relative sensitivity" |w| / |∇w|: NaN for a zero parameter and gradient, infinite for a zero
/// gradient.
struct ratio_metric {
  static constexpr std::size_t state_size = 1;
  template <class T>
  T update(tensor_role, T p, T g, std::span<T, 1> s) const {
    s[0] = std::abs(p) / std::abs(g);
    return s[0];
  }
  template <class T>
  T score(tensor_role, T, std::span<const T, 1> s) const {
    return s[0];
  }
};

/// Forgot the absolute value: w · ∇w is negative half of the time.
struct signed_sensitivity {
  static constexpr std::size_t state_size = 1;
  template <class T>
  T update(tensor_role, T p, T g, std::span<T, 1> s) const {
    s[0] = p * g;
    return s[0];
  }
  template <class T>
  T score(tensor_role, T, std::span<const T, 1> s) const {
    return s[0];
  }
};

/// A hidden call counter (a "random tie-break") makes the score depend on the call history.
struct jittered_sensitivity {
  static constexpr std::size_t state_size = 1;
  static inline unsigned calls = 0;
  template <class T>
  T update(tensor_role, T p, T g, std::span<T, 1> s) const {
    s[0] = std::abs(p * g) + T(++calls % 7) * T(1e-3);
    return s[0];
  }
  template <class T>
  T score(tensor_role, T, std::span<const T, 1> s) const {
    return s[0];
  }
};

/// score() forgets the uncertainty factor that update() applies.
struct inconsistent_metric {
  static constexpr std::size_t state_size = 2;
  template <class T>
  T update(tensor_role, T p, T g, std::span<T, 2> s) const {
    const T ipt = std::abs(p * g);
    s[0] = T(0.5) * s[0] + T(0.5) * ipt;
    s[1] = T(0.5) * s[1] + T(0.5) * std::abs(ipt - s[0]);
    return s[0] * s[1];
  }
  template <class T>
  T score(tensor_role, T, std::span<const T, 2> s) const {
    return s[0];
  }
};

/// A median over a scratch buffer that lives on the heap: allocates at every call.
struct median_metric {
  static constexpr std::size_t state_size = 3;
  template <class T>
  T update(tensor_role, T p, T g, std::span<T, 3> s) const {
    s[0] = s[1];
    s[1] = s[2];
    s[2] = std::abs(p * g);
    std::vector<T> window(s.begin(), s.end());
    std::nth_element(window.begin(), window.begin() + 1, window.end());
    return window[1];
  }
  template <class T>
  T score(tensor_role, T, std::span<const T, 3> s) const {
    std::vector<T> window(s.begin(), s.end());
    std::nth_element(window.begin(), window.begin() + 1, window.end());
    return window[1];
  }
};

/// Writes past its one state value: into the next element's state (or a guard).
struct overflowing_metric {
  static constexpr std::size_t state_size = 1;
  template <class T>
  T update(tensor_role, T p, T g, std::span<T, 1> s) const {
    s[0] = std::abs(p * g);
    s.data()[1] = T(0);  // the bug under test: one past the end of this element's state
    return s[0];
  }
  template <class T>
  T score(tensor_role, T, std::span<const T, 1> s) const {
    return s[0];
  }
};

/// Keeps a running total in a mutable member shared by all elements.
struct running_mean_metric {
  static constexpr std::size_t state_size = 0;
  mutable double total = 0;
  mutable double count = 0;
  template <class T>
  T update(tensor_role, T p, T g, std::span<T, 0>) const {
    total += std::abs(static_cast<double>(p * g));
    count += 1;
    return static_cast<T>(total / count);
  }
  template <class T>
  T score(tensor_role, T, std::span<const T, 0>) const {
    return static_cast<T>(total / count);
  }
};

// ---- metrics that conform but rank badly, for the planted-rank problem -------------------------

/// A pseudo-random score per (role, param, grad): conformant (deterministic, stateless apart from
/// remembering its last score for score()), and useless for ranking.
struct hashed_metric {
  static constexpr std::size_t state_size = 1;
  template <class T>
  T update(tensor_role role, T p, T g, std::span<T, 1> s) const {
    using bits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
    const std::uint64_t key = (std::uint64_t{std::bit_cast<bits>(p)} * 0x9e3779b97f4a7c15ULL) ^
                              std::bit_cast<bits>(g) ^
                              (std::uint64_t{static_cast<std::uint8_t>(role)} << 60);
    s[0] = static_cast<T>(static_cast<double>(at::detail::splitmix64(key) >> 11) * 0x1.0p-53);
    return s[0];
  }
  template <class T>
  T score(tensor_role, T, std::span<const T, 1> s) const {
    return s[0];
  }
};

/// Every element equally important: every triplet ties, and the references' tie rule prunes them
/// all.
struct constant_metric {
  static constexpr std::size_t state_size = 0;
  template <class T>
  T update(tensor_role, T, T, std::span<T, 0>) const {
    return T(1);
  }
  template <class T>
  T score(tensor_role, T, std::span<const T, 0>) const {
    return T(1);
  }
};

using names = std::vector<std::string>;

}  // namespace

static_assert(adalora::ImportanceMetric<ratio_metric, float>);
static_assert(adalora::ImportanceMetric<median_metric, double>);

TEMPLATE_TEST_CASE("the built-in metrics pass the conformance kit", "[testing][conformance]", float,
                   double) {
  auto check = [](const auto& metric) {
    const at::conformance_report report = at::check_metric_conformance<TestType>(metric);
    INFO(report);
    REQUIRE(report.ok());
    REQUIRE(report.checks.size() == 8);
    // The counter is wired in this binary, so nothing may be skipped.
    for (const at::check_result& c : report.checks) REQUIRE(c.passed());
  };
  check(adalora::smoothed_sensitivity{});
  check(adalora::smoothed_sensitivity({.beta1 = 0.5, .beta2 = 0.99}));
  check(adalora::sensitivity{});
  check(adalora::magnitude{});
  check(adalora::parameter_magnitude{});
}

TEMPLATE_TEST_CASE("broken metrics fail exactly the check that names their defect",
                   "[testing][conformance]", float, double) {
  SECTION("NaN and infinite scores") {
    const auto report = at::check_metric_conformance<TestType>(ratio_metric{});
    INFO(report);
    REQUIRE(report.failed() == names{"finite_nonnegative"});
    // The allocator refuses non-finite scores, so its checks cannot run, and say why.
    REQUIRE(report.at(at::checks::output_size).skipped());
    REQUIRE(report.at(at::checks::no_allocation).skipped());
    REQUIRE(report.at(at::checks::finite_nonnegative).message.find("nan") != std::string::npos);
  }
  SECTION("negative scores") {
    const auto report = at::check_metric_conformance<TestType>(signed_sensitivity{});
    INFO(report);
    REQUIRE(report.failed() == names{"finite_nonnegative"});
  }
  SECTION("non-deterministic") {
    const auto report = at::check_metric_conformance<TestType>(jittered_sensitivity{});
    INFO(report);
    REQUIRE(report.failed() == names{"determinism"});
    REQUIRE(report.at(at::checks::state_independence).skipped());
    REQUIRE(report.at(at::checks::reset).skipped());
  }
  SECTION("score() disagrees with update()") {
    const auto report = at::check_metric_conformance<TestType>(inconsistent_metric{});
    INFO(report);
    REQUIRE(report.failed() == names{"score_consistency"});
  }
  SECTION("allocates per call") {
    const auto report = at::check_metric_conformance<TestType>(median_metric{});
    INFO(report);
    REQUIRE(report.failed() == names{"no_allocation"});
  }
  SECTION("writes outside its own state") {
    const auto report = at::check_metric_conformance<TestType>(overflowing_metric{});
    INFO(report);
    REQUIRE(report.failed() == names{"inputs_untouched"});
    // The allocator's state buffer has no guards: the kit does not hand it such a metric.
    REQUIRE(report.at(at::checks::output_size).skipped());
    REQUIRE(report.at(at::checks::no_allocation).skipped());
  }
  SECTION("state shared between elements in the metric object") {
    const auto report = at::check_metric_conformance<TestType>(running_mean_metric{});
    INFO(report);
    // The mutable member is seen as a change of the metric object, as cross-element dependence
    // and as a reset that does not reset; the allocator's scores then differ from a replay.
    const auto failed = report.failed();
    REQUIRE(std::find(failed.begin(), failed.end(), "inputs_untouched") != failed.end());
    REQUIRE(std::find(failed.begin(), failed.end(), "state_independence") != failed.end());
    REQUIRE(std::find(failed.begin(), failed.end(), "reset") != failed.end());
  }
}

TEST_CASE("the report reads well and an unwired counter can be made to fail",
          "[testing][conformance]") {
  const auto report = at::check_metric_conformance<float>(adalora::smoothed_sensitivity{});
  const std::string text = report.summary();
  REQUIRE(text.find("importance metric conformance (float): ok") == 0);
  for (std::string_view name : {at::checks::output_size, at::checks::no_allocation})
    REQUIRE(text.find(std::string(name)) != std::string::npos);
  REQUIRE(report.find("no_such_check") == nullptr);
  REQUIRE_THROWS_AS(report.at("no_such_check"), std::out_of_range);
  REQUIRE(at::allocation_counter::wired());
  REQUIRE_THROWS_AS(at::check_metric_conformance<float>(adalora::magnitude{}, {.steps = 1}),
                    std::invalid_argument);
}

TEMPLATE_TEST_CASE("planted ranks: smoothed_sensitivity recovers them, a random metric does not",
                   "[testing][planted]", float, double) {
  const auto start = std::chrono::steady_clock::now();
  const at::planted_rank_report good =
      at::run_planted_rank_problem<TestType>(adalora::smoothed_sensitivity{});
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  INFO(good);
  INFO("runtime " << seconds << " s");
  REQUIRE(good.planted == std::vector<adalora::index_t>{4, 0, 1, 3, 0, 2});
  // Measured with the default options: overlap 1 (exact) in float and double, relative loss
  // 4e-5; over seeds 1..100 the mean overlap is 0.989 and the minimum 0.7 (91 exact).
  REQUIRE(good.overlap >= 0.8);
  REQUIRE(good.relative_loss() < 0.05);
  std::int64_t kept = 0;
  for (auto k : good.kept) kept += k;
  REQUIRE(kept <= 10);  // never more than the final budget Σ planted

  // Same options, same report: the problem is deterministic.
  const auto again = at::run_planted_rank_problem<TestType>(adalora::smoothed_sensitivity{});
  REQUIRE(again.kept == good.kept);
  REQUIRE(again.final_loss == good.final_loss);

  // A metric can conform and still rank badly: the kit checks the contract, this problem checks
  // the ranking. Measured: hashed 0.4 (relative loss 0.74), constant 0 (everything ties and is
  // pruned, loss unchanged).
  REQUIRE(at::check_metric_conformance<TestType>(hashed_metric{}).ok());
  const auto hashed = at::run_planted_rank_problem<TestType>(hashed_metric{});
  INFO(hashed);
  REQUIRE(hashed.overlap <= 0.6);
  REQUIRE(good.overlap >= hashed.overlap + 0.3);
  REQUIRE(good.final_loss < 0.1 * hashed.final_loss);
  const auto constant = at::run_planted_rank_problem<TestType>(constant_metric{});
  INFO(constant);
  REQUIRE(constant.overlap == 0.0);
  REQUIRE(constant.kept == std::vector<adalora::index_t>(6, 0));
}

TEST_CASE("planted ranks: options are validated", "[testing][planted]") {
  at::planted_rank_options o;
  o.adapters = {{"too_many", 8, 8, 7}};  // above init_rank 6
  REQUIRE_THROWS_AS(at::run_planted_rank_problem<float>(adalora::magnitude{}, o),
                    std::invalid_argument);
  o.adapters = {{"thin", 3, 8, 4}};  // above min(in, out)
  REQUIRE_THROWS_AS(at::run_planted_rank_problem<float>(adalora::magnitude{}, o),
                    std::invalid_argument);
}
