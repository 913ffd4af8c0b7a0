// In-memory exports and a scripted channel for the NBD server's unit test
// and fuzz target: two 1 MiB exports ("rw" and read-only "ro") whose first
// half reports as a hole in base:allocation.
#pragma once

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "frontend/nbd/nbd_server.h"

namespace umbra::nbd::testing_nbd {

constexpr uint64_t kSize = 64 << 10;

class MemDevice final : public BlockDevice {
 public:
  explicit MemDevice(bool ro) : ro_(ro), data_(kSize, std::byte{0}) {}
  uint64_t size() const override { return kSize; }
  bool read_only() const override { return ro_; }
  Status Read(uint64_t off, std::span<std::byte> buf) override {
    std::memcpy(buf.data(), data_.data() + off, buf.size());
    return Status::Ok();
  }
  Status Write(uint64_t off, std::span<const std::byte> buf, bool fua) override {
    if (ro_) return Status::FromErrno(EROFS, "read-only");
    std::memcpy(data_.data() + off, buf.data(), buf.size());
    fua_writes += fua ? 1 : 0;
    return Status::Ok();
  }
  Status Flush() override {
    ++flushes;
    return Status::Ok();
  }
  Status Discard(uint64_t off, uint64_t len) override { return WriteZeroes(off, len); }
  Status WriteZeroes(uint64_t off, uint64_t len) override {
    std::memset(data_.data() + off, 0, len);
    return Status::Ok();
  }
  bool ro_;
  std::vector<std::byte> data_;
  int flushes = 0;
  int fua_writes = 0;
};

// First half a hole, second half data.
class MemExport final : public Export {
 public:
  explicit MemExport(MemDevice* d) : d_(d) {}
  BlockDevice& device() override { return *d_; }
  std::string description() const override { return "test export"; }
  Status Allocation(uint64_t off, uint64_t len, std::vector<AllocationRun>* out) override {
    const uint64_t half = kSize / 2, end = off + len;
    if (off < half) out->push_back({std::min(end, half) - off, true});
    if (end > half) out->push_back({end - std::max(off, half), false});
    return Status::Ok();
  }

 private:
  MemDevice* d_;
};

class Provider final : public ExportProvider {
 public:
  std::vector<Listed> List() override { return {{"rw", "writable"}, {"ro", "read-only"}}; }
  Result<std::unique_ptr<Export>> Open(const std::string& name) override {
    if (name == "rw") return std::unique_ptr<Export>(std::make_unique<MemExport>(&rw));
    if (name == "ro") return std::unique_ptr<Export>(std::make_unique<MemExport>(&ro));
    return Status::NotFound("no " + name);
  }
  MemDevice rw{false};
  MemDevice ro{true};
};

class ScriptChannel final : public Channel {
 public:
  explicit ScriptChannel(std::vector<std::byte> in) : in_(std::move(in)) {}
  bool Read(void* p, size_t n) override {
    if (in_.size() - pos_ < n) return false;
    std::memcpy(p, in_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  bool Write(const void* p, size_t n) override {
    const auto* b = static_cast<const std::byte*>(p);
    out.insert(out.end(), b, b + n);
    return true;
  }
  std::vector<std::byte> out;

 private:
  std::vector<std::byte> in_;
  size_t pos_ = 0;
};

}  // namespace umbra::nbd::testing_nbd
