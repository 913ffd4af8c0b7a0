// Adapters from umbra::Volume (live volume and snapshots) to BlockDevice.
#include "umbra/block_device.h"

#include <cerrno>
#include <utility>

#include "umbra/engine.h"

namespace umbra {
namespace {

class VolumeBlockDevice final : public BlockDevice {
 public:
  explicit VolumeBlockDevice(Volume* v) : v_(v), size_(v->size()) {}

  uint64_t size() const override { return size_; }
  bool read_only() const override { return false; }
  Status Read(uint64_t off, std::span<std::byte> buf) override { return v_->Read(off, buf); }
  Status Write(uint64_t off, std::span<const std::byte> buf, bool fua) override {
    return v_->Write(off, buf, fua);
  }
  Status Flush() override { return v_->Flush(); }
  Status Discard(uint64_t off, uint64_t len) override { return v_->Discard(off, len); }
  Status WriteZeroes(uint64_t off, uint64_t len) override { return v_->WriteZeroes(off, len); }

 private:
  Volume* const v_;
  const uint64_t size_;
};

class SnapshotBlockDevice final : public BlockDevice {
 public:
  SnapshotBlockDevice(Volume* v, std::string id) : v_(v), id_(std::move(id)), size_(v->size()) {}

  uint64_t size() const override { return size_; }
  bool read_only() const override { return true; }
  Status Read(uint64_t off, std::span<std::byte> buf) override {
    return v_->ReadSnapshot(id_, off, buf);
  }
  Status Write(uint64_t, std::span<const std::byte>, bool) override { return ReadOnly(); }
  Status Flush() override { return Status::Ok(); }
  Status Discard(uint64_t, uint64_t) override { return ReadOnly(); }
  Status WriteZeroes(uint64_t, uint64_t) override { return ReadOnly(); }

 private:
  Status ReadOnly() const { return Status::FromErrno(EROFS, "snapshot " + id_ + " is read-only"); }

  Volume* const v_;
  const std::string id_;
  const uint64_t size_;
};

}  // namespace

std::unique_ptr<BlockDevice> VolumeDevice(Volume* volume) {
  return std::make_unique<VolumeBlockDevice>(volume);
}

std::unique_ptr<BlockDevice> SnapshotDevice(Volume* volume, std::string snapshot_id) {
  return std::make_unique<SnapshotBlockDevice>(volume, std::move(snapshot_id));
}

}  // namespace umbra
