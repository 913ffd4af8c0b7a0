// PosixEnv: the real Env, on Linux system calls.
//
// Files use pread/pwrite loops (retrying EINTR and short transfers),
// fdatasync, fallocate(PUNCH_HOLE) and fstat / BLKGETSIZE64. See io.h for the
// contract every Env follows. DefaultEnv() returns a process-wide instance.
//
// Thread-safety: PosixEnv has no mutable state; a PosixFile only holds an fd,
// and pread/pwrite are positionless, so both may be used from any thread.
#pragma once

#include <string>

#include "umbra/io.h"

namespace umbra {

class PosixEnv final : public Env {
 public:
  PosixEnv() = default;

  // Opens with O_CLOEXEC (and O_DIRECT if `direct`; a filesystem that
  // refuses O_DIRECT, e.g. tmpfs, yields kUnsupported with err() == EINVAL).
  // kCreate/kCreateNew create files with mode 0644.
  Result<std::unique_ptr<File>> Open(const std::string& path, OpenMode mode,
                                     bool direct = false) override;
  Result<bool> Exists(const std::string& path) override;
  // mkdir 0755. OK if a directory already exists there; kAlreadyExists if a
  // non-directory does. Parents are not created.
  Status CreateDir(const std::string& path) override;
  Status Remove(const std::string& path) override;
  Status Rename(const std::string& from, const std::string& to) override;
  Status SyncDir(const std::string& dir) override;
  // Sorted names, without "." and "..".
  Result<std::vector<std::string>> ListDir(const std::string& dir) override;
  // statvfs: total = f_blocks * f_frsize, free = f_bavail * f_frsize.
  Result<FsStats> StatFs(const std::string& path) override;
  // See io.h. Uses stat() and /sys/dev/block/MAJ:MIN/{partition,../dev,
  // loop/backing_file}. `volume_path` must be a block device or a regular
  // file (else kInvalidArgument).
  Result<bool> IsOnVolume(const std::string& dir, const std::string& volume_path) override;
  // Both regular files or directories with the same st_dev. A block device
  // is never on the same filesystem as anything (its node is on devtmpfs).
  Result<bool> SameFilesystem(const std::string& a, const std::string& b) override;
  // CLOCK_MONOTONIC.
  uint64_t NowNanos() override;
  // nanosleep, resumed after signals until the full time has passed.
  void SleepNanos(uint64_t ns) override;
};

}  // namespace umbra
