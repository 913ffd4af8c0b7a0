// The filesystem writer (FIFREEZE/FITHAW) and its thaw guard process.
#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "writers/spawn.h"
#include "writers/writers.h"

namespace umbra::writers {
namespace {

Status MountIoctl(const std::string& mount, unsigned long req, const char* what) {
  int fd = ::open(mount.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + mount);
  int rc;
  do {
    rc = ::ioctl(fd, req, 0);
  } while (rc != 0 && errno == EINTR);
  int err = errno;
  ::close(fd);
  if (rc == 0) return Status::Ok();
  if (req == FITHAW && err == EINVAL) return Status::Ok();  // not frozen
  return Status::FromErrno(err, std::string(what) + " " + mount);
}

int64_t UnixMs(std::chrono::system_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

}  // namespace

Status FreezeFilesystem(const std::string& mount) { return MountIoctl(mount, FIFREEZE, "freeze"); }
Status ThawFilesystem(const std::string& mount) { return MountIoctl(mount, FITHAW, "thaw"); }

ThawGuard::~ThawGuard() { Release(); }

Status ThawGuard::Arm(const std::string& exe, const std::vector<std::string>& mounts,
                      std::chrono::system_clock::time_point deadline) {
  Release();
  // A socket pair rather than a pipe: writing to a guard that has exited
  // must not raise SIGPIPE (send with MSG_NOSIGNAL).
  int p[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, p) != 0)
    return Status::FromErrno(errno, "socket pair for the thaw guard");
  std::vector<std::string> args = {exe, "--thaw-guard", std::to_string(UnixMs(deadline))};
  args.insert(args.end(), mounts.begin(), mounts.end());
  pid_t pid = -1;
  int rc = Spawn(args, nullptr, p[0], Detach::kNewSession, &pid);
  ::close(p[0]);
  if (rc != 0) {
    ::close(p[1]);
    return Status::FromErrno(rc, "start the thaw guard " + exe);
  }
  pid_ = pid;
  sock_fd_ = p[1];
  return Status::Ok();
}

bool ThawGuard::Alive() {
  if (pid_ < 0) return false;
  int st = 0;
  pid_t r = ::waitpid(pid_, &st, WNOHANG);
  if (r == 0) return true;
  pid_ = -1;
  return false;
}

void ThawGuard::Release() {
  if (sock_fd_ >= 0) {
    ssize_t ignored = ::send(sock_fd_, "t", 1, MSG_NOSIGNAL);
    (void)ignored;
    ::close(sock_fd_);
    sock_fd_ = -1;
  }
  if (pid_ > 0) {
    int st = 0;
    while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
  }
}

int ThawGuardMain(int argc, char** argv) {
  // argv: exe --thaw-guard DEADLINE_UNIX_MS MOUNT...
  if (argc < 4) {
    std::fprintf(stderr, "umbrad --thaw-guard: usage: --thaw-guard DEADLINE_UNIX_MS MOUNT...\n");
    return 2;
  }
  const int64_t deadline = std::strtoll(argv[2], nullptr, 10);
  const char* why = "the freeze window ended";
  for (;;) {
    const int64_t left = deadline - UnixMs(std::chrono::system_clock::now());
    if (left <= 0) break;
    pollfd pfd{0, POLLIN, 0};
    int rc = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left, 60'000)));
    if (rc < 0 && errno == EINTR) continue;
    if (rc == 0) continue;  // re-check the deadline
    char c = 0;
    ssize_t n = rc > 0 ? ::read(0, &c, 1) : -1;
    if (n == 1 && c == 't') return 0;  // umbrad thawed them itself
    if (n < 0 && errno == EINTR) continue;
    why = "umbrad went away while filesystems were frozen";
    break;
  }
  int failed = 0;
  for (int i = 3; i < argc; ++i) {
    Status s = ThawFilesystem(argv[i]);
    if (s.ok()) {
      std::fprintf(stderr, "umbrad thaw guard: %s: thawed %s\n", why, argv[i]);
    } else {
      std::fprintf(stderr, "umbrad thaw guard: %s: %s\n", why, s.message().c_str());
      ++failed;
    }
  }
  return failed ? 1 : 0;
}

}  // namespace umbra::writers
