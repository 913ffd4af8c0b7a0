// In-memory snapshot state; rules in docs/format/shadow-storage.md §1.
#include "engine/chunk_map.h"

#include <algorithm>
#include <bit>

#include "base/random.h"

namespace umbra::engine {

Bitmap::Bitmap(uint64_t bits)
    : bits_(bits), words_(std::make_unique<std::atomic<uint64_t>[]>((bits + 63) / 64)) {
  for (uint64_t i = 0; i < (bits + 63) / 64; ++i) words_[i].store(0, std::memory_order_relaxed);
}

void Bitmap::SetRange(uint64_t first, uint64_t count) {
  for (uint64_t i = first; i < first + count; ++i) Set(i);
}

void Bitmap::ClearRange(uint64_t first, uint64_t count) {
  for (uint64_t i = first; i < first + count; ++i) Clear(i);
}

void Bitmap::ClearAll() {
  for (uint64_t i = 0; i < (bits_ + 63) / 64; ++i) words_[i].store(0, std::memory_order_release);
}

void Bitmap::CopyFrom(const Bitmap& other) {
  for (uint64_t i = 0; i < (bits_ + 63) / 64; ++i)
    words_[i].store(other.words_[i].load(std::memory_order_acquire), std::memory_order_release);
}

void Bitmap::ForEachRun(const std::function<void(uint64_t, uint64_t)>& f) const {
  uint64_t i = 0;
  while (i < bits_) {
    uint64_t w = words_[i >> 6].load(std::memory_order_acquire) >> (i & 63);
    if (w == 0) {
      i = (i | 63) + 1;
      continue;
    }
    i += static_cast<uint64_t>(std::countr_zero(w));
    if (i >= bits_) break;
    uint64_t start = i;
    while (i < bits_ && Test(i)) ++i;
    f(start, i - start);
  }
}

uint64_t Bitmap::Count() const {
  uint64_t n = 0;
  for (uint64_t i = 0; i < (bits_ + 63) / 64; ++i)
    n += static_cast<uint64_t>(std::popcount(words_[i].load(std::memory_order_acquire)));
  return n;
}

uint64_t ExceptionIndex::LastKey(uint64_t c) const {
  uint64_t key = 0;
  for (uint32_t n = head_[c]; n != kNil; n = nodes_[n].next) key = nodes_[n].key;
  return key;
}

std::optional<Exception> ExceptionIndex::FirstAtOrAfter(uint64_t c, uint64_t key) const {
  for (uint32_t n = head_[c]; n != kNil; n = nodes_[n].next) {
    if (nodes_[n].key >= key)
      return Exception{nodes_[n].key, nodes_[n].slot == kZero32 ? kZeroSlot : nodes_[n].slot};
  }
  return std::nullopt;
}

uint32_t ExceptionIndex::NewNode(Exception e) {
  Node node{e.key, e.slot == kZeroSlot ? kZero32 : static_cast<uint32_t>(e.slot), kNil};
  if (!free_.empty()) {
    uint32_t n = free_.back();
    free_.pop_back();
    nodes_[n] = node;
    return n;
  }
  nodes_.push_back(node);
  return static_cast<uint32_t>(nodes_.size() - 1);
}

void ExceptionIndex::Append(uint64_t c, Exception e) {
  uint32_t n = NewNode(e);
  if (head_[c] == kNil) {
    head_[c] = n;
    return;
  }
  uint32_t t = head_[c];
  while (nodes_[t].next != kNil) t = nodes_[t].next;
  nodes_[t].next = n;
}

void ExceptionIndex::Load(uint64_t c, std::vector<Exception>& out) const {
  out.clear();
  for (uint32_t n = head_[c]; n != kNil; n = nodes_[n].next)
    out.push_back({nodes_[n].key, nodes_[n].slot == kZero32 ? kZeroSlot : nodes_[n].slot});
}

void ExceptionIndex::Store(uint64_t c, const std::vector<Exception>& v) {
  for (uint32_t n = head_[c]; n != kNil;) {
    uint32_t next = nodes_[n].next;
    free_.push_back(n);
    n = next;
  }
  head_[c] = kNil;
  for (const auto& e : v) Append(c, e);
}

State::State(uint64_t num_chunks, uint32_t chunk_size)
    : num_chunks_(num_chunks),
      chunk_size_(chunk_size),
      exc_(num_chunks),
      free_(num_chunks),
      free_at_newest_(num_chunks),
      copied_(num_chunks) {}

Snap* State::FindById(const std::string& id) {
  for (auto& [seq, s] : snaps_)
    if (s.info.id == id) return &s;
  return nullptr;
}

void State::AddSnapshot(Snap snap) {
  uint64_t seq = snap.info.seq;
  bool persistent = snap.info.persistent;
  snaps_.emplace(seq, std::move(snap));
  valid_seqs_.insert(seq);
  if (persistent) persistent_valid_.insert(seq);
  next_seq_ = seq + 1;
  newest_valid_ = seq;
  free_at_newest_.CopyFrom(free_);
  copied_.ClearAll();
}

void State::RemoveSnapshot(uint64_t seq, std::vector<uint64_t>& freed) {
  auto it = snaps_.find(seq);
  if (it == snaps_.end()) return;
  snaps_.erase(it);
  if (valid_seqs_.erase(seq) == 0) return;  // was invalid: its storage is gone already
  persistent_valid_.erase(seq);
  uint64_t old_newest = newest_valid_;
  RecomputeNewest();
  CollectGarbage(seq, freed);
  if (newest_valid_ != old_newest) RecomputeCopied();
}

void State::InvalidateSnapshot(uint64_t seq, InvalidCause cause, const std::string& msg,
                               std::vector<uint64_t>& freed) {
  auto it = snaps_.find(seq);
  if (it == snaps_.end() || !it->second.info.valid) return;
  it->second.info.valid = false;
  it->second.info.cause = cause;
  it->second.info.invalid_message = msg;
  valid_seqs_.erase(seq);
  persistent_valid_.erase(seq);
  uint64_t old_newest = newest_valid_;
  RecomputeNewest();
  CollectGarbage(seq, freed);
  if (newest_valid_ != old_newest) RecomputeCopied();
}

void State::AddException(uint64_t c, uint64_t slot) {
  exc_.Append(c, {newest_valid_, slot});
  ++exception_count_;
  copied_.Set(c);
}

bool State::AddExceptionKeyed(uint64_t c, uint64_t key, uint64_t slot) {
  uint64_t prev = exc_.LastKey(c);
  if (key <= prev || !RangeHasValid(prev, key)) return false;
  exc_.Append(c, {key, slot});
  ++exception_count_;
  if (newest_valid_ != 0 && key >= newest_valid_) copied_.Set(c);
  return true;
}

bool State::NewExceptionIsPersistent(uint64_t c) const {
  uint64_t prev = exc_.LastKey(c);
  auto p = persistent_valid_.upper_bound(prev);
  return p != persistent_valid_.end() && *p <= newest_valid_;
}

void State::ReplayException(uint64_t c, uint64_t key, uint64_t slot) {
  auto& v = scratch_;
  exc_.Load(c, v);
  auto e = std::lower_bound(v.begin(), v.end(), key,
                            [](const Exception& x, uint64_t s) { return x.key < s; });
  if (e != v.end() && e->key == key) {
    if (e->slot != kZeroSlot) FreeSlot(e->slot);
    e->slot = slot;
  } else {
    v.insert(e, {key, slot});
    ++exception_count_;
  }
  exc_.Store(c, v);
}

uint64_t State::AllocSlot() {
  ++slots_in_use_;
  if (!free_slots_.empty()) {
    uint64_t s = *free_slots_.begin();
    free_slots_.erase(free_slots_.begin());
    return s;
  }
  return slot_end_++;
}

void State::FreeSlot(uint64_t slot) {
  --slots_in_use_;
  if (slot + 1 == slot_end_) {
    --slot_end_;
    // Shrink the high-water mark over trailing free slots.
    while (slot_end_ > 0 && free_slots_.count(slot_end_ - 1)) free_slots_.erase(--slot_end_);
  } else {
    free_slots_.insert(slot);
  }
}

bool State::RangeHasValid(uint64_t prev_key, uint64_t key) const {
  auto it = valid_seqs_.upper_bound(prev_key);
  return it != valid_seqs_.end() && *it <= key;
}

void State::CollectGarbage(uint64_t min_key, std::vector<uint64_t>& freed) {
  auto& v = scratch_;
  for (uint64_t c = 0; c < num_chunks_; ++c) {
    if (exc_.Empty(c) || exc_.LastKey(c) < min_key) continue;
    exc_.Load(c, v);
    size_t before = v.size();
    CollectChunk(v, min_key, freed);
    if (v.size() != before) exc_.Store(c, v);
  }
}

void State::CollectChunk(std::vector<Exception>& v, uint64_t min_key,
                         std::vector<uint64_t>& freed) {
  uint64_t prev = 0;
  size_t out = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i].key >= min_key && !RangeHasValid(prev, v[i].key)) {
      if (v[i].slot != kZeroSlot) freed.push_back(v[i].slot);
      --exception_count_;
      continue;  // prev stays: the next exception's range grows over this one
    }
    prev = v[i].key;
    v[out++] = v[i];
  }
  v.resize(out);
}

void State::RecomputeNewest() {
  newest_valid_ = valid_seqs_.empty() ? 0 : *valid_seqs_.rbegin();
}

void State::RecomputeCopied() {
  copied_.ClearAll();
  if (newest_valid_ == 0) return;
  for (uint64_t c = 0; c < num_chunks_; ++c)
    if (!exc_.Empty(c) && exc_.LastKey(c) >= newest_valid_) copied_.Set(c);
}

Status State::Apply(const Record& r) {
  auto check_range = [&](uint64_t first, uint64_t count) {
    return first < num_chunks_ && count <= num_chunks_ - first;
  };
  std::vector<uint64_t> freed;
  switch (r.type) {
    case RecordType::kConfig:
      return Status::Ok();  // Volume applies it
    case RecordType::kNextSeq:
      next_seq_ = std::max(next_seq_, r.seq);
      return Status::Ok();
    case RecordType::kSnapCreate: {
      if (r.seq < next_seq_ || snaps_.count(r.seq))
        return Status::Corruption("snapshot sequence numbers go backwards at seq " +
                                  std::to_string(r.seq));
      Snap s;
      s.uuid = r.snap_uuid;
      s.set_uuid = r.set_uuid;
      s.info.seq = r.seq;
      s.info.id = FormatUuid(r.snap_uuid);
      s.info.set_id = FormatUuid(r.set_uuid);
      s.info.name = r.name;
      s.info.persistent = (r.flags & 1) != 0;
      s.info.created_unix_ns = r.created_unix_ns;
      s.info.set_size = r.set_size;
      AddSnapshot(std::move(s));
      return Status::Ok();
    }
    case RecordType::kSnapDelete:
      if (!snaps_.count(r.seq))
        return Status::Corruption("journal deletes unknown snapshot seq " + std::to_string(r.seq));
      RemoveSnapshot(r.seq, freed);
      break;
    case RecordType::kSnapInvalidate:
      if (!snaps_.count(r.seq))
        return Status::Corruption("journal invalidates unknown snapshot seq " +
                                  std::to_string(r.seq));
      InvalidateSnapshot(r.seq, static_cast<InvalidCause>(r.cause), r.name, freed);
      break;
    case RecordType::kException: {
      if (r.chunk >= num_chunks_) return Status::Corruption("exception for chunk out of range");
      if (r.slot != kZeroSlot) {
        // Mark the slot used; a slot referenced twice is corruption.
        if (r.slot >= slot_end_) {
          for (uint64_t s = slot_end_; s < r.slot; ++s) free_slots_.insert(s);
          slot_end_ = r.slot + 1;
        } else if (free_slots_.erase(r.slot) == 0) {
          return Status::Corruption("slot " + std::to_string(r.slot) + " is referenced twice");
        }
        ++slots_in_use_;
      }
      ReplayException(r.chunk, r.key, r.slot);
      // A copy may be journaled after the snapshots it served were deleted
      // or invalidated (the copier appends concurrently): dead on arrival.
      auto& v = scratch_;
      exc_.Load(r.chunk, v);
      size_t before = v.size();
      CollectChunk(v, r.key, freed);
      if (v.size() != before) exc_.Store(r.chunk, v);
      break;
    }
    case RecordType::kFree:
    case RecordType::kAlloc:
    case RecordType::kNewestFree:
      if (!check_range(r.chunk, r.count)) return Status::Corruption("chunk range out of bounds");
      if (r.type == RecordType::kFree) free_.SetRange(r.chunk, r.count);
      if (r.type == RecordType::kAlloc) free_.ClearRange(r.chunk, r.count);
      if (r.type == RecordType::kNewestFree) free_at_newest_.SetRange(r.chunk, r.count);
      return Status::Ok();
  }
  for (uint64_t s : freed) FreeSlot(s);
  return Status::Ok();
}

void State::FinishRecovery(std::vector<uint64_t>& freed) {
  std::vector<uint64_t> drop;
  for (const auto& [seq, s] : snaps_)
    if (!s.info.persistent) drop.push_back(seq);
  for (uint64_t seq : drop) RemoveSnapshot(seq, freed);
  CollectGarbage(0, freed);
  for (uint64_t s : freed) FreeSlot(s);
  RecomputeNewest();
  RecomputeCopied();
}

void State::Serialize(const Record& config, std::vector<std::byte>& out) const {
  EncodeRecord(config, out);
  for (const auto& [seq, s] : snaps_) {
    Record c;
    c.type = RecordType::kSnapCreate;
    c.seq = seq;
    c.snap_uuid = s.uuid;
    c.flags = s.info.persistent ? 1 : 0;
    c.created_unix_ns = s.info.created_unix_ns;
    c.set_uuid = s.set_uuid;
    c.set_size = s.info.set_size;
    c.name = s.info.name;
    EncodeRecord(c, out);
    if (!s.info.valid) {
      Record inv;
      inv.type = RecordType::kSnapInvalidate;
      inv.seq = seq;
      inv.cause = static_cast<uint8_t>(s.info.cause);
      inv.name = s.info.invalid_message;
      EncodeRecord(inv, out);
    }
  }
  Record r;
  r.type = RecordType::kNextSeq;
  r.seq = next_seq_;
  EncodeRecord(r, out);
  auto runs = [&](const Bitmap& b, RecordType t) {
    b.ForEachRun([&](uint64_t first, uint64_t count) {
      Record x;
      x.type = t;
      x.chunk = first;
      x.count = count;
      EncodeRecord(x, out);
    });
  };
  runs(free_at_newest_, RecordType::kNewestFree);
  runs(free_, RecordType::kFree);
  std::vector<Exception> v;
  for (uint64_t c = 0; c < num_chunks_; ++c) {
    if (exc_.Empty(c)) continue;
    exc_.Load(c, v);
    for (const auto& e : v) {
      Record x;
      x.type = RecordType::kException;
      x.chunk = c;
      x.key = e.key;
      x.slot = e.slot;
      EncodeRecord(x, out);
    }
  }
}

std::map<uint64_t, uint64_t> State::ExclusiveBytes() const {
  std::map<uint64_t, uint64_t> out;
  for (uint64_t seq : valid_seqs_) out[seq] = 0;
  std::vector<Exception> v;
  for (uint64_t c = 0; c < num_chunks_; ++c) {
    if (exc_.Empty(c)) continue;
    exc_.Load(c, v);
    uint64_t prev = 0;
    for (const auto& e : v) {
      if (e.slot != kZeroSlot) {
        auto lo = valid_seqs_.upper_bound(prev);
        if (lo != valid_seqs_.end() && *lo <= e.key) {
          auto nx = std::next(lo);
          if (nx == valid_seqs_.end() || *nx > e.key) out[*lo] += chunk_size_;
        }
      }
      prev = e.key;
    }
  }
  return out;
}

}  // namespace umbra::engine
