#pragma once
// Which singular values (triplets) of each adapter are kept.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "adalora/config.hpp"
#include "adalora/matrix_view.hpp"

namespace adalora {

/// A rank pattern: per adapter (by module name) one flag per initial triplet, true = kept.
/// This is PEFT's AdaLoraConfig.rank_pattern (`{"<name>.lora_E": [bool, ...]}`, docs/algorithm.md §7);
/// loralib's form, `{"<name>.lora_E": kept count}`, is counts(). JSON reading and writing live
/// in adalora/io/rank_pattern_json.hpp so that this header needs the standard library only.
class rank_pattern {
 public:
  struct entry {
    std::string name;
    std::vector<bool> kept;
    index_t kept_count() const noexcept {
      index_t n = 0;
      for (bool k : kept) n += k ? 1 : 0;
      return n;
    }
  };

  /// Appends an adapter; names must be unique and non-empty.
  void add(std::string name, std::vector<bool> kept) {
    ADALORA_REQUIRE(!name.empty(), "rank_pattern::add", "adapter name must not be empty");
    ADALORA_REQUIRE(find(name) == nullptr, "rank_pattern::add", "adapter name '", name,
                    "' is already in the pattern");
    entries_.push_back({std::move(name), std::move(kept)});
  }

  const std::vector<entry>& entries() const noexcept { return entries_; }
  std::size_t size() const noexcept { return entries_.size(); }
  bool empty() const noexcept { return entries_.empty(); }

  /// The entry named `name`, or nullptr.
  const entry* find(std::string_view name) const noexcept {
    for (const entry& e : entries_)
      if (e.name == name) return &e;
    return nullptr;
  }
  /// The entry named `name`; throws std::out_of_range if absent.
  const entry& at(std::string_view name) const {
    const entry* e = find(name);
    if (e == nullptr)
      throw std::out_of_range(detail::concat("adalora::rank_pattern::at: no adapter named '",
                                             name, "'"));
    return *e;
  }

  /// loralib's rank pattern: kept count per adapter, in order.
  std::vector<std::pair<std::string, index_t>> counts() const {
    std::vector<std::pair<std::string, index_t>> out;
    out.reserve(entries_.size());
    for (const entry& e : entries_) out.emplace_back(e.name, e.kept_count());
    return out;
  }
  index_t total_kept() const noexcept {
    index_t n = 0;
    for (const entry& e : entries_) n += e.kept_count();
    return n;
  }

  /// Equal when both name the same adapters with the same flags, in any order: the order of
  /// entries is presentation (PEFT writes adapter_config.json with sorted keys, so a pattern
  /// read back lists "layers.10" before "layers.2", where the allocator lists them in model order).
  friend bool operator==(const rank_pattern& a, const rank_pattern& b) {
    if (a.entries_.size() != b.entries_.size()) return false;
    for (const entry& e : a.entries_) {
      const entry* other = b.find(e.name);
      if (other == nullptr || other->kept != e.kept) return false;
    }
    return true;
  }

 private:
  std::vector<entry> entries_;
};

}  // namespace adalora
