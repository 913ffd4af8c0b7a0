// RwLock: a reader-writer lock that is not owned by a thread. Any thread may
// release a hold that another thread took, which std::shared_mutex forbids
// (and glibc's rwlock gets wrong for writers). The engine needs that for
// asynchronous writes: a serving thread takes the locks, the engine's I/O
// thread releases them when the write is done.
//
// Meets the standard SharedMutex requirements used here (lock, unlock,
// lock_shared, unlock_shared), so std::unique_lock and std::shared_lock work
// with it. Writers are preferred: once a writer waits, new readers wait too.
// One 32-bit word; waiting uses futexes through std::atomic::wait.
#pragma once

#include <atomic>
#include <cstdint>

namespace umbra {

class RwLock {
 public:
  void lock() {
    uint32_t s = state_.load(std::memory_order_relaxed);
    for (;;) {  // claim the writer bit
      if (s & kWriter) {
        state_.wait(s, std::memory_order_relaxed);
        s = state_.load(std::memory_order_relaxed);
      } else if (state_.compare_exchange_weak(s, s | kWriter, std::memory_order_acquire,
                                              std::memory_order_relaxed)) {
        break;
      }
    }
    // No new reader gets in now; wait for the ones inside to leave.
    for (s = state_.load(std::memory_order_acquire); s != kWriter;
         s = state_.load(std::memory_order_acquire))
      state_.wait(s, std::memory_order_acquire);
  }

  void unlock() {
    state_.fetch_and(~kWriter, std::memory_order_release);
    state_.notify_all();
  }

  void lock_shared() {
    uint32_t s = state_.load(std::memory_order_relaxed);
    for (;;) {
      if (s & kWriter) {
        state_.wait(s, std::memory_order_relaxed);
        s = state_.load(std::memory_order_relaxed);
      } else if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acquire,
                                              std::memory_order_relaxed)) {
        return;
      }
    }
  }

  void unlock_shared() {
    // The last reader out wakes a writer waiting for readers to drain.
    if (state_.fetch_sub(1, std::memory_order_release) - 1 == kWriter) state_.notify_all();
  }

 private:
  static constexpr uint32_t kWriter = 1u << 31;  // low bits: readers inside
  std::atomic<uint32_t> state_{0};
};

}  // namespace umbra
