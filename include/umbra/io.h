// The I/O interface: every disk, directory and clock access Umbra makes goes
// through an Env, so tests can swap the real one for an in-memory one or for a
// fault-injecting one that simulates power loss and errors.
//
// Implementations (src/io/):
//   PosixEnv  - the real thing (pread/pwrite/fdatasync/fallocate/rename).
//   MemEnv    - files in memory; tracks what was made durable so Crash() can
//               drop (all, or a random subset of) writes not yet synced.
//   FaultEnv  - wraps another Env; fails the Nth operation, returns ENOSPC or
//               EIO for chosen files, delays operations.
//
// Durability contract (the one the engine's write ordering relies on):
//   * File::WriteAt / PunchHole / Truncate become durable only after a later
//     File::Sync() on the same file returns OK.
//   * Creating, renaming or removing a directory entry becomes durable only
//     after Env::SyncDir() on the parent directory returns OK.
//   * Until then, after a crash, any subset of the unsynced operations may
//     have reached the disk (MemEnv models this exactly).
// Thread safety: an Env and its Files may be used from many threads at once;
// concurrent writes to overlapping ranges of one file have no defined order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "umbra/status.h"

namespace umbra {

class File {
 public:
  virtual ~File() = default;
  // Reads exactly buf.size() bytes at off. Bytes past end of file read as
  // zeros (a file is a sparse array of bytes). Never a short read.
  virtual Status ReadAt(uint64_t off, std::span<std::byte> buf) = 0;
  // Writes all of buf at off, extending the file if needed.
  virtual Status WriteAt(uint64_t off, std::span<const std::byte> buf) = 0;
  // Makes every earlier WriteAt/PunchHole/Truncate of this file durable
  // (fdatasync, or fsync when the size changed).
  virtual Status Sync() = 0;
  // Deallocates [off, off+len): afterwards the range reads as zeros and
  // stops counting toward AllocatedBytes(). File size is unchanged.
  virtual Status PunchHole(uint64_t off, uint64_t len) = 0;
  virtual Status Truncate(uint64_t size) = 0;
  virtual Result<uint64_t> Size() = 0;
  // Bytes of storage the file occupies (st_blocks * 512 for POSIX).
  virtual Result<uint64_t> AllocatedBytes() = 0;
  // The path the file was opened with.
  virtual const std::string& path() const = 0;
  // The POSIX descriptor behind the file, or -1 (in-memory files).
  virtual int fd() const { return -1; }
};

enum class OpenMode : uint8_t {
  kReadOnly,      // must exist
  kReadWrite,     // must exist
  kCreate,        // read-write; created if missing
  kCreateNew,     // read-write; fails with kAlreadyExists if present
};

struct FsStats {
  uint64_t total_bytes = 0;   // size of the filesystem holding the path
  uint64_t free_bytes = 0;    // available to unprivileged users
};

class Env {
 public:
  virtual ~Env() = default;
  // Opening a block device is allowed; for POSIX, `direct` asks for O_DIRECT
  // (callers then pass 4096-aligned buffers, offsets and lengths).
  virtual Result<std::unique_ptr<File>> Open(const std::string& path, OpenMode mode,
                                             bool direct = false) = 0;
  virtual Result<bool> Exists(const std::string& path) = 0;
  virtual Status CreateDir(const std::string& path) = 0;   // OK if it exists already
  virtual Status Remove(const std::string& path) = 0;      // file or empty directory
  virtual Status Rename(const std::string& from, const std::string& to) = 0;  // atomic replace
  virtual Status SyncDir(const std::string& dir) = 0;
  virtual Result<std::vector<std::string>> ListDir(const std::string& dir) = 0;  // names only
  virtual Result<FsStats> StatFs(const std::string& path) = 0;
  // True if directory `dir` lives on the block device or file `volume_path`
  // (directly, on a partition of it, or on a loop device backed by it).
  virtual Result<bool> IsOnVolume(const std::string& dir, const std::string& volume_path) = 0;
  // True if the existing paths `a` and `b` are on one filesystem, so that
  // whatever stalls I/O to one stalls I/O to the other as well.
  virtual Result<bool> SameFilesystem(const std::string& a, const std::string& b) = 0;
  // Monotonic clock.
  virtual uint64_t NowNanos() = 0;
  // Sleep helper (FaultEnv uses it for injected delays).
  virtual void SleepNanos(uint64_t ns) = 0;
};

// The process-wide real Env. Never null; not owned by the caller.
Env* DefaultEnv();

}  // namespace umbra
