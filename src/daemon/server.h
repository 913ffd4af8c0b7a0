// The control socket: accepts connections, checks who is calling
// (SO_PEERCRED/SO_PEERGROUPS), and serves each connection on its own thread
// (at most kMaxConnections at once), one request/response at a time.
// A bad frame closes that connection only.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
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

  explicit Server(Daemon* daemon) : daemon_(daemon) {}
  ~Server() { Stop(); }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Creates the parent directory, replaces a stale socket, listens (mode
  // 0660, group admin_group if set) and starts the accept thread.
  Status Start(const std::string& path, const std::string& admin_group);
  // Stops accepting, closes every connection and waits for their threads
  // (a request in progress finishes first). Idempotent.
  void Stop();

 private:
  void AcceptLoop();
  void Serve(int fd, uint64_t conn_id);

  Daemon* const daemon_;
  std::string path_;
  std::optional<gid_t> admin_gid_;
  int listen_fd_ = -1;
  std::thread accept_thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, int> conns_;  // guarded by mu_: conn id -> fd
  bool stopping_ = false;          // guarded by mu_
  uint64_t next_conn_ = 1;
};

}  // namespace umbra::daemon
