// Control protocol framing and client: docs/protocol/control.md.
// A frame is a 4-byte little-endian length followed by that many bytes of
// JSON. Used by umbrad (server side) and by umbra and the client library.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "umbra/status.h"

namespace umbra::control {

using Json = nlohmann::json;

inline constexpr uint32_t kMaxFrame = 1u << 20;
inline constexpr int kProtocolVersion = 1;
inline constexpr const char* kDefaultSocket = "/run/umbra/umbrad.sock";

// Writes one frame; handles short writes and EINTR.
Status WriteFrame(int fd, const Json& msg);
// Reads one frame. kNotFound with message "connection closed" on a clean
// EOF before the first byte; kInvalidArgument (code "protocol") on a bad
// length or bad JSON.
Result<Json> ReadFrame(int fd);

// Error code names used on the wire <-> Status codes.
std::string WireCode(Code c);
Code CodeFromWire(const std::string& s);

// A response for a request id: {"id", "ok": true, "result"} or the error.
Json OkResponse(const Json& id, Json result);
Json ErrorResponse(const Json& id, const Status& s);

// A blocking client for one connection. Not thread-safe.
class Client {
 public:
  ~Client();
  Client(Client&& o) noexcept : fd_(o.fd_), next_id_(o.next_id_) { o.fd_ = -1; }
  Client& operator=(Client&&) = delete;
  // Connects to the socket at `path`. A missing socket or refused connection
  // gives "umbrad is not running (no socket at PATH)".
  static Result<Client> Connect(const std::string& path);
  // Sends {op, args}, waits for the response; an error response becomes a
  // Status with the wire code and message.
  Result<Json> Call(const std::string& op, const Json& args = Json::object());
  int fd() const { return fd_; }

 private:
  explicit Client(int fd) : fd_(fd) {}
  int fd_ = -1;
  uint64_t next_id_ = 1;
};

// The socket path a client should use: explicit flag, else $UMBRA_SOCKET,
// else the default.
std::string SocketPath(const std::string& flag);

}  // namespace umbra::control
