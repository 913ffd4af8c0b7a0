// umbrad: the Umbra daemon. Serves protected volumes as block devices,
// takes and keeps their snapshots, and answers the control socket
// (docs/protocol/control.md).
#include <signal.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include "daemon/config.h"
#include "daemon/daemon.h"
#include "daemon/log.h"
#include "daemon/nbd_exports.h"
#include "daemon/server.h"
#include "writers/writers.h"

namespace {

using umbra::daemon::Config;
using umbra::daemon::LogError;
using umbra::daemon::LogInfo;

constexpr const char* kDescription = R"(umbrad - the Umbra volume shadow-copy daemon

umbrad protects volumes (a file, or an existing block device adopted in
place) and takes copy-on-write snapshots of them while they are in use. It
serves each attached volume and snapshot as a block device (a loop device
over a file on umbrad's own FUSE mount) and answers requests from `umbra`
and the client library on a Unix control socket.
)";

constexpr const char* kFooter = R"(CONFIGURATION
  The TOML file given with --config (default /etc/umbra/umbrad.toml, read if
  it exists) may set:
    state_dir = "/var/lib/umbra"        registry, shadow storage, volume files
    socket = "/run/umbra/umbrad.sock"   control socket
    fuse_dir = "/run/umbra/dev"         FUSE mount serving attached devices
    admin_group = "umbra"               members may use every request
    copy_timeout_ms = 10000             a slower copy invalidates snapshots
    origin_cache = "writeback"          or "direct" (O_DIRECT on volume data)
    nbd_socket = "/run/umbra/nbd.sock"  NBD exports (default: next to socket)
    nbd_tcp = "127.0.0.1:10809"         NBD also on loopback TCP (default: off)
    writers_dir = "/etc/umbra/writers.d"  hook scripts run with freeze/thaw
    prepare_timeout_ms = 60000          bound of the writers' prepare step
    freeze_window_ms = 10000            bound from first freeze to last thaw
  Command-line options override the file.

FILES
  STATE_DIR/volumes.json          the registry of protected volumes
  STATE_DIR/shadow/UUID/          default shadow storage of each volume
  STATE_DIR/volumes/NAME.img      backing files of volumes umbrad created
  STATE_DIR/writers.json          which writers each snapshot was consistent for
  WRITERS_DIR/*                   hook scripts (docs/writers.md)
  FUSE_DIR/vol-NAME, snap-ID      files behind attached loop devices

ACCESS
  The socket has mode 0660. Requests from uid 0 and from members of
  admin_group are served; anyone else gets permission_denied (except
  daemon.hello).

SIGNALS
  SIGTERM, SIGINT   stop: unmount the snapshot mounts umbrad made, detach
                    its loop devices, unmount FUSE, close volumes, exit 0.
  A filesystem umbrad froze for a snapshot is thawed by a separate guard
  process (umbrad --thaw-guard) when the freeze window ends, also when
  umbrad is killed.
  After a crash (or kill -9) the next start cleans up what was left:
  a dead FUSE mount, loop devices and snapshot mounts; persistent snapshots
  are recovered, other snapshots are gone.

LOGGING
  One line per event on standard error: "<level>: message", with level
  info, warning or error. Under systemd (Type=notify) umbrad reports
  readiness with sd_notify(READY=1).

EXIT STATUS
  0 after a clean stop, 1 if start-up failed, 2 on bad usage.

EXAMPLES
  umbrad --foreground
  umbrad --state-dir /srv/umbra --socket /run/umbra-test.sock --foreground)";

}  // namespace

int main(int argc, char** argv) {
  // The thaw guard umbrad starts around a filesystem freeze (internal).
  if (argc >= 2 && std::strcmp(argv[1], "--thaw-guard") == 0)
    return umbra::writers::ThawGuardMain(argc, argv);
  CLI::App app(kDescription, "umbrad");
  app.footer(kFooter);
  app.get_formatter()->column_width(34);
  std::string config_file, state_dir, socket_path, fuse_dir, nbd_socket, nbd_tcp, writers_dir;
  bool foreground = false;
  app.add_option("--config", config_file, "TOML configuration file")->type_name("FILE");
  app.add_option("--state-dir", state_dir, "state directory (default /var/lib/umbra)")
      ->type_name("DIR");
  app.add_option("--socket", socket_path, "control socket path (default /run/umbra/umbrad.sock)")
      ->type_name("PATH");
  app.add_option("--fuse-dir", fuse_dir,
                 "where umbrad mounts its FUSE export (default /run/umbra/dev)")
      ->type_name("DIR");
  app.add_option("--nbd-socket", nbd_socket,
                 "NBD socket serving volumes and snapshots (default: nbd.sock next to the "
                 "control socket)")
      ->type_name("PATH");
  app.add_option("--nbd-tcp", nbd_tcp,
                 "also serve NBD on this loopback address, e.g. 127.0.0.1:10809 (default: off)")
      ->type_name("ADDR:PORT");
  app.add_option("--writers-dir", writers_dir,
                 "hook scripts run with 'freeze' and 'thaw' around every snapshot (default "
                 "/etc/umbra/writers.d)")
      ->type_name("DIR");
  app.add_flag("--foreground", foreground,
               "stay in the foreground (for systemd and tests); otherwise umbrad detaches once "
               "it is ready");
  app.set_version_flag("--version", "umbrad 0.1.0");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }

  Config cfg;
  std::string file = config_file;
  if (file.empty() && ::access(umbra::daemon::kDefaultConfigFile, F_OK) == 0)
    file = umbra::daemon::kDefaultConfigFile;
  if (!file.empty()) {
    umbra::Status s = umbra::daemon::LoadConfigFile(file, &cfg);
    if (!s.ok()) {
      LogError(s.message());
      return 2;
    }
  }
  if (!state_dir.empty()) cfg.state_dir = state_dir;
  if (!socket_path.empty()) cfg.socket = socket_path;
  if (!fuse_dir.empty()) cfg.fuse_dir = fuse_dir;
  if (!nbd_socket.empty()) cfg.nbd_socket = nbd_socket;
  if (!nbd_tcp.empty()) cfg.nbd_tcp = nbd_tcp;
  if (!writers_dir.empty()) cfg.writers_dir = writers_dir;
  if (cfg.nbd_socket.empty())
    cfg.nbd_socket = std::filesystem::path(cfg.socket).parent_path().string() + "/nbd.sock";
  cfg.foreground = foreground;
  for (std::string* p :
       {&cfg.state_dir, &cfg.socket, &cfg.fuse_dir, &cfg.nbd_socket, &cfg.writers_dir}) {
    if (p->empty() || (*p)[0] != '/') {
      LogError("'" + *p + "' must be an absolute path");
      return 2;
    }
    while (p->size() > 1 && p->back() == '/') p->pop_back();
  }

  // Signals: SIGTERM/SIGINT are taken by sigwait in the main thread; every
  // thread started from here inherits the blocked mask.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGHUP);
  ::pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  int ready_pipe[2] = {-1, -1};
  if (!cfg.foreground) {
    // Detach once ready: the parent exits 0 when the child says it serves,
    // 1 if the child failed to start.
    if (::pipe(ready_pipe) != 0) {
      LogError(std::string("pipe: ") + std::strerror(errno));
      return 1;
    }
    pid_t pid = ::fork();
    if (pid < 0) {
      LogError(std::string("fork: ") + std::strerror(errno));
      return 1;
    }
    if (pid > 0) {
      ::close(ready_pipe[1]);
      char c = 0;
      ssize_t n;
      do n = ::read(ready_pipe[0], &c, 1);
      while (n < 0 && errno == EINTR);
      return n == 1 && c == 'R' ? 0 : 1;
    }
    ::close(ready_pipe[0]);
    ::setsid();
    if (::chdir("/") != 0) {
    }
  }

  umbra::daemon::Daemon daemon(cfg);
  umbra::Status s = daemon.Start();
  if (!s.ok()) {
    LogError("cannot start: " + s.message());
    daemon.Stop();
    return 1;
  }
  umbra::daemon::Server server("control", umbra::daemon::ControlHandler(&daemon),
                               umbra::daemon::ControlBusy());
  s = server.Start(cfg.socket, cfg.admin_group);
  if (!s.ok()) {
    LogError("cannot start: " + s.message());
    daemon.Stop();
    return 1;
  }
  umbra::daemon::Server nbd_server("NBD", umbra::daemon::NbdHandler(&daemon), nullptr);
  s = nbd_server.Start(cfg.nbd_socket, cfg.admin_group);
  if (!s.ok()) {
    LogError("cannot start: " + s.message());
    server.Stop();
    daemon.Stop();
    return 1;
  }
  umbra::daemon::Server nbd_tcp_server("NBD", umbra::daemon::NbdHandler(&daemon), nullptr);
  if (!cfg.nbd_tcp.empty()) {
    s = nbd_tcp_server.StartTcp(cfg.nbd_tcp, cfg.admin_group);
    if (!s.ok()) {
      LogError("cannot start: " + s.message());
      nbd_server.Stop();
      server.Stop();
      daemon.Stop();
      return 1;
    }
  }
  ::sd_notify(0, "READY=1\nSTATUS=serving");
  LogInfo("ready (state " + cfg.state_dir + ", socket " + cfg.socket + ", FUSE " + cfg.fuse_dir +
          ")");
  if (ready_pipe[1] >= 0) {
    if (::write(ready_pipe[1], "R", 1) != 1) {
    }
    ::close(ready_pipe[1]);
  }

  int sig = 0;
  while (::sigwait(&stop, &sig) != 0 || sig == SIGHUP) {
    if (sig == SIGHUP) LogInfo("SIGHUP ignored (restart umbrad to reload its configuration)");
  }
  LogInfo(std::string("received ") + (sig == SIGTERM ? "SIGTERM" : "SIGINT") + ", stopping");
  ::sd_notify(0, "STOPPING=1");
  nbd_tcp_server.Stop();
  nbd_server.Stop();
  server.Stop();
  daemon.Stop();
  return 0;
}
