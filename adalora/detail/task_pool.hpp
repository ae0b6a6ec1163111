#pragma once
// A small pool of worker threads that runs numbered tasks; the caller's thread works too.
//
// Why not std::async or OpenMP: the pool is created once, so a step allocates nothing; idle
// workers sleep on a condition variable and never spin (PERF.md: spinning OpenMP barriers
// collapsed by 10-80x on these shared 2-core machines); and the thread count is the caller's.
// Which thread runs a task is not deterministic, so callers give every task its own output and
// combine the outputs afterwards in a fixed order.

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace adalora::detail {

class task_pool {
 public:
  using task_fn = void (*)(void* context, std::size_t task);

  /// A pool of `threads` threads in all: `threads - 1` workers plus the caller of run().
  explicit task_pool(unsigned threads) {
    workers_.reserve(threads > 1 ? threads - 1 : 0);
    for (unsigned i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  task_pool(const task_pool&) = delete;
  task_pool& operator=(const task_pool&) = delete;
  ~task_pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  unsigned threads() const noexcept { return static_cast<unsigned>(workers_.size()) + 1; }

  /// Runs fn(context, i) for every i in [0, n) and returns when all have finished. The first
  /// exception a task throws is rethrown here (the other tasks still run to completion).
  void run(std::size_t n, task_fn fn, void* context) {
    if (workers_.empty()) {
      for (std::size_t i = 0; i < n; ++i) fn(context, i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = fn;
      context_ = context;
      count_ = n;
      next_.store(0, std::memory_order_relaxed);
      busy_ = workers_.size();
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void drain() noexcept {
    for (;;) {
      const std::size_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= count_) return;
      try {
        fn_(context_, i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void work() {
    std::size_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  task_fn fn_ = nullptr;
  void* context_ = nullptr;
  std::size_t count_ = 0;
  std::atomic<std::size_t> next_{0};
  std::size_t busy_ = 0;
  std::size_t generation_ = 0;
  std::exception_ptr error_;
  bool stop_ = false;
};

}  // namespace adalora::detail
