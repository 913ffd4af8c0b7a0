// PosixEnv implementation (see posix_env.h).
//
// Sync choice: File::Sync always calls fdatasync(). On Linux fdatasync also
// flushes the metadata needed to read the data back, which includes a changed
// file size, so tracking size changes to pick fsync() would buy nothing.
#include "io/posix_env.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

namespace umbra {
namespace {

// Owns a file descriptor; closes it on destruction. close() errors are
// ignored there (data durability is Sync()'s job, not close()'s).
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~UniqueFd() { Reset(); }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// open() retried on EINTR (possible for FIFOs/devices).
int OpenRetry(const char* path, int flags, mode_t mode = 0) {
  int fd;
  do {
    fd = ::open(path, flags, mode);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

class PosixFile final : public File {
 public:
  PosixFile(UniqueFd fd, std::string path, bool is_block)
      : fd_(std::move(fd)), path_(std::move(path)), is_block_(is_block) {}
  int fd() const override { return fd_.get(); }

  Status ReadAt(uint64_t off, std::span<std::byte> buf) override {
    size_t done = 0;
    while (done < buf.size()) {
      const ssize_t n =
          ::pread(fd_.get(), buf.data() + done, buf.size() - done, static_cast<off_t>(off + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "pread " + path_);
      }
      if (n == 0) {  // end of file: the rest reads as zeros
        std::memset(buf.data() + done, 0, buf.size() - done);
        break;
      }
      done += static_cast<size_t>(n);
    }
    return Status::Ok();
  }

  Status WriteAt(uint64_t off, std::span<const std::byte> buf) override {
    size_t done = 0;
    while (done < buf.size()) {
      const ssize_t n =
          ::pwrite(fd_.get(), buf.data() + done, buf.size() - done, static_cast<off_t>(off + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "pwrite " + path_);
      }
      if (n == 0) return Status(Code::kIOError, "pwrite " + path_ + ": wrote nothing", EIO);
      done += static_cast<size_t>(n);
    }
    return Status::Ok();
  }

  Status Sync() override {
    if (::fdatasync(fd_.get()) != 0) return Status::FromErrno(errno, "fdatasync " + path_);
    return Status::Ok();
  }

  Status PunchHole(uint64_t off, uint64_t len) override {
    if (len == 0) return Status::Ok();
    if (::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                    static_cast<off_t>(len)) == 0) {
      return Status::Ok();
    }
    const int err = errno;
    if (err != EOPNOTSUPP && err != ENOTSUP) {
      return Status::FromErrno(err, "fallocate(PUNCH_HOLE) " + path_);
    }
    // No hole punching here: write zeros over the part inside the file (the
    // range still reads as zeros; it just keeps its storage).
    UMBRA_ASSIGN_OR_RETURN(const uint64_t size, Size());
    if (off >= size) return Status::Ok();
    const uint64_t end = std::min(size, off + len);
    static constexpr size_t kChunk = 1 << 20;
    std::vector<std::byte> zeros(std::min<uint64_t>(kChunk, end - off));
    for (uint64_t pos = off; pos < end;) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(zeros.size(), end - pos));
      UMBRA_RETURN_IF_ERROR(WriteAt(pos, std::span<const std::byte>(zeros.data(), n)));
      pos += n;
    }
    return Status::Ok();
  }

  Status Truncate(uint64_t size) override {
    int r;
    do {
      r = ::ftruncate(fd_.get(), static_cast<off_t>(size));
    } while (r != 0 && errno == EINTR);
    if (r != 0) return Status::FromErrno(errno, "ftruncate " + path_);
    return Status::Ok();
  }

  Result<uint64_t> Size() override {
    if (is_block_) {
      uint64_t bytes = 0;
      if (::ioctl(fd_.get(), BLKGETSIZE64, &bytes) != 0) {
        return Status::FromErrno(errno, "ioctl(BLKGETSIZE64) " + path_);
      }
      return bytes;
    }
    struct stat st;
    if (::fstat(fd_.get(), &st) != 0) return Status::FromErrno(errno, "fstat " + path_);
    return static_cast<uint64_t>(st.st_size);
  }

  Result<uint64_t> AllocatedBytes() override {
    if (is_block_) return Size();
    struct stat st;
    if (::fstat(fd_.get(), &st) != 0) return Status::FromErrno(errno, "fstat " + path_);
    return static_cast<uint64_t>(st.st_blocks) * 512;
  }

  const std::string& path() const override { return path_; }

 private:
  UniqueFd fd_;
  const std::string path_;
  const bool is_block_;
};

// Reads a small sysfs attribute, without the trailing newline.
std::optional<std::string> ReadSysfs(const std::string& path) {
  UniqueFd fd(OpenRetry(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return std::nullopt;
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      return std::nullopt;
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

std::string SysBlockDir(dev_t dev) {
  return "/sys/dev/block/" + std::to_string(major(dev)) + ":" + std::to_string(minor(dev));
}

// The whole-disk device a partition belongs to, or nullopt if `dev` is not
// a partition (or sysfs does not say).
std::optional<dev_t> ParentDisk(dev_t dev) {
  const std::string dir = SysBlockDir(dev);
  if (::access((dir + "/partition").c_str(), F_OK) != 0) return std::nullopt;
  // /sys/dev/block/M:m is a symlink to .../<disk>/<partition>; ".." is
  // resolved after following it, so this names the disk's "dev" file.
  auto text = ReadSysfs(dir + "/../dev");
  if (!text) return std::nullopt;
  unsigned maj = 0, min = 0;
  if (std::sscanf(text->c_str(), "%u:%u", &maj, &min) != 2) return std::nullopt;
  return makedev(maj, min);
}

// The backing file of a loop device, or nullopt if `dev` is not one.
std::optional<std::string> LoopBackingFile(dev_t dev) {
  return ReadSysfs(SysBlockDir(dev) + "/loop/backing_file");
}

std::optional<std::string> RealPath(const std::string& p) {
  char* r = ::realpath(p.c_str(), nullptr);
  if (r == nullptr) return std::nullopt;
  std::string s(r);
  std::free(r);
  return s;
}

}  // namespace

Result<std::unique_ptr<File>> PosixEnv::Open(const std::string& path, OpenMode mode, bool direct) {
  int flags = O_CLOEXEC;
  switch (mode) {
    case OpenMode::kReadOnly:
      flags |= O_RDONLY;
      break;
    case OpenMode::kReadWrite:
      flags |= O_RDWR;
      break;
    case OpenMode::kCreate:
      flags |= O_RDWR | O_CREAT;
      break;
    case OpenMode::kCreateNew:
      flags |= O_RDWR | O_CREAT | O_EXCL;
      break;
  }
  if (direct) flags |= O_DIRECT;
  UniqueFd fd(OpenRetry(path.c_str(), flags, 0644));
  if (!fd.valid()) {
    const int err = errno;
    if (direct && err == EINVAL) {
      return Status(Code::kUnsupported, "open " + path + ": O_DIRECT not supported here", err);
    }
    return Status::FromErrno(err, "open " + path);
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return Status::FromErrno(errno, "fstat " + path);
  if (S_ISDIR(st.st_mode)) return Status::FromErrno(EISDIR, "open " + path);
  return std::unique_ptr<File>(
      std::make_unique<PosixFile>(std::move(fd), path, S_ISBLK(st.st_mode)));
}

Result<bool> PosixEnv::Exists(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) return true;
  if (errno == ENOENT || errno == ENOTDIR) return false;
  return Status::FromErrno(errno, "stat " + path);
}

Status PosixEnv::CreateDir(const std::string& path) {
  if (::mkdir(path.c_str(), 0755) == 0) return Status::Ok();
  const int err = errno;
  if (err == EEXIST) {
    struct stat st;
    if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) return Status::Ok();
    return Status::AlreadyExists("mkdir " + path + ": exists and is not a directory");
  }
  return Status::FromErrno(err, "mkdir " + path);
}

Status PosixEnv::Remove(const std::string& path) {
  if (::unlink(path.c_str()) == 0) return Status::Ok();
  if (errno == EISDIR || errno == EPERM) {  // EPERM: POSIX's answer for unlink(dir)
    struct stat st;
    if (::lstat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
      if (::rmdir(path.c_str()) == 0) return Status::Ok();
      return Status::FromErrno(errno, "rmdir " + path);
    }
    errno = EPERM;
  }
  return Status::FromErrno(errno, "unlink " + path);
}

Status PosixEnv::Rename(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    return Status::FromErrno(errno, "rename " + from + " -> " + to);
  }
  return Status::Ok();
}

Status PosixEnv::SyncDir(const std::string& dir) {
  UniqueFd fd(OpenRetry(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return Status::FromErrno(errno, "open dir " + dir);
  if (::fsync(fd.get()) != 0) return Status::FromErrno(errno, "fsync dir " + dir);
  return Status::Ok();
}

Result<std::vector<std::string>> PosixEnv::ListDir(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return Status::FromErrno(errno, "opendir " + dir);
  std::vector<std::string> names;
  for (;;) {
    errno = 0;
    struct dirent* e = ::readdir(d);
    if (e == nullptr) {
      const int err = errno;
      ::closedir(d);
      if (err != 0) return Status::FromErrno(err, "readdir " + dir);
      break;
    }
    std::string_view name = e->d_name;
    if (name == "." || name == "..") continue;
    names.emplace_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

Result<FsStats> PosixEnv::StatFs(const std::string& path) {
  struct statvfs sv;
  if (::statvfs(path.c_str(), &sv) != 0) return Status::FromErrno(errno, "statvfs " + path);
  FsStats s;
  s.total_bytes = static_cast<uint64_t>(sv.f_blocks) * sv.f_frsize;
  s.free_bytes = static_cast<uint64_t>(sv.f_bavail) * sv.f_frsize;
  return s;
}

Result<bool> PosixEnv::IsOnVolume(const std::string& dir, const std::string& volume_path) {
  struct stat dst;
  if (::stat(dir.c_str(), &dst) != 0) return Status::FromErrno(errno, "stat " + dir);
  struct stat vst;
  if (::stat(volume_path.c_str(), &vst) != 0) {
    return Status::FromErrno(errno, "stat " + volume_path);
  }
  const bool vol_is_block = S_ISBLK(vst.st_mode);
  if (!vol_is_block && !S_ISREG(vst.st_mode)) {
    return Status::InvalidArgument(volume_path + " is neither a block device nor a regular file");
  }
  const auto vol_real = RealPath(volume_path);

  // The device holding `dir`, and the disk it is a partition of (if any).
  std::vector<dev_t> candidates{dst.st_dev};
  if (auto parent = ParentDisk(dst.st_dev)) candidates.push_back(*parent);
  for (dev_t dev : candidates) {
    if (vol_is_block && dev == vst.st_rdev) return true;
    if (auto backing = LoopBackingFile(dev); backing && vol_real && *backing == *vol_real) {
      return true;
    }
  }
  return false;
}

Result<bool> PosixEnv::SameFilesystem(const std::string& a, const std::string& b) {
  struct stat sa;
  if (::stat(a.c_str(), &sa) != 0) return Status::FromErrno(errno, "stat " + a);
  struct stat sb;
  if (::stat(b.c_str(), &sb) != 0) return Status::FromErrno(errno, "stat " + b);
  auto on_fs = [](const struct stat& st) { return S_ISREG(st.st_mode) || S_ISDIR(st.st_mode); };
  return on_fs(sa) && on_fs(sb) && sa.st_dev == sb.st_dev;
}

uint64_t PosixEnv::NowNanos() {
  struct timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

void PosixEnv::SleepNanos(uint64_t ns) {
  struct timespec req;
  req.tv_sec = static_cast<time_t>(ns / 1'000'000'000ull);
  req.tv_nsec = static_cast<long>(ns % 1'000'000'000ull);
  struct timespec rem;
  while (::nanosleep(&req, &rem) != 0 && errno == EINTR) req = rem;
}

Env* DefaultEnv() {
  static PosixEnv env;  // stateless, so safe to use during static teardown too
  return &env;
}

}  // namespace umbra
