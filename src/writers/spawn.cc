#include "writers/spawn.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>

extern char** environ;

namespace umbra::writers {
namespace {

std::vector<char*> Pointers(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (std::string& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

}  // namespace

int Spawn(const std::vector<std::string>& args, const std::vector<std::string>* env, int stdin_fd,
          Detach detach, pid_t* pid) {
  std::vector<std::string> a = args;
  std::vector<char*> argv = Pointers(a);
  std::vector<std::string> e = env != nullptr ? *env : std::vector<std::string>{};
  std::vector<char*> envp = Pointers(e);

  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  ::posix_spawn_file_actions_init(&fa);
  if (stdin_fd >= 0)
    ::posix_spawn_file_actions_adddup2(&fa, stdin_fd, 0);
  else
    ::posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  ::posix_spawnattr_init(&attr);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  ::posix_spawnattr_setsigmask(&attr, &none);
  ::posix_spawnattr_setsigdefault(&attr, &all);
  short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
  if (detach == Detach::kNewSession) {
    flags |= POSIX_SPAWN_SETSID;
  } else {
    ::posix_spawnattr_setpgroup(&attr, 0);
    flags |= POSIX_SPAWN_SETPGROUP;
  }
  ::posix_spawnattr_setflags(&attr, flags);
  int rc = ::posix_spawn(pid, a[0].c_str(), &fa, &attr, argv.data(),
                         env != nullptr ? envp.data() : environ);
  ::posix_spawn_file_actions_destroy(&fa);
  ::posix_spawnattr_destroy(&attr);
  return rc;
}

}  // namespace umbra::writers
