#include "daemon/system.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

namespace umbra::daemon {
namespace {

std::string ReadLine(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  if (in) std::getline(in, s);
  return s;
}

// /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      int v = 0;
      bool ok = true;
      for (int k = 1; k <= 3; ++k) {
        char c = s[i + static_cast<size_t>(k)];
        if (c < '0' || c > '7') ok = false;
        v = v * 8 + (c - '0');
      }
      if (ok) {
        out += static_cast<char>(v);
        i += 3;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

}  // namespace

std::vector<MountEntry> ListMounts() {
  std::vector<MountEntry> out;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    // id parent maj:min root target options... - fstype source superopts
    std::istringstream ss(line);
    std::string id, parent, majmin, root, target;
    ss >> id >> parent >> majmin >> root >> target;
    std::string tok;
    while (ss >> tok && tok != "-") {
    }
    MountEntry e;
    ss >> e.fstype >> e.source;
    e.target = Unescape(target);
    e.source = Unescape(e.source);
    unsigned maj = 0, min = 0;
    if (std::sscanf(majmin.c_str(), "%u:%u", &maj, &min) == 2) e.dev = makedev(maj, min);
    out.push_back(std::move(e));
  }
  return out;
}

bool IsMountPoint(const std::string& dir) {
  for (const MountEntry& m : ListMounts())
    if (m.target == dir) return true;
  return false;
}

std::vector<LoopInfo> ListLoops() {
  std::vector<LoopInfo> out;
  DIR* d = ::opendir("/sys/block");
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name.rfind("loop", 0) != 0) continue;
    std::string backing = ReadLine("/sys/block/" + name + "/loop/backing_file");
    if (backing.empty()) continue;
    out.push_back({"/dev/" + name, backing});
  }
  ::closedir(d);
  return out;
}

Status ClearLoop(const std::string& device) {
  int fd = ::open(device.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + device);
  int rc = ::ioctl(fd, LOOP_CLR_FD, 0);
  int e = errno;
  ::close(fd);
  if (rc != 0 && e != ENXIO) return Status::FromErrno(e, "detach " + device);
  return Status::Ok();
}

std::string LoopBackingFileOf(dev_t dev) {
  const std::string sys =
      "/sys/dev/block/" + std::to_string(major(dev)) + ":" + std::to_string(minor(dev));
  std::string b = ReadLine(sys + "/loop/backing_file");
  if (b.empty()) b = ReadLine(sys + "/../loop/backing_file");  // a partition
  return b;
}

bool BlockDeviceInUse(const std::string& device) {
  int fd = ::open(device.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC);
  if (fd < 0) return errno == EBUSY;
  ::close(fd);
  return false;
}

std::string DetectFilesystem(BlockDevice* dev, const std::string& path) {
  if (dev != nullptr && dev->size() >= 128 * 1024) {
    alignas(4096) std::byte buf[65536 + 4096];
    if (dev->Read(0, std::span(buf, 4096)).ok()) {
      if (std::memcmp(buf, "XFSB", 4) == 0) return "xfs";
      if (static_cast<uint8_t>(buf[1080]) == 0x53 && static_cast<uint8_t>(buf[1081]) == 0xEF)
        return "ext4";  // ext2/3/4: the ext4 driver mounts all of them
    }
    if (dev->Read(65536, std::span(buf, 4096)).ok() && std::memcmp(buf + 0x40, "_BHRfS_M", 8) == 0)
      return "btrfs";
  }
  std::string out;
  if (RunCommand({"blkid", "-o", "value", "-s", "TYPE", path}, &out) != 0) return "";
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

int RunCommand(const std::vector<std::string>& argv, std::string* output) {
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) return -1;
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(pipefd[0]);
    ::close(pipefd[1]);
    return -1;
  }
  if (pid == 0) {
    ::dup2(pipefd[1], 1);
    ::dup2(pipefd[1], 2);
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, 0);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  ::close(pipefd[1]);
  char buf[4096];
  ssize_t n;
  while ((n = ::read(pipefd[0], buf, sizeof buf)) != 0) {
    if (n < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (output != nullptr) output->append(buf, static_cast<size_t>(n));
  }
  ::close(pipefd[0]);
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

}  // namespace umbra::daemon
