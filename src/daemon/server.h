// A Unix socket listener: accepts connections, finds out who is calling
// (SO_PEERCRED/SO_PEERGROUPS: root or a member of admin_group is allowed)
// and serves each connection on its own thread with a handler (at most
// kMaxConnections at once; past that, the busy handler answers and the
// connection is closed). Used for the control socket (ControlHandler: one
// request/response at a time, a bad frame closes that connection only) and
// the NBD socket (daemon/nbd_exports.h).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "daemon/daemon.h"

namespace umbra::daemon {

class Server {
 public:
  static constexpr int kMaxConnections = 64;

  // Serves one accepted connection until it ends; the Server closes fd.
  using Handler = std::function<void(int fd, const Peer& peer)>;
  // Tells a connection over the limit why it is closed.
  using BusyHandler = std::function<void(int fd)>;

  Server(std::string what, Handler handler, BusyHandler busy)
      : what_(std::move(what)), handler_(std::move(handler)), busy_(std::move(busy)) {}
  ~Server() { Stop(); }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Creates the parent directory, replaces a stale socket, listens (mode
  // 0660, group admin_group if set) and starts the accept thread.
  Status Start(const std::string& path, const std::string& admin_group);
  // Listens on a loopback TCP address "127.x.y.z:PORT" (anything else is
  // refused: there is no TLS). Who calls is found from /proc/net/tcp (the
  // owner of the client's socket), so the same access rule applies.
  Status StartTcp(const std::string& address, const std::string& admin_group);
  // Stops accepting, closes every connection and waits for their threads
  // (a request in progress finishes first). Idempotent.
  void Stop();

 private:
  Status ResolveAdminGroup(const std::string& admin_group);
  void AcceptLoop();
  void Serve(int fd, uint64_t conn_id);

  const std::string what_;  // "control", "NBD": for the log
  const Handler handler_;
  const BusyHandler busy_;
  std::string path_;
  std::optional<gid_t> admin_gid_;
  int listen_fd_ = -1;
  bool tcp_ = false;
  std::thread accept_thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, int> conns_;  // guarded by mu_: conn id -> fd
  bool stopping_ = false;          // guarded by mu_
  uint64_t next_conn_ = 1;
};

// The owner of the client socket of a loopback TCP connection `fd`, from
// /proc/net/tcp; nullopt if not loopback IPv4 or not found.
std::optional<uid_t> LoopbackPeerUid(int fd);

// The control protocol on a Server: requests to `daemon`, and its
// release-on-disconnect when the connection closes.
Server::Handler ControlHandler(Daemon* daemon);
Server::BusyHandler ControlBusy();

}  // namespace umbra::daemon
