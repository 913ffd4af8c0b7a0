// The snapshot engine: copy-on-write snapshots of a block store, with crash-
// safe shadow storage. Knows nothing of FUSE, NBD, sockets or the CLI; front
// ends call Volume's block operations, the daemon calls its admin operations.
//
// On-disk format and write ordering: docs/format/shadow-storage.md.
// Threading: every Volume method is thread-safe and may be called from many
// threads at once (front ends serve requests in parallel). Block operations
// never hold a lock across a sync except the per-chunk lock of a chunk being
// copied. Each Volume owns one shadow I/O thread (copies + group commit).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "umbra/io.h"
#include "umbra/status.h"

namespace umbra {

enum class ProtectionLevel : uint8_t {
  kVolume = 0,    // origin writes always succeed; snapshots are dropped instead
  kSnapshot = 1,  // origin writes fail (ENOSPC/EIO) rather than drop a snapshot
};

struct MaxSize {
  enum class Kind : uint8_t { kBytes = 0, kPercent = 1, kUnbounded = 2 };
  Kind kind = Kind::kUnbounded;
  uint64_t value = 0;  // bytes, or percent (1..100)
  static MaxSize Bytes(uint64_t b) { return {Kind::kBytes, b}; }
  static MaxSize Percent(uint64_t p) { return {Kind::kPercent, p}; }
  static MaxSize Unbounded() { return {}; }
  // "10G", "20%", "unbounded".
  static Result<MaxSize> Parse(std::string_view text);
  std::string ToString() const;
};

struct VolumeConfig {
  std::string origin_path;    // file or block device; used in place, never formatted
  std::string shadow_dir;     // shadow storage location (created if missing)
  std::string uuid;           // volume identity; Create() generates one if empty
  uint32_t chunk_size = 16 * 1024;  // measured choice: docs/benchmarks.md
  MaxSize max_size;
  ProtectionLevel protection = ProtectionLevel::kVolume;
  uint32_t copy_timeout_ms = 10'000;  // a copy slower than this invalidates snapshots
  bool direct_io = false;             // open the origin with O_DIRECT
  // The kernel's boot id (/proc/sys/kernel/random/boot_id). With it, change
  // tracking survives a killed process; without it, only a clean close.
  std::string boot_id;
};

enum class InvalidCause : uint8_t {
  kNone = 0,
  kStorageFull = 1,
  kStorageIOError = 2,
  kCopyTooSlow = 3,
  kStorageRemoved = 4,
};
std::string_view InvalidCauseName(InvalidCause c);

struct SnapshotInfo {
  std::string id;          // UUID text; unique across volumes
  uint64_t seq = 0;        // order within the volume
  std::string volume_uuid;
  std::string name;
  bool persistent = false;
  uint64_t created_unix_ns = 0;
  std::string set_id;      // snapshots taken together share a set id
  uint32_t set_size = 1;
  bool valid = true;
  InvalidCause cause = InvalidCause::kNone;
  std::string invalid_message;
  uint64_t exclusive_bytes = 0;  // storage freed if this snapshot alone were deleted
  // Change tracking position at the instant (set in the result of creating
  // the snapshot): ChangedSince(tracking_id, change_epoch) gives what changed
  // after it.
  std::string tracking_id;
  uint64_t change_epoch = 0;
};

struct SnapshotOptions {
  bool persistent = false;
  std::string name;
  // The set's id (a UUID string), chosen by the caller so that it can be
  // named before the set exists (writers are told it); "" = a new one.
  std::string set_id;
};

struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;
};

struct StorageUsage {
  uint64_t used_bytes = 0;       // slots in use * chunk size
  uint64_t allocated_bytes = 0;  // what the shadow files occupy on disk
  uint64_t max_bytes = 0;        // UINT64_MAX when unbounded
  MaxSize max_size;
  uint64_t copies = 0;           // chunks copied since open
  uint64_t zero_copies = 0;      // copies skipped because the chunk was free
  // True when shadow storage is on the origin's filesystem and writers copy
  // old chunks themselves; false when copier threads do it and a writer
  // waits for them at most copy_timeout_ms.
  bool copies_inline = false;
};

class Volume {
 public:
  virtual ~Volume() = default;

  // Creates shadow storage for a new volume and opens it. Fails with
  // kAlreadyExists if the directory already holds shadow storage, and with
  // kInvalidArgument if the directory is on the volume itself or the config
  // does not fit (chunk size not a power of two, volume smaller than a chunk).
  static Result<std::unique_ptr<Volume>> Create(Env* env, VolumeConfig config);
  // Opens existing shadow storage, recovering from any crash. config.uuid must
  // be set. A corrupt, truncated or foreign store gives a clear error and is
  // not modified. Auto-release snapshots from before are gone.
  static Result<std::unique_ptr<Volume>> Open(Env* env, VolumeConfig config);

  virtual const VolumeConfig& config() const = 0;
  virtual uint64_t size() const = 0;

  // Block operations on the live volume. Offsets/lengths are bytes; any
  // alignment is accepted. With protection level kVolume, Write/Discard/
  // WriteZeroes fail only if the origin itself fails.
  virtual Status Read(uint64_t off, std::span<std::byte> buf) = 0;
  virtual Status Write(uint64_t off, std::span<const std::byte> buf, bool fua = false) = 0;
  virtual Status Discard(uint64_t off, uint64_t len) = 0;
  virtual Status WriteZeroes(uint64_t off, uint64_t len) = 0;
  virtual Status Flush() = 0;
  // Write, finished later: `done` is called exactly once with what Write
  // would have returned, either before WriteAsync returns or from the
  // volume's I/O thread (so it must not block, and must not call back into
  // this Volume). `buf` need only stay valid until WriteAsync returns. Only a
  // write that must copy old chunks, with shadow storage on the origin's
  // filesystem, is finished on the I/O thread; the default does Write.
  using WriteDone = std::function<void(Status)>;
  virtual void WriteAsync(uint64_t off, std::span<const std::byte> buf, bool fua,
                          WriteDone done) {
    done(Write(off, buf, fua));
  }

  // Snapshots.
  virtual Result<SnapshotInfo> CreateSnapshot(const SnapshotOptions& opts) = 0;
  virtual Status DeleteSnapshot(const std::string& id) = 0;
  virtual std::vector<SnapshotInfo> ListSnapshots() = 0;
  virtual Result<SnapshotInfo> GetSnapshot(const std::string& id) = 0;
  // Reads the snapshot as it was at its instant. kSnapshotInvalid (message
  // names the cause) if it was invalidated, kNotFound if unknown.
  virtual Status ReadSnapshot(const std::string& id, uint64_t off, std::span<std::byte> buf) = 0;
  // Allocated (not free at the instant) ranges of the snapshot, chunk
  // granular, merged, in order.
  virtual Result<std::vector<Extent>> SnapshotExtents(const std::string& id) = 0;
  // Allocated (not free: written since the last discard) ranges of the live
  // volume within [off, off+len), chunk granular, clipped to the range,
  // merged, in order. A moment's view: concurrent writes may change it.
  virtual Result<std::vector<Extent>> LiveExtents(uint64_t off, uint64_t len) = 0;

  // Shadow storage.
  virtual StorageUsage GetStorageUsage() = 0;
  virtual Status SetMaxSize(MaxSize max) = 0;
  virtual Status SetProtection(ProtectionLevel level) = 0;
  // The bound on a writer's wait for its copies (VolumeConfig::
  // copy_timeout_ms); journaled like the other settings. Open() restores the
  // journaled value, so a service applies its configured one after opening.
  virtual Status SetCopyTimeout(uint32_t ms) = 0;

  // Change tracking (docs/format/shadow-storage.md section 6): byte ranges
  // written, discarded or zeroed after the snapshot that reported
  // (tracking_id, epoch), region granular, merged, in order; a superset is
  // possible, a miss is not. kNotFound if the tracking was reset since.
  virtual Result<std::vector<Extent>> ChangedSince(const std::string& tracking_id,
                                                   uint64_t epoch) = 0;
  // Why the change map was reset when the volume was opened, "" if it was not.
  virtual std::string ChangeMapResetReason() = 0;

  // Flushes and writes a checkpoint; deletes auto-release snapshots. The
  // destructor calls it if it was not called.
  virtual Status Close() = 0;
};

// Takes one snapshot of each volume at the same instant: writes to all of them
// are held off together while the snapshots are taken. Either every snapshot is
// created or none is. Returns them in the order of `volumes`.
Result<std::vector<SnapshotInfo>> CreateSnapshotSet(std::span<Volume* const> volumes,
                                                    const SnapshotOptions& opts);

// After a crash, a persistent set may have reached only some volumes' storage.
// Deletes every snapshot whose set has fewer members among `volumes` than its
// set size. Call once with all volumes after opening them. Returns how many
// snapshots were deleted.
Result<uint32_t> ReconcileSnapshotSets(std::span<Volume* const> volumes);

}  // namespace umbra
