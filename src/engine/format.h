// Byte layout of shadow storage files: docs/format/shadow-storage.md.
// Encoding and decoding of headers and records; no I/O here.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/endian.h"
#include "umbra/status.h"

namespace umbra::engine {

inline constexpr char kCheckpointMagic[8] = {'U', 'M', 'B', 'R', 'A', 'C', 'K', 'P'};
inline constexpr char kJournalMagic[8] = {'U', 'M', 'B', 'R', 'A', 'J', 'N', 'L'};
inline constexpr uint32_t kFormatVersion = 1;
inline constexpr size_t kCheckpointHeaderSize = 128;
inline constexpr size_t kJournalHeaderSize = 64;
inline constexpr size_t kRecordHeaderSize = 20;
inline constexpr uint32_t kMaxRecordPayload = 1u << 20;
inline constexpr uint64_t kZeroSlot = UINT64_MAX;

inline constexpr const char* kCheckpointName = "umbra-shadow.ckpt";
inline constexpr const char* kCheckpointTmpName = "umbra-shadow.ckpt.tmp";
inline constexpr const char* kCheckpointFailedName = "umbra-shadow.ckpt.failed";
inline constexpr const char* kDataName = "umbra-shadow.data";
inline constexpr const char* kJournalPrefix = "umbra-shadow.jnl.";
std::string JournalName(uint64_t gen);

using Uuid = std::array<uint8_t, 16>;

enum class RecordType : uint16_t {
  kConfig = 1,
  kSnapCreate = 2,
  kSnapDelete = 3,
  kSnapInvalidate = 4,
  kException = 5,
  kFree = 6,
  kAlloc = 7,
  kNextSeq = 8,
  kNewestFree = 9,
};
std::string_view RecordTypeName(RecordType t);

// Decoded record payloads. One struct holds every field; which ones are
// meaningful depends on `type` (see the table in the format doc).
struct Record {
  RecordType type = RecordType::kConfig;
  uint64_t lsn = 0;
  // kConfig
  uint8_t max_kind = 2;
  uint64_t max_value = 0;
  uint8_t protection = 0;
  uint32_t copy_timeout_ms = 0;
  // kSnapCreate / kSnapDelete / kSnapInvalidate / kNextSeq
  uint64_t seq = 0;
  Uuid snap_uuid{};
  uint32_t flags = 0;  // bit 0: persistent
  uint64_t created_unix_ns = 0;
  Uuid set_uuid{};
  uint32_t set_size = 1;
  std::string name;  // snapshot name, or invalidation message
  uint8_t cause = 0;
  // kException
  uint64_t chunk = 0;
  uint64_t key = 0;
  uint64_t slot = 0;
  // kFree / kAlloc / kNewestFree: chunk = first, count
  uint64_t count = 0;
};

// Appends the encoded record (header + payload) to `out`.
void EncodeRecord(const Record& r, std::vector<std::byte>& out);

// Decodes one record from the front of `in`. Returns the number of bytes it
// used, or 0 if `in` does not start with a whole, valid record (short, bad
// CRC, absurd length, unknown type or malformed payload).
size_t DecodeRecord(std::span<const std::byte> in, Record& out);

struct CheckpointHeader {
  Uuid volume_uuid{};
  uint64_t volume_size = 0;
  uint32_t chunk_size = 0;
  uint64_t journal_gen = 0;
  uint64_t next_lsn = 0;
  uint64_t body_length = 0;
  uint32_t body_crc = 0;
};
std::array<std::byte, kCheckpointHeaderSize> EncodeCheckpointHeader(const CheckpointHeader& h);
Status DecodeCheckpointHeader(std::span<const std::byte> in, CheckpointHeader& h);

struct JournalHeader {
  Uuid volume_uuid{};
  uint64_t generation = 0;
  uint64_t first_lsn = 0;
};
std::array<std::byte, kJournalHeaderSize> EncodeJournalHeader(const JournalHeader& h);
Status DecodeJournalHeader(std::span<const std::byte> in, JournalHeader& h);

}  // namespace umbra::engine
