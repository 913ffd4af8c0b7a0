// LoopDevice: attaches a file to a free /dev/loopN and detaches it when done.
//
// Attach: LOOP_CTL_GET_FREE on /dev/loop-control, then LOOP_CONFIGURE (one
// ioctl: backing fd, block size, flags). On kernels without LOOP_CONFIGURE
// (EINVAL/ENOTTY) it falls back to LOOP_SET_FD + LOOP_SET_STATUS64 +
// LOOP_SET_BLOCK_SIZE + LOOP_SET_DIRECT_IO. If another process takes the same
// free device first (EBUSY), it asks for another one.
//
// Two lifetimes (Hold):
//  * kHoldOpen: the device is configured with LO_FLAGS_AUTOCLEAR and this
//    object keeps it open, so even if the process dies the kernel detaches it
//    when the last opener closes it. Right for devices over ordinary files.
//  * kReleased: no auto-clear and no descriptor kept. Required when the
//    backing file is served by this same process (umbrad's FUSE export): the
//    last close of a loop device writes back its dirty page cache, and if that
//    close happens while the process is being killed, the writes go to the
//    server that is dying and the exit never finishes (a `Zl` process stuck in
//    bdev_release, and every sync on the machine behind it). With kReleased a
//    kill leaves the device attached to a dead file (I/O errors, no hang); the
//    next start detaches it (see Daemon reconcile).
// Detach() (also run by the destructor) clears the device (LOOP_CLR_FD,
// retried briefly on EBUSY) and waits briefly until the kernel has really
// released it; if something else (a mount, another process) still holds it
// open, the kernel detaches it on that last close and Detach() reports kBusy.
// In kReleased mode Detach() first checks that the device still serves the
// same backing file, so it never clears a device someone else has reused.
//
// Not thread-safe; movable, not copyable.
#pragma once

#include <cstdint>
#include <string>

#include "umbra/status.h"

namespace umbra {

class LoopDevice {
 public:
  // Attaches `file`. direct_io asks the loop driver to use O_DIRECT on the
  // file (no second page cache); if the kernel cannot, the device still works
  // and direct_io() reports false. sector_size is the logical block size
  // (512..4096, power of two).
  enum class Hold { kHoldOpen, kReleased };
  static Result<LoopDevice> Attach(const std::string& file, bool read_only, bool direct_io,
                                   uint32_t sector_size = 4096, Hold hold = Hold::kHoldOpen);

  LoopDevice() = default;
  LoopDevice(LoopDevice&& other) noexcept;
  LoopDevice& operator=(LoopDevice&& other) noexcept;
  LoopDevice(const LoopDevice&) = delete;
  LoopDevice& operator=(const LoopDevice&) = delete;
  ~LoopDevice();

  // "/dev/loopN", or "" when not attached.
  const std::string& path() const { return path_; }
  int number() const { return number_; }
  bool attached() const { return number_ >= 0; }
  // What the kernel reports now (/sys/block/loopN/loop/dio).
  bool direct_io() const;

  Status Detach();

 private:
  int fd_ = -1;  // kHoldOpen only
  int number_ = -1;
  std::string path_;
  std::string backing_;  // the file as the kernel reports it (kReleased only)
};

}  // namespace umbra
