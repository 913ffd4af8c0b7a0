// VolumeImpl: the copy-on-write engine behind umbra::Volume.
//
// Locking (acquire in this order; never the reverse):
//   admin_mu_   serialises snapshot create/delete, rotation, config changes.
//   gate_       shared by every block operation; exclusive for the instant of
//               a snapshot (so no write straddles it).
//   stripes_[]  per-chunk-stripe rwlock. Exclusive: a write/discard that must
//               copy, or touches a free chunk. Shared: a snapshot read of the
//               chunk. Writes whose chunks are already copied (and not free)
//               take no stripe: no snapshot reads those chunks' origin bytes.
//   Snap::read_mu  shared by a snapshot read (after its stripe); exclusive by
//               whoever frees that snapshot's slots (rule 8).
//   meta_mu_    State and journal appends (journal order == memory order).
//   gate_ and stripes_ are RwLocks: an asynchronous write takes them on the
//   caller's thread and the I/O thread releases them.
// Threads: callers' threads do reads, writes and origin I/O. Copies of old
// chunks: when shadow storage shares the origin's filesystem (a stall of one
// is a stall of the other), the writer writes them itself, or for WriteAsync
// the I/O thread reads the old chunks (io_uring) and finishes the write;
// otherwise a few copier threads write them to the data file and
// group-commit journal records for persistent ranges, and writers wait for
// them at most copy_timeout_ms, so a hung shadow storage cannot hang the
// origin. docs/architecture.md, "Threading model", has the whole picture.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <shared_mutex>
#include <thread>

#include "base/rwlock.h"
#include "engine/change_map.h"
#include "engine/chunk_map.h"
#include "engine/journal.h"
#include "umbra/engine.h"

namespace umbra::engine {

// Chunk-sized, 4 KiB-aligned buffers, recycled so the write path does not
// allocate in steady state.
class BufferPool {
 public:
  struct Deleter {
    void operator()(std::byte* p) const { std::free(p); }
  };
  using Buffer = std::unique_ptr<std::byte, Deleter>;
  explicit BufferPool(size_t size) : size_(size) {}
  Buffer Get();
  void Put(Buffer b);
  size_t size() const { return size_; }

 private:
  size_t size_;
  std::mutex mu_;
  std::vector<Buffer> free_;
};

// A run of consecutive chunks to preserve, read from the origin in one call.
// The copier writes runs of consecutive slots in one call too.
// One writer's wait for its copy jobs: the copier wakes only that writer
// (a shared condition variable woke every waiting writer on every copy).
struct CopyWait {
  std::mutex mu;
  std::condition_variable cv;
};

struct CopyJob {
  struct Item {
    uint64_t chunk;
    uint64_t key;
    uint64_t slot;
    bool persistent;
  };
  std::vector<Item> items;
  BufferPool::Buffer buf;  // items.size() * chunk_size bytes, 4 KiB aligned
  bool pooled = false;     // buf came from the pool (one chunk)
  // 0 pending, 1 done, 2 abandoned by the waiting writer (copier frees slots).
  std::atomic<int> state{0};
  Status status;
  uint64_t duration_ns = 0;
  std::shared_ptr<CopyWait> wait;  // set by Submit
};

// The copies one write needs, planned under meta_mu_ (PlanCopies) and
// accounted for once written (FinishCopies).
struct CopyPlan {
  std::vector<std::shared_ptr<CopyJob>> jobs;
  uint64_t sync_lsn = 0;
  std::shared_ptr<Journal> jnl;
};

// A write waiting for the I/O thread (volume.cc, "asynchronous writes").
struct AsyncWrite {
  struct ReadOp {
    AsyncWrite* op;
    CopyJob* job;
    uint64_t off;
    uint32_t len;
  };
  uint64_t off = 0;
  uint64_t c0 = 0, c1 = 0;
  std::vector<std::byte> data;  // a copy of the caller's buffer
  Volume::WriteDone done;
  std::vector<size_t> idx;  // stripes held exclusively, sorted
  CopyPlan plan;
  std::vector<ReadOp> reads;  // one per job
  size_t pending = 0;         // reads in flight
  Status read_status;
};

class VolumeImpl final : public Volume {
 public:
  // copy_inline: shadow storage is on the origin's filesystem; writers
  // write their copies themselves (no copier threads).
  VolumeImpl(Env* env, VolumeConfig cfg, Uuid uuid, uint64_t size,
             std::unique_ptr<File> origin, std::unique_ptr<File> data, bool copy_inline);
  ~VolumeImpl() override;

  // Create: writes the initial checkpoint + journal. Open: recovery.
  Status InitNew();
  void SetOriginDirect(std::unique_ptr<File> f) { origin_direct_ = std::move(f); }
  void SetDataDirect(std::unique_ptr<File> f) { data_direct_ = std::move(f); }
  Status Recover();
  bool ready() const { return ready_; }

  const VolumeConfig& config() const override { return cfg_; }
  uint64_t size() const override { return size_; }
  Status Read(uint64_t off, std::span<std::byte> buf) override;
  Status Write(uint64_t off, std::span<const std::byte> buf, bool fua) override;
  void WriteAsync(uint64_t off, std::span<const std::byte> buf, bool fua,
                  WriteDone done) override;
  Status Discard(uint64_t off, uint64_t len) override;
  Status WriteZeroes(uint64_t off, uint64_t len) override;
  Status Flush() override;
  Result<SnapshotInfo> CreateSnapshot(const SnapshotOptions& opts) override;
  Status DeleteSnapshot(const std::string& id) override;
  std::vector<SnapshotInfo> ListSnapshots() override;
  Result<SnapshotInfo> GetSnapshot(const std::string& id) override;
  Status ReadSnapshot(const std::string& id, uint64_t off, std::span<std::byte> buf) override;
  Result<std::vector<Extent>> SnapshotExtents(const std::string& id) override;
  Result<std::vector<Extent>> LiveExtents(uint64_t off, uint64_t len) override;
  StorageUsage GetStorageUsage() override;
  Status SetMaxSize(MaxSize max) override;
  Status SetProtection(ProtectionLevel level) override;
  Status SetCopyTimeout(uint32_t ms) override;
  Result<std::vector<Extent>> ChangedSince(const std::string& tracking_id,
                                           uint64_t epoch) override;
  std::string ChangeMapResetReason() override { return change_reset_reason_; }
  Status Close() override;

  // Snapshot sets (snapshot_set.cc).
  RwLock& gate() { return gate_; }
  std::mutex& admin_mu() { return admin_mu_; }
  Status PrepareInstant(bool persistent);   // origin sync before the gate
  // With gate_ held exclusively: adds the snapshot, appends its record.
  Result<SnapshotInfo> AddSnapshotLocked(const SnapshotOptions& opts, const Uuid& set_uuid,
                                         uint32_t set_size, uint64_t* lsn);
  Status SyncJournal(uint64_t lsn);
  Status DeleteSnapshotLocked(const std::string& id);  // admin_mu_ held
  std::string uuid_text() const { return cfg_.uuid; }

 private:
  uint64_t ChunkOf(uint64_t off) const { return off >> shift_; }
  RwLock& Stripe(uint64_t c) { return stripes_[c % stripes_.size()]; }
  Record ConfigRecord() const;
  Result<std::shared_ptr<Journal>> NewJournal(uint64_t gen, uint64_t first_lsn);
  CheckpointHeader Header(uint64_t gen, uint64_t next_lsn) const;
  // New journal generation + checkpoint of the current state (open, create).
  Status StartGeneration(uint64_t gen, uint64_t first_lsn);
  uint64_t MaxSlots();
  std::shared_ptr<Journal> journal();
  void UpdateCowActive();

  // Origin I/O honouring O_DIRECT alignment (bounces unaligned buffers).
  Status OriginRead(uint64_t off, std::span<std::byte> buf);
  Status OriginWrite(uint64_t off, std::span<const std::byte> buf);

  // Copy-on-write for chunks [c0, c1] (stripes held exclusively).
  Status PreserveChunks(uint64_t c0, uint64_t c1);
  // Its steps: plan (slots, zero copies), buffers, accounting afterwards.
  // FinishCopies sets *retry when a full store dropped a snapshot and the
  // plan must be made again.
  Status PlanCopies(uint64_t c0, uint64_t c1, CopyPlan* plan);
  void GetCopyBuffers(CopyPlan* plan);
  // Where a job's old chunks are on the origin: offset and length (the last
  // chunk of the volume may be short).
  std::pair<uint64_t, uint64_t> OldChunkRange(const CopyJob& j) const;
  void FreePlanSlots(CopyPlan* plan);
  Status FinishCopies(CopyPlan* plan, bool* retry, int attempt);
  // Asynchronous writes (copy_inline_ only; volume.cc explains): the I/O
  // thread reads old chunks through its io_uring (or ReadAt when the origin
  // has no descriptor), then finishes each write and calls its `done`.
  void IoMain();
  // Finishes writes whose reads are done: copies, records, origin writes,
  // locks released; their `done` calls go to `replies`, for the caller to
  // make once the whole pass is finished.
  struct Reply {
    WriteDone done;
    Status status;
  };
  void FinishAsync(std::span<AsyncWrite* const> ops, std::vector<Reply>* replies);
  std::unique_ptr<AsyncWrite> GetAsyncOp();
  void PutAsyncOp(std::unique_ptr<AsyncWrite> op);
  // Makes room for `n` more slots; may delete or invalidate snapshots.
  // meta_mu_ held via `l`, may be released and re-taken.
  Status ReserveSlots(std::unique_lock<std::mutex>& l, uint64_t n);
  // Invalidates every valid snapshot (cause), freeing their storage.
  void InvalidateAllLocked(std::unique_lock<std::mutex>& l, InvalidCause cause,
                           const std::string& msg);
  Status RemoveSnapshotLocked(std::unique_lock<std::mutex>& l, uint64_t seq);
  // Waits for readers of the given snapshots, syncs the journal, punches and
  // releases `freed` slots (rules 4 and 8).
  Status ReleaseSlots(std::unique_lock<std::mutex>& l,
                      std::vector<std::shared_ptr<std::shared_mutex>> readers,
                      std::vector<uint64_t> freed);
  // Shadow storage failed: renames the checkpoint aside so a later Open
  // starts afresh (no snapshots, empty free map) instead of trusting
  // metadata that could not be kept up to date. OK if it could be done.
  Status Retire(const Status& why);
  // Makes FREE/ALLOC records durable (flush, FUA); on failure invalidates
  // snapshots and retires the store (protection kVolume).
  Status SyncFreeMap();
  Status RotateLocked();  // admin_mu_ held
  Status OpenChangeMap();
  Status MaybeRotate();

  // Writes the jobs' chunks to the data file, appends their journal records
  // (jobs still pending only), syncs them if a persistent snapshot needs it,
  // and sets each job's status and duration_ns. Used by a writer copying
  // inline and by the copier threads.
  void WriteCopies(std::span<const std::shared_ptr<CopyJob>> jobs);
  // Copier thread.
  void CopierMain();
  void Submit(std::vector<std::shared_ptr<CopyJob>>& jobs);
  bool WaitJobs(std::vector<std::shared_ptr<CopyJob>>& jobs);

  Env* env_;
  VolumeConfig cfg_;
  Uuid uuid_;
  uint64_t size_;
  uint32_t shift_;
  std::unique_ptr<File> origin_;
  std::unique_ptr<File> origin_direct_;  // O_DIRECT, for reading long runs to copy
  std::unique_ptr<File> data_;
  std::unique_ptr<File> data_direct_;  // the same file with O_DIRECT, for long runs
  const bool copy_inline_;
  BufferPool pool_;      // one chunk
  BufferPool run_pool_;  // runs of chunks up to 1 MiB + one chunk (1 MiB unaligned)
  const std::vector<std::byte> zeros_;  // one chunk of zeros (partial discards)

  std::mutex admin_mu_;
  RwLock gate_;  // released by the I/O thread for asynchronous writes
  std::array<RwLock, 1024> stripes_;
  std::mutex meta_mu_;
  State state_;
  std::shared_ptr<Journal> journal_;
  std::atomic<bool> cow_active_{false};
  // cfg_.copy_timeout_ms for readers that hold no lock (WaitJobs).
  std::atomic<uint32_t> copy_timeout_ms_{0};
  std::atomic<uint64_t> copies_{0};
  std::atomic<uint64_t> zero_copies_{0};
  bool closed_ = false;
  bool ready_ = false;  // opened successfully; Close may write
  std::atomic<bool> retired_{false};  // guarded by meta_mu_ for writes
  std::unique_ptr<ChangeMap> changes_;   // set before ready_
  std::string change_reset_reason_;
  bool creating_ = false;  // InitNew: no change map expected yet

  std::mutex copier_mu_;
  std::condition_variable copier_cv_;
  std::deque<std::shared_ptr<CopyJob>> queue_;
  bool stop_ = false;
  std::vector<std::thread> copiers_;

  // Asynchronous writes: queued for the I/O thread, which sleeps in its ring
  // (or on io_efd_) and is woken through io_efd_.
  bool async_ = false;
  int io_efd_ = -1;
  std::mutex aq_mu_;
  std::vector<AsyncWrite*> aq_;                        // guarded by aq_mu_
  std::vector<std::unique_ptr<AsyncWrite>> op_pool_;   // guarded by aq_mu_
  bool io_sleeping_ = false;                           // guarded by aq_mu_
  bool io_stop_ = false;                               // guarded by aq_mu_
  std::thread io_thread_;
  // Target of the I/O thread's eventfd read: a member, not a local, so a read
  // the kernel completes while the ring is torn down has somewhere to go.
  uint64_t io_wake_count_ = 0;
};

}  // namespace umbra::engine
