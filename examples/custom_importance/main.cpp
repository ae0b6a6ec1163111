// A custom importance metric plugged into the rank allocator: Fisher saliency w²·EMA(g²)
// (fisher_importance.hpp) next to AdaLoRA's own smoothed sensitivity, on the testing kit's
// planted-rank problem: six adapters whose true updates have ranks {4, 0, 1, 3, 0, 2}, trained
// from rank 6 each (b0 = 36) down to a total of 10. A good metric keeps exactly the planted ranks.
//
//   bazel run -c opt //examples/custom_importance -- [--seed N] [--beta B]
//
// With your own metric: replace example::fisher_importance below by it, and copy
// fisher_importance_test.cpp for its unit test.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>

#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/testing/planted_rank.hpp"
#include "examples/custom_importance/fisher_importance.hpp"

int main(int argc, char** argv) {
  adalora::testing::planted_rank_options problem;  // the kit's defaults: 300 Adam steps
  example::fisher_importance::options fisher;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--seed") == 0) {
      problem.seed = std::strtoull(argv[i + 1], nullptr, 10);
    } else if (std::strcmp(argv[i], "--beta") == 0) {
      fisher.beta = std::strtod(argv[i + 1], nullptr);
    } else {
      std::fprintf(stderr, "usage: %s [--seed N] [--beta B]\n", argv[0]);
      return 2;
    }
  }

  // The metric is the allocator's second template argument; run_planted_rank_problem builds
  // rank_allocator<float, fisher_importance> and calls step() after every optimizer step.
  const auto ours = adalora::testing::run_planted_rank_problem<float>(
      example::fisher_importance(fisher), problem);
  const auto baseline =
      adalora::testing::run_planted_rank_problem<float>(adalora::smoothed_sensitivity{}, problem);

  std::cout << "fisher_importance (beta " << fisher.beta << "): " << ours
            << "\nsmoothed_sensitivity (AdaLoRA): " << baseline << '\n';
  if (ours.exact)
    std::cout << "fisher_importance kept exactly the planted ranks\n";
  else
    std::cout << "fisher_importance recovered " << ours.overlap * 100 << "% of the planted rank\n";
  return 0;
}
