#pragma once
// A small pool of worker threads that runs numbered tasks; the caller's thread works too.
//
// Why not std::async or OpenMP: the pool is created once, so a step allocates nothing; idle
// workers sleep on a condition variable and never spin (docs/algorithm.md §13: spinning OpenMP barriers
// collapsed by 10-80x on these shared 2-core machines); and the thread count is the caller's.
//
// Each thread first runs a fixed home range of the tasks (the caller says where the ranges
// split), then helps with what is left of the others'. Fixed homes keep each thread on the same
// data from call to call, so data that fits in a core's caches stays there between steps;
// helping keeps a descheduled thread from holding up the call. Which thread runs a task is still
// not fixed, so callers give every task its own output and combine the outputs afterwards in a
// fixed order.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <stdexcept>
#include <thread>
#include <vector>

#include "adalora/config.hpp"

namespace adalora::detail {

class task_pool {
 public:
  using task_fn = void (*)(void* context, std::size_t task);
  /// Called with k before worker k (1 to threads - 1) is started; a test makes it throw as
  /// std::thread throws when the system refuses a thread. Null in production.
  using start_hook = void (*)(unsigned worker);

  /// A pool of `threads` threads in all: `threads - 1` workers plus the caller of run(). If a
  /// worker cannot be started (too many threads for the system's limits), the workers already
  /// started are stopped and joined and std::runtime_error names `owner`, the worker and the
  /// reason.
  explicit task_pool(unsigned threads, const char* owner = "task_pool", start_hook before_start = nullptr)
      : homes_(std::make_unique<home[]>(threads > 1 ? threads : 1)), threads_(threads > 1 ? threads : 1) {
    workers_.reserve(threads_ - 1);
    for (unsigned i = 1; i < threads_; ++i) {
      try {
        if (before_start) before_start(i);
        workers_.emplace_back([this, i] { work(i); });
      } catch (const std::exception& e) {
        // Unwinding with running workers would destroy what they wait on, and a joinable
        // std::thread's destructor calls std::terminate.
        stop_and_join();
        throw std::runtime_error(concat(
            "adalora::", owner, ": could not start worker thread ", i, " of ", threads_ - 1, " (",
            e.what(), "); threads = ", threads_, " asks for ", threads_ - 1,
            " workers besides the caller's thread, more than the system allows: ask for fewer (the ",
            i - 1, " started were stopped and joined)"));
      } catch (...) {
        stop_and_join();
        throw;
      }
    }
  }
  task_pool(const task_pool&) = delete;
  task_pool& operator=(const task_pool&) = delete;
  ~task_pool() { stop_and_join(); }

  unsigned threads() const noexcept { return threads_; }

  /// Runs fn(context, i) for every i in [0, n) and returns when all have finished. Thread k
  /// (the caller is 0) starts with tasks [split[k], split[k + 1]); `split` has threads() + 1
  /// non-decreasing entries from 0 to n, or is empty for equal counts. The first exception a
  /// task throws is rethrown here (the other tasks still run to completion).
  void run(std::size_t n, task_fn fn, void* context, std::span<const std::size_t> split = {}) {
    if (workers_.empty()) {
      for (std::size_t i = 0; i < n; ++i) fn(context, i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = fn;
      context_ = context;
      for (unsigned k = 0; k < threads_; ++k) {
        const std::size_t begin = split.empty() ? n * k / threads_ : std::min(split[k], n);
        const std::size_t end = split.empty() ? n * (k + 1) / threads_ : std::min(split[k + 1], n);
        homes_[k].next.store(begin, std::memory_order_relaxed);
        homes_[k].end = std::max(begin, end);
      }
      busy_ = workers_.size();
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    drain(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  /// One thread's home range; its own cache line, as every thread takes from every counter.
  struct alignas(64) home {
    std::atomic<std::size_t> next{0};
    std::size_t end = 0;
  };

  void stop_and_join() noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  void drain(unsigned self) noexcept {
    for (unsigned step = 0; step < threads_; ++step) {  // home first, then the others in turn
      home& h = homes_[(self + step) % threads_];
      for (;;) {
        const std::size_t i = h.next.fetch_add(1, std::memory_order_relaxed);
        if (i >= h.end) break;
        try {
          fn_(context_, i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mutex_);
          if (!error_) error_ = std::current_exception();
        }
      }
    }
  }

  void work(unsigned self) {
    std::size_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain(self);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_one();
    }
  }

  std::unique_ptr<home[]> homes_;
  unsigned threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  task_fn fn_ = nullptr;
  void* context_ = nullptr;
  std::size_t busy_ = 0;
  std::size_t generation_ = 0;
  std::exception_ptr error_;
  bool stop_ = false;
};

}  // namespace adalora::detail
