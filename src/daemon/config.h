// umbrad configuration: defaults, the TOML config file, command-line flags.
#pragma once

#include <cstdint>
#include <string>

#include "umbra/status.h"

namespace umbra::daemon {

struct Config {
  std::string state_dir = "/var/lib/umbra";
  std::string socket = "/run/umbra/umbrad.sock";
  std::string fuse_dir = "/run/umbra/dev";
  // The NBD socket (docs/protocol/nbd.md); "" = nbd.sock next to `socket`.
  std::string nbd_socket;
  // Optional loopback TCP address for NBD, "127.0.0.1:10809"; "" = none.
  std::string nbd_tcp;
  // Members of this group (besides root) may make every request.
  std::string admin_group;
  // A copy to shadow storage slower than this invalidates the snapshots.
  uint32_t copy_timeout_ms = 10'000;
  // How umbrad reads and writes the origin (the volume's data): "writeback"
  // through the page cache (like losetup's default, nbdkit's file plugin and
  // QEMU's cache=writeback; flushes still reach the disk), or "direct"
  // (O_DIRECT: no second cache, but every write waits for the disk in a
  // serving thread).
  std::string origin_cache = "writeback";
  // Writers (docs/writers.md): the hook-script directory ("" = none) and the
  // bounds of the sequence.
  std::string writers_dir = "/etc/umbra/writers.d";
  uint32_t prepare_timeout_ms = 60'000;
  uint32_t freeze_window_ms = 10'000;
  bool foreground = false;
};

inline constexpr const char* kDefaultConfigFile = "/etc/umbra/umbrad.toml";

// Reads the TOML file at `path` into *cfg (keys: state_dir, socket, fuse_dir,
// admin_group, copy_timeout_ms, origin_cache, nbd_socket, nbd_tcp, writers_dir,
// prepare_timeout_ms, freeze_window_ms). An unknown key, a wrong type or a syntax
// error fails with kInvalidArgument naming the file, line and key.
Status LoadConfigFile(const std::string& path, Config* cfg);

}  // namespace umbra::daemon
