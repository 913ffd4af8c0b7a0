// The engine's in-memory state: snapshots, per-chunk exception lists and the
// free/copied bitmaps, with the rules of docs/format/shadow-storage.md §1.
// Pure data structure: no I/O, no locks. Volume serialises mutations under its
// metadata mutex; the bitmaps are atomic so the write fast path may test them
// without that mutex.
//
// Design notes
//   exceptions  chunk -> small sorted vector of (key, slot). An exception
//               serves the snapshots with seq in (previous key, key]; it is
//               live while that range holds a valid snapshot.
//   copied[c]   c's last exception key >= newest valid seq: writes copy nothing.
//   free[c]     live free map (TRIM). free_at_newest[c]: free[c] at the
//               newest snapshot's instant, which is also every older
//               snapshot's view of a chunk with no exception at/after it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <memory>
#include <set>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/format.h"
#include "umbra/engine.h"

namespace umbra::engine {

class Bitmap {
 public:
  explicit Bitmap(uint64_t bits = 0);
  uint64_t size() const { return bits_; }
  bool Test(uint64_t i) const {
    return (words_[i >> 6].load(std::memory_order_acquire) >> (i & 63)) & 1;
  }
  void Set(uint64_t i) { words_[i >> 6].fetch_or(uint64_t{1} << (i & 63), std::memory_order_release); }
  void Clear(uint64_t i) {
    words_[i >> 6].fetch_and(~(uint64_t{1} << (i & 63)), std::memory_order_release);
  }
  void SetRange(uint64_t first, uint64_t count);
  void ClearRange(uint64_t first, uint64_t count);
  void ClearAll();
  void CopyFrom(const Bitmap& other);
  // Calls f(first, count) for each maximal run of set bits, in order.
  void ForEachRun(const std::function<void(uint64_t, uint64_t)>& f) const;
  uint64_t Count() const;

 private:
  uint64_t bits_;
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
};

struct Exception {
  uint64_t key;
  uint64_t slot;  // kZeroSlot: zeros
};

// Per-chunk exception lists in one flat node array: 4 bytes per chunk plus
// 16 bytes per exception (an unordered_map of vectors cost ~130 bytes per
// exception; see docs/benchmarks.md). Lists are short and sorted by key.
class ExceptionIndex {
 public:
  explicit ExceptionIndex(uint64_t chunks) : head_(chunks, kNil) {}
  bool Empty(uint64_t c) const { return head_[c] == kNil; }
  uint64_t LastKey(uint64_t c) const;  // 0 if none
  // First exception with key >= key.
  std::optional<Exception> FirstAtOrAfter(uint64_t c, uint64_t key) const;
  void Append(uint64_t c, Exception e);  // e.key > LastKey(c)
  void Load(uint64_t c, std::vector<Exception>& out) const;
  void Store(uint64_t c, const std::vector<Exception>& v);
  uint64_t chunks() const { return head_.size(); }
  // Largest slot number the index can hold.
  static constexpr uint64_t kMaxSlot = UINT32_MAX - 1;

 private:
  static constexpr uint32_t kNil = UINT32_MAX;
  static constexpr uint32_t kZero32 = UINT32_MAX;
  struct Node {
    uint64_t key;
    uint32_t slot;  // kZero32: zeros
    uint32_t next;
  };
  static_assert(sizeof(Node) == 16);
  uint32_t NewNode(Exception e);
  std::vector<uint32_t> head_;
  std::vector<Node> nodes_;
  std::vector<uint32_t> free_;
};

struct Snap {
  SnapshotInfo info;
  Uuid uuid{};
  Uuid set_uuid{};
  // Readers hold it shared; deletion/invalidation takes it exclusively
  // before freeing slots the snapshot may be reading (ordering rule 8).
  std::shared_ptr<std::shared_mutex> read_mu = std::make_shared<std::shared_mutex>();
};

class State {
 public:
  State(uint64_t num_chunks, uint32_t chunk_size);

  uint64_t num_chunks() const { return num_chunks_; }

  // --- snapshots ---
  std::map<uint64_t, Snap>& snaps() { return snaps_; }
  const std::map<uint64_t, Snap>& snaps() const { return snaps_; }
  Snap* FindById(const std::string& id);
  // 0 if there is no valid snapshot. Cached; updated by every mutation.
  uint64_t newest_valid() const { return newest_valid_; }
  uint64_t next_seq() const { return next_seq_; }
  uint64_t valid_count() const { return valid_seqs_.size(); }
  uint64_t oldest_valid() const { return valid_seqs_.empty() ? 0 : *valid_seqs_.begin(); }

  // Adds a snapshot with seq == next_seq(); sets free_at_newest := free.
  void AddSnapshot(Snap snap);
  // Removes (delete) or marks invalid; appends the slots that became free.
  void RemoveSnapshot(uint64_t seq, std::vector<uint64_t>& freed);
  void InvalidateSnapshot(uint64_t seq, InvalidCause cause, const std::string& msg,
                          std::vector<uint64_t>& freed);

  // --- chunks ---
  Bitmap& free_map() { return free_; }
  Bitmap& free_at_newest() { return free_at_newest_; }
  Bitmap& copied() { return copied_; }
  // True if a write to chunk c must first preserve it for the newest snapshot.
  bool NeedsCopy(uint64_t c) const { return newest_valid_ != 0 && !copied_.Test(c); }
  // First exception of c with key >= seq, if any.
  std::optional<Exception> Lookup(uint64_t c, uint64_t seq) const { return exc_.FirstAtOrAfter(c, seq); }
  // Adds (c, key=newest_valid, slot). Requires NeedsCopy(c).
  void AddException(uint64_t c, uint64_t slot);
  // Adds (c, key, slot) after a copy that began when `key` was newest. False
  // (nothing added) if its range no longer holds a valid snapshot: the
  // caller frees the slot.
  bool AddExceptionKeyed(uint64_t c, uint64_t key, uint64_t slot);
  // Whether the exception that AddException(c, ...) would add covers a
  // persistent snapshot (and so must be journaled durably).
  bool NewExceptionIsPersistent(uint64_t c) const;
  // Replays a journaled exception (any key); used by recovery.
  void ReplayException(uint64_t c, uint64_t key, uint64_t slot);

  // --- slots ---
  // Takes a free slot (lowest reusable first, else a new one at the end).
  uint64_t AllocSlot();
  void FreeSlot(uint64_t slot);  // back to the free list
  uint64_t slots_in_use() const { return slots_in_use_; }
  uint64_t slot_high_water() const { return slot_end_; }

  // Applies one journal/checkpoint record (recovery).
  Status Apply(const Record& r);
  // After replay: drops non-persistent snapshots and dead exceptions, and
  // rebuilds slot accounting and the copied bitmap. Appends freed slots.
  void FinishRecovery(std::vector<uint64_t>& freed);
  // Records that rebuild this state (checkpoint body), LSN 0.
  void Serialize(const Record& config, std::vector<std::byte>& out) const;

  // Storage exclusively held by each valid snapshot (bytes), by seq.
  std::map<uint64_t, uint64_t> ExclusiveBytes() const;
  uint64_t exception_count() const { return exception_count_; }

 private:
  bool RangeHasValid(uint64_t prev_key, uint64_t key) const;
  // Drops exceptions with key >= min_key whose range lost its last valid snapshot.
  void CollectGarbage(uint64_t min_key, std::vector<uint64_t>& freed);
  void CollectChunk(std::vector<Exception>& v, uint64_t min_key, std::vector<uint64_t>& freed);
  void RecomputeNewest();
  void RecomputeCopied();

  uint64_t num_chunks_;
  uint32_t chunk_size_;
  std::map<uint64_t, Snap> snaps_;
  std::set<uint64_t> valid_seqs_;
  std::set<uint64_t> persistent_valid_;
  uint64_t newest_valid_ = 0;
  uint64_t next_seq_ = 1;
  ExceptionIndex exc_;
  std::vector<Exception> scratch_;
  uint64_t exception_count_ = 0;
  Bitmap free_, free_at_newest_, copied_;
  // slot allocation
  uint64_t slot_end_ = 0;
  uint64_t slots_in_use_ = 0;
  std::set<uint64_t> free_slots_;
};

}  // namespace umbra::engine
