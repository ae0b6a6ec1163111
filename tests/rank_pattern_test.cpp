// Rank patterns: PEFT's bool lists, loralib's counts, and their JSON forms.

#include <catch2/catch.hpp>

#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iterator>
#include <type_traits>
#include <vector>
#include <fstream>
#include <string>

#include "adalora/io/rank_pattern_json.hpp"
#include "adalora/rank_pattern.hpp"
#include "adalora/svd_adapter.hpp"
#include "tests/golden.hpp"

TEST_CASE("PEFT's rank pattern from the reference run reads back with names and flags",
          "[rank_pattern][golden]") {
  const auto g = golden::load("allocator_main.json");
  const auto& peft = g["expected"]["peft_f64"]["rank_pattern"];  // keys "<name>.lora_E.default"
  const adalora::rank_pattern p = adalora::rank_pattern_from_peft_json(peft);
  REQUIRE(p.size() == 5);
  const auto& loralib = g["expected"]["loralib_f64"]["rank_pattern"];
  for (const auto& [name, count] : p.counts())
    REQUIRE(count == loralib[name + ".lora_E"].get<adalora::index_t>());
  REQUIRE(p.at("layers.4").kept == std::vector<bool>(8, false));  // pruned to rank 0
  REQUIRE(p.total_kept() == g["checks"]["target_bgt"].get<adalora::index_t>());
  // Written back in PEFT's saved form: keys without the adapter suffix, same order and flags.
  const auto j = adalora::to_peft_json(p);
  REQUIRE(j.begin().key() == "layers.0.lora_E");
  REQUIRE(j["layers.3.lora_E"] == peft["layers.3.lora_E.default"]);
  REQUIRE(adalora::to_loralib_json(p)["layers.1.lora_E"] == loralib["layers.1.lora_E"]);
}

TEST_CASE("a rank pattern survives a JSON file round trip, also inside adapter_config.json",
          "[rank_pattern]") {
  adalora::rank_pattern p;
  p.add("model.q", {true, false, true});
  p.add("model.v", {});
  p.add("a.b.c", {false, false});
  const std::string path = std::string(std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp") +
                           "/adalora_rank_pattern_test.json";
  adalora::write_rank_pattern_json(p, path);
  REQUIRE(adalora::read_rank_pattern_json(path) == p);

  nlohmann::ordered_json config = {{"peft_type", "ADALORA"}, {"rank_pattern", adalora::to_peft_json(p)}};
  std::ofstream(path) << config.dump();
  REQUIRE(adalora::read_rank_pattern_json(path) == p);
  std::remove(path.c_str());
}

TEST_CASE("malformed rank patterns are refused with the key and the reason", "[rank_pattern][errors]") {
  using nlohmann::json;
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(json::array()),
                      Catch::Contains("rank_pattern_from_peft_json") && Catch::Contains("object"));
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(json{{"x.lora_E", 3}}),
                      Catch::Contains("x.lora_E") && Catch::Contains("kept count"));
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(json{{"x.lora_A", {true}}}),
                      Catch::Contains("x.lora_A"));
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(json{{"x.lora_E", {true, 1}}}),
                      Catch::Contains("only booleans"));
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(json{{"x.lora_E", "yes"}}),
                      Catch::Contains("list of booleans"));
  REQUIRE_THROWS_WITH(adalora::read_rank_pattern_json("/nonexistent/p.json"),
                      Catch::Contains("cannot open"));
  adalora::rank_pattern p;
  p.add("x", {true});
  REQUIRE_THROWS_WITH(p.add("x", {false}), Catch::Contains("already"));
  REQUIRE_THROWS_AS(p.at("y"), std::out_of_range);
}

namespace {

std::string temp_dir() {
  return std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp";
}

std::string read_error(const std::string& path) {
  try {
    (void)adalora::read_rank_pattern_json(path);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

std::string error_for_text(const std::string& text) {
  const std::string path = temp_dir() + "/adalora_rank_pattern_hostile.json";
  std::ofstream(path, std::ios::binary) << text;
  const std::string e = read_error(path);
  std::remove(path.c_str());
  return e;
}

/// An array nested `depth` deep, built without recursion (moves only).
nlohmann::json nested_array(int depth) {
  nlohmann::json j = nlohmann::json::array();
  for (int i = 1; i < depth; ++i) {
    nlohmann::json outer = nlohmann::json::array();
    outer.push_back(std::move(j));
    j = std::move(outer);
  }
  return j;
}

}  // namespace

TEST_CASE("rank pattern files nested 100,000 deep are refused; user-built deep values are "
          "described briefly", "[rank_pattern][errors][hostile]") {
  const std::string deep = std::string(100'000, '[') + std::string(100'000, ']');
  REQUIRE_THAT(error_for_text(R"({"x.lora_E":)" + deep + "}"),
               Catch::Contains("read_rank_pattern_json") && Catch::Contains("64 levels"));
  REQUIRE_THAT(error_for_text(R"({"rank_pattern":{"x.lora_E":[)" + deep + "]}}"),
               Catch::Contains("64 levels"));
  // A value built in memory is not limited by a parser: the message describes it without
  // printing (or recursing through) it.
  nlohmann::json j = nlohmann::json::object();
  j["x.lora_E"] = nlohmann::json::array();
  j["x.lora_E"].push_back(nested_array(100'000));
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(j),
                      Catch::Contains("\"x.lora_E\"") && Catch::Contains("only booleans") &&
                          Catch::Contains("an array nested 100000 levels deep"));
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(nested_array(100'000)),
                      Catch::Contains("an array nested 100000 levels deep"));
  // Long values are cut short.
  nlohmann::json long_string = {{"x.lora_E", std::string(1'000'000, 'a')}};
  std::string message;
  try {
    (void)adalora::rank_pattern_from_peft_json(long_string);
  } catch (const std::invalid_argument& e) {
    message = e.what();
  }
  REQUIRE_THAT(message, Catch::Contains("list of booleans") && Catch::Contains("characters)"));
  REQUIRE(message.size() < 400);
}

TEST_CASE("a rank pattern naming a key or a module twice is refused, naming it",
          "[rank_pattern][errors][hostile]") {
  // nlohmann kept the last value silently.
  REQUIRE_THAT(error_for_text(R"({"x.lora_E":[true],"x.lora_E":[false]})"),
               Catch::Contains("read_rank_pattern_json") && Catch::Contains("\"x.lora_E\"") &&
                   Catch::Contains("twice"));
  REQUIRE_THAT(error_for_text(R"({"rank_pattern":{"q.lora_E":[true]},"rank_pattern":null})"),
               Catch::Contains("\"rank_pattern\"") && Catch::Contains("twice"));
  // Two keys for one module: the saved form and the training form with an adapter name.
  nlohmann::ordered_json j = {{"x.lora_E", {true}}, {"x.lora_E.default", {false}}};
  REQUIRE_THROWS_WITH(adalora::rank_pattern_from_peft_json(j),
                      Catch::Contains("\"x.lora_E.default\"") && Catch::Contains("\"x\"") &&
                          Catch::Contains("second time"));
}

TEST_CASE("reading a directory, a FIFO or a device as a rank pattern fails at once, naming it",
          "[rank_pattern][errors][hostile]") {
  const std::string dir = temp_dir();
  REQUIRE_THAT(read_error(dir), Catch::Contains("adalora::read_rank_pattern_json: '" + dir + "'") &&
                                    Catch::Contains("a directory"));
  const std::string fifo = dir + "/adalora_rank_pattern_test.fifo";
  std::remove(fifo.c_str());
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  REQUIRE_THAT(read_error(fifo), Catch::Contains("'" + fifo + "'") && Catch::Contains("FIFO"));
  std::remove(fifo.c_str());
  REQUIRE_THAT(read_error("/dev/zero"), Catch::Contains("'/dev/zero'") && Catch::Contains("character device"));
  REQUIRE_THROWS_AS(adalora::read_rank_pattern_json(dir), std::runtime_error);
}

TEST_CASE("writing a rank pattern is atomic and refuses names JSON cannot hold",
          "[rank_pattern][errors][hostile]") {
  const std::string dir = temp_dir() + "/adalora_rank_pattern_atomic";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/rank_pattern.json";
  adalora::rank_pattern small;
  small.add("q", {true});
  adalora::write_rank_pattern_json(small, path);

  adalora::rank_pattern large;
  for (int i = 0; i < 200; ++i) large.add("model.layers." + std::to_string(i) + ".q_proj", std::vector<bool>(8, true));
  // Files may grow to 1 KiB only: the write fails with EFBIG half-way (SIGXFSZ ignored).
  rlimit old{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit limit = old;
  limit.rlim_cur = 1024;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &limit) == 0);
  std::string error = "no error";
  try {
    adalora::write_rank_pattern_json(large, path);
  } catch (const std::runtime_error& e) {
    error = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  REQUIRE_THAT(error, Catch::Contains("adalora::write_rank_pattern_json: '" + path + "'") &&
                          Catch::Contains("previous file is intact"));
  REQUIRE(adalora::read_rank_pattern_json(path) == small);
  REQUIRE(std::distance(std::filesystem::directory_iterator(dir), std::filesystem::directory_iterator()) == 1);

  // nlohmann's type_error 316 escaped from dump() without adalora's context.
  adalora::rank_pattern bad;
  bad.add("caf\xc3", {true});
  REQUIRE_THROWS_AS(adalora::write_rank_pattern_json(bad, path), std::invalid_argument);
  REQUIRE_THROWS_WITH(adalora::write_rank_pattern_json(bad, path),
                      Catch::Contains("write_rank_pattern_json") && Catch::Contains("UTF-8"));
  REQUIRE(adalora::read_rank_pattern_json(path) == small);
  std::filesystem::remove_all(dir);
}

TEMPLATE_TEST_CASE("adapters resized to the reference run's final pattern give the masked output",
                   "[rank_pattern][golden]", float, double) {
  // The end of PEFT's reference run: E already zero where the pattern prunes. Resizing each
  // adapter to its pattern entry (PEFT resize_state_dict_by_rank_pattern) keeps r_init in the
  // scale, so the output is the masked adapter's, exactly: dropping zero terms from a sequential
  // sum changes no rounding.
  const auto g = golden::load("allocator_main.json");
  const double alpha = g["config"]["lora_alpha"].get<double>();
  const auto& expected = g["expected"][std::is_same_v<TestType, float> ? "peft_f32" : "peft_f64"];
  const adalora::rank_pattern pattern =
      adalora::rank_pattern_from_peft_json(expected["rank_pattern"]);
  for (std::size_t l = 0; l < g["layers"].size(); ++l) {
    const auto& L = g["layers"][l];
    const auto in = L["in"].get<adalora::index_t>(), out = L["out"].get<adalora::index_t>(),
               r = L["r"].get<adalora::index_t>();
    adalora::svd_adapter<TestType> masked(in, out, r, alpha);
    const auto& fp = expected["final_params"][l];
    const auto A = golden::to_matrix<TestType>(fp["A"]);
    const auto B = golden::to_matrix<TestType>(fp["B"]);
    const auto E = golden::to_vector<TestType>(fp["E"]);
    std::copy(A.data.begin(), A.data.end(), masked.params().A.data());
    std::copy(B.data.begin(), B.data.end(), masked.params().B.data());
    std::copy(E.begin(), E.end(), masked.params().E.data());

    const auto& entry = pattern.at(L["name"].get<std::string>());
    adalora::svd_adapter<TestType> resized = masked.resized(entry.kept);
    REQUIRE(resized.rank() == entry.kept_count());
    REQUIRE(resized.r_init() == r);

    const adalora::index_t n = 3;
    std::vector<TestType> x(static_cast<std::size_t>(n * in));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = TestType(0.125) * TestType(int(i % 11) - 5);
    std::vector<TestType> y_masked(static_cast<std::size_t>(n * out), TestType(0)), y_resized = y_masked;
    masked.forward(adalora::make_matrix_view<const TestType>(x.data(), n, in),
                   adalora::make_matrix_view(y_masked.data(), n, out));
    resized.forward(adalora::make_matrix_view<const TestType>(x.data(), n, in),
                    adalora::make_matrix_view(y_resized.data(), n, out));
    REQUIRE(y_resized == y_masked);
  }
}
