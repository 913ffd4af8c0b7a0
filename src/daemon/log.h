// umbrad's log: one line per event on stderr, "<level>: message", so that
// journald (which reads the level prefix only from sd-daemon prefixes) and a
// person running `umbrad --foreground` both read it easily.
#pragma once

#include <cstdio>
#include <mutex>
#include <string>

namespace umbra::daemon {

enum class LogLevel { kDebug, kInfo, kWarning, kError };

inline void Log(LogLevel level, const std::string& msg) {
  static std::mutex mu;
  const char* name = "info";
  switch (level) {
    case LogLevel::kDebug:
      name = "debug";
      break;
    case LogLevel::kInfo:
      name = "info";
      break;
    case LogLevel::kWarning:
      name = "warning";
      break;
    case LogLevel::kError:
      name = "error";
      break;
  }
  std::lock_guard<std::mutex> l(mu);
  std::fprintf(stderr, "%s: %s\n", name, msg.c_str());
  std::fflush(stderr);
}

inline void LogInfo(const std::string& m) { Log(LogLevel::kInfo, m); }
inline void LogWarning(const std::string& m) { Log(LogLevel::kWarning, m); }
inline void LogError(const std::string& m) { Log(LogLevel::kError, m); }

}  // namespace umbra::daemon
