// Checks the files the fine-tuning demo writes for one task (used by finetune_test.sh):
//   check_outputs TASK OUT_DIR SUMMARY_JSON
// The JSON summary must parse and hold, for every method and budget, the metric, mean, std,
// params and per-seed ranks; the rank-history CSV must have its header and well-formed rows;
// the pictures must be SVG documents; the Markdown table must be there. With --compact's
// entries, the compacted runs must keep AdaLoRA's ranks, and with the orthogonality
// regularizer off their test metric must be the masked runs' up to rounding. The growth
// experiment (TASK planted_growth) must keep its total rank: the budget times the matrices.
// Prints what is wrong and exits 1, or prints "ok" and exits 0.

#include <cmath>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (ok) return;
  std::cerr << "check_outputs: " << what << "\n";
  ++failures;
}

std::string read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  expect(static_cast<bool>(in), "cannot read " + path);
  return s.str();
}

void check_svg(const std::string& path) {
  const std::string s = read(path);
  expect(s.rfind("<svg ", 0) == 0, path + " does not start with <svg");
  expect(s.size() > 7 && s.substr(s.size() - 7) == "</svg>\n", path + " does not end with </svg>");
  expect(s.find("<polyline") != std::string::npos || s.find("<rect") != std::string::npos,
         path + " draws nothing");
}

void check_csv(const std::string& path, const std::set<std::string>& adapters) {
  std::istringstream in(read(path));
  std::string line;
  std::getline(in, line);
  expect(line == "method,budget,seed,step,adapter,kept",
         path + ": unexpected header '" + line + "'");
  int rows = 0;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string method, budget, seed, step, adapter, kept, extra;
    const bool six = std::getline(fields, method, ',') && std::getline(fields, budget, ',') &&
                     std::getline(fields, seed, ',') && std::getline(fields, step, ',') &&
                     std::getline(fields, adapter, ',') && std::getline(fields, kept, ',') &&
                     !std::getline(fields, extra, ',');
    expect(six, path + ": row is not 6 fields: " + line);
    if (!six) break;
    expect(method.rfind("adalora", 0) == 0, path + ": unknown method in: " + line);
    expect(adapters.count(adapter) == 1, path + ": unknown adapter in: " + line);
    try {
      expect(std::stoi(budget) >= 1 && std::stoi(seed) >= 0 && std::stoll(step) >= 0 &&
                 std::stoi(kept) >= 0,
             path + ": bad numbers in: " + line);
    } catch (const std::exception&) {
      expect(false, path + ": not numbers: " + line);
    }
    ++rows;
  }
  expect(rows > 0, path + " has no rows");
}

/// --compact's entries: the compacted runs are AdaLoRA's runs at its chosen learning rate, so
/// they keep its ranks; without the regularizer their metric is the masked runs' up to rounding.
void check_compaction(const std::string& path, const nlohmann::json& e) {
  const double orth = e.at("orth_weight").get<double>();
  for (const auto& c : e.at("compaction")) {
    const std::string where = path + ": compaction at budget " + c.at("budget").dump();
    const nlohmann::json* adalora = nullptr;
    for (const auto& r : e.at("results"))
      if (r.at("method") == "adalora" && r.at("budget") == c.at("budget")) adalora = &r;
    expect(adalora != nullptr, where + ": no AdaLoRA result at that budget");
    if (adalora == nullptr) continue;
    expect(c.at("lr") == adalora->at("lr"), where + ": not AdaLoRA's learning rate");
    expect(c.at("ranks_compacted") == adalora->at("ranks"), where + ": ranks " +
           c.at("ranks_compacted").dump() + " are not AdaLoRA's " + adalora->at("ranks").dump());
    const auto& masked = c.at("metric_masked");
    const auto& compacted = c.at("metric_compacted");
    expect(masked.size() == compacted.size() && !masked.empty(), where + ": metric sizes");
    for (std::size_t s = 0; s < masked.size() && s < compacted.size(); ++s) {
      const double a = masked[s].get<double>(), b = compacted[s].get<double>();
      expect(a == adalora->at("values")[s].get<double>(),
             where + ": the masked run is not AdaLoRA's run of the same seed");
      // Eigen's GEMM sums over the rank in blocks, so the two agree to rounding, not bits.
      if (orth == 0)
        expect(std::abs(a - b) <= 1e-4 * std::abs(a),
               where + ": masked " + std::to_string(a) + " and compacted " + std::to_string(b) +
                   " differ by more than rounding with the regularizer off");
    }
    for (const auto& f : c.at("kept_cost_fraction"))
      expect(f.get<double>() >= 0 && f.get<double>() <= 1, where + ": kept cost outside [0, 1]");
    for (const char* k : {"step_ms_masked", "step_ms_compacted"})
      for (const auto& ms : c.at(k)) expect(ms.get<double>() > 0, where + ": " + k + " <= 0");
  }
}

void check_json(const std::string& path, const std::string& task, std::set<std::string>* adapters) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read(path));
  } catch (const std::exception& e) {
    expect(false, path + " is not valid JSON: " + e.what());
    return;
  }
  const nlohmann::json* entry = nullptr;
  for (const auto& t : j.at("tasks"))
    if (t.at("task") == task) entry = &t;
  expect(entry != nullptr, path + " has no task " + task);
  if (entry == nullptr) return;
  const auto& e = *entry;
  const std::size_t n = e.at("adapters").size();
  for (const auto& a : e.at("adapters")) adapters->insert(a.get<std::string>());
  expect(n > 0, "no adapters");
  if (task.rfind("planted", 0) == 0) expect(e.at("planted_ranks").size() == n, "planted_ranks size");
  std::set<std::string> methods;
  for (const auto& r : e.at("results")) {
    const std::string m = r.at("method");
    methods.insert(m);
    const std::string where = path + ": " + m + " budget " + r.at("budget").dump();
    expect(r.at("metric") == e.at("metric"), where + ": metric differs from the task's");
    expect(std::isfinite(r.at("mean").get<double>()), where + ": mean is not finite");
    expect(r.at("std").get<double>() >= 0, where + ": std < 0");
    expect(r.at("params").get<double>() > 0, where + ": params <= 0");
    expect(r.at("budget").is_null() == (m == "full"), where + ": budget null iff full");
    expect(!r.at("ranks").empty(), where + ": no ranks");
    for (const auto& ranks : r.at("ranks")) {
      expect(ranks.size() == n, where + ": ranks size");
      int total = 0;
      for (const auto& k : ranks) total += k.get<int>();
      // Growth keeps the total at the budget (constant) or brings it there (rising).
      if (m == "adalora_growth")
        expect(total == r.at("budget").get<int>() * static_cast<int>(n),
               where + ": growth's total rank " + std::to_string(total) + " is not the budget's");
    }
  }
  const bool growth = task == "planted_growth";
  for (const char* m : {"lora", "adalora", growth ? "adalora_growth" : "full"})
    expect(methods.count(m) == 1, path + ": no results for the method " + m);
  for (const std::string& m : methods)
    expect(m == "lora" || m == "adalora" || m == "full" || m == "svd_fixed_rank" ||
               m == "lora_adalora_ranks" || m == "adalora_growth",
           path + ": unknown method " + m);
  if (e.contains("compaction")) check_compaction(path, e);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: check_outputs TASK OUT_DIR SUMMARY_JSON\n";
    return 2;
  }
  const std::string task = argv[1], dir = argv[2], json = argv[3];
  try {
    std::set<std::string> adapters;
    check_json(json, task, &adapters);
    check_csv(dir + "/" + task + "_rank_history.csv", adapters);
    check_svg(dir + "/" + task + "_ranks.svg");
    check_svg(dir + "/" + task + "_curves.svg");
    expect(read(dir + "/" + task + "_table.md").find("| method |") != std::string::npos,
           task + "_table.md has no table");
  } catch (const std::exception& e) {  // nlohmann's at() on a missing key, a wrong type
    expect(false, json + ": " + e.what());
  }
  if (failures > 0) return 1;
  std::cout << "check_outputs: " << task << " ok\n";
  return 0;
}
