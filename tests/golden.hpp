#pragma once
// Test-only helpers to read the reference implementations' golden files (tests/data/*.json,
// produced by running PEFT and loralib, see docs/algorithm.md) into plain row-major buffers.

#include <nlohmann/json.hpp>

#include <cstddef>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace golden {

/// Loads tests/data/<name>; paths are relative to the Bazel runfiles root (the test's cwd).
inline nlohmann::json load(const std::string& name) {
  const std::string path = "tests/data/" + name;
  std::ifstream in(path);
  if (!in) throw std::runtime_error("golden::load: cannot open " + path);
  return nlohmann::json::parse(in);
}

/// A row-major rows x cols matrix from a JSON array of arrays, each element times `scale`.
template <class T>
struct matrix {
  std::ptrdiff_t rows = 0, cols = 0;
  std::vector<T> data;
  T& operator()(std::ptrdiff_t i, std::ptrdiff_t j) { return data[i * cols + j]; }
  const T& operator()(std::ptrdiff_t i, std::ptrdiff_t j) const { return data[i * cols + j]; }
};

template <class T>
matrix<T> to_matrix(const nlohmann::json& rows, double scale = 1.0) {
  matrix<T> m;
  m.rows = static_cast<std::ptrdiff_t>(rows.size());
  m.cols = m.rows == 0 ? 0 : static_cast<std::ptrdiff_t>(rows[0].size());
  m.data.reserve(static_cast<std::size_t>(m.rows * m.cols));
  for (const auto& row : rows) {
    if (static_cast<std::ptrdiff_t>(row.size()) != m.cols)
      throw std::runtime_error("golden::to_matrix: ragged array");
    // Integers times a power of two are exact in both float and double.
    for (const auto& v : row) m.data.push_back(static_cast<T>(v.get<double>() * scale));
  }
  return m;
}

/// A flat vector from a JSON array (of numbers, or of single-element arrays like lora_E).
template <class T>
std::vector<T> to_vector(const nlohmann::json& values, double scale = 1.0) {
  std::vector<T> v;
  for (const auto& x : values)
    v.push_back(static_cast<T>((x.is_array() ? x[0].get<double>() : x.get<double>()) * scale));
  return v;
}

}  // namespace golden
