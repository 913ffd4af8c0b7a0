// MemEnv: an Env whose files live in memory and which can simulate power loss.
//
// Model. Every file is an inode with
//   * current contents (what reads see), kept as a sparse map of 4 KiB pages,
//   * durable contents (what would survive a power cut), and
//   * the list of operations (WriteAt with its data, PunchHole, Truncate)
//     done since the inode's last successful File::Sync.
// The namespace (path -> inode) likewise has a current and a durable version,
// and every directory keeps the list of namespace operations (create, rename,
// remove) done in it since its last Env::SyncDir. File::Sync replays the
// inode's pending operations onto its durable contents; SyncDir replays the
// directory's pending namespace operations onto the durable namespace.
//
// Crash(mode, seed) then rebuilds the world from durable state plus some of
// the pending operations (see CrashMode), makes the result durable, and kills
// every File opened before it.
//
// Simplifications (documented so tests do not rely on more):
//   * Directories: CreateDir creates missing ancestors too (like mkdir -p) and
//     is immediately durable; removing an (empty) directory is immediately
//     durable; directories cannot be renamed (kUnsupported). The root ("" or
//     "/") always exists. Opening a file requires its parent directory to
//     exist (else kNotFound).
//   * A rename within one directory is one atomic pending operation of that
//     directory. A rename between directories is modelled as "link at `to`"
//     pending in to's directory plus "unlink `from`" pending in from's
//     directory, so a crash may leave both names or neither.
//   * Handles opened with direct=true enforce O_DIRECT's rule that offsets,
//     lengths and buffer addresses be multiples of 512 (else kInvalidArgument
//     with EINVAL), so code that would fail on a real disk fails here too.
//   * StatFs returns the values given to SetFsStats for any path; until then
//     total is 1 TiB and free is total minus all files' allocated bytes.
//
// Thread-safety: all methods of MemEnv and of its Files may be called
// concurrently; one mutex serialises them. Files must not outlive their
// MemEnv.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "umbra/io.h"

namespace umbra {

class MemEnv final : public Env {
 public:
  enum class CrashMode {
    // Everything not yet made durable is lost.
    kDropUnsynced,
    // Each pending file operation independently survives with p = 0.5
    // (survivors applied in their original order on top of the durable
    // contents); for each directory a random prefix (possibly empty or all)
    // of its pending namespace operations survives.
    kKeepRandomSubset,
    // Like kKeepRandomSubset, but each 512-byte sector (aligned to file
    // offsets) of each pending write survives independently, so a write may
    // be torn. Punches and truncates survive whole with p = 0.5.
    kTornSectors,
  };

  static constexpr uint64_t kPageSize = 4096;
  static constexpr uint64_t kSectorSize = 512;
  static constexpr uint64_t kInitialClockNanos = 1'000'000'000;

  MemEnv();
  ~MemEnv() override;
  MemEnv(const MemEnv&) = delete;
  MemEnv& operator=(const MemEnv&) = delete;

  // --- Env ---
  Result<std::unique_ptr<File>> Open(const std::string& path, OpenMode mode,
                                     bool direct = false) override;
  Result<bool> Exists(const std::string& path) override;
  Status CreateDir(const std::string& path) override;
  Status Remove(const std::string& path) override;
  Status Rename(const std::string& from, const std::string& to) override;
  Status SyncDir(const std::string& dir) override;
  Result<std::vector<std::string>> ListDir(const std::string& dir) override;  // sorted
  Result<FsStats> StatFs(const std::string& path) override;
  // True iff `dir` is, or is below, a directory registered with
  // SetVolumeDir(dir, volume_path) for this exact volume_path.
  Result<bool> IsOnVolume(const std::string& dir, const std::string& volume_path) override;
  // One filesystem holds everything except the trees registered with
  // SetSeparateFilesystem, each of which is a filesystem of its own.
  Result<bool> SameFilesystem(const std::string& a, const std::string& b) override;
  // A manual clock: starts at kInitialClockNanos and only moves through
  // AdvanceClock() and SleepNanos() (which advances it instead of sleeping).
  uint64_t NowNanos() override;
  void SleepNanos(uint64_t ns) override;

  // --- Simulation controls ---
  // Simulates power loss and reboot as described in CrashMode; the same seed
  // and the same history give the same outcome. Afterwards every File opened
  // earlier fails each call with kIOError "file handle from before crash",
  // and the surviving state is entirely durable.
  void Crash(CrashMode mode, uint64_t seed);
  // Successful File::Sync plus SyncDir calls so far.
  uint64_t sync_count() const;
  void SetFsStats(FsStats stats);
  void SetVolumeDir(const std::string& dir, const std::string& volume_path);
  // `dir` and everything below it become a filesystem of their own.
  void SetSeparateFilesystem(const std::string& dir);
  // The current contents of a file (all of it; beware huge sparse files).
  Result<std::vector<std::byte>> ReadWholeFile(const std::string& path);
  void AdvanceClock(uint64_t ns);

 private:
  class MemFile;
  struct Inode;
  struct NsOp;

  bool DirExistsLocked(const std::string& dir) const;
  Status CheckFileParentLocked(const std::string& path) const;
  void AddNsOpLocked(const std::string& dir, NsOp op);
  Status CheckAlive(uint64_t generation) const;  // requires mu_

  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<Inode>> files_;          // current namespace
  std::map<std::string, std::shared_ptr<Inode>> durable_files_;  // durable namespace
  std::set<std::string> dirs_;                                   // always durable
  std::map<std::string, std::vector<NsOp>> pending_ns_;          // per directory
  std::optional<FsStats> fs_stats_;
  std::set<std::pair<std::string, std::string>> volume_dirs_;
  std::set<std::string> separate_fs_;
  uint64_t generation_ = 0;  // bumped by Crash; Files from older ones are dead
  std::atomic<uint64_t> sync_count_{0};
  std::atomic<uint64_t> clock_{kInitialClockNanos};
};

// So callers may write either MemEnv::CrashMode::kX or CrashMode::kX.
using CrashMode = MemEnv::CrashMode;

}  // namespace umbra
