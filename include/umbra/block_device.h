// BlockDevice: the operation table a block-device front end (FUSE+loop today,
// NBD or ublk later) serves. The front end knows only this interface; the
// adapters below bind it to the snapshot engine, so the engine never knows
// which front end serves it (dependencies point down: frontend -> engine).
//
// Contract for every implementation:
//   * Thread-safe: every method may be called from many threads at once
//     (a front end serves requests in parallel). Concurrent writes to
//     overlapping ranges have no defined order, as on a disk.
//   * Offsets and lengths are bytes; any alignment is accepted. A range that
//     does not lie inside [0, size()) fails with kInvalidArgument; front ends
//     clamp requests at the end of the device before calling.
//   * size() and read_only() never change while the device is exported.
//   * Write with fua=true returns only once the data is durable (as if
//     followed by Flush()). Flush makes every earlier completed write,
//     discard and write-zeroes durable.
//   * After Discard or WriteZeroes, the range reads as zeros.
//   * A read-only device fails Write/Discard/WriteZeroes with an error whose
//     ToErrno() is EROFS and changes nothing; Flush succeeds.
//   * Errors are Status values; front ends turn them into errno with
//     Status::ToErrno(). No method throws.
//   * Block operations should not allocate in the steady state: they run on
//     threads that serve the block device under a mounted filesystem, where
//     allocation can wait on memory reclaim that waits on this device.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <shared_mutex>
#include <span>
#include <string>

#include "umbra/status.h"

namespace umbra {

class Volume;

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  virtual uint64_t size() const = 0;
  virtual bool read_only() const = 0;

  virtual Status Read(uint64_t off, std::span<std::byte> buf) = 0;
  virtual Status Write(uint64_t off, std::span<const std::byte> buf, bool fua) = 0;
  // Write, finished later: `done` is called exactly once with Write's
  // result, on this thread or another one (Volume::WriteAsync). A front end
  // replies from `done`; a completed write is one whose `done` was called.
  virtual void WriteAsync(uint64_t off, std::span<const std::byte> buf, bool fua,
                          std::function<void(Status)> done) {
    done(Write(off, buf, fua));
  }
  virtual Status Flush() = 0;
  virtual Status Discard(uint64_t off, uint64_t len) = 0;
  virtual Status WriteZeroes(uint64_t off, uint64_t len) = 0;
};

// The live volume, read-write. Does not own `volume`, which must outlive the
// returned device.
std::unique_ptr<BlockDevice> VolumeDevice(Volume* volume);

// A snapshot of `volume`, read-only: reads call Volume::ReadSnapshot (an
// invalidated snapshot reads as kSnapshotInvalid -> EIO, a deleted one as
// kNotFound -> ENOENT); writes, discards and write-zeroes fail with EROFS.
// Does not own `volume`.
std::unique_ptr<BlockDevice> SnapshotDevice(Volume* volume, std::string snapshot_id);

// A Volume that its owner may replace while devices serve it (umbrad does
// when shadow storage moves: the engine Volume is re-created on the new
// location while the loop device and the filesystem on it stay). Devices take
// `mu` shared for each call; the owner takes it exclusively to swap `volume`.
// While `volume` is null, calls fail with kIOError ("volume is closed").
struct SwappableVolume {
  std::shared_mutex mu;
  std::unique_ptr<Volume> volume;  // guarded by mu
};

// The same two devices over a SwappableVolume (which must outlive them);
// `size` is the volume's size, fixed for the device's life.
std::unique_ptr<BlockDevice> VolumeDevice(SwappableVolume* volume, uint64_t size);
std::unique_ptr<BlockDevice> SnapshotDevice(SwappableVolume* volume, uint64_t size,
                                            std::string snapshot_id);

}  // namespace umbra
