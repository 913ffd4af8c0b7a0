// FuseExport: serves BlockDevices as regular files on a FUSE mount inside
// this process, so a loop device can be attached to each one. Design,
// mapping and threading: the comment block at the top of fuse_export.cc.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>

#include "umbra/block_device.h"
#include "umbra/status.h"

namespace umbra {

class FuseExport {
 public:
  struct Options {
    // Serving threads, all started by Mount and kept until Unmount.
    // 32: the loop driver keeps up to its queue depth of direct I/Os in
    // flight, and a thread blocked in a disk write serves nothing else.
    unsigned max_threads = 32;
    // How many asynchronous requests (the loop driver's direct I/O) the
    // kernel lets be outstanding before it queues them itself (kernel
    // default 12, which caps a queue depth of 32 at 12).
    unsigned max_background = 128;
    // Shown as the mount's source in /proc/mounts ("umbra" -> "umbra on DIR").
    std::string fsname = "umbra";
  };

  // Mounts an empty FUSE filesystem on `dir` (an existing directory) and
  // starts serving it on threads owned by the returned object. Needs root.
  static Result<std::unique_ptr<FuseExport>> Mount(const std::string& dir, Options options);
  static Result<std::unique_ptr<FuseExport>> Mount(const std::string& dir) {
    return Mount(dir, Options());
  }

  virtual ~FuseExport() = default;  // unmounts (see Unmount)

  // Adds file `name` (no '/', not "." or "..") backed by `device`, owned by
  // root with permission bits `mode` (0600 read-write, 0400 read-only). The
  // device must outlive the file (until Remove or Unmount returns).
  // kAlreadyExists if the name is taken; kInvalidArgument if `mode` grants
  // write but the device is read-only.
  virtual Status Add(const std::string& name, BlockDevice* device, mode_t mode) = 0;

  // Removes the file. kBusy while it is open (e.g. a loop device is attached
  // to it); waits up to `grace` for closes that are still in flight (the
  // kernel delivers the last RELEASE asynchronously after a loop detach).
  // kNotFound if there is no such file.
  virtual Status Remove(const std::string& name,
                        std::chrono::milliseconds grace = std::chrono::milliseconds(0)) = 0;

  // Unmounts and stops the serving threads; idempotent. If files are still
  // open the mount is detached lazily and the FUSE connection aborted (their
  // users then get EIO), so a mount is never leaked; the status says so.
  virtual Status Unmount() = 0;

  virtual const std::string& mountpoint() const = 0;
  // Full path of file `name` on the mount.
  std::string PathOf(const std::string& name) const { return mountpoint() + "/" + name; }
};

}  // namespace umbra
