#include "engine/change_map.h"

#include <cstring>

#include "base/checksum.h"
#include "base/endian.h"
#include "base/random.h"

namespace umbra::engine {
namespace {

constexpr char kMagic[8] = {'U', 'M', 'B', 'R', 'A', 'C', 'H', 'G'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kStateOpen = 1;
constexpr uint32_t kStateClosed = 2;
constexpr size_t kCrcOffset = 84;

}  // namespace

ChangeMap::ChangeMap(std::unique_ptr<File> file, uint64_t size, uint32_t region)
    : file_(std::move(file)),
      size_(size),
      region_(region),
      count_((size + region - 1) / region) {
  entries_ = std::make_unique<std::atomic<uint64_t>[]>(count_);
}

Result<std::unique_ptr<ChangeMap>> ChangeMap::Open(Env* env, const std::string& dir,
                                                   const std::array<uint8_t, 16>& volume_uuid,
                                                   uint64_t volume_size, uint32_t chunk_size,
                                                   const std::string& boot_id,
                                                   bool expect_existing,
                                                   std::string* reset_reason) {
  const std::string path = dir + "/" + kChangeMapName;
  UMBRA_ASSIGN_OR_RETURN(bool existed, env->Exists(path));
  UMBRA_ASSIGN_OR_RETURN(auto file, env->Open(path, OpenMode::kCreate));
  uint32_t region = std::max(kChangeRegionSize, chunk_size);
  std::unique_ptr<ChangeMap> m(new ChangeMap(std::move(file), volume_size, region));
  m->volume_uuid_ = volume_uuid;
  Uuid boot{};
  if (!ParseUuid(boot_id, boot)) boot = Uuid{};
  m->boot_ = boot;

  std::string why;
  std::vector<std::byte> h(kChangeHeaderSize);
  if (!existed) {
    why = "";
  } else if (Status s = m->file_->ReadAt(0, h); !s.ok()) {
    why = "unreadable (" + s.message() + ")";
  } else if (std::memcmp(h.data(), kMagic, 8) != 0 || GetU32(&h[8]) != kVersion) {
    why = "not a version 1 change map";
  } else if (GetU32(&h[kCrcOffset]) !=
             Crc32(std::span<const std::byte>(h.data(), kCrcOffset))) {
    why = "header checksum mismatch";
  } else if (GetU32(&h[12]) != region || std::memcmp(&h[16], volume_uuid.data(), 16) != 0 ||
             GetU64(&h[32]) != volume_size) {
    why = "made for another volume, size or region size";
  } else if (auto fsize = m->file_->Size();
             !fsize.ok() || *fsize < kChangeHeaderSize + m->count_ * 8) {
    why = "short (entries missing)";  // they would read as 0: changes silently lost
  } else {
    uint32_t state = GetU32(&h[80]);
    bool same_boot = boot != Uuid{} && std::memcmp(&h[64], boot.data(), 16) == 0;
    if (state != kStateClosed && !same_boot)
      why = "left open by an earlier boot (power loss or system crash): changes not synced may "
            "be lost";
  }
  bool keep = existed && why.empty();
  if (keep) {
    std::memcpy(m->tracking_.data(), &h[40], 16);
    uint64_t epoch = GetU64(&h[56]);
    std::vector<std::byte> raw(m->count_ * 8);
    Status s = m->file_->ReadAt(kChangeHeaderSize, raw);
    if (!s.ok()) {
      keep = false;
      why = "entries unreadable (" + s.message() + ")";
    } else {
      for (uint64_t i = 0; i < m->count_; ++i) {
        uint64_t e = GetU64(&raw[i * 8]);
        if (e > epoch) {
          keep = false;
          why = "entry newer than the map's epoch";
          break;
        }
        m->entries_[i].store(e, std::memory_order_relaxed);
      }
    }
    // Rule 3: a new epoch per open, so nothing written from now on can be
    // mistaken for a change before a snapshot taken in an earlier run.
    m->epoch_.store(epoch + 1);
  }
  if (!keep) {
    UMBRA_RETURN_IF_ERROR(m->file_->Truncate(0));
    UMBRA_RETURN_IF_ERROR(m->file_->Truncate(kChangeHeaderSize + m->count_ * 8));
    for (uint64_t i = 0; i < m->count_; ++i) m->entries_[i].store(0, std::memory_order_relaxed);
    ParseUuid(NewUuid(), m->tracking_);
    m->epoch_.store(1);
  }
  m->tracking_text_ = FormatUuid(m->tracking_);
  if (!existed && expect_existing) why = "missing";
  if (reset_reason != nullptr) *reset_reason = (existed || expect_existing) && !keep ? why : "";
  UMBRA_RETURN_IF_ERROR(m->WriteHeader(kStateOpen));
  UMBRA_RETURN_IF_ERROR(m->file_->Sync());
  if (!existed) UMBRA_RETURN_IF_ERROR(env->SyncDir(dir));
  return m;
}

Status ChangeMap::WriteHeader(uint32_t state) {
  std::lock_guard l(header_mu_);
  std::array<std::byte, 128> h{};
  std::memcpy(h.data(), kMagic, 8);
  PutU32(&h[8], kVersion);
  PutU32(&h[12], region_);
  std::memcpy(&h[16], volume_uuid_.data(), 16);
  PutU64(&h[32], size_);
  std::memcpy(&h[40], tracking_.data(), 16);
  PutU64(&h[56], epoch_.load());
  std::memcpy(&h[64], boot_.data(), 16);
  PutU32(&h[80], state);
  PutU32(&h[kCrcOffset], Crc32(std::span<const std::byte>(h.data(), kCrcOffset)));
  return file_->WriteAt(0, h);
}

void ChangeMap::Mark(uint64_t off, uint64_t len) {
  if (len == 0 || off >= size_ || broken_.load(std::memory_order_relaxed)) return;
  const uint64_t e = epoch_.load(std::memory_order_relaxed);
  const uint64_t r0 = off / region_;
  const uint64_t r1 = std::min(count_ - 1, (off + len - 1) / region_);
  for (uint64_t r = r0; r <= r1; ++r) {
    // The entry is set in memory only after it is in the file: a writer that
    // finds it set may issue its change at once (rule 1). Racing writers may
    // both write the entry; they write the same value.
    if (entries_[r].load(std::memory_order_acquire) == e) continue;
    std::array<std::byte, 8> b;
    PutU64(b.data(), e);
    if (Status s = file_->WriteAt(kChangeHeaderSize + r * 8, b); !s.ok()) {
      Break(s.Annotate("recording a change"));
      return;
    }
    entries_[r].store(e, std::memory_order_release);
  }
}

void ChangeMap::Break(const Status& why) {
  {
    std::lock_guard l(header_mu_);
    if (broken_.load()) return;
    broken_reason_ = why.message();
    broken_.store(true);
  }
  // Cut the file short so that the next open resets the map (rule 4) even
  // if this process is killed: a map missing a change must never be trusted.
  // If even that fails, the map is left "open"; only a same-boot reopen after
  // a kill would then trust it (docs/format/shadow-storage.md section 6).
  if (file_->Truncate(kChangeHeaderSize).ok()) file_->Sync().IgnoreError();
}

uint64_t ChangeMap::CloseEpoch() {
  uint64_t e = epoch_.fetch_add(1);
  if (!broken_.load()) {
    if (Status s = WriteHeader(kStateOpen); !s.ok()) Break(s.Annotate("closing an epoch"));
  }
  return e;
}

std::string ChangeMap::tracking_id() const {
  return broken_.load() ? std::string() : tracking_text_;
}

Result<std::vector<Extent>> ChangeMap::ChangedSince(const std::string& tracking_id,
                                                    uint64_t epoch) const {
  if (broken_.load()) {
    std::lock_guard l(header_mu_);
    return Status::NotFound("change tracking stopped: " + broken_reason_);
  }
  if (tracking_id != tracking_text_)
    return Status::NotFound("change tracking " + tracking_id +
                            " is not current (the change map was reset to " + tracking_text_ +
                            ")");
  std::vector<Extent> out;
  for (uint64_t r = 0; r < count_; ++r) {
    if (entries_[r].load(std::memory_order_relaxed) <= epoch) continue;
    uint64_t off = r * region_;
    uint64_t len = std::min<uint64_t>(region_, size_ - off);
    if (!out.empty() && out.back().offset + out.back().length == off)
      out.back().length += len;
    else
      out.push_back({off, len});
  }
  return out;
}

Status ChangeMap::Close() {
  if (closed_) return Status::Ok();
  closed_ = true;
  if (broken_.load()) return Status::Ok();  // never mark a map missing changes clean
  UMBRA_RETURN_IF_ERROR(file_->Sync());
  UMBRA_RETURN_IF_ERROR(WriteHeader(kStateClosed));
  return file_->Sync();
}

}  // namespace umbra::engine
