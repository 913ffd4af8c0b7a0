// Imaging: turning a source of volume bytes into an image in a repository,
// and images back into bytes. The requester side of docs/format/repository.md.
//
// A Source is where bytes come from: a snapshot exported by umbrad over NBD
// (the normal, live path) or a device or file read directly (--offline).
// Work is split per chunk across worker threads, each with its own reader:
// read (only allocated ranges), hash, look up, compress and store.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "umbra/block_device.h"
#include "umbra/repo.h"
#include "umbra/status.h"

namespace umbra::imaging {

struct Range {
  uint64_t offset = 0;
  uint64_t length = 0;
};

// One worker's reader. Not thread-safe; each worker makes its own.
class Reader {
 public:
  virtual ~Reader() = default;
  virtual Status Read(uint64_t off, std::span<std::byte> buf) = 0;
};

class Source {
 public:
  virtual ~Source() = default;
  virtual uint64_t size() const = 0;
  // Ranges that may hold data, merged and in order; the rest reads as zeros.
  virtual Result<std::vector<Range>> Allocated() = 0;
  virtual Result<std::unique_ptr<Reader>> NewReader() = 0;
  // After Allocated(): how the allocation was found, for the summary ("" if
  // nothing worth saying).
  virtual std::string allocation_note() const { return ""; }
};

// An NBD export (docs/protocol/nbd.md) on a Unix socket, read with libnbd.
// Allocation comes from base:allocation (holes are skipped).
Result<std::unique_ptr<Source>> OpenNbdSource(const std::string& socket,
                                              const std::string& export_name);
// A block device or file, read with pread. Allocation: the block bitmap of
// a cleanly unmounted ext2/3/4 filesystem (libext2fs); otherwise
// SEEK_DATA/SEEK_HOLE for files and everything for devices.
Result<std::unique_ptr<Source>> OpenFileSource(const std::string& path);

// "ext4", "xfs", "btrfs", "vfat", "swap" or "" from a volume's first bytes
// (at least 128 KiB for all of them).
std::string DetectFilesystem(std::span<const std::byte> head);

// Called now and then from worker threads with bytes done and total.
using Progress = std::function<void(uint64_t done, uint64_t total)>;

// Progress of an image create that can be resumed (docs/format/repository.md
// section 2.5): for each chunk, done or not, and its id if done.
struct Partial {
  std::vector<repo::ChunkId> chunks;
  std::vector<bool> done;
};

// A resume record (docs/format/repository.md section 2.5).
struct ResumeRecord {
  std::string volume_uuid;
  uint64_t size = 0;
  uint32_t chunk_size = 0;
  std::string tracking_id;
  uint64_t tracking_epoch = 0;
  Partial partial;
};
// Version 2 (binary); DecodeResume also reads version 1 (JSON). Corruption
// for a damaged record, kUnsupported for a newer version.
std::string EncodeResume(const ResumeRecord& r);
Result<ResumeRecord> DecodeResume(const std::string& data);

struct CreateOptions {
  // Incremental: chunks outside `changed` are taken from `base` without
  // reading them (`base` must be a manifest of this repository, read under
  // the shared lock, so its chunks are there).
  const repo::Manifest* base = nullptr;
  std::vector<Range> changed;
  // Resume: chunks done in `resume` and outside `resume_changed` are taken
  // from it without reading (they are durable in the repository).
  const Partial* resume = nullptr;
  std::vector<Range> resume_changed;
  // Called every `checkpoint_seconds` from a helper thread (and not after
  // BuildImage returns) with the chunks done so far.
  std::function<void(const Partial&)> checkpoint;
  double checkpoint_seconds = 5;
  int threads = 0;  // 0: two per CPU, at least 4
  Progress progress;
};

// Fills m->chunks and m->stats (everything else is the caller's). Does not
// write the manifest.
Status BuildImage(repo::Repository& repo, Source& src, const CreateOptions& opts,
                  repo::Manifest* m);

struct RestoreOptions {
  bool delta = false;  // read the target; write only chunks that differ
  int threads = 0;
  Progress progress;
};

struct RestoreStats {
  uint64_t chunks = 0;
  uint64_t written_chunks = 0;  // chunks written to the target
  uint64_t same_chunks = 0;     // delta: already equal, not written
  uint64_t zero_chunks = 0;     // all zero in the image
  uint64_t written_bytes = 0;
  uint64_t read_bytes = 0;      // delta: bytes read from the target
  double seconds = 0;
};

// Restores onto `target`: a block device or a file (created if missing).
// Refuses a target smaller than the image, or a mounted device, before
// writing anything.
Result<RestoreStats> Restore(repo::Repository& repo, const repo::Manifest& m,
                             const std::string& target, const RestoreOptions& opts);

struct Damage {
  std::string what;                 // "chunk <id>" or "image <id>"
  std::string error;
  std::vector<std::string> images;  // images that need it
};

struct VerifyReport {
  uint64_t images = 0;
  uint64_t chunks = 0;  // distinct chunks checked
  uint64_t bytes = 0;   // plain bytes checked
  std::vector<Damage> damage;
  double seconds = 0;
};

// Re-reads and re-hashes every chunk referenced by `images` (all if empty).
Result<VerifyReport> Verify(repo::Repository& repo, const std::vector<std::string>& images,
                            int threads, Progress progress);

struct GcReport {
  uint64_t chunks_kept = 0;
  uint64_t chunks_removed = 0;
  uint64_t temporary_removed = 0;
};

// Removes chunks no image references. Takes the exclusive repository lock
// (waits for running commands). Refuses if any manifest cannot be read.
Result<GcReport> CollectGarbage(repo::Repository& repo);

struct PrunePolicy {
  int keep_last = 0;
  int keep_daily = 0;
  int keep_weekly = 0;
  int keep_monthly = 0;
};

// Ids to delete so that, per volume, what the policy keeps remains: the
// newest keep_last images, and the newest image of each of the newest
// keep_daily days (weeks, months) that have images. Local time.
std::vector<std::string> PruneSelect(const std::vector<repo::Manifest>& images,
                                     const PrunePolicy& policy);

// An image as a read-only block device (reads decode chunks on demand, with
// a small cache); writes fail with EROFS. Keeps `repo` alive.
std::unique_ptr<BlockDevice> ImageDevice(std::shared_ptr<repo::Repository> repo,
                                         repo::Manifest m);
// The image's non-zero chunks as merged ranges (NBD base:allocation).
std::vector<Range> ImageAllocated(const repo::Manifest& m);

}  // namespace umbra::imaging
