// Writes the seed corpus of checkpoint_fuzz: valid checkpoints of the fuzz configuration
// (fuzz_support.hpp) in each phase, both element types and both final-phase semantics, one of
// another metric and schedule, one of a sharded run, and that one with a shape that the file's
// bytes do not back (read_checkpoint_config refuses it), and runs whose rank changed: compacted
// in the final phase, grown before it, grown then compacted. Regenerate (after a format change)
// from the repository root:
//   g++ -std=c++20 -I. tests/fuzz/make_checkpoint_corpus.cpp -o /tmp/mk && /tmp/mk tests/fuzz/corpus/checkpoint_fuzz
// The v1_*.ckpt seeds are not written here: they are this program's output under format version
// 1, kept so that the fuzzer (and tests/checkpoint_rank_change_test.cpp) go on reading old files.

#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "adalora/importance/magnitude.hpp"
#include "adalora/io/checkpoint.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace {

void write_bytes(const std::string& dir, const std::string& name, const std::vector<std::uint8_t>& bytes) {
  std::ofstream out(dir + "/" + name, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  std::printf("%s/%s: %zu bytes\n", dir.c_str(), name.c_str(), bytes.size());
}

template <class T, class M, class S>
std::vector<std::uint8_t> stepped_bytes(adalora::rank_allocator<T, M, S>& alloc, std::int64_t steps) {
  fuzz::tensors<T> t({alloc.shapes().begin(), alloc.shapes().end()});
  for (std::int64_t s = 0; s < steps; ++s) {
    t.set_gradients(s);
    alloc.step(s, t.views);
  }
  return adalora::checkpoint_bytes(alloc);
}

/// Steps with a rank change: grow(add) after step `grow_after` (-1: never), compact() once the
/// pattern is final and prunes something; the tensors follow the shapes (their values restart,
/// which a seed does not mind).
template <class T>
std::vector<std::uint8_t> changed_bytes(adalora::rank_allocator<T>& alloc, std::int64_t steps,
                                        std::int64_t grow_after, std::vector<adalora::index_t> add) {
  auto t = std::make_unique<fuzz::tensors<T>>(std::vector<adalora::adapter_shape>(alloc.shapes().begin(), alloc.shapes().end()));
  for (std::int64_t s = 0; s < steps; ++s) {
    t->set_gradients(s);
    alloc.step(s, t->views);
    bool changed = false;
    if (s == grow_after) {
      alloc.grow(add);
      changed = true;
    }
    if (alloc.pattern_final() && alloc.last_result().kept_total < alloc.total_rank()) {
      alloc.compact();
      changed = true;
    }
    if (changed)
      t = std::make_unique<fuzz::tensors<T>>(std::vector<adalora::adapter_shape>(alloc.shapes().begin(), alloc.shapes().end()));
  }
  return adalora::checkpoint_bytes(alloc);
}

template <class T, class M, class S>
void write(const std::string& dir, const std::string& name, adalora::rank_allocator<T, M, S>& alloc,
           std::int64_t steps) {
  write_bytes(dir, name, stepped_bytes(alloc, steps));
}

template <class T>
void seeds(const std::string& dir, const std::string& type, adalora::final_phase_rule semantics,
           adalora::non_finite_policy policy) {
  const std::string tag = type + (semantics == adalora::final_phase_rule::peft ? "_peft" : "_loralib");
  for (std::int64_t steps : {0, 5, 10, 12}) {  // fresh, reduction, just after T - tfinal, final
    adalora::rank_allocator<T> alloc(fuzz::shapes(), adalora::cubic_schedule(fuzz::schedule_options()),
                                     {}, {.final_phase = semantics, .non_finite = policy});
    write(dir, tag + "_" + std::to_string(steps) + ".ckpt", alloc, steps);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus directory>\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  seeds<float>(dir, "f32", adalora::final_phase_rule::peft, adalora::non_finite_policy::ignore_elements);
  seeds<double>(dir, "f64", adalora::final_phase_rule::loralib, adalora::non_finite_policy::skip_step);
  adalora::rank_allocator<float, adalora::magnitude, adalora::linear_schedule> mag(
      fuzz::shapes(), adalora::linear_schedule(fuzz::schedule_options()), {},
      {.ties = adalora::tie_policy::exact_budget});
  write(dir, "f32_magnitude_linear_7.ckpt", mag, 7);

  // A process of a sharded run: two of q's triplets, two of its columns of A and three of its
  // rows of B; one of v's two triplets.
  auto shards = fuzz::shapes();
  shards[0].shard = {.triplet_count = 2, .in_count = 2, .out_count = 3};
  shards[1].shard = {.triplet_begin = 1, .triplet_count = 1};
  adalora::rank_allocator<float> sharded(shards, adalora::cubic_schedule(fuzz::schedule_options()));
  const auto bytes = stepped_bytes(sharded, 5);
  write_bytes(dir, "f32_sharded_5.ckpt", bytes);
  // The same declaring q 2^35 columns wide: 3 GiB of block sums that no byte of it backs.
  auto im = adalora::detail::ckpt::parse<float>(bytes);
  im.shapes[0].in_features = adalora::index_t{1} << 35;
  write_bytes(dir, "f32_sharded_unbacked_width.ckpt", adalora::detail::ckpt::encode(im));

  // Rank that changed (format version 2): loads reshape the fuzz target's allocators. Growth
  // stays within full rank (min(in_features, out_features)), the most a fresh allocator loads.
  const auto peft = adalora::allocator_options{.final_phase = adalora::final_phase_rule::peft};
  const auto loralib = adalora::allocator_options{.final_phase = adalora::final_phase_rule::loralib,
                                                  .non_finite = adalora::non_finite_policy::skip_step};
  const adalora::cubic_schedule schedule(fuzz::schedule_options());
  adalora::rank_allocator<float> compacted(fuzz::shapes(), schedule, {}, peft);
  write_bytes(dir, "f32_peft_compacted_11.ckpt", changed_bytes(compacted, 11, -1, {}));
  adalora::rank_allocator<double> grown(fuzz::shapes(), schedule, {}, loralib);
  write_bytes(dir, "f64_loralib_grown_6.ckpt", changed_bytes(grown, 6, 3, {1, 1, 2}));
  adalora::rank_allocator<float> both(fuzz::shapes(), schedule, {}, peft);
  write_bytes(dir, "f32_peft_grown_compacted_12.ckpt", changed_bytes(both, 12, 3, {1, 0, 4}));
  return 0;
}
