// LoopDevice: see loop_device.h.
#include "frontend/loop_device.h"

#include <fcntl.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>
#include <utility>

namespace umbra {
namespace {

using namespace std::chrono_literals;

// Closes a descriptor on scope exit unless released.
class FdGuard {
 public:
  explicit FdGuard(int fd) : fd_(fd) {}
  ~FdGuard() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

std::string SysAttr(int number, const char* attr) {
  return "/sys/block/loop" + std::to_string(number) + "/loop/" + attr;
}

// The backing file as the kernel reports it ("" if none).
std::string ReadBacking(int number) {
  std::ifstream f(SysAttr(number, "backing_file"));
  std::string line;
  std::getline(f, line);
  return line;
}

bool BackingAttached(int number) {
  struct stat st;
  return ::stat(SysAttr(number, "backing_file").c_str(), &st) == 0;
}

// Opens /dev/loopN, waiting briefly for devtmpfs to create the node.
int OpenLoopNode(const std::string& path) {
  for (int i = 0;; ++i) {
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd >= 0 || errno != ENOENT || i >= 100) return fd;
    std::this_thread::sleep_for(10ms);
  }
}

int Ioctl(int fd, unsigned long req, unsigned long arg) {
  int r;
  do {
    r = ::ioctl(fd, req, arg);
  } while (r < 0 && errno == EINTR);
  return r < 0 ? errno : 0;
}

template <typename T>
int IoctlPtr(int fd, unsigned long req, T* arg) {
  int r;
  do {
    r = ::ioctl(fd, req, arg);
  } while (r < 0 && errno == EINTR);
  return r < 0 ? errno : 0;
}

// Old-kernel path: four ioctls instead of LOOP_CONFIGURE. Returns errno.
int ConfigureLegacy(int loop_fd, int file_fd, const loop_info64& info, uint32_t sector_size,
                    bool direct_io) {
  if (int e = Ioctl(loop_fd, LOOP_SET_FD, static_cast<unsigned long>(file_fd)); e != 0) return e;
  loop_info64 status = info;
  status.lo_flags &= ~static_cast<uint32_t>(LO_FLAGS_DIRECT_IO | LO_FLAGS_READ_ONLY);
  int e = IoctlPtr(loop_fd, LOOP_SET_STATUS64, &status);
  if (e == 0) e = Ioctl(loop_fd, LOOP_SET_BLOCK_SIZE, sector_size);
  if (e == 0 && direct_io) {
    // Not fatal: the device works without direct I/O, only slower.
    if (int d = Ioctl(loop_fd, LOOP_SET_DIRECT_IO, 1); d != 0)
      std::fprintf(stderr, "umbra: loop: LOOP_SET_DIRECT_IO failed: %s\n", std::strerror(d));
  }
  if (e != 0) Ioctl(loop_fd, LOOP_CLR_FD, 0);
  return e;
}

}  // namespace

Result<LoopDevice> LoopDevice::Attach(const std::string& file, bool read_only, bool direct_io,
                                      uint32_t sector_size, Hold hold) {
  if (sector_size < 512 || sector_size > 4096 || (sector_size & (sector_size - 1)) != 0)
    return Status::InvalidArgument("loop sector size must be a power of two in 512..4096");

  const int access = read_only ? O_RDONLY : O_RDWR;
  int ffd = -1;
  if (direct_io) {
    ffd = ::open(file.c_str(), access | O_CLOEXEC | O_DIRECT);
    if (ffd < 0 && errno != EINVAL) return Status::FromErrno(errno, "opening " + file);
  }
  if (ffd < 0) ffd = ::open(file.c_str(), access | O_CLOEXEC);
  if (ffd < 0) return Status::FromErrno(errno, "opening " + file);
  FdGuard file_fd(ffd);

  FdGuard ctl(::open("/dev/loop-control", O_RDWR | O_CLOEXEC));
  if (ctl.get() < 0) return Status::FromErrno(errno, "opening /dev/loop-control");

  loop_info64 info{};
  std::snprintf(reinterpret_cast<char*>(info.lo_file_name), sizeof(info.lo_file_name), "%s",
                file.c_str());
  info.lo_flags = hold == Hold::kHoldOpen ? LO_FLAGS_AUTOCLEAR : 0;
  if (read_only) info.lo_flags |= LO_FLAGS_READ_ONLY;
  if (direct_io) info.lo_flags |= LO_FLAGS_DIRECT_IO;

  // Another process may take the free device between GET_FREE and
  // CONFIGURE (EBUSY): ask again.
  for (int attempt = 0; attempt < 20; ++attempt) {
    int n = ::ioctl(ctl.get(), LOOP_CTL_GET_FREE);
    if (n < 0) return Status::FromErrno(errno, "LOOP_CTL_GET_FREE");
    std::string path = "/dev/loop" + std::to_string(n);
    FdGuard lfd(OpenLoopNode(path));
    if (lfd.get() < 0) {
      if (errno == ENXIO || errno == EBUSY) continue;  // removed or claimed meanwhile
      return Status::FromErrno(errno, "opening " + path);
    }

    loop_config cfg{};
    cfg.fd = static_cast<uint32_t>(file_fd.get());
    cfg.block_size = sector_size;
    cfg.info = info;
    int e = IoctlPtr(lfd.get(), LOOP_CONFIGURE, &cfg);
    if (e == EINVAL || e == ENOTTY) {
      // LOOP_CONFIGURE is 5.8+; or the kernel rejected direct I/O with it.
      e = ConfigureLegacy(lfd.get(), file_fd.get(), info, sector_size, direct_io);
    }
    if (e == EBUSY) continue;
    if (e != 0) return Status::FromErrno(e, "configuring " + path + " for " + file);

    LoopDevice dev;
    dev.number_ = n;
    dev.path_ = std::move(path);
    if (hold == Hold::kHoldOpen) {
      dev.fd_ = lfd.release();
    } else {
      dev.backing_ = ReadBacking(n);
    }
    return dev;
  }
  return Status::Busy("no free loop device (every free one was taken by another process)");
}

LoopDevice::LoopDevice(LoopDevice&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      number_(std::exchange(other.number_, -1)),
      path_(std::move(other.path_)),
      backing_(std::move(other.backing_)) {
  other.path_.clear();
  other.backing_.clear();
}

LoopDevice& LoopDevice::operator=(LoopDevice&& other) noexcept {
  if (this != &other) {
    Detach().IgnoreError();
    fd_ = std::exchange(other.fd_, -1);
    number_ = std::exchange(other.number_, -1);
    path_ = std::move(other.path_);
    backing_ = std::move(other.backing_);
    other.path_.clear();
    other.backing_.clear();
  }
  return *this;
}

LoopDevice::~LoopDevice() {
  Status s = Detach();
  if (!s.ok()) std::fprintf(stderr, "umbra: loop: %s\n", s.ToString().c_str());
}

bool LoopDevice::direct_io() const {
  if (number_ < 0) return false;
  std::ifstream f(SysAttr(number_, "dio"));
  int v = 0;
  return (f >> v) && v == 1;
}

Status LoopDevice::Detach() {
  if (number_ < 0) return Status::Ok();
  const std::string path = path_;
  const int n = number_;
  if (fd_ < 0) {
    // kReleased: reopen the node, but only if it still serves our file.
    const bool ours = ReadBacking(n) == backing_;
    backing_.clear();
    if (!ours) {
      number_ = -1;
      path_.clear();
      return Status::Ok();  // already detached (and perhaps reused): not ours to clear
    }
    fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd_ < 0) fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) {
      const int e = errno;
      number_ = -1;
      path_.clear();
      return Status::FromErrno(e, "opening " + path + " to detach it");
    }
  }
  // LOOP_CLR_FD marks the device for clearing on last close (kernels since
  // 5.x never return EBUSY; older ones do while it is open elsewhere).
  int e = 0;
  for (int i = 0; i < 40; ++i) {
    e = Ioctl(fd_, LOOP_CLR_FD, 0);
    if (e != EBUSY) break;
    std::this_thread::sleep_for(50ms);
  }
  ::close(fd_);
  fd_ = -1;
  number_ = -1;
  path_.clear();
  if (e != 0 && e != ENXIO && e != EBUSY) return Status::FromErrno(e, "LOOP_CLR_FD on " + path);
  // Autoclear still detaches it on the last close if someone else holds it;
  // wait briefly so callers can rely on the backing file being released.
  for (int i = 0; i < 200 && BackingAttached(n); ++i) std::this_thread::sleep_for(10ms);
  if (BackingAttached(n))
    return Status::Busy(path + " is still open elsewhere; it detaches on its last close");
  return Status::Ok();
}

}  // namespace umbra
