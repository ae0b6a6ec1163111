#pragma once
// A Communicator (communicator.hpp) whose "processes" are threads of one process: what the tests
// of a sharded rank allocator, and a user checking a sharding plan, need without MPI.
//
//     adalora::testing::in_process_group group(3);  // 3 participants
//     group.run([&](adalora::testing::in_process_communicator comm) {
//       // runs on its own thread, once per participant; comm.rank() is 0, 1 or 2
//       auto mine = adalora::shard_shapes(shapes, adalora::shard_layout::triplets, comm.rank(),
//                                         comm.size());
//       adalora::rank_allocator<float, adalora::smoothed_sensitivity, adalora::cubic_schedule,
//                               adalora::testing::in_process_communicator>
//           alloc(mine, schedule, {}, {}, comm);
//       ...
//     });
//
// all_reduce_sum is a collective: it returns when every participant of the group has called it,
// each with the same number of values. The last participant to arrive sums the buffers in rank
// order, ((v0 + v1) + v2) + ..., per value, and writes the sum into every participant's buffer,
// so results are the same bits on every participant and on every run, whatever order the
// threads arrive in (an MPI library may use any order or tree; sums of exact values, like the
// sharded allocator's, agree with every order).
//
// Failures are errors, not hangs, as far as the group can see them: a participant whose
// function throws, or returns while others wait in all_reduce_sum, or buffers of different
// lengths, abort the group; every waiting participant then throws std::runtime_error, run()
// rethrows the first failure, and the group stays failed (make a new one). A thread that never
// calls all_reduce_sum without run() knowing (the group used without run()) still blocks the
// others: that is a deadlock in the caller's program, as with MPI.

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "adalora/communicator.hpp"
#include "adalora/config.hpp"

namespace adalora::testing {

namespace detail {

using ::adalora::detail::concat;

/// The state the participants of one group share: the buffers of the call in progress.
class in_process_hub {
 public:
  explicit in_process_hub(int participants)
      : n_(participants),
        buffers_(static_cast<std::size_t>(participants)),
        arrived_flag_(static_cast<std::size_t>(participants), false),
        finished_(static_cast<std::size_t>(participants), false) {}

  int size() const noexcept { return n_; }

  /// Completed collective calls so far.
  std::size_t calls() const {
    const std::lock_guard<std::mutex> lock(m_);
    return generation_;
  }

  void all_reduce_sum(int rank, std::span<double> values) {
    std::unique_lock<std::mutex> lock(m_);
    throw_if_failed(rank);
    const auto r = static_cast<std::size_t>(rank);
    if (arrived_flag_[r])
      fail_locked(concat("participant ", rank, " called all_reduce_sum again while its call ",
                         generation_,
                         " was in progress (two threads share one participant's "
                         "communicator?)"));
    throw_if_failed(rank);
    if (n_ == 1) {  // nothing to add: the values are already the sums
      ++generation_;
      return;
    }
    buffers_[r] = values;
    arrived_flag_[r] = true;
    if (++arrived_ < n_) {
      check_finished_locked();
      const std::size_t call = generation_;
      cv_.wait(lock, [&] { return generation_ != call || !failure_.empty(); });
      if (generation_ == call) throw_if_failed(rank);
      return;
    }
    // The last to arrive: every buffer is in place and its owner is waiting.
    const std::size_t count = buffers_[0].size();
    for (int p = 1; p < n_; ++p)
      if (buffers_[static_cast<std::size_t>(p)].size() != count)
        fail_locked(concat("participant ", p, " passed ",
                           buffers_[static_cast<std::size_t>(p)].size(),
                           " values but participant 0 passed ", count, " (call ", generation_,
                           "): every participant must pass the same number"));
    throw_if_failed(rank);
    for (std::size_t i = 0; i < count; ++i) {
      double sum = buffers_[0][i];  // not 0.0 + v0: that would turn a lone -0.0 into +0.0
      for (std::size_t p = 1; p < buffers_.size(); ++p) sum += buffers_[p][i];
      for (std::span<double>& b : buffers_) b[i] = sum;
    }
    for (std::size_t p = 0; p < buffers_.size(); ++p) {
      buffers_[p] = {};
      arrived_flag_[p] = false;
    }
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }

  /// A run() starts: every participant will make calls again.
  void begin_run() {
    const std::lock_guard<std::mutex> lock(m_);
    std::fill(finished_.begin(), finished_.end(), false);
  }

  /// Participant `rank` will make no more calls in this run() (its function returned or threw).
  void finish(int rank) {
    const std::lock_guard<std::mutex> lock(m_);
    finished_[static_cast<std::size_t>(rank)] = true;
    check_finished_locked();
  }

  /// Makes every waiting and every later call throw, naming `why`. The first reason stays.
  void fail(const std::string& why) {
    const std::lock_guard<std::mutex> lock(m_);
    if (failure_.empty()) failure_ = why;
    cv_.notify_all();
  }

 private:
  void throw_if_failed(int rank) const {
    if (!failure_.empty())
      throw std::runtime_error(
          concat("adalora::testing::in_process_communicator::all_reduce_sum: "
                 "participant ",
                 rank, " of ", n_, ": the group failed: ", failure_));
  }
  void fail_locked(std::string why) {
    if (failure_.empty()) failure_ = std::move(why);
    cv_.notify_all();
  }
  // A participant that makes no more calls while others wait would leave them waiting forever.
  void check_finished_locked() {
    if (arrived_ == 0 || !failure_.empty()) return;
    for (int p = 0; p < n_; ++p) {
      const auto i = static_cast<std::size_t>(p);
      if (finished_[i] && !arrived_flag_[i]) {
        std::string waiting;
        for (int q = 0; q < n_; ++q)
          if (arrived_flag_[static_cast<std::size_t>(q)])
            waiting += concat(waiting.empty() ? "" : ", ", q);
        fail_locked(concat("participant ", p, " returned while participant(s) ", waiting,
                           " wait in all_reduce_sum (call ", generation_,
                           "): every participant must make the same calls"));
        return;
      }
    }
  }

  const int n_;
  mutable std::mutex m_;
  std::condition_variable cv_;
  std::vector<std::span<double>> buffers_;
  std::vector<bool> arrived_flag_;
  std::vector<bool> finished_;
  int arrived_ = 0;
  std::size_t generation_ = 0;
  std::string failure_;
};

}  // namespace detail

/// One participant's handle on an in_process_group: the Communicator a sharded rank_allocator
/// takes. Cheap to copy (the allocator keeps a copy); all copies are the same participant, so
/// only one thread may call all_reduce_sum on them at a time.
class in_process_communicator {
 public:
  /// Replaces each value by its sum over the group's participants, summed in rank order (see
  /// the header comment). Blocks until every participant has called it. Throws
  /// std::runtime_error if the group failed (a participant threw or quit, or buffers differ in
  /// length).
  void all_reduce_sum(std::span<double> values) { hub_->all_reduce_sum(rank_, values); }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return hub_->size(); }

 private:
  friend class in_process_group;
  in_process_communicator(std::shared_ptr<detail::in_process_hub> hub, int rank)
      : hub_(std::move(hub)), rank_(rank) {}

  std::shared_ptr<detail::in_process_hub> hub_;
  int rank_ = 0;
};

static_assert(check_communicator<in_process_communicator>());

/// N participants that all-reduce among themselves; each is usually a thread (see run()). The
/// communicators share the group's state, so they stay valid after the group is destroyed.
class in_process_group {
 public:
  /// Throws std::invalid_argument unless participants >= 1.
  explicit in_process_group(int participants) {
    ADALORA_REQUIRE(participants >= 1, "testing::in_process_group",
                    "participants must be >= 1, got ", participants);
    hub_ = std::make_shared<detail::in_process_hub>(participants);
  }

  int size() const noexcept { return hub_->size(); }

  /// Collective calls completed so far (each all_reduce_sum of all participants counts once).
  std::size_t calls() const { return hub_->calls(); }

  /// Participant `rank`'s communicator. Throws std::invalid_argument unless 0 <= rank < size().
  in_process_communicator communicator(int rank) const {
    ADALORA_REQUIRE(rank >= 0 && rank < size(), "testing::in_process_group::communicator",
                    "rank must be in [0, ", size(), "), got ", rank);
    return in_process_communicator(hub_, rank);
  }

  /// Every participant's communicator, in rank order (for a kit or threads of your own).
  std::vector<in_process_communicator> communicators() const {
    std::vector<in_process_communicator> all;
    for (int p = 0; p < size(); ++p) all.push_back(communicator(p));
    return all;
  }

  /// Calls f(communicator(p)) for every participant p, each on its own thread, and returns when
  /// all have returned. If one throws (or cannot be started), the group fails so that the others
  /// stop waiting, and run() rethrows the first exception thrown.
  template <class F>
  void run(F&& f) {
    const auto n = static_cast<std::size_t>(size());
    std::vector<std::exception_ptr> errors(n);
    std::mutex first_m;
    std::size_t first = n;
    std::vector<std::thread> threads;
    threads.reserve(n);
    hub_->begin_run();
    auto body = [&](int p) {
      try {
        f(communicator(p));
      } catch (...) {
        errors[static_cast<std::size_t>(p)] = std::current_exception();
        {
          const std::lock_guard<std::mutex> lock(first_m);
          if (first == n) first = static_cast<std::size_t>(p);
        }
        hub_->fail(::adalora::detail::concat("participant ", p, " threw"));
      }
      hub_->finish(p);
    };
    try {
      for (int p = 0; p < size(); ++p) threads.emplace_back(body, p);
    } catch (const std::system_error& ex) {
      hub_->fail(
          ::adalora::detail::concat("a participant's thread could not be started: ", ex.what()));
      for (std::thread& t : threads) t.join();
      throw;
    }
    for (std::thread& t : threads) t.join();
    if (first != n) std::rethrow_exception(errors[first]);
  }

 private:
  std::shared_ptr<detail::in_process_hub> hub_;
};

}  // namespace adalora::testing
