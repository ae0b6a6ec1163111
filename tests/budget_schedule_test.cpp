#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "tests/golden.hpp"

using adalora::budget_decision;
using adalora::schedule_options;
using std::int64_t;

namespace {

schedule_options options_of(const nlohmann::json& c) {
  return {.initial_budget = c.at("init_bgt").get<int64_t>(),
          .target_budget = c.at("target_bgt").get<int64_t>(),
          .total_step = c.at("total_step").get<int64_t>(),
          .tinit = c.at("tinit").get<int64_t>(),
          .tfinal = c.at("tfinal").get<int64_t>(),
          .delta_t = c.at("deltaT").get<int64_t>()};
}

// The golden main config (docs/algorithm.md §5, worked example).
constexpr schedule_options main_options{.initial_budget = 40, .target_budget = 20,
                                        .total_step = 60, .tinit = 10, .tfinal = 10,
                                        .delta_t = 5};

// A user-defined schedule: keep everything, then drop to the target at T - tfinal.
struct user_schedule {
  budget_decision at(int64_t t) const { return {t < 50 ? 40 : 20, t >= 50}; }
  int64_t initial_budget() const { return 40; }
  int64_t target_budget() const { return 20; }
  int64_t final_phase_start() const { return 50; }
};
struct no_final_phase_start {
  budget_decision at(int64_t) const { return {40, false}; }
  int64_t initial_budget() const { return 40; }
  int64_t target_budget() const { return 20; }
};
struct wrong_budget_type {
  budget_decision at(int64_t) const { return {40, false}; }
  int initial_budget() const { return 40; }
  int64_t target_budget() const { return 20; }
  int64_t final_phase_start() const { return 50; }
};
struct at_returns_int {
  int64_t at(int64_t) const { return 40; }
  int64_t initial_budget() const { return 40; }
  int64_t target_budget() const { return 20; }
  int64_t final_phase_start() const { return 50; }
};

template <class S>
std::string class_name() {
  if constexpr (std::is_same_v<S, adalora::cubic_schedule>) return "cubic_schedule";
  if constexpr (std::is_same_v<S, adalora::linear_schedule>) return "linear_schedule";
  return "constant_schedule";
}

}  // namespace

TEST_CASE("the concept accepts the built-ins and user schedules, and rejects incomplete ones",
          "[schedule][concept]") {
  STATIC_REQUIRE(adalora::BudgetSchedule<adalora::cubic_schedule>);
  STATIC_REQUIRE(adalora::BudgetSchedule<adalora::linear_schedule>);
  STATIC_REQUIRE(adalora::BudgetSchedule<adalora::constant_schedule>);
  STATIC_REQUIRE(adalora::BudgetSchedule<user_schedule>);
  STATIC_REQUIRE_FALSE(adalora::BudgetSchedule<no_final_phase_start>);
  STATIC_REQUIRE_FALSE(adalora::BudgetSchedule<wrong_budget_type>);
  STATIC_REQUIRE_FALSE(adalora::BudgetSchedule<at_returns_int>);
  STATIC_REQUIRE_FALSE(adalora::BudgetSchedule<int>);
}

TEST_CASE("cubic_schedule reproduces loralib and PEFT for every valid config in schedule.json",
          "[schedule][golden]") {
  const auto doc = golden::load("schedule.json");
  int valid_configs = 0;
  for (const auto& c : doc.at("configs")) {
    if (!c.at("peft_config_valid").get<bool>()) continue;
    ++valid_configs;
    const std::string name = c.at("name").get<std::string>();
    INFO("config " << name);
    const adalora::cubic_schedule s(options_of(c));

    const auto layer_r = c.at("layer_r").get<std::vector<int64_t>>();
    REQUIRE(c.at("init_bgt").get<int64_t>() == std::accumulate(layer_r.begin(), layer_r.end(),
                                                               int64_t{0}));
    REQUIRE(s.initial_budget() == c.at("init_bgt").get<int64_t>());
    REQUIRE(s.target_budget() == c.at("target_bgt").get<int64_t>());

    const auto& budget = c.at("budget");
    const auto& mask = c.at("mask_ind");
    REQUIRE(budget.size() == mask.size());
    // The file covers t = 0..T+1, i.e. every phase including the final one.
    REQUIRE(static_cast<int64_t>(budget.size()) == c.at("total_step").get<int64_t>() + 2);
    int64_t first_mask = -1;
    int mismatches = 0;
    for (std::size_t i = 0; i < budget.size(); ++i) {
      const auto t = static_cast<int64_t>(i);
      const budget_decision d = s.at(t);
      const budget_decision expected{budget[i].get<int64_t>(), mask[i].get<bool>()};
      if (d != expected) {
        ++mismatches;
        UNSCOPED_INFO("t = " << t << ": got {" << d.budget << ", " << d.mask << "}, expected {"
                             << expected.budget << ", " << expected.mask << "}");
      }
      if (d.mask && first_mask < 0) first_mask = t;
      // The allocator asks kthvalue for k = b0 - budget whenever it masks: never below 1 here.
      if (d.mask) REQUIRE(s.initial_budget() - d.budget >= 1);
    }
    REQUIRE(mismatches == 0);
    REQUIRE(first_mask == c.at("first_mask_step").get<int64_t>());

    REQUIRE(s.final_phase_start() == c.at("peft_force_mask_step").get<int64_t>());
    REQUIRE(s.at(s.final_phase_start()).budget == c.at("peft_force_mask_budget").get<int64_t>());
    REQUIRE(s.initial_budget() - s.at(s.final_phase_start()).budget ==
            c.at("peft_force_mask_k").get<int64_t>());
    REQUIRE(adalora::phase_at(s.options(), s.final_phase_start()) ==
            adalora::schedule_phase::reduction);
    REQUIRE(adalora::phase_at(s.options(), s.final_phase_start() + 1) ==
            adalora::schedule_phase::final_phase);
  }
  REQUIRE(valid_configs == 6);
}

TEST_CASE("cubic_schedule rejects the config of PEFT issue #2337 (no budgeting phase)",
          "[schedule][golden][validation]") {
  const auto doc = golden::load("schedule.json");
  int invalid_configs = 0;
  for (const auto& c : doc.at("configs")) {
    if (c.at("peft_config_valid").get<bool>()) continue;
    ++invalid_configs;
    INFO("config " << c.at("name").get<std::string>());
    // In the reference the force-mask at T - tfinal lands in the warm-up: k = 0.
    REQUIRE(c.at("peft_force_mask_k").get<int64_t>() == 0);
    const auto o = options_of(c);
    REQUIRE_THROWS_AS(adalora::cubic_schedule(o), std::invalid_argument);
    REQUIRE_THROWS_WITH(adalora::cubic_schedule(o),
                        Catch::Contains("cubic_schedule") && Catch::Contains("tinit") &&
                            Catch::Contains("total_step - tfinal") &&
                            Catch::Contains(std::to_string(o.tinit)) &&
                            Catch::Contains(std::to_string(o.total_step - o.tfinal)));
  }
  REQUIRE(invalid_configs == 1);
}

TEST_CASE("docs/algorithm.md §5 worked example: budgets for t = 10..16 and the first mask at t = 15",
          "[schedule]") {
  const adalora::cubic_schedule s(main_options);
  const std::vector<int64_t> expected = {40, 38, 37, 35, 34, 33, 32};
  for (int64_t t = 10; t <= 16; ++t) REQUIRE(s.at(t).budget == expected[static_cast<std::size_t>(t - 10)]);
  for (int64_t t = 0; t < 15; ++t) REQUIRE_FALSE(s.at(t).mask);
  REQUIRE(s.at(15).mask);
  REQUIRE(s.initial_budget() - s.at(15).budget == 7);
}

TEST_CASE("the two writings of the cubic formula give the same double", "[schedule]") {
  // PEFT: (b0 - bT) * mul**3 + bT; loralib: bT + (b0 - bT) * mul**3.
  for (int64_t b0 : {16, 24, 36, 40, 48, 1000, 123457}) {
    for (int64_t bT : {int64_t{0}, b0 / 3, b0 / 2, b0 - 1}) {
      for (int64_t span : {1, 7, 40, 1000, 2999}) {
        for (int64_t i = 0; i <= span; ++i) {
          const double mul = 1.0 - static_cast<double>(i) / static_cast<double>(span);
          const double p = std::pow(mul, 3.0);
          const double peft = static_cast<double>(b0 - bT) * p + static_cast<double>(bT);
          const double ll = static_cast<double>(bT) + static_cast<double>(b0 - bT) * p;
          if (peft != ll) FAIL("b0 " << b0 << " bT " << bT << " i/span " << i << "/" << span);
        }
      }
    }
  }
  SUCCEED();
}

TEST_CASE("at(t) is defined for every t >= 0 and rejects t < 0", "[schedule][validation]") {
  const adalora::cubic_schedule c(main_options);
  const adalora::linear_schedule l(main_options);
  const adalora::constant_schedule k(main_options);
  REQUIRE_THROWS_WITH(c.at(-1), Catch::Contains("cubic_schedule::at") && Catch::Contains("-1"));
  REQUIRE_THROWS_WITH(l.at(-7), Catch::Contains("linear_schedule::at") && Catch::Contains("-7"));
  REQUIRE_THROWS_WITH(k.at(-2), Catch::Contains("constant_schedule::at") && Catch::Contains("-2"));
  REQUIRE_THROWS_AS(c.at(-1), std::invalid_argument);
  constexpr int64_t huge = std::numeric_limits<int64_t>::max();
  for (const budget_decision d : {c.at(huge), l.at(huge), k.at(huge)}) {
    REQUIRE(d.budget == 20);
    REQUIRE(d.mask);
  }
}

TEMPLATE_TEST_CASE("every built-in schedule validates its options", "[schedule][validation]",
                   adalora::cubic_schedule, adalora::linear_schedule, adalora::constant_schedule) {
  const std::string cls = class_name<TestType>();
  auto with = [](auto change) {
    schedule_options o = main_options;
    change(o);
    return o;
  };
  auto rejects = [&](const schedule_options& o, const std::string& argument,
                     const std::string& given) {
    INFO("argument " << argument << ", given " << given);
    REQUIRE_THROWS_AS(TestType(o), std::invalid_argument);
    REQUIRE_THROWS_WITH(TestType(o), Catch::StartsWith("adalora::" + cls + ": ") &&
                                         Catch::Contains(argument) && Catch::Contains(given));
  };

  rejects(with([](auto& o) { o.total_step = 0; }), "total_step must be > 0", "got 0");
  rejects(with([](auto& o) { o.total_step = -5; }), "total_step must be > 0", "got -5");
  rejects(with([](auto& o) { o.tinit = -1; }), "tinit must be >= 0", "got -1");
  rejects(with([](auto& o) { o.tfinal = -3; }), "tfinal must be >= 0", "got -3");
  rejects(with([](auto& o) { o.delta_t = 0; }), "delta_t must be >= 1", "got 0");
  rejects(with([](auto& o) { o.delta_t = -4; }), "delta_t must be >= 1", "got -4");
  // tinit == T - tfinal: no step left for the reduction phase.
  rejects(with([](auto& o) { o.tinit = 50; }), "tinit must be < total_step - tfinal",
          "tinit = 50, total_step - tfinal = 60 - 10 = 50");
  rejects(with([](auto& o) { o.tfinal = 61; }), "total_step - tfinal",
          "total_step - tfinal = 60 - 61 = -1");
  rejects(with([](auto& o) { o.initial_budget = 0; o.target_budget = 0; }),
          "initial_budget must be >= 1", "got 0");
  rejects(with([](auto& o) { o.initial_budget = (int64_t{1} << 53) + 1; }),
          "initial_budget must be <= 2^53", "got 9007199254740993");
  rejects(with([](auto& o) { o.target_budget = -1; }), "target_budget must be >= 0", "got -1");
  rejects(with([](auto& o) { o.target_budget = 40; }), "target_budget must be < initial_budget = 40",
          "got 40");
  rejects(with([](auto& o) { o.target_budget = 41; }), "target_budget must be < initial_budget = 40",
          "got 41");

  // The boundaries themselves are accepted.
  REQUIRE_NOTHROW(TestType(with([](auto& o) { o.tinit = 49; })));
  REQUIRE_NOTHROW(TestType(with([](auto& o) { o.target_budget = 0; })));
  REQUIRE_NOTHROW(TestType(with([](auto& o) { o.target_budget = 39; })));
  REQUIRE_NOTHROW(TestType({.initial_budget = 1, .target_budget = 0, .total_step = 1}));
  // Defaults: tinit = tfinal = 0, delta_t = 1 (PEFT AdaLoraConfig).
  const schedule_options defaults{.initial_budget = 24, .target_budget = 16, .total_step = 100};
  REQUIRE(defaults.tinit == 0);
  REQUIRE(defaults.tfinal == 0);
  REQUIRE(defaults.delta_t == 1);
}

TEMPLATE_TEST_CASE("phases common to every built-in schedule", "[schedule]",
                   adalora::cubic_schedule, adalora::linear_schedule, adalora::constant_schedule) {
  const schedule_options configs[] = {
      main_options,
      {.initial_budget = 48, .target_budget = 30, .total_step = 50, .tinit = 5, .tfinal = 7,
       .delta_t = 3},
      {.initial_budget = 16, .target_budget = 0, .total_step = 20},
      {.initial_budget = 2, .target_budget = 1, .total_step = 3, .tinit = 2, .tfinal = 0,
       .delta_t = 4},
  };
  for (const auto& o : configs) {
    const TestType s(o);
    const int64_t b0 = o.initial_budget, bT = o.target_budget, end = o.total_step - o.tfinal;
    INFO("b0 " << b0 << " bT " << bT << " T " << o.total_step << " tinit " << o.tinit
               << " tfinal " << o.tfinal << " delta_t " << o.delta_t);
    REQUIRE(s.initial_budget() == b0);
    REQUIRE(s.target_budget() == bT);
    REQUIRE(s.final_phase_start() == end);
    REQUIRE(adalora::final_phase_start(o) == end);
    for (int64_t t = 0; t <= o.tinit; ++t) {
      REQUIRE(s.at(t) == budget_decision{b0, false});
      REQUIRE(adalora::phase_at(o, t) == adalora::schedule_phase::warm_up);
    }
    int64_t previous = b0;
    for (int64_t t = o.tinit + 1; t <= end; ++t) {
      const auto d = s.at(t);
      REQUIRE(adalora::phase_at(o, t) == adalora::schedule_phase::reduction);
      REQUIRE(d.budget <= previous);  // monotone non-increasing
      REQUIRE(d.budget < b0);         // so k = b0 - budget >= 1 at every mask
      REQUIRE(d.budget >= bT);
      REQUIRE(d.mask == (t % o.delta_t == 0));  // absolute step, not t - tinit
      previous = d.budget;
    }
    REQUIRE(s.at(end).budget == bT);
    for (int64_t t = end + 1; t <= end + 2 * o.delta_t + 3; ++t) {
      REQUIRE(s.at(t) == budget_decision{bT, true});
      REQUIRE(adalora::phase_at(o, t) == adalora::schedule_phase::final_phase);
    }
  }
}

TEST_CASE("linear_schedule: bT + (b0 - bT) * mul, truncated", "[schedule][linear]") {
  // Reduction phase (10, 50], 40 steps; the midpoint t = 30 has mul = 0.5 exactly.
  const adalora::linear_schedule s(main_options);
  REQUIRE(s.at(30).budget == static_cast<int64_t>(20 + (40 - 20) * 0.5));
  REQUIRE(s.at(30).budget == 30);
  REQUIRE(s.at(30).mask);  // 30 % 5 == 0
  // mul = 3/4 at t = 20, 1/4 at t = 40 (exact binary fractions).
  REQUIRE(s.at(20).budget == 35);
  REQUIRE(s.at(40).budget == 25);
  // t = 11: mul = 39/40, budget = int(20 + 19.5) = 39 (the cubic has already dropped to 38).
  REQUIRE(s.at(11).budget == 39);
  REQUIRE(adalora::cubic_schedule(main_options).at(11).budget == 38);
  // An odd span: b0 = 7, bT = 0, reduction (0, 3]: int(7 * 2/3) = 4, int(7 * 1/3) = 2, then 0.
  const adalora::linear_schedule odd({.initial_budget = 7, .target_budget = 0, .total_step = 3});
  REQUIRE(odd.at(1).budget == 4);
  REQUIRE(odd.at(2).budget == 2);
  REQUIRE(odd.at(3).budget == 0);
  // Linear never lies below the cubic (mul^3 <= mul for mul in [0, 1]).
  const adalora::cubic_schedule c(main_options);
  for (int64_t t = 0; t <= 62; ++t) REQUIRE(s.at(t).budget >= c.at(t).budget);
}

TEST_CASE("constant_schedule: b0 through the warm-up, then bT at once", "[schedule][constant]") {
  const adalora::constant_schedule s(main_options);
  for (int64_t t = 0; t <= 10; ++t) REQUIRE(s.at(t) == budget_decision{40, false});
  for (int64_t t = 11; t <= 50; ++t) REQUIRE(s.at(t) == budget_decision{20, t % 5 == 0});
  for (int64_t t = 51; t <= 70; ++t) REQUIRE(s.at(t) == budget_decision{20, true});
  // First mask at the first multiple of delta_t after tinit, as for the cubic schedule.
  REQUIRE_FALSE(s.at(14).mask);
  REQUIRE(s.at(15).mask);
}

TEST_CASE("cubic_schedule agrees with the closed form on a large config", "[schedule]") {
  // loralib README example: lora_r 12 -> target 8, warm-ups 500 / 1500, interval 10, T 3000, and
  // 3 layers -- the golden readme_like config; here the closed form at the phase midpoint.
  const adalora::cubic_schedule s({.initial_budget = 36, .target_budget = 24, .total_step = 3000,
                                   .tinit = 500, .tfinal = 1500, .delta_t = 10});
  // t = 1000: mul = 0.5, mul^3 = 0.125, budget = int(24 + 12 * 0.125) = int(25.5) = 25.
  REQUIRE(s.at(1000) == budget_decision{25, true});
  // t = 750: mul = 0.75, mul^3 = 27/64, budget = int(24 + 12 * 27/64) = int(29.0625) = 29.
  REQUIRE(s.at(750) == budget_decision{29, true});
  REQUIRE(s.at(751) == budget_decision{29, false});
}
