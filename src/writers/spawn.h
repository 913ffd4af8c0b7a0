// Starting the processes the writers run (hook scripts, the thaw guard):
// posix_spawn, so that nothing of umbrad's threads is copied. Internal to
// src/writers.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace umbra::writers {

// How the child is set apart from umbrad.
enum class Detach {
  kNewSession,       // setsid: signals to umbrad's process group do not reach it
  kNewProcessGroup,  // its own group, which can be killed as one
};

// Runs args[0] with `args`, the environment `env` (nullptr = umbrad's), and
// as its stdin `stdin_fd` (dup'ed to 0) or /dev/null when it is -1. Signal
// mask and dispositions are reset to the defaults (umbrad blocks SIGTERM and
// SIGINT in its threads). Returns 0 and sets *pid, or the errno of the
// failure.
int Spawn(const std::vector<std::string>& args, const std::vector<std::string>* env, int stdin_fd,
          Detach detach, pid_t* pid);

}  // namespace umbra::writers
