// Checks the files the fine-tuning demo writes for one task (used by finetune_test.sh):
//   check_outputs TASK OUT_DIR SUMMARY_JSON
// The JSON summary must parse and hold, for every method and budget, the metric, mean, std,
// params and per-seed ranks; the rank-history CSV must have its header and well-formed rows;
// the pictures must be SVG documents; the Markdown table must be there. Prints what is wrong
// and exits 1, or prints "ok" and exits 0.

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
  expect(line == "budget,seed,step,adapter,kept", path + ": unexpected header '" + line + "'");
  int rows = 0;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string budget, seed, step, adapter, kept, extra;
    const bool five = std::getline(fields, budget, ',') && std::getline(fields, seed, ',') &&
                      std::getline(fields, step, ',') && std::getline(fields, adapter, ',') &&
                      std::getline(fields, kept, ',') && !std::getline(fields, extra, ',');
    expect(five, path + ": row is not 5 fields: " + line);
    if (!five) break;
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
  if (task == "planted") expect(e.at("planted_ranks").size() == n, "planted_ranks size");
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
    for (const auto& ranks : r.at("ranks")) expect(ranks.size() == n, where + ": ranks size");
  }
  for (const char* m : {"lora", "adalora", "full"})
    expect(methods.count(m) == 1, path + ": no results for the method " + m);
  for (const std::string& m : methods)
    expect(m == "lora" || m == "adalora" || m == "full" || m == "svd_fixed_rank" ||
               m == "lora_adalora_ranks",
           path + ": unknown method " + m);
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
