// Unit test of the custom communicator, with adalora's testing kit (//adalora:testing): what
// docs/communicators.md asks of any communicator, without MPI or a second process.
//  1. compile time: it satisfies adalora::Communicator (check_communicator names a missing
//     requirement);
//  2. behaviour: the communicator conformance kit, for 1 to 5 participants (the ring's chunks
//     are then empty, single values and longer runs);
//  3. its own contract: buffers of different lengths are refused on every participant.
//
//   bazel test //examples/custom_communicator:ring_communicator_test

#include <catch2/catch.hpp>

#include <stdexcept>
#include <thread>
#include <vector>

#include "adalora/testing/communicator_conformance.hpp"
#include "examples/custom_communicator/ring_communicator.hpp"

namespace {

static_assert(adalora::Communicator<example::ring_communicator>);

}  // namespace

TEST_CASE("ring_communicator passes the communicator conformance kit", "[ring]") {
  for (int n = 1; n <= 5; ++n) {
    example::ring ring(n);
    std::vector<example::ring_communicator> comms;
    for (int p = 0; p < n; ++p) comms.emplace_back(ring, p);
    const auto report = adalora::testing::check_communicator_conformance(comms);
    INFO(report);
    REQUIRE(report.ok());
  }
}

TEST_CASE("ring_communicator refuses buffers of different lengths on every participant", "[ring]") {
  example::ring ring(2);
  int refused = 0;
  std::vector<std::thread> threads;
  std::vector<int> refusals(2, 0);
  for (int p = 0; p < 2; ++p)
    threads.emplace_back([&, p] {
      example::ring_communicator comm(ring, p);
      std::vector<double> v(p == 0 ? 4 : 5, 1.0);
      try {
        comm.all_reduce_sum(v);
      } catch (const std::invalid_argument&) {
        refusals[static_cast<std::size_t>(p)] = 1;
      }
    });
  for (std::thread& t : threads) t.join();
  for (int r : refusals) refused += r;
  REQUIRE(refused == 2);
  REQUIRE_THROWS_AS(example::ring_communicator(ring, 2), std::invalid_argument);
}
