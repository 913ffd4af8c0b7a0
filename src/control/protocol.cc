// Control protocol framing and client. Format: docs/protocol/control.md.
#include "control/protocol.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace umbra::control {
namespace {

Status WriteAll(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "control socket write");
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

// Reads exactly n bytes; returns 0 on success, 1 on EOF before any byte.
Result<int> ReadAll(int fd, void* data, size_t n) {
  auto* p = static_cast<char*>(data);
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::recv(fd, p + got, n - got, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "control socket read");
    }
    if (r == 0) {
      if (got == 0) return 1;
      return Status(Code::kInvalidArgument, "connection closed in the middle of a frame");
    }
    got += static_cast<size_t>(r);
  }
  return 0;
}

}  // namespace

Status WriteFrame(int fd, const Json& msg) {
  std::string body = msg.dump();
  if (body.size() > kMaxFrame) return Status::InvalidArgument("message too large");
  uint8_t len[4];
  for (int i = 0; i < 4; ++i) len[i] = static_cast<uint8_t>(body.size() >> (8 * i));
  UMBRA_RETURN_IF_ERROR(WriteAll(fd, len, 4));
  return WriteAll(fd, body.data(), body.size());
}

Result<Json> ReadFrame(int fd) {
  uint8_t len[4];
  UMBRA_ASSIGN_OR_RETURN(int eof, ReadAll(fd, len, 4));
  if (eof) return Status::NotFound("connection closed");
  uint32_t n = 0;
  for (int i = 3; i >= 0; --i) n = (n << 8) | len[i];
  if (n == 0 || n > kMaxFrame)
    return Status::InvalidArgument("protocol error: frame length " + std::to_string(n));
  std::string body(n, '\0');
  UMBRA_ASSIGN_OR_RETURN(eof, ReadAll(fd, body.data(), n));
  if (eof) return Status::InvalidArgument("protocol error: connection closed mid-frame");
  Json j = Json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return Status::InvalidArgument("protocol error: frame is not a JSON object");
  return j;
}

std::string WireCode(Code c) {
  switch (c) {
    case Code::kOk: return "ok";
    case Code::kInvalidArgument: return "invalid_argument";
    case Code::kNotFound: return "not_found";
    case Code::kAlreadyExists: return "already_exists";
    case Code::kCorruption: return "corruption";
    case Code::kIOError: return "io_error";
    case Code::kNoSpace: return "no_space";
    case Code::kSnapshotInvalid: return "snapshot_invalid";
    case Code::kTimedOut: return "timed_out";
    case Code::kBusy: return "busy";
    case Code::kPermissionDenied: return "permission_denied";
    case Code::kUnsupported: return "unsupported";
    case Code::kWriterFailed: return "writer_failed";
  }
  return "io_error";
}

Code CodeFromWire(const std::string& s) {
  for (Code c : {Code::kInvalidArgument, Code::kNotFound, Code::kAlreadyExists, Code::kCorruption,
                 Code::kIOError, Code::kNoSpace, Code::kSnapshotInvalid, Code::kTimedOut,
                 Code::kBusy, Code::kPermissionDenied, Code::kUnsupported, Code::kWriterFailed})
    if (WireCode(c) == s) return c;
  return Code::kIOError;
}

Json OkResponse(const Json& id, Json result) {
  return Json{{"id", id}, {"ok", true}, {"result", std::move(result)}};
}

Json ErrorResponse(const Json& id, const Status& s) {
  return Json{{"id", id},
              {"ok", false},
              {"error", {{"code", WireCode(s.code())}, {"message", s.message()}}}};
}

Client::~Client() {
  if (fd_ >= 0) ::close(fd_);
}

Result<Client> Client::Connect(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path))
    return Status::InvalidArgument("socket path too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "socket");
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    int e = errno;
    ::close(fd);
    if (e == ENOENT || e == ECONNREFUSED)
      return Status(Code::kNotFound, "umbrad is not running (no daemon listening at " + path + ")",
                    e);
    return Status::FromErrno(e, "connecting to umbrad at " + path);
  }
  return Client(fd);
}

Result<Json> Client::Call(const std::string& op, const Json& args) {
  uint64_t id = next_id_++;
  UMBRA_RETURN_IF_ERROR(WriteFrame(fd_, Json{{"id", id}, {"op", op}, {"args", args}}));
  auto r = ReadFrame(fd_);
  if (!r.ok()) {
    if (r.status().code() == Code::kNotFound)
      return Status(Code::kIOError, "umbrad closed the connection");
    return r.status();
  }
  const Json& j = *r;
  if (!j.contains("id") || j["id"] != id)
    return Status::InvalidArgument("protocol error: response for another request");
  if (j.value("ok", false)) return j.contains("result") ? j["result"] : Json::object();
  const Json& e = j.contains("error") ? j["error"] : Json::object();
  return Status(CodeFromWire(e.value("code", "io_error")), e.value("message", "unknown error"));
}

std::string SocketPath(const std::string& flag) {
  if (!flag.empty()) return flag;
  const char* env = std::getenv("UMBRA_SOCKET");
  return env && *env ? env : kDefaultSocket;
}

}  // namespace umbra::control
