// The copy-on-write engine. Rules: docs/format/shadow-storage.md (§1 model,
// §4 write ordering, §5 failure handling). Locking: volume_impl.h.
#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include "base/random.h"
#include "base/units.h"
#include "engine/volume_impl.h"

#include <liburing.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <unistd.h>

namespace umbra {

std::string_view InvalidCauseName(InvalidCause c) {
  switch (c) {
    case InvalidCause::kNone: return "none";
    case InvalidCause::kStorageFull: return "shadow storage full";
    case InvalidCause::kStorageIOError: return "shadow storage I/O error";
    case InvalidCause::kCopyTooSlow: return "copy to shadow storage too slow";
    case InvalidCause::kStorageRemoved: return "shadow storage removed";
  }
  return "unknown";
}

Result<MaxSize> MaxSize::Parse(std::string_view text) {
  if (text == "unbounded" || text == "UNBOUNDED") return MaxSize::Unbounded();
  if (!text.empty() && text.back() == '%') {
    std::string num(text.substr(0, text.size() - 1));
    char* end = nullptr;
    unsigned long long p = std::strtoull(num.c_str(), &end, 10);
    if (num.empty() || *end != '\0' || p < 1 || p > 100)
      return Status::InvalidArgument("maximum size percent must be 1%..100%, got '" +
                                     std::string(text) + "'");
    return MaxSize::Percent(p);
  }
  auto b = ParseSize(text);
  if (!b.ok()) return b.status();
  if (*b == 0) return Status::InvalidArgument("maximum size must be greater than zero");
  return MaxSize::Bytes(*b);
}

std::string MaxSize::ToString() const {
  switch (kind) {
    case Kind::kBytes: return FormatBytes(value);
    case Kind::kPercent: return std::to_string(value) + "%";
    case Kind::kUnbounded: return "unbounded";
  }
  return "?";
}

namespace engine {
namespace {

uint64_t UnixNowNs() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

constexpr uint64_t kDirectAlign = 4096;
constexpr uint64_t kRotateBytes = 64ull << 20;
constexpr int kCopiers = 2;
constexpr unsigned kRingEntries = 256;  // old-chunk reads in one submission
constexpr size_t kAsyncPoolMax = 128;   // spare AsyncWrite objects kept
// Larger writes go through Write on the caller's thread: the I/O thread
// finishes its writes one after the other, and a 1 MiB copy is long enough to
// hold up everyone else's (firstseq1m lost a third; docs/benchmarks.md),
// while one blocking read per 1 MiB costs little.
constexpr size_t kAsyncMaxBytes = 128 << 10;
constexpr uint64_t kDirectRunMin = 256 << 10;
// Most chunks one copier pass takes from the queue.
constexpr size_t kCopierBatchItems = 256;

bool Aligned(uint64_t v) { return v % kDirectAlign == 0; }

}  // namespace

BufferPool::Buffer BufferPool::Get() {
  {
    std::lock_guard l(mu_);
    if (!free_.empty()) {
      Buffer b = std::move(free_.back());
      free_.pop_back();
      return b;
    }
  }
  void* p = std::aligned_alloc(kDirectAlign, size_);
  if (p == nullptr) std::abort();  // out of memory: nothing sane to do on the I/O path
  return Buffer(static_cast<std::byte*>(p));
}

void BufferPool::Put(Buffer b) {
  std::lock_guard l(mu_);
  if (free_.size() < 256) free_.push_back(std::move(b));
}

VolumeImpl::VolumeImpl(Env* env, VolumeConfig cfg, Uuid uuid, uint64_t size,
                       std::unique_ptr<File> origin, std::unique_ptr<File> data,
                       bool copy_inline)
    : env_(env),
      cfg_(std::move(cfg)),
      uuid_(uuid),
      size_(size),
      shift_(static_cast<uint32_t>(std::countr_zero(cfg_.chunk_size))),
      origin_(std::move(origin)),
      data_(std::move(data)),
      copy_inline_(copy_inline),
      pool_(cfg_.chunk_size),
      run_pool_((size_t{1} << 20) + cfg_.chunk_size),
      zeros_(cfg_.chunk_size),
      state_((size + cfg_.chunk_size - 1) / cfg_.chunk_size, cfg_.chunk_size) {
  copy_timeout_ms_.store(cfg_.copy_timeout_ms);
  // Several copiers so that concurrent writers' copies (and, for persistent
  // snapshots, their syncs) overlap; the journal batches their syncs.
  if (!copy_inline_)
    for (int i = 0; i < kCopiers; ++i) copiers_.emplace_back([this] { CopierMain(); });
  // Writes that copy inline hand their old-chunk reads to the I/O thread.
  if (copy_inline_) {
    io_efd_ = ::eventfd(0, EFD_CLOEXEC);
    if (io_efd_ >= 0) {
      async_ = true;
      io_thread_ = std::thread([this] { IoMain(); });
    }
  }
}

VolumeImpl::~VolumeImpl() {
  Close().IgnoreError();
  if (io_thread_.joinable()) {
    {
      std::lock_guard l(aq_mu_);
      io_stop_ = true;
    }
    ::eventfd_write(io_efd_, 1);
    io_thread_.join();
  }
  if (io_efd_ >= 0) ::close(io_efd_);
  {
    std::lock_guard l(copier_mu_);
    stop_ = true;
  }
  copier_cv_.notify_all();
  for (auto& t : copiers_) t.join();
}

Record VolumeImpl::ConfigRecord() const {
  Record r;
  r.type = RecordType::kConfig;
  r.max_kind = static_cast<uint8_t>(cfg_.max_size.kind);
  r.max_value = cfg_.max_size.value;
  r.protection = static_cast<uint8_t>(cfg_.protection);
  r.copy_timeout_ms = cfg_.copy_timeout_ms;
  return r;
}

std::shared_ptr<Journal> VolumeImpl::journal() {
  // meta_mu_ guards the pointer; callers that already hold it read journal_.
  return journal_;
}

void VolumeImpl::UpdateCowActive() { cow_active_.store(state_.newest_valid() != 0); }

uint64_t VolumeImpl::MaxSlots() {
  switch (cfg_.max_size.kind) {
    case MaxSize::Kind::kUnbounded: return UINT64_MAX;
    case MaxSize::Kind::kBytes: return cfg_.max_size.value / cfg_.chunk_size;
    case MaxSize::Kind::kPercent: {
      auto st = env_->StatFs(cfg_.shadow_dir);
      if (!st.ok()) return 0;
      return st->total_bytes / 100 * cfg_.max_size.value / cfg_.chunk_size;
    }
  }
  return 0;
}

// ---------------------------------------------------------------- set-up --

Result<std::shared_ptr<Journal>> VolumeImpl::NewJournal(uint64_t gen, uint64_t first_lsn) {
  auto j = Journal::Create(env_, cfg_.shadow_dir, uuid_, gen, first_lsn);
  if (!j.ok()) return j.status();
  std::shared_ptr<Journal> jnl = std::move(j).value();
  jnl->set_before_write([this] { return data_->Sync(); });  // rule 1
  return jnl;
}

CheckpointHeader VolumeImpl::Header(uint64_t gen, uint64_t next_lsn) const {
  CheckpointHeader h;
  h.volume_uuid = uuid_;
  h.volume_size = size_;
  h.chunk_size = cfg_.chunk_size;
  h.journal_gen = gen;
  h.next_lsn = next_lsn;
  return h;
}

Status VolumeImpl::StartGeneration(uint64_t gen, uint64_t first_lsn) {
  UMBRA_ASSIGN_OR_RETURN(journal_, NewJournal(gen, first_lsn));
  std::vector<std::byte> body;
  state_.Serialize(ConfigRecord(), body);
  return WriteCheckpoint(env_, cfg_.shadow_dir, Header(gen, first_lsn), body);
}

Status VolumeImpl::InitNew() {
  creating_ = true;
  UMBRA_RETURN_IF_ERROR(StartGeneration(1, 1));
  UMBRA_RETURN_IF_ERROR(OpenChangeMap());
  ready_ = true;
  return Status::Ok();
}

Status VolumeImpl::OpenChangeMap() {
  std::string why;
  auto m = ChangeMap::Open(env_, cfg_.shadow_dir, uuid_, size_, cfg_.chunk_size, cfg_.boot_id,
                           /*expect_existing=*/!creating_, &why);
  if (!m.ok()) return m.status().Annotate("opening the change map");
  changes_ = std::move(m).value();
  change_reset_reason_ = why;
  return Status::Ok();
}

Result<std::vector<Extent>> VolumeImpl::ChangedSince(const std::string& tracking_id,
                                                     uint64_t epoch) {
  if (changes_ == nullptr) return Status(Code::kIOError, "volume is not open", EIO);
  return changes_->ChangedSince(tracking_id, epoch);
}

Status VolumeImpl::Recover() {
  auto validate = [&](const CheckpointHeader& h) -> Status {
    if (h.volume_uuid != uuid_)
      return Status::InvalidArgument("shadow storage in " + cfg_.shadow_dir +
                                     " belongs to another volume (" + FormatUuid(h.volume_uuid) +
                                     ", expected " + cfg_.uuid + ")");
    if (h.volume_size != size_)
      return Status::InvalidArgument(
          "shadow storage in " + cfg_.shadow_dir + " was made for a volume of " +
          std::to_string(h.volume_size) + " bytes, but " + cfg_.origin_path + " has " +
          std::to_string(size_));
    if (h.chunk_size != cfg_.chunk_size)
      return Status::InvalidArgument("shadow storage in " + cfg_.shadow_dir + " uses chunk size " +
                                     std::to_string(h.chunk_size) + ", configured " +
                                     std::to_string(cfg_.chunk_size));
    return Status::Ok();
  };
  auto apply = [&](const Record& r) -> Status {
    if (r.type == RecordType::kConfig) {
      cfg_.max_size = MaxSize{static_cast<MaxSize::Kind>(r.max_kind), r.max_value};
      cfg_.protection = static_cast<ProtectionLevel>(r.protection);
      cfg_.copy_timeout_ms = r.copy_timeout_ms;
      copy_timeout_ms_.store(r.copy_timeout_ms);
      return Status::Ok();
    }
    return state_.Apply(r);
  };
  auto res = ReadAndReplay(env_, cfg_.shadow_dir, validate, apply);
  if (!res.ok()) return res.status();
  std::vector<uint64_t> freed;
  state_.FinishRecovery(freed);
  UpdateCowActive();
  // Only now, with everything validated, write: a fresh generation + checkpoint.
  UMBRA_RETURN_IF_ERROR(StartGeneration(res->last_gen + 1, res->next_lsn));
  for (uint64_t g = res->header.journal_gen; g <= res->last_gen; ++g)
    env_->Remove(cfg_.shadow_dir + "/" + JournalName(g)).IgnoreError();
  env_->Remove(cfg_.shadow_dir + "/" + kCheckpointTmpName).IgnoreError();
  // Punch slots no live exception uses (copies lost in the crash).
  for (uint64_t s : freed) data_->PunchHole(s * cfg_.chunk_size, cfg_.chunk_size).IgnoreError();
  UMBRA_ASSIGN_OR_RETURN(uint64_t dsize, data_->Size());
  uint64_t end = state_.slot_high_water() * cfg_.chunk_size;
  if (dsize > end) UMBRA_RETURN_IF_ERROR(data_->Truncate(end));
  UMBRA_RETURN_IF_ERROR(OpenChangeMap());
  ready_ = true;
  return Status::Ok();
}

namespace {

Status CheckConfig(Env* env, VolumeConfig& cfg, uint64_t size) {
  if (cfg.chunk_size < 4096 || cfg.chunk_size > (4u << 20) || !std::has_single_bit(cfg.chunk_size))
    return Status::InvalidArgument("chunk size must be a power of two from 4 KiB to 4 MiB, got " +
                                   std::to_string(cfg.chunk_size));
  if (size < cfg.chunk_size)
    return Status::InvalidArgument("volume " + cfg.origin_path + " (" + std::to_string(size) +
                                   " bytes) is smaller than one chunk");
  if (cfg.direct_io && size % kDirectAlign != 0)
    return Status::InvalidArgument("direct I/O needs a volume size that is a multiple of 4096");
  if (cfg.max_size.kind == MaxSize::Kind::kPercent &&
      (cfg.max_size.value < 1 || cfg.max_size.value > 100))
    return Status::InvalidArgument("maximum size percent must be 1..100");
  UMBRA_ASSIGN_OR_RETURN(bool on_volume, env->IsOnVolume(cfg.shadow_dir, cfg.origin_path));
  if (on_volume)
    return Status::InvalidArgument("shadow storage location " + cfg.shadow_dir +
                                   " is on the volume itself (" + cfg.origin_path +
                                   "); choose a directory on another filesystem");
  return Status::Ok();
}

Result<std::unique_ptr<VolumeImpl>> Construct(Env* env, VolumeConfig& cfg, bool create) {
  if (cfg.origin_path.empty() || cfg.shadow_dir.empty())
    return Status::InvalidArgument("volume needs an origin path and a shadow storage directory");
  UMBRA_ASSIGN_OR_RETURN(auto origin, env->Open(cfg.origin_path, OpenMode::kReadWrite,
                                                cfg.direct_io));
  UMBRA_ASSIGN_OR_RETURN(uint64_t size, origin->Size());
  if (create) UMBRA_RETURN_IF_ERROR(env->CreateDir(cfg.shadow_dir));
  UMBRA_ASSIGN_OR_RETURN(bool dir_exists, env->Exists(cfg.shadow_dir));
  if (!dir_exists)
    return Status::NotFound("shadow storage directory " + cfg.shadow_dir + " does not exist");
  UMBRA_RETURN_IF_ERROR(CheckConfig(env, cfg, size));
  Uuid uuid{};
  if (create && cfg.uuid.empty()) cfg.uuid = NewUuid();
  if (!ParseUuid(cfg.uuid, uuid))
    return Status::InvalidArgument("volume UUID '" + cfg.uuid + "' is not a UUID");
  std::string ckpt = cfg.shadow_dir + "/" + kCheckpointName;
  UMBRA_ASSIGN_OR_RETURN(bool has_ckpt, env->Exists(ckpt));
  if (create && has_ckpt)
    return Status::AlreadyExists("shadow storage already exists in " + cfg.shadow_dir);
  bool fresh = create;
  if (!create && !has_ckpt) {
    UMBRA_ASSIGN_OR_RETURN(bool retired,
                           env->Exists(cfg.shadow_dir + "/" + kCheckpointFailedName));
    if (!retired) return Status::NotFound("no shadow storage in " + cfg.shadow_dir);
    // Retired after a failure: its snapshots were invalidated; start afresh.
    UMBRA_ASSIGN_OR_RETURN(auto names, env->ListDir(cfg.shadow_dir));
    for (const auto& n : names)
      if (n.rfind(kJournalPrefix, 0) == 0)
        UMBRA_RETURN_IF_ERROR(env->Remove(cfg.shadow_dir + "/" + n));
    fresh = true;
  }
  std::unique_ptr<File> data;
  if (fresh) {
    UMBRA_ASSIGN_OR_RETURN(data, env->Open(cfg.shadow_dir + "/" + kDataName, OpenMode::kCreate));
    UMBRA_RETURN_IF_ERROR(data->Truncate(0));
  } else {
    UMBRA_ASSIGN_OR_RETURN(data, env->Open(cfg.shadow_dir + "/" + kDataName, OpenMode::kReadWrite));
  }
  // Shadow storage on the origin's own filesystem cannot hang while the
  // origin goes on: the writers copy inline, without a hand-off per copy.
  UMBRA_ASSIGN_OR_RETURN(bool same_fs, env->SameFilesystem(cfg.shadow_dir, cfg.origin_path));
  auto v = std::make_unique<VolumeImpl>(env, cfg, uuid, size, std::move(origin), std::move(data),
                                        same_fs);
  // Long runs of chunks to copy bypass the page cache: their old contents are
  // read (PreserveChunks) and written to the data file (WriteCopies) with O_DIRECT.
  if (!cfg.direct_io && size % kDirectAlign == 0) {
    auto direct = env->Open(cfg.origin_path, OpenMode::kReadOnly, true);
    if (direct.ok()) v->SetOriginDirect(std::move(direct).value());
  }
  auto data_direct = env->Open(cfg.shadow_dir + "/" + kDataName, OpenMode::kReadWrite, true);
  if (data_direct.ok()) v->SetDataDirect(std::move(data_direct).value());
  if (fresh && !create) {
    UMBRA_RETURN_IF_ERROR(v->InitNew());
    env->Remove(cfg.shadow_dir + "/" + kCheckpointFailedName).IgnoreError();
  }
  return v;
}

}  // namespace

// ------------------------------------------------------------ origin I/O --

Status VolumeImpl::OriginRead(uint64_t off, std::span<std::byte> buf) {
  if (!cfg_.direct_io || reinterpret_cast<uintptr_t>(buf.data()) % kDirectAlign == 0)
    return origin_->ReadAt(off, buf);
  for (size_t done = 0; done < buf.size(); done += pool_.size()) {
    size_t n = std::min(buf.size() - done, pool_.size());
    auto b = pool_.Get();
    Status s = origin_->ReadAt(off + done, std::span(b.get(), n));
    if (s.ok()) std::memcpy(buf.data() + done, b.get(), n);
    pool_.Put(std::move(b));
    UMBRA_RETURN_IF_ERROR(s);
  }
  return Status::Ok();
}

Status VolumeImpl::OriginWrite(uint64_t off, std::span<const std::byte> buf) {
  if (!cfg_.direct_io || reinterpret_cast<uintptr_t>(buf.data()) % kDirectAlign == 0)
    return origin_->WriteAt(off, buf);
  for (size_t done = 0; done < buf.size(); done += pool_.size()) {
    size_t n = std::min(buf.size() - done, pool_.size());
    auto b = pool_.Get();
    std::memcpy(b.get(), buf.data() + done, n);
    Status s = origin_->WriteAt(off + done, std::span<const std::byte>(b.get(), n));
    pool_.Put(std::move(b));
    UMBRA_RETURN_IF_ERROR(s);
  }
  return Status::Ok();
}

// ------------------------------------------------------- live block ops --

Status VolumeImpl::Read(uint64_t off, std::span<std::byte> buf) {
  if (off > size_ || buf.size() > size_ - off)
    return Status::InvalidArgument("read beyond the end of the volume");
  if (cfg_.direct_io && (!Aligned(off) || !Aligned(buf.size())))
    return Status::InvalidArgument("direct I/O needs 4096-aligned offsets and lengths");
  std::shared_lock g(gate_);
  // Free chunks read as zeros; runs of allocated chunks are read in one go.
  size_t pos = 0;
  while (pos < buf.size()) {
    uint64_t c = ChunkOf(off + pos);
    bool is_free = state_.free_map().Test(c);
    size_t run = 0;
    while (pos + run < buf.size()) {
      uint64_t cc = ChunkOf(off + pos + run);
      if (state_.free_map().Test(cc) != is_free) break;
      uint64_t chunk_end = (cc + 1) << shift_;
      run = std::min<uint64_t>(chunk_end - off, buf.size()) - pos;
    }
    auto part = buf.subspan(pos, run);
    if (is_free) {
      std::memset(part.data(), 0, part.size());
    } else {
      UMBRA_RETURN_IF_ERROR(OriginRead(off + pos, part));
    }
    pos += run;
  }
  return Status::Ok();
}

Status VolumeImpl::Write(uint64_t off, std::span<const std::byte> buf, bool fua) {
  if (off > size_ || buf.size() > size_ - off)
    return Status::InvalidArgument("write beyond the end of the volume");
  if (cfg_.direct_io && (!Aligned(off) || !Aligned(buf.size())))
    return Status::InvalidArgument("direct I/O needs 4096-aligned offsets and lengths");
  if (buf.empty()) return Status::Ok();
  std::shared_lock g(gate_);
  if (closed_) return Status(Code::kIOError, "volume is closed", EIO);
  changes_->Mark(off, buf.size());  // before the write: rule 6.1
  uint64_t c0 = ChunkOf(off), c1 = ChunkOf(off + buf.size() - 1);
  bool active = cow_active_.load();
  bool fast = true;
  for (uint64_t c = c0; c <= c1 && fast; ++c)
    fast = !state_.free_map().Test(c) && (!active || state_.copied().Test(c));
  if (fast) {
    UMBRA_RETURN_IF_ERROR(OriginWrite(off, buf));
    return fua ? origin_->Sync() : Status::Ok();
  }

  // Slow path: lock the stripes of every chunk touched, in order.
  // Reused per thread: no allocation on the write path in steady state.
  thread_local std::vector<size_t> idx;
  idx.clear();
  for (uint64_t c = c0; c <= c1; ++c) idx.push_back(c % stripes_.size());
  std::sort(idx.begin(), idx.end());
  idx.erase(std::unique(idx.begin(), idx.end()), idx.end());
  for (size_t i : idx) stripes_[i].lock();
  struct Unlock {
    VolumeImpl* v;
    std::vector<size_t>& idx;
    ~Unlock() {
      for (auto it = idx.rbegin(); it != idx.rend(); ++it) v->stripes_[*it].unlock();
    }
  } unlock{this, idx};

  UMBRA_RETURN_IF_ERROR(PreserveChunks(c0, c1));

  // Free chunks: write whole chunks (zeros around the data) so a chunk never
  // reads stale bytes once it stops being free (rule 6); then clear the bit.
  thread_local std::vector<uint64_t> was_free;
  was_free.clear();
  for (uint64_t c = c0; c <= c1; ++c)
    if (state_.free_map().Test(c)) was_free.push_back(c);
  if (!was_free.empty()) {
    std::unique_lock l(meta_mu_);
    for (uint64_t c : was_free) {
      Record r;
      r.type = RecordType::kAlloc;
      r.chunk = c;
      r.count = 1;
      journal_->Append(r);
    }
  }
  size_t fi = 0;
  uint64_t pos = off;
  const uint64_t end = off + buf.size();
  while (pos < end) {
    uint64_t c = ChunkOf(pos);
    uint64_t cstart = c << shift_;
    uint64_t cend = std::min<uint64_t>(cstart + cfg_.chunk_size, size_);
    uint64_t seg_end = std::min(end, cend);
    if (fi < was_free.size() && was_free[fi] == c) {
      ++fi;
      if (pos != cstart || seg_end != cend) {
        auto b = pool_.Get();
        std::memset(b.get(), 0, cfg_.chunk_size);
        std::memcpy(b.get() + (pos - cstart), buf.data() + (pos - off), seg_end - pos);
        Status s = OriginWrite(cstart, std::span<const std::byte>(b.get(), cend - cstart));
        pool_.Put(std::move(b));
        UMBRA_RETURN_IF_ERROR(s);
      } else {
        UMBRA_RETURN_IF_ERROR(OriginWrite(pos, buf.subspan(pos - off, seg_end - pos)));
      }
      state_.free_map().Clear(c);
      pos = seg_end;
      continue;
    }
    // Write the longest run of non-free chunks in one call.
    uint64_t run_end = seg_end;
    while (run_end < end && !(fi < was_free.size() && was_free[fi] == ChunkOf(run_end)))
      run_end = std::min<uint64_t>(end, (ChunkOf(run_end) + 1) << shift_);
    UMBRA_RETURN_IF_ERROR(OriginWrite(pos, buf.subspan(pos - off, run_end - pos)));
    pos = run_end;
  }
  if (!fua) return Status::Ok();
  // FUA: this write (and any ALLOC record it appended) durable now. Not via
  // Flush(), which would take gate_ a second time.
  UMBRA_RETURN_IF_ERROR(origin_->Sync());
  return SyncFreeMap();
}

// ------------------------------------------------- asynchronous writes --
//
// A write that must copy old chunks, when copies are written inline: the
// serving thread takes the gate and the stripes and plans the copies (slots,
// zero copies), then hands the write to the I/O thread and returns to serve
// the next request. The I/O thread reads the old chunks for every queued
// write in one io_uring submission, and as each write's reads complete it
// writes the copies, records them, applies the write to the origin, releases
// the locks and calls `done`. So no thread sleeps per old-chunk read, and
// the reads of concurrent writes go to the disk together.

namespace {

// Marks the calling thread as an I/O flusher (its allocations do not recurse
// into I/O on the device it serves). Best effort: umbrad warns at start when
// it is not permitted.
void MarkIoFlusherThread() { ::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0); }

}  // namespace

std::unique_ptr<AsyncWrite> VolumeImpl::GetAsyncOp() {
  {
    std::lock_guard l(aq_mu_);
    if (!op_pool_.empty()) {
      auto op = std::move(op_pool_.back());
      op_pool_.pop_back();
      return op;
    }
  }
  return std::make_unique<AsyncWrite>();
}

void VolumeImpl::PutAsyncOp(std::unique_ptr<AsyncWrite> op) {
  // The data buffer (at most kAsyncMaxBytes) is kept for the next write.
  op->done = nullptr;
  op->plan = CopyPlan{};
  op->reads.clear();
  op->idx.clear();
  op->pending = 0;
  op->read_status = Status::Ok();
  std::lock_guard l(aq_mu_);
  if (op_pool_.size() < kAsyncPoolMax) op_pool_.push_back(std::move(op));
}

void VolumeImpl::WriteAsync(uint64_t off, std::span<const std::byte> buf, bool fua,
                            WriteDone done) {
  // Whatever needs no copy, or is unusual (FUA, huge, errors, free chunks),
  // goes the synchronous way.
  if (!async_ || fua || buf.empty() || buf.size() > kAsyncMaxBytes || off > size_ ||
      buf.size() > size_ - off ||
      (cfg_.direct_io && (!Aligned(off) || !Aligned(buf.size()))) || !cow_active_.load())
    return done(Write(off, buf, fua));
  const uint64_t c0 = ChunkOf(off), c1 = ChunkOf(off + buf.size() - 1);
  gate_.lock_shared();
  bool sync = closed_;
  bool all_copied = true;
  for (uint64_t c = c0; c <= c1 && !sync; ++c) {
    sync = state_.free_map().Test(c);
    all_copied = all_copied && state_.copied().Test(c);
  }
  if (sync || all_copied) {
    gate_.unlock_shared();
    return done(Write(off, buf, fua));
  }
  changes_->Mark(off, buf.size());  // before the write: rule 6.1
  std::unique_ptr<AsyncWrite> op = GetAsyncOp();
  op->off = off;
  op->c0 = c0;
  op->c1 = c1;
  for (uint64_t c = c0; c <= c1; ++c) op->idx.push_back(c % stripes_.size());
  std::sort(op->idx.begin(), op->idx.end());
  op->idx.erase(std::unique(op->idx.begin(), op->idx.end()), op->idx.end());
  for (size_t i : op->idx) stripes_[i].lock();
  auto release = [&] {
    for (auto it = op->idx.rbegin(); it != op->idx.rend(); ++it) stripes_[*it].unlock();
    gate_.unlock_shared();
    PutAsyncOp(std::move(op));
  };
  // Free bits change only under the stripes, so this answer holds.
  for (uint64_t c = c0; c <= c1 && !sync; ++c) sync = state_.free_map().Test(c);
  if (sync) {
    release();
    return done(Write(off, buf, fua));
  }
  Status s = PlanCopies(c0, c1, &op->plan);
  if (!s.ok() || op->plan.jobs.empty()) {  // refused, or only zero copies
    if (s.ok()) s = OriginWrite(off, buf);
    release();
    return done(s);
  }
  GetCopyBuffers(&op->plan);
  op->data.assign(buf.begin(), buf.end());
  op->done = std::move(done);
  for (auto& j : op->plan.jobs) {
    auto [cstart, len] = OldChunkRange(*j);
    op->reads.push_back({op.get(), j.get(), cstart, static_cast<uint32_t>(len)});
  }
  bool wake;
  {
    std::lock_guard l(aq_mu_);
    aq_.push_back(op.release());
    wake = io_sleeping_;
    io_sleeping_ = false;
  }
  if (wake) ::eventfd_write(io_efd_, 1);
}

void VolumeImpl::FinishAsync(std::span<AsyncWrite* const> ops, std::vector<Reply>* replies) {
  // The copies of every write whose reads succeeded, in one pass: one
  // journal append under meta_mu_ and, for persistent snapshots, one sync.
  thread_local std::vector<std::shared_ptr<CopyJob>> jobs;
  jobs.clear();
  for (AsyncWrite* op : ops)
    if (op->read_status.ok())
      jobs.insert(jobs.end(), op->plan.jobs.begin(), op->plan.jobs.end());
  if (!jobs.empty()) {
    WriteCopies(jobs);
    for (auto& j : jobs) j->state.store(1);
    jobs.clear();
  }
  for (AsyncWrite* op : ops) {
    Status s = op->read_status;
    if (!s.ok()) {
      FreePlanSlots(&op->plan);
      s = s.Annotate("reading the origin to preserve it");
    } else {
      bool retry = false;
      s = FinishCopies(&op->plan, &retry, 0);
      // A full store dropped a snapshot: copy what is still needed the
      // synchronous way (we hold the stripes).
      if (s.ok() && retry) s = PreserveChunks(op->c0, op->c1);
      if (s.ok()) s = OriginWrite(op->off, op->data);
    }
    for (auto it = op->idx.rbegin(); it != op->idx.rend(); ++it) stripes_[*it].unlock();
    gate_.unlock_shared();
    replies->push_back({std::move(op->done), std::move(s)});
    PutAsyncOp(std::unique_ptr<AsyncWrite>(op));
  }
}

void VolumeImpl::IoMain() {
  MarkIoFlusherThread();
  ::pthread_setname_np(::pthread_self(), "umbra-io");
  // The ring belongs to this thread alone: completions are reaped here, so
  // DEFER_TASKRUN (run completion work only when this thread asks) applies.
  io_uring ring;
  io_uring_params params{};
  params.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
  bool have_ring = origin_->fd() >= 0 && io_uring_queue_init_params(kRingEntries, &ring,
                                                                   &params) == 0;
  if (!have_ring && origin_->fd() >= 0)  // kernels before 6.1
    have_ring = io_uring_queue_init(kRingEntries, &ring, 0) == 0;
  auto next_sqe = [&] {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    if (sqe == nullptr) {  // full: pass what we have to the kernel
      io_uring_submit(&ring);
      sqe = io_uring_get_sqe(&ring);
      if (sqe == nullptr) std::abort();  // the kernel took none of 256 entries
    }
    return sqe;
  };
  auto arm_wake = [&] {  // completes when a serving thread writes the eventfd
    io_uring_sqe* sqe = next_sqe();
    io_uring_prep_read(sqe, io_efd_, &io_wake_count_, sizeof io_wake_count_, 0);
    io_uring_sqe_set_data(sqe, nullptr);
  };
  if (have_ring) arm_wake();
  size_t inflight = 0;
  std::vector<AsyncWrite*> batch, completed;
  std::vector<Reply> replies;
  for (;;) {
    batch.clear();
    bool idle;
    {
      std::lock_guard l(aq_mu_);
      batch.swap(aq_);
      idle = batch.empty();
      if (idle && io_stop_ && inflight == 0) break;
      io_sleeping_ = idle;
    }
    if (!have_ring) {  // in-memory origin or no io_uring: read here, one by one
      for (AsyncWrite* op : batch)
        for (auto& r : op->reads)
          if (op->read_status.ok())
            op->read_status = origin_->ReadAt(r.off, std::span(r.job->buf.get(), r.len));
      FinishAsync(batch, &replies);
      for (Reply& r : replies) r.done(std::move(r.status));
      replies.clear();
      if (idle) {
        eventfd_t v;
        ::eventfd_read(io_efd_, &v);
      }
      continue;
    }
    for (AsyncWrite* op : batch) {
      for (auto& r : op->reads) {
        io_uring_sqe* sqe = next_sqe();
        io_uring_prep_read(sqe, origin_->fd(), r.job->buf.get(), r.len, r.off);
        io_uring_sqe_set_data(sqe, &r);
        ++op->pending;
      }
      ++inflight;
    }
    if (idle) {
      io_uring_submit_and_wait(&ring, 1);
    } else {
      io_uring_submit_and_get_events(&ring);
    }
    {
      std::lock_guard l(aq_mu_);
      io_sleeping_ = false;
    }
    completed.clear();
    io_uring_cqe* cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&ring, head, cqe) {
      ++seen;
      auto* r = static_cast<AsyncWrite::ReadOp*>(io_uring_cqe_get_data(cqe));
      if (r == nullptr) {
        arm_wake();
        continue;
      }
      AsyncWrite* op = r->op;
      // Anything but a whole read (an error, EAGAIN, a short read at the end
      // of the file) is redone with ReadAt, which reports errors, retries
      // EINTR and reads zeros past the end.
      if (cqe->res != static_cast<int>(r->len) && op->read_status.ok())
        op->read_status = origin_->ReadAt(r->off, std::span(r->job->buf.get(), r->len));
      if (--op->pending == 0) completed.push_back(op);
    }
    io_uring_cq_advance(&ring, seen);
    // Every write of this pass is done before the first reply goes out: a
    // reply wakes the kernel side, which then takes the CPU from this thread.
    FinishAsync(completed, &replies);
    inflight -= completed.size();
    for (Reply& r : replies) r.done(std::move(r.status));
    replies.clear();
  }
  if (have_ring) io_uring_queue_exit(&ring);
}

Status VolumeImpl::PlanCopies(uint64_t c0, uint64_t c1, CopyPlan* plan) {
  auto& jobs = plan->jobs;
  uint64_t& sync_lsn = plan->sync_lsn;
  std::shared_ptr<Journal>& jnl = plan->jnl;
  {
    std::unique_lock l(meta_mu_);
    uint64_t needed = 0;
    for (uint64_t c = c0; c <= c1; ++c)
      if (state_.NeedsCopy(c) && !state_.free_at_newest().Test(c)) ++needed;
    if (needed > 0) {
      Status s = ReserveSlots(l, needed);
      if (!s.ok()) return s;  // protection level "snapshot": fail the write
    }
    jnl = journal_;
    for (uint64_t c = c0; c <= c1; ++c) {
      if (!state_.NeedsCopy(c)) continue;
      bool persistent = state_.NewExceptionIsPersistent(c);
      if (state_.free_at_newest().Test(c)) {
        // Free at the instant: the snapshot reads zeros; nothing to copy.
        uint64_t key = state_.newest_valid();
        state_.AddException(c, kZeroSlot);
        zero_copies_.fetch_add(1);
        Record r;
        r.type = RecordType::kException;
        r.chunk = c;
        r.key = key;
        r.slot = kZeroSlot;
        uint64_t lsn = jnl->Append(r);
        if (persistent) sync_lsn = lsn;
        continue;
      }
      uint64_t key = state_.newest_valid();
      uint64_t slot = state_.AllocSlot();
      if (jobs.empty() || jobs.back()->items.back().chunk + 1 != c)
        jobs.push_back(std::make_shared<CopyJob>());
      jobs.back()->items.push_back({c, key, slot, persistent});
    }
  }
  return Status::Ok();
}

std::pair<uint64_t, uint64_t> VolumeImpl::OldChunkRange(const CopyJob& j) const {
  uint64_t cstart = j.items.front().chunk << shift_;
  return {cstart, std::min<uint64_t>(j.items.size() * uint64_t{cfg_.chunk_size}, size_ - cstart)};
}

void VolumeImpl::GetCopyBuffers(CopyPlan* plan) {
  for (auto& j : plan->jobs) {
    size_t n = j->items.size();
    if (n == 1) {
      j->buf = pool_.Get();
      j->pooled = true;
    } else if (n * cfg_.chunk_size <= run_pool_.size()) {
      j->buf = run_pool_.Get();  // e.g. the chunks under one 1 MiB write
      j->pooled = true;
    } else {
      void* p = std::aligned_alloc(kDirectAlign, n * cfg_.chunk_size);
      if (p == nullptr) std::abort();
      j->buf.reset(static_cast<std::byte*>(p));
    }
    uint64_t len = OldChunkRange(*j).second;
    if (len < n * cfg_.chunk_size) std::memset(j->buf.get() + len, 0, n * cfg_.chunk_size - len);
  }
}

void VolumeImpl::FreePlanSlots(CopyPlan* plan) {
  std::unique_lock l(meta_mu_);
  for (auto& j : plan->jobs)
    for (auto& it : j->items) state_.FreeSlot(it.slot);
}

Status VolumeImpl::FinishCopies(CopyPlan* plan, bool* retry_out, int attempt) {
  auto& jobs = plan->jobs;
  uint64_t sync_lsn = plan->sync_lsn;
  std::shared_ptr<Journal>& jnl = plan->jnl;
  *retry_out = false;
  std::unique_lock l(meta_mu_);
  Status failure;
  InvalidCause cause = InvalidCause::kNone;
  bool retry = false;
  const uint64_t bound_ns = uint64_t{cfg_.copy_timeout_ms} * 1'000'000;
  for (auto& j : jobs) {
    if (j->state.load() == 2) {  // abandoned: the copier frees the slots
      cause = InvalidCause::kCopyTooSlow;
      failure = Status::TimedOut("copy to shadow storage exceeded " +
                                 std::to_string(cfg_.copy_timeout_ms) + " ms");
      continue;
    }
    Status s = j->status;
    if (s.ok() && j->duration_ns > bound_ns) {
      s = Status::TimedOut("copy to shadow storage took " +
                           std::to_string(j->duration_ns / 1'000'000) + " ms, bound " +
                           std::to_string(cfg_.copy_timeout_ms) + " ms");
      cause = InvalidCause::kCopyTooSlow;
    }
    for (auto& it : j->items) {
      if (s.ok() && state_.AddExceptionKeyed(it.chunk, it.key, it.slot)) {
        copies_.fetch_add(1);
      } else {
        state_.FreeSlot(it.slot);
      }
    }
    if (s.ok()) continue;
    if (cause == InvalidCause::kNone) {
      cause = s.code() == Code::kNoSpace ? InvalidCause::kStorageFull
                                         : InvalidCause::kStorageIOError;
    }
    if (failure.ok()) failure = s;
  }
  for (auto& j : jobs) {
    if (j->state.load() != 1 || !j->pooled) continue;
    if (j->items.size() == 1) {
      pool_.Put(std::move(j->buf));
    } else {
      run_pool_.Put(std::move(j->buf));
    }
  }
  if (failure.ok()) {
    l.unlock();
    if (sync_lsn != 0) {
      Status s = jnl->SyncTo(sync_lsn);
      if (!s.ok()) {
        l.lock();
        if (cfg_.protection == ProtectionLevel::kSnapshot) return s;
        InvalidateAllLocked(l, InvalidCause::kStorageIOError, s.message());
      }
    }
    return Status::Ok();
  }
  if (cfg_.protection == ProtectionLevel::kSnapshot)
    return failure.Annotate("origin write refused to protect snapshots");
  if (cause == InvalidCause::kStorageFull && state_.valid_count() > 1 && attempt < 64) {
    // Disk full: drop the oldest snapshot and try again (copies that
    // succeeded are kept; the retry copies only what is still needed).
    RemoveSnapshotLocked(l, state_.oldest_valid()).IgnoreError();  // failure invalidates all
    retry = true;
  } else {
    InvalidateAllLocked(l, cause, failure.message());
  }
  *retry_out = retry;
  return Status::Ok();
}

Status VolumeImpl::PreserveChunks(uint64_t c0, uint64_t c1) {
  if (!cow_active_.load()) return Status::Ok();
  for (int attempt = 0;; ++attempt) {
    CopyPlan plan;
    UMBRA_RETURN_IF_ERROR(PlanCopies(c0, c1, &plan));
    GetCopyBuffers(&plan);
    // Read the old contents (we hold the stripes: nobody else writes them),
    // each run of consecutive chunks in one read.
    Status rs;
    for (auto& j : plan.jobs) {
      auto [cstart, len] = OldChunkRange(*j);
      File* from = origin_.get();
      if (origin_direct_ && len >= kDirectRunMin && Aligned(len)) from = origin_direct_.get();
      if (rs.ok()) rs = from->ReadAt(cstart, std::span(j->buf.get(), len));
    }
    if (!rs.ok()) {
      FreePlanSlots(&plan);
      return rs.Annotate("reading the origin to preserve it");
    }
    if (!plan.jobs.empty() && copy_inline_) {
      WriteCopies(plan.jobs);
      for (auto& j : plan.jobs) j->state.store(1);
    } else if (!plan.jobs.empty()) {
      Submit(plan.jobs);
      WaitJobs(plan.jobs);  // on timeout the jobs are marked abandoned
    }
    bool retry = false;
    Status s = FinishCopies(&plan, &retry, attempt);
    if (!retry) return s;
  }
}

Status VolumeImpl::ReserveSlots(std::unique_lock<std::mutex>& l, uint64_t n) {
  for (;;) {
    if (state_.newest_valid() == 0) return Status::Ok();
    uint64_t max = std::min<uint64_t>(MaxSlots(), ExceptionIndex::kMaxSlot);
    if (state_.slots_in_use() + n <= max) return Status::Ok();
    if (cfg_.protection == ProtectionLevel::kSnapshot)
      return Status::NoSpace("shadow storage of " + cfg_.origin_path + " is full (maximum " +
                             cfg_.max_size.ToString() +
                             "); origin write refused to protect snapshots");
    if (state_.valid_count() > 1) {
      RemoveSnapshotLocked(l, state_.oldest_valid()).IgnoreError();  // failure invalidates all
    } else {
      InvalidateAllLocked(l, InvalidCause::kStorageFull,
                          "shadow storage reached its maximum size (" +
                              cfg_.max_size.ToString() + ")");
    }
  }
}

Status VolumeImpl::RemoveSnapshotLocked(std::unique_lock<std::mutex>& l, uint64_t seq) {
  auto it = state_.snaps().find(seq);
  if (it == state_.snaps().end()) return Status::Ok();
  auto reader = it->second.read_mu;
  std::vector<uint64_t> freed;
  state_.RemoveSnapshot(seq, freed);
  Record r;
  r.type = RecordType::kSnapDelete;
  r.seq = seq;
  journal_->Append(r);
  UpdateCowActive();
  return ReleaseSlots(l, {reader}, std::move(freed));
}

void VolumeImpl::InvalidateAllLocked(std::unique_lock<std::mutex>& l, InvalidCause cause,
                                     const std::string& msg) {
  std::vector<std::shared_ptr<std::shared_mutex>> readers;
  std::vector<uint64_t> freed;
  std::vector<uint64_t> seqs;
  for (auto& [seq, s] : state_.snaps())
    if (s.info.valid) seqs.push_back(seq);
  for (uint64_t seq : seqs) {
    readers.push_back(state_.snaps().at(seq).read_mu);
    state_.InvalidateSnapshot(seq, cause, msg, freed);
    Record r;
    r.type = RecordType::kSnapInvalidate;
    r.seq = seq;
    r.cause = static_cast<uint8_t>(cause);
    r.name = msg;
    journal_->Append(r);
  }
  UpdateCowActive();
  ReleaseSlots(l, std::move(readers), std::move(freed)).IgnoreError();  // cause already recorded
}

Status VolumeImpl::ReleaseSlots(std::unique_lock<std::mutex>& l,
                              std::vector<std::shared_ptr<std::shared_mutex>> readers,
                              std::vector<uint64_t> freed) {
  auto jnl = journal_;
  uint64_t lsn = jnl->next_lsn() - 1;
  l.unlock();
  for (auto& r : readers) {  // rule 8: wait for in-flight reads of these snapshots
    r->lock();
    r->unlock();
  }
  Status s = jnl->SyncTo(lsn);  // rule 4
  if (s.ok()) {
    std::sort(freed.begin(), freed.end());
    for (size_t i = 0; i < freed.size();) {
      size_t j = i + 1;
      while (j < freed.size() && freed[j] == freed[j - 1] + 1) ++j;
      data_->PunchHole(freed[i] * cfg_.chunk_size, (j - i) * uint64_t{cfg_.chunk_size})
          .IgnoreError();  // space reclaim only
      i = j;
    }
  }
  if (!s.ok()) {
    // The deletion/invalidation may not be durable: the store cannot be trusted.
    l.lock();
    if (state_.newest_valid() != 0) {
      InvalidateAllLocked(l, InvalidCause::kStorageIOError, s.message());
    }
    l.unlock();
    Retire(s).IgnoreError();
  }
  l.lock();
  // If the journal failed, the slots stay allocated: storage is broken anyway.
  if (s.ok())
    for (uint64_t slot : freed) state_.FreeSlot(slot);
  return s;
}

Status VolumeImpl::Retire(const Status& why) {
  if (retired_.exchange(true)) return Status::Ok();
  Status s = env_->Rename(cfg_.shadow_dir + "/" + kCheckpointName,
                          cfg_.shadow_dir + "/" + kCheckpointFailedName);
  if (s.ok()) s = env_->SyncDir(cfg_.shadow_dir);
  if (!s.ok()) {
    retired_ = false;
    return s.Annotate("retiring failed shadow storage (" + why.message() + ")");
  }
  return Status::Ok();
}

Status VolumeImpl::Discard(uint64_t off, uint64_t len) {
  if (off > size_ || len > size_ - off)
    return Status::InvalidArgument("discard beyond the end of the volume");
  if (len == 0) return Status::Ok();
  // Partial chunks at either end are written as zeros (so they read zeros).
  uint64_t first_full = (off + cfg_.chunk_size - 1) >> shift_;
  uint64_t end_full = (off + len) == size_ ? ((size_ + cfg_.chunk_size - 1) >> shift_)
                                           : ((off + len) >> shift_);
  auto zero_range = [&](uint64_t zoff, uint64_t zlen) -> Status {
    for (uint64_t done = 0; done < zlen; done += zeros_.size()) {
      uint64_t n = std::min<uint64_t>(zeros_.size(), zlen - done);
      UMBRA_RETURN_IF_ERROR(Write(zoff + done, std::span(zeros_.data(), n), false));
    }
    return Status::Ok();
  };
  if (first_full >= end_full) return zero_range(off, len);
  uint64_t full_off = first_full << shift_;
  uint64_t full_end = std::min<uint64_t>(end_full << shift_, size_);
  if (off < full_off) UMBRA_RETURN_IF_ERROR(zero_range(off, full_off - off));
  if (off + len > full_end) UMBRA_RETURN_IF_ERROR(zero_range(full_end, off + len - full_end));

  std::shared_lock g(gate_);
  for (uint64_t c = first_full; c < end_full; ++c) {
    if (state_.free_map().Test(c)) continue;
    std::unique_lock stripe(Stripe(c));
    // A discard changes the chunk, so the newest snapshot's copy is made
    // first, exactly as for a write (unless the chunk was free at the
    // snapshot, which costs nothing).
    UMBRA_RETURN_IF_ERROR(PreserveChunks(c, c));
    {
      std::unique_lock l(meta_mu_);
      if (state_.free_map().Test(c)) continue;
      state_.free_map().Set(c);
      Record r;
      r.type = RecordType::kFree;
      r.chunk = c;
      r.count = 1;
      journal_->Append(r);
    }
    uint64_t coff = c << shift_;
    changes_->Mark(coff, cfg_.chunk_size);
    origin_->PunchHole(coff, std::min<uint64_t>(cfg_.chunk_size, size_ - coff)).IgnoreError();
  }
  return Status::Ok();
}

Status VolumeImpl::WriteZeroes(uint64_t off, uint64_t len) {
  // Whole chunks become free (they read zeros); partial ones are written.
  return Discard(off, len);
}

Status VolumeImpl::Flush() {
  std::shared_lock g(gate_);
  UMBRA_RETURN_IF_ERROR(origin_->Sync());
  UMBRA_RETURN_IF_ERROR(SyncFreeMap());
  g.unlock();
  return MaybeRotate();
}

Status VolumeImpl::SyncFreeMap() {
  std::shared_ptr<Journal> jnl;
  {
    std::lock_guard l(meta_mu_);
    jnl = journal_;
  }
  Status s = jnl->SyncAll();  // rule 5: FREE/ALLOC records
  if (s.ok()) return s;
  if (cfg_.protection == ProtectionLevel::kSnapshot) return s;
  {
    std::unique_lock l(meta_mu_);
    if (state_.newest_valid() != 0) InvalidateAllLocked(l, InvalidCause::kStorageIOError, s.message());
  }
  // The free map could not be made durable. Once the store is retired a
  // crash starts from an empty free map, which is safe; if even that fails
  // durability cannot be promised.
  return Retire(s);
}

// ------------------------------------------------------------ copier --

void VolumeImpl::Submit(std::vector<std::shared_ptr<CopyJob>>& jobs) {
  auto wait = std::make_shared<CopyWait>();
  {
    std::lock_guard l(copier_mu_);
    for (auto& j : jobs) {
      j->wait = wait;
      queue_.push_back(j);
    }
  }
  if (jobs.size() == 1) {
    copier_cv_.notify_one();
  } else {
    copier_cv_.notify_all();
  }
}

bool VolumeImpl::WaitJobs(std::vector<std::shared_ptr<CopyJob>>& jobs) {
  auto deadline = std::chrono::steady_clock::now() +
                  std::chrono::milliseconds(copy_timeout_ms_.load()) + std::chrono::milliseconds(50);
  CopyWait& w = *jobs.front()->wait;
  std::unique_lock l(w.mu);
  auto all_done = [&] {
    return std::all_of(jobs.begin(), jobs.end(), [](auto& j) { return j->state.load() != 0; });
  };
  if (w.cv.wait_until(l, deadline, all_done)) return true;
  // Give up: a job still pending becomes abandoned (the copier sees its CAS
  // fail and frees the slots); one that finished meanwhile stays done.
  for (auto& j : jobs) {
    int expected = 0;
    j->state.compare_exchange_strong(expected, 2);
  }
  return false;
}

void VolumeImpl::WriteCopies(std::span<const std::shared_ptr<CopyJob>> jobs) {
  uint64_t t0 = env_->NowNanos();
  uint64_t max_lsn = 0;
  std::shared_ptr<Journal> jnl;
  for (auto& j : jobs) {
    if (j->state.load() != 0) continue;
    // Runs of consecutive slots go to the data file in one write.
    const auto& items = j->items;
    for (size_t i = 0; i < items.size() && j->status.ok();) {
      size_t k = i + 1;
      while (k < items.size() && items[k].slot == items[k - 1].slot + 1) ++k;
      const uint64_t len = (k - i) * uint64_t{cfg_.chunk_size};
      File* to = data_direct_ && len >= kDirectRunMin ? data_direct_.get() : data_.get();
      j->status = to->WriteAt(items[i].slot * uint64_t{cfg_.chunk_size},
                              std::span<const std::byte>(j->buf.get() + i * cfg_.chunk_size, len));
      i = k;
    }
  }
  {
    std::lock_guard l(meta_mu_);
    jnl = journal_;
    // Every exception is journaled, so replay frees and reuses slots exactly
    // as this run did; only persistent ranges wait for the sync (rule 2).
    for (auto& j : jobs) {
      if (!j->status.ok() || j->state.load() != 0) continue;
      for (const auto& it : j->items) {
        Record r;
        r.type = RecordType::kException;
        r.chunk = it.chunk;
        r.key = it.key;
        r.slot = it.slot;
        uint64_t lsn = jnl->Append(r);  // rule 1: SyncTo syncs the data file first
        if (it.persistent) max_lsn = lsn;
      }
    }
  }
  if (max_lsn != 0) {
    Status s = jnl->SyncTo(max_lsn);
    if (!s.ok())
      for (auto& j : jobs)
        if (j->status.ok()) j->status = s;
  }
  uint64_t dt = env_->NowNanos() - t0;
  for (auto& j : jobs) j->duration_ns = dt;
}

void VolumeImpl::CopierMain() {
  for (;;) {
    std::vector<std::shared_ptr<CopyJob>> batch;
    {
      std::unique_lock l(copier_mu_);
      copier_cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty() && stop_) return;
      // Take everything queued (bounded): one pass writes it, appends its
      // records and, for persistent snapshots, syncs it once.
      size_t items = 0;
      while (!queue_.empty() && items < kCopierBatchItems) {
        items += queue_.front()->items.size();
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
    }
    WriteCopies(batch);
    std::vector<std::shared_ptr<CopyJob>> orphans;
    for (auto& j : batch) {
      int expected = 0;
      if (!j->state.compare_exchange_strong(expected, 1)) {
        orphans.push_back(j);
        continue;
      }
      // Taking the waiter's mutex orders this wake-up after its predicate
      // check (no lost wake-up); then wake that writer alone.
      { std::lock_guard g(j->wait->mu); }
      j->wait->cv.notify_all();
    }
    if (!orphans.empty()) {
      // The writer gave up waiting and invalidated the snapshots; the slot
      // is ours to free (after the invalidation record, which came first).
      std::lock_guard l(meta_mu_);
      for (auto& j : orphans)
        for (auto& it : j->items) state_.FreeSlot(it.slot);
    }
  }
}

// ----------------------------------------------------------- snapshots --

Status VolumeImpl::PrepareInstant(bool persistent) {
  if (closed_) return Status(Code::kIOError, "volume is closed", EIO);
  // Rule 3: a persistent snapshot must hold every completed write, flushed
  // or not. Syncing before the gate keeps the gate's hold short.
  if (persistent) UMBRA_RETURN_IF_ERROR(origin_->Sync().Annotate("syncing the origin"));
  Status js;
  {
    std::lock_guard l(meta_mu_);
    js = journal_->error();
  }
  if (!js.ok()) {
    // The last journal failed; a fresh generation may work again.
    UMBRA_RETURN_IF_ERROR(
        RotateLocked().Annotate("shadow storage failed earlier and is still failing"));
  }
  return Status::Ok();
}

Result<SnapshotInfo> VolumeImpl::AddSnapshotLocked(const SnapshotOptions& opts,
                                                   const Uuid& set_uuid, uint32_t set_size,
                                                   uint64_t* lsn) {
  if (opts.persistent) UMBRA_RETURN_IF_ERROR(origin_->Sync().Annotate("syncing the origin"));
  std::lock_guard l(meta_mu_);
  Snap s;
  s.info.seq = state_.next_seq();
  s.info.id = NewUuid();
  ParseUuid(s.info.id, s.uuid);
  s.info.volume_uuid = cfg_.uuid;
  s.info.name = opts.name;
  s.info.persistent = opts.persistent;
  s.info.created_unix_ns = UnixNowNs();
  s.set_uuid = set_uuid;
  s.info.set_id = FormatUuid(set_uuid);
  s.info.set_size = set_size;
  // Inside the instant (gate_ held exclusively): rule 6.2.
  s.info.change_epoch = changes_->CloseEpoch();
  s.info.tracking_id = changes_->tracking_id();
  SnapshotInfo info = s.info;
  Record r;
  r.type = RecordType::kSnapCreate;
  r.seq = s.info.seq;
  r.snap_uuid = s.uuid;
  r.flags = opts.persistent ? 1 : 0;
  r.created_unix_ns = s.info.created_unix_ns;
  r.set_uuid = set_uuid;
  r.set_size = set_size;
  r.name = opts.name;
  state_.AddSnapshot(std::move(s));
  *lsn = journal_->Append(r);
  UpdateCowActive();
  return info;
}

Status VolumeImpl::SyncJournal(uint64_t lsn) {
  std::shared_ptr<Journal> jnl;
  {
    std::lock_guard l(meta_mu_);
    jnl = journal_;
  }
  return jnl->SyncTo(lsn);
}

Result<SnapshotInfo> VolumeImpl::CreateSnapshot(const SnapshotOptions& opts) {
  Volume* self = this;
  auto r = CreateSnapshotSet(std::span<Volume* const>(&self, 1), opts);
  if (!r.ok()) return r.status();
  return r->front();
}

Status VolumeImpl::DeleteSnapshot(const std::string& id) {
  std::lock_guard a(admin_mu_);
  return DeleteSnapshotLocked(id);
}

Status VolumeImpl::DeleteSnapshotLocked(const std::string& id) {
  std::unique_lock l(meta_mu_);
  Snap* s = state_.FindById(id);
  if (s == nullptr) return Status::NotFound("no snapshot " + id + " on volume " + cfg_.uuid);
  Status st = RemoveSnapshotLocked(l, s->info.seq);
  l.unlock();
  return st.Annotate("deleting snapshot " + id);
}

std::vector<SnapshotInfo> VolumeImpl::ListSnapshots() {
  std::lock_guard l(meta_mu_);
  auto excl = state_.ExclusiveBytes();
  std::vector<SnapshotInfo> out;
  for (auto& [seq, s] : state_.snaps()) {
    out.push_back(s.info);
    out.back().volume_uuid = cfg_.uuid;
    out.back().exclusive_bytes = excl.count(seq) ? excl[seq] : 0;
  }
  return out;
}

Result<SnapshotInfo> VolumeImpl::GetSnapshot(const std::string& id) {
  std::lock_guard l(meta_mu_);
  Snap* s = state_.FindById(id);
  if (s == nullptr) return Status::NotFound("no snapshot " + id);
  SnapshotInfo info = s->info;
  info.volume_uuid = cfg_.uuid;
  return info;
}

namespace {
Status InvalidStatus(const SnapshotInfo& info) {
  return Status::SnapshotInvalid("snapshot " + info.id + " was invalidated: " +
                                 std::string(InvalidCauseName(info.cause)) +
                                 (info.invalid_message.empty() ? "" : " (" + info.invalid_message + ")"));
}
}  // namespace

Status VolumeImpl::ReadSnapshot(const std::string& id, uint64_t off, std::span<std::byte> buf) {
  if (off > size_ || buf.size() > size_ - off)
    return Status::InvalidArgument("read beyond the end of the snapshot");
  std::shared_ptr<std::shared_mutex> reader;
  uint64_t seq = 0;
  {
    std::lock_guard l(meta_mu_);
    Snap* s = state_.FindById(id);
    if (s == nullptr) return Status::NotFound("no snapshot " + id);
    if (!s->info.valid) return InvalidStatus(s->info);
    reader = s->read_mu;
    seq = s->info.seq;
  }
  // Batches of consecutive chunks: their stripes are taken shared in
  // increasing stripe order (a batch never wraps the stripe index, so this is
  // the order writers use), then read_mu, then one meta_mu_ lookup for the
  // batch; runs of chunks read from the origin become one read.
  constexpr uint64_t kBatch = 64;
  enum Src : uint8_t { kZero, kSlot, kOrigin };
  std::array<Src, kBatch> srcs;
  std::array<uint64_t, kBatch> slots;
  size_t pos = 0;
  while (pos < buf.size()) {
    const uint64_t c0 = ChunkOf(off + pos);
    const uint64_t clast = ChunkOf(off + buf.size() - 1);
    const uint64_t stripe0 = c0 % stripes_.size();
    const uint64_t nc = std::min({kBatch, clast - c0 + 1, stripes_.size() - stripe0});
    for (uint64_t i = 0; i < nc; ++i) stripes_[stripe0 + i].lock_shared();
    struct Unlock {
      VolumeImpl* v;
      uint64_t first, count;
      ~Unlock() {
        for (uint64_t i = count; i-- > 0;) v->stripes_[first + i].unlock_shared();
      }
    } unlock{this, stripe0, nc};
    std::shared_lock rl(*reader);
    {
      std::lock_guard l(meta_mu_);
      auto it = state_.snaps().find(seq);
      if (it == state_.snaps().end()) return Status::NotFound("snapshot " + id + " was deleted");
      if (!it->second.info.valid) return InvalidStatus(it->second.info);
      for (uint64_t i = 0; i < nc; ++i) {
        auto e = state_.Lookup(c0 + i, seq);
        if (e) {
          srcs[i] = e->slot == kZeroSlot ? kZero : kSlot;
          slots[i] = e->slot;
        } else {
          srcs[i] = state_.free_at_newest().Test(c0 + i) ? kZero : kOrigin;
        }
      }
    }
    for (uint64_t i = 0; i < nc;) {
      const uint64_t c = c0 + i;
      const uint64_t cstart = c << shift_;
      const uint64_t from = off + pos;  // == cstart except in the first chunk
      if (srcs[i] == kOrigin) {
        // The longest run of origin chunks in this batch, read in one call.
        uint64_t j = i + 1;
        while (j < nc && srcs[j] == kOrigin) ++j;
        const uint64_t run_end = std::min<uint64_t>((c0 + j) << shift_, off + buf.size());
        UMBRA_RETURN_IF_ERROR(OriginRead(from, buf.subspan(pos, run_end - from)));
        pos += run_end - from;
        i = j;
        continue;
      }
      const uint64_t n = std::min<uint64_t>(off + buf.size(), cstart + cfg_.chunk_size) - from;
      auto part = buf.subspan(pos, n);
      if (srcs[i] == kZero) {
        std::memset(part.data(), 0, part.size());
      } else {
        UMBRA_RETURN_IF_ERROR(data_->ReadAt(slots[i] * cfg_.chunk_size + (from - cstart), part)
                                  .Annotate("reading shadow storage"));
      }
      pos += n;
      ++i;
    }
  }
  return Status::Ok();
}

Result<std::vector<Extent>> VolumeImpl::SnapshotExtents(const std::string& id) {
  std::lock_guard l(meta_mu_);
  Snap* s = state_.FindById(id);
  if (s == nullptr) return Status::NotFound("no snapshot " + id);
  if (!s->info.valid) return InvalidStatus(s->info);
  std::vector<Extent> out;
  for (uint64_t c = 0; c < state_.num_chunks(); ++c) {
    auto e = state_.Lookup(c, s->info.seq);
    bool allocated = e ? e->slot != kZeroSlot : !state_.free_at_newest().Test(c);
    if (!allocated) continue;
    uint64_t o = c << shift_;
    uint64_t n = std::min<uint64_t>(cfg_.chunk_size, size_ - o);
    if (!out.empty() && out.back().offset + out.back().length == o) {
      out.back().length += n;
    } else {
      out.push_back({o, n});
    }
  }
  return out;
}

Result<std::vector<Extent>> VolumeImpl::LiveExtents(uint64_t off, uint64_t len) {
  if (off > size_ || len > size_ - off) return Status::InvalidArgument("range beyond the volume");
  std::vector<Extent> out;
  if (len == 0) return out;
  const uint64_t end = off + len;
  std::lock_guard l(meta_mu_);
  for (uint64_t c = off >> shift_; (c << shift_) < end; ++c) {
    if (state_.free_map().Test(c)) continue;
    const uint64_t o = std::max(off, c << shift_);
    const uint64_t e = std::min(end, (c + 1) << shift_);
    if (!out.empty() && out.back().offset + out.back().length == o) {
      out.back().length += e - o;
    } else {
      out.push_back({o, e - o});
    }
  }
  return out;
}

// ------------------------------------------------------------- storage --

StorageUsage VolumeImpl::GetStorageUsage() {
  StorageUsage u;
  u.copies_inline = copy_inline_;
  std::shared_ptr<Journal> jnl;
  {
    std::lock_guard l(meta_mu_);
    u.used_bytes = state_.slots_in_use() * uint64_t{cfg_.chunk_size};
    u.max_size = cfg_.max_size;
    jnl = journal_;
  }
  uint64_t max = MaxSlots();
  u.max_bytes = max == UINT64_MAX ? UINT64_MAX : max * cfg_.chunk_size;
  auto a = data_->AllocatedBytes();
  u.allocated_bytes = (a.ok() ? *a : 0) + jnl->bytes_written();
  auto ck = env_->Open(cfg_.shadow_dir + "/" + kCheckpointName, OpenMode::kReadOnly);
  if (ck.ok()) {
    auto n = (*ck)->Size();
    if (n.ok()) u.allocated_bytes += *n;
  }
  u.copies = copies_.load();
  u.zero_copies = zero_copies_.load();
  return u;
}

Status VolumeImpl::SetMaxSize(MaxSize max) {
  std::lock_guard a(admin_mu_);
  if (max.kind == MaxSize::Kind::kPercent && (max.value < 1 || max.value > 100))
    return Status::InvalidArgument("maximum size percent must be 1..100");
  UMBRA_ASSIGN_OR_RETURN(FsStats st, env_->StatFs(cfg_.shadow_dir));
  if (max.kind == MaxSize::Kind::kBytes) {
    if (max.value < cfg_.chunk_size)
      return Status::InvalidArgument("maximum size " + max.ToString() +
                                     " is smaller than one chunk (" +
                                     FormatBytes(cfg_.chunk_size) + ")");
    if (st.total_bytes != 0 && max.value > st.total_bytes)
      return Status::InvalidArgument("maximum size " + max.ToString() +
                                     " does not fit: the filesystem holding " + cfg_.shadow_dir +
                                     " has " + FormatBytes(st.total_bytes));
  }
  std::unique_lock l(meta_mu_);
  MaxSize old = cfg_.max_size;
  cfg_.max_size = max;
  uint64_t slots = MaxSlots();
  if (slots != UINT64_MAX && state_.slots_in_use() > slots) {
    cfg_.max_size = old;
    return Status::InvalidArgument(
        "maximum size " + max.ToString() + " is below the " +
        FormatBytes(state_.slots_in_use() * uint64_t{cfg_.chunk_size}) +
        " in use; delete snapshots first");
  }
  uint64_t lsn = journal_->Append(ConfigRecord());
  auto jnl = journal_;
  l.unlock();
  return jnl->SyncTo(lsn);
}

Status VolumeImpl::SetCopyTimeout(uint32_t ms) {
  if (ms == 0) return Status::InvalidArgument("copy timeout must be at least 1 ms");
  std::lock_guard a(admin_mu_);
  std::unique_lock l(meta_mu_);
  if (cfg_.copy_timeout_ms == ms) return Status::Ok();
  cfg_.copy_timeout_ms = ms;
  copy_timeout_ms_.store(ms);
  uint64_t lsn = journal_->Append(ConfigRecord());
  auto jnl = journal_;
  l.unlock();
  return jnl->SyncTo(lsn);
}

Status VolumeImpl::SetProtection(ProtectionLevel level) {
  std::lock_guard a(admin_mu_);
  std::unique_lock l(meta_mu_);
  cfg_.protection = level;
  uint64_t lsn = journal_->Append(ConfigRecord());
  auto jnl = journal_;
  l.unlock();
  return jnl->SyncTo(lsn);
}

// ------------------------------------------------------ rotation/close --

Status VolumeImpl::MaybeRotate() {
  std::unique_lock a(admin_mu_, std::try_to_lock);
  if (!a.owns_lock()) return Status::Ok();  // an admin op is running; next time
  std::shared_ptr<Journal> jnl;
  {
    std::lock_guard l(meta_mu_);
    jnl = journal_;
  }
  if (jnl->bytes_written() < kRotateBytes) return Status::Ok();
  return RotateLocked();
}

Status VolumeImpl::RotateLocked() {
  std::vector<std::byte> body;
  CheckpointHeader h;
  uint64_t old_gen;
  {
    std::lock_guard l(meta_mu_);
    old_gen = journal_->generation();
    // (a) the current journal is complete; a failed one is abandoned (its
    // durable prefix is still replayed, the new checkpoint supersedes it).
    journal_->SyncAll().IgnoreError();  // on failure its unsynced tail is lost: see above
    uint64_t next = journal_->next_lsn();
    // (b) new generation, (c) switch to it.
    UMBRA_ASSIGN_OR_RETURN(journal_, NewJournal(old_gen + 1, next));
    state_.Serialize(ConfigRecord(), body);
    h = Header(old_gen + 1, next);
  }
  // (d) checkpoint, then (e) old journals go.
  UMBRA_RETURN_IF_ERROR(data_->Sync());
  UMBRA_RETURN_IF_ERROR(WriteCheckpoint(env_, cfg_.shadow_dir, h, body));
  if (retired_.exchange(false))
    env_->Remove(cfg_.shadow_dir + "/" + kCheckpointFailedName).IgnoreError();
  UMBRA_ASSIGN_OR_RETURN(auto names, env_->ListDir(cfg_.shadow_dir));
  for (const auto& n : names) {
    if (n.rfind(kJournalPrefix, 0) != 0) continue;
    uint64_t g = std::strtoull(n.c_str() + std::strlen(kJournalPrefix), nullptr, 16);
    if (g <= old_gen) env_->Remove(cfg_.shadow_dir + "/" + n).IgnoreError();
  }
  return Status::Ok();
}

Status VolumeImpl::Close() {
  std::lock_guard a(admin_mu_);
  if (closed_ || !ready_) return Status::Ok();  // never write to a store that failed to open
  Status s = origin_->Sync();
  {
    std::unique_lock l(meta_mu_);
    std::vector<uint64_t> autos;
    for (auto& [seq, sn] : state_.snaps())
      if (!sn.info.persistent) autos.push_back(seq);
    for (uint64_t seq : autos) RemoveSnapshotLocked(l, seq).IgnoreError();  // gone on reopen anyway
  }
  {
    std::unique_lock g(gate_);
    closed_ = true;
  }
  Status r = RotateLocked();
  if (s.ok()) s = r;
  Status c = changes_->Close();
  if (s.ok()) s = c;
  return s;
}

}  // namespace engine

// ------------------------------------------------------------- factory --

Result<std::unique_ptr<Volume>> Volume::Create(Env* env, VolumeConfig config) {
  auto v = engine::Construct(env, config, /*create=*/true);
  if (!v.ok()) return v.status();
  UMBRA_RETURN_IF_ERROR((*v)->InitNew());
  return std::unique_ptr<Volume>(std::move(v).value());
}

Result<std::unique_ptr<Volume>> Volume::Open(Env* env, VolumeConfig config) {
  if (config.uuid.empty()) return Status::InvalidArgument("opening a volume needs its UUID");
  auto v = engine::Construct(env, config, /*create=*/false);
  if (!v.ok()) return v.status();
  if (!(*v)->ready()) UMBRA_RETURN_IF_ERROR((*v)->Recover());
  return std::unique_ptr<Volume>(std::move(v).value());
}

}  // namespace umbra
