// The shadow storage journal: an append-only file of records (format doc §2.2,
// §2.3) with group commit, plus the checkpoint writer/reader and recovery
// replay. Thread-safe.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/format.h"
#include "umbra/io.h"

namespace umbra::engine {

class Journal {
 public:
  // Creates journal generation `gen` whose first record will have
  // `first_lsn`: writes and syncs the header and syncs the directory.
  static Result<std::unique_ptr<Journal>> Create(Env* env, const std::string& dir,
                                                 const Uuid& uuid, uint64_t gen,
                                                 uint64_t first_lsn);

  // Buffers a record, assigning its LSN (returned). Nothing is written yet.
  uint64_t Append(Record r);
  // Returns once every record with LSN <= lsn is durable. Concurrent callers
  // share one write + sync (group commit). `before_write` (if set) runs once
  // per group before the records are written: rule 1 uses it to sync the
  // data file. After a failure every later call fails with the same status.
  Status SyncTo(uint64_t lsn);
  Status SyncAll() { return SyncTo(UINT64_MAX); }
  void set_before_write(std::function<Status()> f) { before_write_ = std::move(f); }

  uint64_t next_lsn();
  uint64_t generation() const { return gen_; }
  uint64_t bytes_written();
  Status error();

 private:
  Journal(std::unique_ptr<File> f, uint64_t gen, uint64_t first_lsn);

  std::unique_ptr<File> file_;
  const uint64_t gen_;
  std::function<Status()> before_write_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::byte> buf_;      // encoded, not yet written
  uint64_t next_lsn_;               // LSN of the next Append
  uint64_t durable_lsn_;            // every LSN <= this is durable
  uint64_t write_off_;
  bool syncing_ = false;
  Status error_;
};

// Writes a checkpoint (header + body) atomically: tmp file, sync, rename,
// sync directory.
Status WriteCheckpoint(Env* env, const std::string& dir, const CheckpointHeader& h,
                       std::span<const std::byte> body);

// Reads and validates the checkpoint and replays it and the journals after it
// through `apply`. Returns the next LSN and the last journal generation seen.
struct ReplayResult {
  CheckpointHeader header;
  uint64_t next_lsn = 0;
  uint64_t last_gen = 0;
  uint64_t records = 0;
  bool torn_tail = false;
};
// `validate` sees the checkpoint header before anything is replayed.
Result<ReplayResult> ReadAndReplay(Env* env, const std::string& dir,
                                   const std::function<Status(const CheckpointHeader&)>& validate,
                                   const std::function<Status(const Record&)>& apply);

// Reads a whole file into memory.
Result<std::vector<std::byte>> ReadAll(Env* env, const std::string& path);

}  // namespace umbra::engine
