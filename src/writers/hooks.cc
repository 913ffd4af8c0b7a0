// The hook-script writer: executables in a directory run with "freeze" and
// "thaw", compatible with qemu-guest-agent's fsfreeze-hook.d scripts.
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "writers/spawn.h"
#include "writers/writers.h"

extern char** environ;

namespace umbra::writers {
namespace {

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string ExitText(int st) {
  if (WIFEXITED(st)) return "exited with status " + std::to_string(WEXITSTATUS(st));
  if (WIFSIGNALED(st)) return std::string("was killed by signal ") + ::strsignal(WTERMSIG(st));
  return "ended";
}

std::string Join(const std::vector<std::string>& v) {
  std::string out;
  for (const std::string& s : v) out += (out.empty() ? "" : " ") + s;
  return out;
}

}  // namespace

bool HookNameSkipped(const std::string& name) {
  // The list of qemu-guest-agent's scripts/qemu-guest-agent/fsfreeze-hook.
  // Dot files are skipped as its "$dir"/* glob skips them.
  static const std::array<const char*, 14> kSuffixes = {
      "~",          ".bak",      ".orig",        ".rpmnew",     ".rpmorig",
      ".rpmsave",   ".sample",   ".dpkg-old",    ".dpkg-new",   ".dpkg-tmp",
      ".dpkg-dist", ".dpkg-bak", ".dpkg-backup", ".dpkg-remove"};
  if (name.empty() || name[0] == '.') return true;
  for (const char* s : kSuffixes)
    if (EndsWith(name, s)) return true;
  return false;
}

std::vector<std::string> HookScripts(const std::string& dir) {
  std::vector<std::string> out;
  if (dir.empty()) return out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (HookNameSkipped(name)) continue;
    std::string path = dir + "/" + name;
    struct stat st;
    if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    if (::access(path.c_str(), X_OK) != 0) continue;
    out.push_back(path);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

Status RunHook(const std::string& path, const std::string& arg, const EventContext& ctx,
               Clock::time_point deadline) {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "UMBRA_SNAPSHOT_SET=", 19) != 0 &&
        std::strncmp(*e, "UMBRA_VOLUMES=", 14) != 0)
      env.emplace_back(*e);
  env.push_back("UMBRA_SNAPSHOT_SET=" + ctx.set_id);
  env.push_back("UMBRA_VOLUMES=" + Join(ctx.volumes));
  // Its own process group: killed as one at the bound.
  pid_t pid = -1;
  int rc = Spawn({path, arg}, &env, -1, Detach::kNewProcessGroup, &pid);
  if (rc != 0) return Status::FromErrno(rc, "run " + path);

  int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  int st = 0;
  for (;;) {
    pid_t r = ::waitpid(pid, &st, WNOHANG);
    if (r == pid) break;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      ::kill(-pid, SIGKILL);
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
      }
      if (pidfd >= 0) ::close(pidfd);
      return Status::TimedOut(arg + " did not finish in time and was killed");
    }
    if (pidfd >= 0) {
      pollfd pfd{pidfd, POLLIN, 0};
      ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
    } else {
      ::usleep(2000);
    }
  }
  if (pidfd >= 0) ::close(pidfd);
  if (WIFEXITED(st) && WEXITSTATUS(st) == 0) return Status::Ok();
  return Status(Code::kWriterFailed, arg + " " + ExitText(st));
}

}  // namespace umbra::writers
