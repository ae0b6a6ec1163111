// Writes the seed corpus of checkpoint_fuzz: valid checkpoints of the fuzz configuration
// (fuzz_support.hpp) in each phase, both element types and both final-phase semantics, plus one
// of another metric and schedule. Regenerate (after a format change) from the repository root:
//   g++ -std=c++20 -I. tests/fuzz/make_checkpoint_corpus.cpp -o /tmp/mk && /tmp/mk tests/fuzz/corpus/checkpoint_fuzz

#include <cstdio>
#include <fstream>
#include <string>

#include "adalora/importance/magnitude.hpp"
#include "adalora/io/checkpoint.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace {

template <class T, class M, class S>
void write(const std::string& dir, const std::string& name, adalora::rank_allocator<T, M, S>& alloc,
           std::int64_t steps) {
  fuzz::tensors<T> t(fuzz::shapes());
  for (std::int64_t s = 0; s < steps; ++s) {
    t.set_gradients(s);
    alloc.step(s, t.views);
  }
  const auto bytes = adalora::checkpoint_bytes(alloc);
  std::ofstream out(dir + "/" + name, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  std::printf("%s/%s: %zu bytes after %lld steps\n", dir.c_str(), name.c_str(), bytes.size(),
              static_cast<long long>(steps));
}

template <class T>
void seeds(const std::string& dir, const std::string& type, adalora::final_phase semantics,
           adalora::non_finite_policy policy) {
  const std::string tag = type + (semantics == adalora::final_phase::peft ? "_peft" : "_loralib");
  for (std::int64_t steps : {0, 5, 10, 12}) {  // fresh, reduction, just after T - tfinal, final
    adalora::rank_allocator<T> alloc(fuzz::shapes(), adalora::cubic_schedule(fuzz::schedule_options()),
                                     {}, {.semantics = semantics, .non_finite = policy});
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
  seeds<float>(dir, "f32", adalora::final_phase::peft, adalora::non_finite_policy::ignore_elements);
  seeds<double>(dir, "f64", adalora::final_phase::loralib, adalora::non_finite_policy::skip_step);
  adalora::rank_allocator<float, adalora::magnitude, adalora::linear_schedule> mag(
      fuzz::shapes(), adalora::linear_schedule(fuzz::schedule_options()), {},
      {.ties = adalora::tie_policy::exact_budget});
  write(dir, "f32_magnitude_linear_7.ckpt", mag, 7);
  return 0;
}
