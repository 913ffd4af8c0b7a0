// Encoding/decoding of shadow storage headers and records.
// Layout: docs/format/shadow-storage.md, section 2.
#include "engine/format.h"

#include <cstdio>

#include "base/checksum.h"

namespace umbra::engine {
namespace {

class Writer {
 public:
  explicit Writer(std::vector<std::byte>& out) : out_(out) {}
  void U8(uint8_t v) { out_.push_back(std::byte(v)); }
  void U16(uint16_t v) { Grow(2, [&](std::byte* p) { PutU16(p, v); }); }
  void U32(uint32_t v) { Grow(4, [&](std::byte* p) { PutU32(p, v); }); }
  void U64(uint64_t v) { Grow(8, [&](std::byte* p) { PutU64(p, v); }); }
  void Bytes(const void* data, size_t n) {
    const auto* b = static_cast<const std::byte*>(data);
    out_.insert(out_.end(), b, b + n);
  }
  void Str(const std::string& s) {
    U16(static_cast<uint16_t>(s.size()));
    Bytes(s.data(), s.size());
  }

 private:
  template <typename F>
  void Grow(size_t n, F f) {
    size_t at = out_.size();
    out_.resize(at + n);
    f(out_.data() + at);
  }
  std::vector<std::byte>& out_;
};

class Reader {
 public:
  explicit Reader(std::span<const std::byte> in) : in_(in) {}
  bool U8(uint8_t& v) {
    if (!Need(1)) return false;
    v = std::to_integer<uint8_t>(in_[pos_++]);
    return true;
  }
  bool U16(uint16_t& v) { return Fixed(2, [&](const std::byte* p) { v = GetU16(p); }); }
  bool U32(uint32_t& v) { return Fixed(4, [&](const std::byte* p) { v = GetU32(p); }); }
  bool U64(uint64_t& v) { return Fixed(8, [&](const std::byte* p) { v = GetU64(p); }); }
  bool Bytes(void* out, size_t n) {
    return Fixed(n, [&](const std::byte* p) { std::memcpy(out, p, n); });
  }
  bool Str(std::string& s) {
    uint16_t n = 0;
    if (!U16(n) || !Need(n)) return false;
    s.assign(reinterpret_cast<const char*>(in_.data() + pos_), n);
    pos_ += n;
    return true;
  }
  bool AtEnd() const { return pos_ == in_.size(); }

 private:
  bool Need(size_t n) const { return in_.size() - pos_ >= n; }
  template <typename F>
  bool Fixed(size_t n, F f) {
    if (!Need(n)) return false;
    f(in_.data() + pos_);
    pos_ += n;
    return true;
  }
  std::span<const std::byte> in_;
  size_t pos_ = 0;
};

void EncodePayload(const Record& r, Writer& w) {
  switch (r.type) {
    case RecordType::kConfig:
      w.U8(r.max_kind);
      w.U64(r.max_value);
      w.U8(r.protection);
      w.U32(r.copy_timeout_ms);
      break;
    case RecordType::kSnapCreate:
      w.U64(r.seq);
      w.Bytes(r.snap_uuid.data(), 16);
      w.U32(r.flags);
      w.U64(r.created_unix_ns);
      w.Bytes(r.set_uuid.data(), 16);
      w.U32(r.set_size);
      w.Str(r.name);
      break;
    case RecordType::kSnapDelete:
    case RecordType::kNextSeq:
      w.U64(r.seq);
      break;
    case RecordType::kSnapInvalidate:
      w.U64(r.seq);
      w.U8(r.cause);
      w.Str(r.name);
      break;
    case RecordType::kException:
      w.U64(r.chunk);
      w.U64(r.key);
      w.U64(r.slot);
      break;
    case RecordType::kFree:
    case RecordType::kAlloc:
    case RecordType::kNewestFree:
      w.U64(r.chunk);
      w.U64(r.count);
      break;
  }
}

bool DecodePayload(std::span<const std::byte> in, Record& r) {
  Reader rd(in);
  bool ok = false;
  switch (r.type) {
    case RecordType::kConfig:
      ok = rd.U8(r.max_kind) && rd.U64(r.max_value) && rd.U8(r.protection) &&
           rd.U32(r.copy_timeout_ms) && r.max_kind <= 2 && r.protection <= 1;
      break;
    case RecordType::kSnapCreate:
      ok = rd.U64(r.seq) && rd.Bytes(r.snap_uuid.data(), 16) && rd.U32(r.flags) &&
           rd.U64(r.created_unix_ns) && rd.Bytes(r.set_uuid.data(), 16) && rd.U32(r.set_size) &&
           rd.Str(r.name) && r.seq != 0 && r.set_size != 0;
      break;
    case RecordType::kSnapDelete:
    case RecordType::kNextSeq:
      ok = rd.U64(r.seq);
      break;
    case RecordType::kSnapInvalidate:
      ok = rd.U64(r.seq) && rd.U8(r.cause) && rd.Str(r.name) && r.cause >= 1 && r.cause <= 4;
      break;
    case RecordType::kException:
      ok = rd.U64(r.chunk) && rd.U64(r.key) && rd.U64(r.slot) && r.key != 0;
      break;
    case RecordType::kFree:
    case RecordType::kAlloc:
    case RecordType::kNewestFree:
      ok = rd.U64(r.chunk) && rd.U64(r.count) && r.count != 0;
      break;
    default:
      return false;
  }
  return ok && rd.AtEnd();
}

static_assert(kCheckpointHeaderSize == 128 && kJournalHeaderSize == 64 && kRecordHeaderSize == 20,
              "header sizes are fixed by docs/format/shadow-storage.md");
static_assert(sizeof(Uuid) == 16);

void PutUuid(std::byte* p, const Uuid& u) { std::memcpy(p, u.data(), 16); }
void GetUuid(const std::byte* p, Uuid& u) { std::memcpy(u.data(), p, 16); }

}  // namespace

std::string JournalName(uint64_t gen) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s%016llx", kJournalPrefix, static_cast<unsigned long long>(gen));
  return buf;
}

std::string_view RecordTypeName(RecordType t) {
  switch (t) {
    case RecordType::kConfig: return "CONFIG";
    case RecordType::kSnapCreate: return "SNAP_CREATE";
    case RecordType::kSnapDelete: return "SNAP_DELETE";
    case RecordType::kSnapInvalidate: return "SNAP_INVALIDATE";
    case RecordType::kException: return "EXCEPTION";
    case RecordType::kFree: return "FREE";
    case RecordType::kAlloc: return "ALLOC";
    case RecordType::kNextSeq: return "NEXT_SEQ";
    case RecordType::kNewestFree: return "NEWEST_FREE";
  }
  return "UNKNOWN";
}

void EncodeRecord(const Record& r, std::vector<std::byte>& out) {
  size_t start = out.size();
  out.resize(start + kRecordHeaderSize);
  Writer w(out);
  EncodePayload(r, w);
  size_t payload = out.size() - start - kRecordHeaderSize;
  std::byte* h = out.data() + start;
  PutU32(h, static_cast<uint32_t>(payload));
  PutU16(h + 4, static_cast<uint16_t>(r.type));
  PutU16(h + 6, 0);
  PutU64(h + 8, r.lsn);
  uint32_t crc = Crc32(std::span<const std::byte>(h, 16));
  crc = Crc32(std::span<const std::byte>(h + kRecordHeaderSize, payload), crc);
  PutU32(h + 16, crc);
}

size_t DecodeRecord(std::span<const std::byte> in, Record& out) {
  if (in.size() < kRecordHeaderSize) return 0;
  const std::byte* h = in.data();
  uint32_t len = GetU32(h);
  if (len > kMaxRecordPayload || in.size() - kRecordHeaderSize < len) return 0;
  if (GetU16(h + 6) != 0) return 0;
  uint32_t crc = Crc32(std::span<const std::byte>(h, 16));
  crc = Crc32(in.subspan(kRecordHeaderSize, len), crc);
  if (crc != GetU32(h + 16)) return 0;
  out = Record{};
  out.type = static_cast<RecordType>(GetU16(h + 4));
  out.lsn = GetU64(h + 8);
  if (!DecodePayload(in.subspan(kRecordHeaderSize, len), out)) return 0;
  return kRecordHeaderSize + len;
}

std::array<std::byte, kCheckpointHeaderSize> EncodeCheckpointHeader(const CheckpointHeader& h) {
  std::array<std::byte, kCheckpointHeaderSize> b{};
  std::memcpy(b.data(), kCheckpointMagic, 8);
  PutU32(&b[8], kFormatVersion);
  PutU32(&b[12], kCheckpointHeaderSize);
  PutUuid(&b[16], h.volume_uuid);
  PutU64(&b[32], h.volume_size);
  PutU32(&b[40], h.chunk_size);
  PutU64(&b[48], h.journal_gen);
  PutU64(&b[56], h.next_lsn);
  PutU64(&b[64], h.body_length);
  PutU32(&b[72], h.body_crc);
  PutU32(&b[124], Crc32(std::span<const std::byte>(b.data(), 124)));
  return b;
}

Status DecodeCheckpointHeader(std::span<const std::byte> b, CheckpointHeader& h) {
  if (b.size() < kCheckpointHeaderSize)
    return Status::Corruption("checkpoint is truncated (shorter than its header)");
  if (std::memcmp(b.data(), kCheckpointMagic, 8) != 0)
    return Status::Corruption("not an Umbra shadow storage checkpoint (bad magic)");
  if (GetU32(&b[124]) != Crc32(b.subspan(0, 124)))
    return Status::Corruption("checkpoint header checksum mismatch");
  if (GetU32(&b[8]) != kFormatVersion)
    return Status::Corruption("unsupported shadow storage format version " +
                              std::to_string(GetU32(&b[8])));
  if (GetU32(&b[12]) != kCheckpointHeaderSize)
    return Status::Corruption("checkpoint header has an unexpected size");
  GetUuid(&b[16], h.volume_uuid);
  h.volume_size = GetU64(&b[32]);
  h.chunk_size = GetU32(&b[40]);
  h.journal_gen = GetU64(&b[48]);
  h.next_lsn = GetU64(&b[56]);
  h.body_length = GetU64(&b[64]);
  h.body_crc = GetU32(&b[72]);
  return Status::Ok();
}

std::array<std::byte, kJournalHeaderSize> EncodeJournalHeader(const JournalHeader& h) {
  std::array<std::byte, kJournalHeaderSize> b{};
  std::memcpy(b.data(), kJournalMagic, 8);
  PutU32(&b[8], kFormatVersion);
  PutU32(&b[12], kJournalHeaderSize);
  PutUuid(&b[16], h.volume_uuid);
  PutU64(&b[32], h.generation);
  PutU64(&b[40], h.first_lsn);
  PutU32(&b[60], Crc32(std::span<const std::byte>(b.data(), 60)));
  return b;
}

Status DecodeJournalHeader(std::span<const std::byte> b, JournalHeader& h) {
  if (b.size() < kJournalHeaderSize) return Status::Corruption("journal is truncated");
  if (std::memcmp(b.data(), kJournalMagic, 8) != 0)
    return Status::Corruption("not an Umbra journal (bad magic)");
  if (GetU32(&b[60]) != Crc32(b.subspan(0, 60)))
    return Status::Corruption("journal header checksum mismatch");
  if (GetU32(&b[8]) != kFormatVersion || GetU32(&b[12]) != kJournalHeaderSize)
    return Status::Corruption("unsupported journal version");
  GetUuid(&b[16], h.volume_uuid);
  h.generation = GetU64(&b[32]);
  h.first_lsn = GetU64(&b[40]);
  return Status::Ok();
}

}  // namespace umbra::engine
