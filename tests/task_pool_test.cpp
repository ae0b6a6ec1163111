// The task pool under the rank allocator: every task once, errors passed on, and a worker thread
// the system refuses to start (it used to hang or call std::terminate).

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <filesystem>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

#include "adalora/detail/task_pool.hpp"

namespace {

/// Threads of this process now (Linux), or 0 where /proc is not there.
std::size_t threads_now() {
  std::error_code ec;
  std::size_t n = 0;
  for (std::filesystem::directory_iterator it("/proc/self/task", ec), end; !ec && it != end; it.increment(ec)) ++n;
  return ec ? 0 : n;
}

/// Waits (up to 10 s) for the thread count to come back to `n`: a joined thread leaves
/// /proc/self/task a moment after join() returns.
bool threads_back_to(std::size_t n) {
  for (int i = 0; i < 1000; ++i) {
    if (threads_now() == n) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

std::atomic<unsigned> refused_worker{0};
std::atomic<unsigned> hook_calls{0};

/// Refuses worker `refused_worker` as std::thread does when the system has no thread left.
void refuse_one(unsigned worker) {
  ++hook_calls;
  if (worker == refused_worker)
    throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                            "thread creation refused");
}

void count_task(void* context, std::size_t i) {
  auto& counts = *static_cast<std::vector<std::atomic<int>>*>(context);
  ++counts[i];
}

}  // namespace

TEST_CASE("the task pool runs every task once and passes a task's exception on", "[threads]") {
  for (unsigned threads : {1u, 2u, 5u}) {
    adalora::detail::task_pool pool(threads);
    REQUIRE(pool.threads() == threads);
    std::vector<std::atomic<int>> counts(37);
    for (int round = 0; round < 3; ++round) pool.run(counts.size(), &count_task, &counts);
    for (auto& c : counts) REQUIRE(c == 3);
    REQUIRE_THROWS_WITH(pool.run(9, [](void*, std::size_t i) { if (i == 4) throw std::runtime_error("task 4 failed"); }, nullptr),
                        "task 4 failed");
  }
}

TEST_CASE("a worker thread the system refuses is an error: the started ones are stopped and joined",
          "[threads][errors]") {
  const std::size_t before = threads_now();
  for (unsigned refused : {3u, 7u, 1u}) {
    refused_worker = refused;
    hook_calls = 0;
    // Without the fix this std::terminate()s (joinable threads destroyed) or hangs.
    REQUIRE_THROWS_AS(adalora::detail::task_pool(8, "rank_allocator", &refuse_one), std::runtime_error);
    REQUIRE(hook_calls == refused);  // nothing is tried after the refusal
    REQUIRE_THROWS_WITH(adalora::detail::task_pool(8, "rank_allocator", &refuse_one),
                        Catch::StartsWith("adalora::rank_allocator: could not start worker thread " +
                                          std::to_string(refused) + " of 7 (") &&
                            Catch::Contains("thread creation refused") &&
                            Catch::Contains("ask for fewer") &&
                            Catch::Contains("the " + std::to_string(refused - 1) + " started were stopped and joined"));
    if (before != 0) REQUIRE(threads_back_to(before));
  }
  // A pool that can start its threads still works afterwards.
  refused_worker = 0;
  adalora::detail::task_pool pool(4, "rank_allocator", &refuse_one);
  std::vector<std::atomic<int>> counts(10);
  pool.run(counts.size(), &count_task, &counts);
  for (auto& c : counts) REQUIRE(c == 1);
}
