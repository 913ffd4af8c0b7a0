#include "daemon/server.h"

#include <arpa/inet.h>
#include <grp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "daemon/log.h"

namespace umbra::daemon {

Status Server::ResolveAdminGroup(const std::string& admin_group) {
  if (admin_group.empty()) return Status::Ok();
  struct group* g = ::getgrnam(admin_group.c_str());
  if (g == nullptr)
    return Status::InvalidArgument("admin_group '" + admin_group + "' does not exist");
  admin_gid_ = g->gr_gid;
  return Status::Ok();
}

Status Server::Start(const std::string& path, const std::string& admin_group) {
  path_ = path;
  UMBRA_RETURN_IF_ERROR(ResolveAdminGroup(admin_group));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path))
    return Status::InvalidArgument("socket path " + path + " is too long");
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const std::string parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(parent, ec);
    if (ec) return Status(Code::kIOError, "cannot create " + parent + ": " + ec.message());
  }
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return Status::AlreadyExists(path + " exists and is not a socket; refusing to replace it");
    // The state-directory lock already proved no other umbrad serves our
    // state; a socket left behind by a crash is stale.
    ::unlink(path.c_str());
  }
  listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return Status::FromErrno(errno, "socket");
  const mode_t old = ::umask(0117);
  int rc = ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  int e = errno;
  ::umask(old);
  if (rc != 0) return Status::FromErrno(e, "bind " + path);
  if (admin_gid_ && ::chown(path.c_str(), 0, *admin_gid_) != 0)
    LogWarning("cannot give " + path + " to group " + admin_group + ": " + std::strerror(errno));
  ::chmod(path.c_str(), 0660);
  if (::listen(listen_fd_, 64) != 0) return Status::FromErrno(errno, "listen " + path);
  accept_thread_ = std::thread([this] { AcceptLoop(); });
  LogInfo("listening on " + path + " (" + what_ + ")");
  return Status::Ok();
}

Status Server::StartTcp(const std::string& address, const std::string& admin_group) {
  UMBRA_RETURN_IF_ERROR(ResolveAdminGroup(admin_group));
  const size_t colon = address.rfind(':');
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  unsigned long port = 0;
  char* end = nullptr;
  if (colon != std::string::npos) port = std::strtoul(address.c_str() + colon + 1, &end, 10);
  if (colon == std::string::npos || end == nullptr || *end != '\0' || port == 0 || port > 65535 ||
      ::inet_pton(AF_INET, address.substr(0, colon).c_str(), &addr.sin_addr) != 1)
    return Status::InvalidArgument("'" + address + "' is not an IPv4 address:port");
  if ((ntohl(addr.sin_addr.s_addr) >> 24) != 127)
    return Status::InvalidArgument("'" + address +
                                   "' is not a loopback address (127.0.0.0/8): without TLS, "
                                   "umbrad serves TCP on this machine only");
  addr.sin_port = htons(static_cast<uint16_t>(port));
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return Status::FromErrno(errno, "socket");
  int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    return Status::FromErrno(errno, "bind " + address);
  if (::listen(listen_fd_, 64) != 0) return Status::FromErrno(errno, "listen " + address);
  tcp_ = true;
  accept_thread_ = std::thread([this] { AcceptLoop(); });
  LogInfo("listening on " + address + " (" + what_ + ", TCP)");
  return Status::Ok();
}

void Server::Stop() {
  {
    std::unique_lock l(mu_);
    if (stopping_) return;
    stopping_ = true;
    if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
    for (auto& [id, fd] : conns_) ::shutdown(fd, SHUT_RDWR);
  }
  if (accept_thread_.joinable()) accept_thread_.join();
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    listen_fd_ = -1;
    if (!tcp_) ::unlink(path_.c_str());
  }
  std::unique_lock l(mu_);
  cv_.wait(l, [&] { return conns_.empty(); });
}

void Server::AcceptLoop() {
  for (;;) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      std::lock_guard l(mu_);
      if (stopping_) return;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        LogWarning(std::string("accept: ") + std::strerror(errno));
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        continue;
      }
      LogError(std::string("accept failed: ") + std::strerror(errno));
      return;
    }
    std::unique_lock l(mu_);
    if (stopping_) {
      ::close(fd);
      return;
    }
    if (conns_.size() >= kMaxConnections) {
      l.unlock();
      if (busy_) busy_(fd);
      ::close(fd);
      continue;
    }
    const uint64_t id = next_conn_++;
    conns_[id] = fd;
    std::thread([this, fd, id] { Serve(fd, id); }).detach();
  }
}

namespace {

// "7F000001:1F90" style address of /proc/net/tcp for an IPv4 socket address.
std::string ProcNetAddr(const sockaddr_in& a) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%08X:%04X", a.sin_addr.s_addr, ntohs(a.sin_port));
  return buf;
}

}  // namespace

std::optional<uid_t> LoopbackPeerUid(int fd) {
  sockaddr_in peer{}, self{};
  socklen_t pl = sizeof peer, sl = sizeof self;
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &pl) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&self), &sl) != 0 ||
      peer.sin_family != AF_INET || (ntohl(peer.sin_addr.s_addr) >> 24) != 127)
    return std::nullopt;
  // The client's end of this connection is a socket on this machine whose
  // local address is our peer and whose remote address is us; its line in
  // /proc/net/tcp names its owner (as identd does).
  const std::string want_local = ProcNetAddr(peer), want_remote = ProcNetAddr(self);
  std::ifstream in("/proc/net/tcp");
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::istringstream ss(line);
    std::string slot, local, remote, st, queues, timer, retr;
    unsigned long uid = 0;
    if (!(ss >> slot >> local >> remote >> st >> queues >> timer >> retr >> uid)) continue;
    if (local == want_local && remote == want_remote) return static_cast<uid_t>(uid);
  }
  return std::nullopt;
}

namespace {

// Whether user `uid` belongs to group `gid` (primary or supplementary), from
// the group database: for TCP callers, whose socket carries no groups.
bool UserInGroup(uid_t uid, gid_t gid) {
  passwd* pw = ::getpwuid(uid);
  if (pw == nullptr) return false;
  if (pw->pw_gid == gid) return true;
  std::vector<gid_t> groups(256);
  int n = static_cast<int>(groups.size());
  if (::getgrouplist(pw->pw_name, pw->pw_gid, groups.data(), &n) < 0) return false;
  groups.resize(static_cast<size_t>(n));
  return std::find(groups.begin(), groups.end(), gid) != groups.end();
}

// Whether the Unix-socket peer `fd` has `gid` as its group or one of its
// supplementary groups (SO_PEERCRED's gid, SO_PEERGROUPS).
bool PeerInGroup(int fd, gid_t peer_gid, gid_t gid) {
  if (peer_gid == gid) return true;
  std::vector<gid_t> groups(256);
  socklen_t glen = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &glen) != 0) return false;
  groups.resize(glen / sizeof(gid_t));
  return std::find(groups.begin(), groups.end(), gid) != groups.end();
}

}  // namespace

void Server::Serve(int fd, uint64_t conn_id) {
  Peer peer;
  peer.conn_id = conn_id;
  // Who calls: SO_PEERCRED on the Unix socket; on loopback TCP the owner of
  // the client's socket. Allowed: root, or a member of admin_group.
  std::optional<uid_t> uid;
  bool in_group = false;
  if (tcp_) {
    uid = LoopbackPeerUid(fd);
    if (uid && admin_gid_) in_group = UserInGroup(*uid, *admin_gid_);
  } else {
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
      uid = cred.uid;
      if (admin_gid_) in_group = PeerInGroup(fd, cred.gid, *admin_gid_);
    }
  }
  peer.uid = uid.value_or(static_cast<uid_t>(-1));
  peer.allowed = uid && (*uid == 0 || in_group);
  handler_(fd, peer);
  std::lock_guard l(mu_);
  ::close(fd);
  conns_.erase(conn_id);
  cv_.notify_all();
}

Server::Handler ControlHandler(Daemon* daemon) {
  return [daemon](int fd, const Peer& peer) {
    for (;;) {
      auto req = control::ReadFrame(fd);
      if (!req.ok()) {
        if (req.status().code() != Code::kNotFound) {
          control::WriteFrame(
              fd, Json{{"id", nullptr},
                       {"ok", false},
                       {"error",
                        {{"code", "protocol"},
                         {"message", req.status().message() + "; closing the connection"}}}})
              .IgnoreError();
          LogWarning("connection " + std::to_string(peer.conn_id) + " (uid " +
                     std::to_string(peer.uid) + ") closed: " + req.status().message());
        }
        break;
      }
      // A writer's connection carries events from then on (docs/writers.md).
      if (req->is_object() && req->value("op", "") == "writer.register") {
        daemon->ServeWriter(fd, *req, peer);
        break;
      }
      Json resp = daemon->Handle(*req, peer);
      if (!control::WriteFrame(fd, resp).ok()) break;
    }
    daemon->OnDisconnect(peer.conn_id);
  };
}

Server::BusyHandler ControlBusy() {
  return [](int fd) {
    control::WriteFrame(
        fd,
        Json{{"id", nullptr},
             {"ok", false},
             {"error",
              {{"code", "busy"},
               {"message", "umbrad has too many connections (" +
                               std::to_string(Server::kMaxConnections) + "); try again later"}}}})
        .IgnoreError();
  };
}

}  // namespace umbra::daemon
