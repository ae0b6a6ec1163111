// libFuzzer target: arbitrary bytes as a rank-allocator checkpoint. Build and run with
// tests/fuzz/run_fuzzers.sh; the seeds in tests/fuzz/corpus/checkpoint_fuzz come from
// make_checkpoint_corpus.cpp.
//
// Must never crash, leak or trip a sanitizer. Every input is tried twice: as given (which the
// header checks and checksums almost always refuse) and with its header re-sealed (payload
// size and both CRC-32s recomputed), so that mutations reach the payload parser behind the
// checksums. Each try loads into allocators of the seeds' configuration (float and double),
// which must be unchanged after a refusal, and rebuilds an allocator from the bytes' own
// configuration (read_checkpoint_config), into which the same bytes must then load. Whatever
// loads must be consistent (fuzz::check_loaded) and able to step. A configuration that reads
// must not need more memory than the bytes back (checkpoint_limits): every one is built.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <vector>

#include "adalora/importance/magnitude.hpp"
#include "adalora/io/checkpoint.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace {

/// An allocator of the seeds' configuration in a state of its own (three steps in), kept across
/// inputs: a refused load must leave it as it was, and after a successful one it is loaded back
/// from its own checkpoint (which restore() must undo completely).
template <class T>
struct fixed_target {
  adalora::rank_allocator<T> alloc;
  std::vector<std::uint8_t> own;
  std::vector<double> before;

  explicit fixed_target(const adalora::allocator_options& options)
      : alloc(fuzz::shapes(), adalora::cubic_schedule(fuzz::schedule_options()), {}, options) {
    fuzz::tensors<T> t(fuzz::shapes());
    for (std::int64_t s = 0; s < 3; ++s) {
      t.set_gradients(s);
      alloc.step(s, t.views);
    }
    own = adalora::checkpoint_bytes(alloc);
    before = fuzz::snapshot(alloc);
  }

  void load(std::span<const std::uint8_t> bytes) {
    try {
      adalora::load_checkpoint_bytes(alloc, bytes);
    } catch (const adalora::checkpoint_error&) {
      if (fuzz::snapshot(alloc) != before) fuzz::invariant_broken("a refused load changed the allocator");
      return;
    }
    fuzz::check_loaded(alloc, bytes);
    adalora::load_checkpoint_bytes(alloc, own);
    if (fuzz::snapshot(alloc) != before) fuzz::invariant_broken("restore() did not undo a loaded state");
  }
};

/// The two largest parts of what an allocator for these shapes allocates, in bytes: the metric
/// state of the slice this process holds, and the block sums of the whole adapters' rows of A
/// and columns of B (one per 256 of in_features and out_features). Worked out here apart from
/// the library's own estimate, which it checks.
template <class T>
long double core_bytes(std::span<const adalora::adapter_shape> shapes, std::size_t state_size) {
  long double n = 0;
  for (const auto& s : shapes) {
    const fuzz::local_extent d(s);
    n += static_cast<long double>(d.r) * static_cast<long double>(d.in + 1 + d.out) *
         static_cast<long double>(state_size * sizeof(T));
    n += 8.0L * static_cast<long double>(s.rank) *
         (std::ceil(static_cast<long double>(s.in_features) / 256.0L) +
          std::ceil(static_cast<long double>(s.out_features) / 256.0L));
  }
  return n;
}

/// Rebuilds the allocator the bytes describe and loads them into it.
template <class T, class Metric, class Schedule>
void load_own_config(std::span<const std::uint8_t> bytes) {
  std::unique_ptr<adalora::rank_allocator<T, Metric, Schedule>> alloc;
  try {
    // A small allowance beyond what the bytes back keeps every input fast.
    constexpr std::uint64_t allowance = 1u << 20;
    auto c = adalora::read_checkpoint_config_bytes<T, Metric, Schedule>(bytes, {.max_unbacked_bytes = allowance});
    if (core_bytes<T>(c.shapes, Metric::state_size) > 16.0L * static_cast<long double>(bytes.size()) + allowance)
      fuzz::invariant_broken("read_checkpoint_config accepted shapes that need more memory than the bytes back");
    c.options.threads = 1;
    alloc = std::make_unique<adalora::rank_allocator<T, Metric, Schedule>>(c.shapes, c.schedule,
                                                                           c.metric, c.options);
  } catch (const adalora::checkpoint_error&) {
    return;
  }
  try {
    adalora::load_checkpoint_bytes(*alloc, bytes);
  } catch (const adalora::checkpoint_error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    fuzz::invariant_broken("bytes whose configuration reads do not load into that configuration");
  }
  fuzz::check_loaded(*alloc, bytes);
}

void try_all(std::span<const std::uint8_t> bytes) {
  // The options of the seeds (make_checkpoint_corpus.cpp).
  static fixed_target<float> f32({.final_phase = adalora::final_phase_rule::peft});
  static fixed_target<double> f64({.final_phase = adalora::final_phase_rule::loralib,
                                   .non_finite = adalora::non_finite_policy::skip_step});
  f32.load(bytes);
  f64.load(bytes);
  load_own_config<float, adalora::smoothed_sensitivity, adalora::cubic_schedule>(bytes);
  load_own_config<double, adalora::smoothed_sensitivity, adalora::cubic_schedule>(bytes);
  load_own_config<float, adalora::magnitude, adalora::linear_schedule>(bytes);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::uint8_t> bytes(data, size);
  try_all(bytes);
  if (size >= adalora::detail::ckpt::header_size) {
    std::vector<std::uint8_t> sealed(bytes.begin(), bytes.end());
    adalora::detail::ckpt::seal(sealed);
    try_all(sealed);
  }
  return 0;
}
