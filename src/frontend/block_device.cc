// Adapters from umbra::Volume (live volume and snapshots) to BlockDevice,
// over a plain Volume* or a SwappableVolume. One template per device kind;
// the Ref policy says how a call reaches the Volume (Lock() returns a guard
// whose get() is the Volume, or null when it is closed).
#include "umbra/block_device.h"

#include <cerrno>
#include <mutex>
#include <utility>

#include "umbra/engine.h"

namespace umbra {
namespace {

struct PlainRef {
  Volume* v;
  struct Guard {
    Volume* v;
    Volume* get() const { return v; }
  };
  Guard Lock() const { return {v}; }
};

struct SwappableRef {
  SwappableVolume* h;
  struct Guard {
    std::shared_lock<std::shared_mutex> l;  // held for the whole call
    SwappableVolume* h;
    Volume* get() const { return h->volume.get(); }
  };
  Guard Lock() const { return {std::shared_lock(h->mu), h}; }
};

Status Closed() { return Status(Code::kIOError, "volume is closed", EIO); }

template <typename Ref>
class LiveDevice final : public BlockDevice {
 public:
  LiveDevice(Ref ref, uint64_t size) : ref_(ref), size_(size) {}

  uint64_t size() const override { return size_; }
  bool read_only() const override { return false; }
  Status Read(uint64_t off, std::span<std::byte> buf) override {
    auto g = ref_.Lock();
    return g.get() ? g.get()->Read(off, buf) : Closed();
  }
  Status Write(uint64_t off, std::span<const std::byte> buf, bool fua) override {
    auto g = ref_.Lock();
    return g.get() ? g.get()->Write(off, buf, fua) : Closed();
  }
  // The guard is held only until the engine has taken the write: a Volume
  // finishes its asynchronous writes before it closes, so swapping it out
  // waits for them.
  void WriteAsync(uint64_t off, std::span<const std::byte> buf, bool fua,
                  std::function<void(Status)> done) override {
    auto g = ref_.Lock();
    if (!g.get()) return done(Closed());
    g.get()->WriteAsync(off, buf, fua, std::move(done));
  }
  Status Flush() override {
    auto g = ref_.Lock();
    return g.get() ? g.get()->Flush() : Closed();
  }
  Status Discard(uint64_t off, uint64_t len) override {
    auto g = ref_.Lock();
    return g.get() ? g.get()->Discard(off, len) : Closed();
  }
  Status WriteZeroes(uint64_t off, uint64_t len) override {
    auto g = ref_.Lock();
    return g.get() ? g.get()->WriteZeroes(off, len) : Closed();
  }

 private:
  const Ref ref_;
  const uint64_t size_;
};

template <typename Ref>
class SnapDevice final : public BlockDevice {
 public:
  SnapDevice(Ref ref, uint64_t size, std::string id) : ref_(ref), size_(size), id_(std::move(id)) {}

  uint64_t size() const override { return size_; }
  bool read_only() const override { return true; }
  Status Read(uint64_t off, std::span<std::byte> buf) override {
    auto g = ref_.Lock();
    return g.get() ? g.get()->ReadSnapshot(id_, off, buf) : Closed();
  }
  Status Write(uint64_t, std::span<const std::byte>, bool) override { return ReadOnly(); }
  Status Flush() override { return Status::Ok(); }
  Status Discard(uint64_t, uint64_t) override { return ReadOnly(); }
  Status WriteZeroes(uint64_t, uint64_t) override { return ReadOnly(); }

 private:
  Status ReadOnly() const { return Status::FromErrno(EROFS, "snapshot " + id_ + " is read-only"); }

  const Ref ref_;
  const uint64_t size_;
  const std::string id_;
};

}  // namespace

std::unique_ptr<BlockDevice> VolumeDevice(Volume* volume) {
  return std::make_unique<LiveDevice<PlainRef>>(PlainRef{volume}, volume->size());
}

std::unique_ptr<BlockDevice> SnapshotDevice(Volume* volume, std::string snapshot_id) {
  return std::make_unique<SnapDevice<PlainRef>>(PlainRef{volume}, volume->size(),
                                                std::move(snapshot_id));
}

std::unique_ptr<BlockDevice> VolumeDevice(SwappableVolume* volume, uint64_t size) {
  return std::make_unique<LiveDevice<SwappableRef>>(SwappableRef{volume}, size);
}

std::unique_ptr<BlockDevice> SnapshotDevice(SwappableVolume* volume, uint64_t size,
                                            std::string snapshot_id) {
  return std::make_unique<SnapDevice<SwappableRef>>(SwappableRef{volume}, size,
                                                    std::move(snapshot_id));
}

}  // namespace umbra
