// NBD server side of one connection: the fixed-newstyle handshake and the
// transmission phase, over any byte channel, serving BlockDevices that an
// ExportProvider names. What is supported, message by message:
// docs/protocol/nbd.md. Knows nothing of the engine or the daemon: exports
// are BlockDevices plus an allocation map.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "umbra/block_device.h"
#include "umbra/status.h"

namespace umbra::nbd {

// One run of base:allocation: `length` bytes that are all holes (read as
// zeros, nothing stored) or all data.
struct AllocationRun {
  uint64_t length = 0;
  bool hole = false;
};

// An export opened for one connection; closing it (destruction) releases
// whatever keeps the device alive.
class Export {
 public:
  virtual ~Export() = default;
  virtual BlockDevice& device() = 0;
  virtual std::string description() const = 0;
  // base:allocation from `off` (< size) for at most `len` bytes: runs in
  // order, covering at least one byte and at most `len`.
  virtual Status Allocation(uint64_t off, uint64_t len, std::vector<AllocationRun>* out) = 0;
};

class ExportProvider {
 public:
  struct Listed {
    std::string name;
    std::string description;
  };
  virtual ~ExportProvider() = default;
  virtual std::vector<Listed> List() = 0;
  // kNotFound for an unknown name.
  virtual Result<std::unique_ptr<Export>> Open(const std::string& name) = 0;
};

// A reliable byte stream. Read fills exactly n bytes or returns false (EOF
// or error); Write writes all n bytes or returns false.
class Channel {
 public:
  virtual ~Channel() = default;
  virtual bool Read(void* p, size_t n) = 0;
  virtual bool Write(const void* p, size_t n) = 0;
};

// A connected socket or pipe (not owned).
class FdChannel final : public Channel {
 public:
  explicit FdChannel(int fd) : fd_(fd) {}
  bool Read(void* p, size_t n) override;
  bool Write(const void* p, size_t n) override;

 private:
  int fd_;
};

struct Limits {
  uint32_t max_request = 32u << 20;  // READ/WRITE payload
  uint32_t max_option = 64u << 10;   // option data during the handshake
};

// Serves one client until it disconnects, aborts or breaks the protocol.
// Returns a one-line reason for the log ("client disconnected", "bad request
// magic", ...). Never throws; never crashes on any input.
std::string Serve(Channel& ch, ExportProvider& provider, const Limits& limits = Limits());

}  // namespace umbra::nbd
