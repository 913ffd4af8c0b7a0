// Small Linux helpers for umbrad: mount table, loop devices, filesystem type.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "umbra/block_device.h"
#include "umbra/status.h"

namespace umbra::daemon {

struct MountEntry {
  std::string source;
  std::string target;
  std::string fstype;
  dev_t dev = 0;  // st_dev of the mounted filesystem
};
// The mounts this process sees (/proc/self/mountinfo), in mount order.
std::vector<MountEntry> ListMounts();
bool IsMountPoint(const std::string& dir);

struct LoopInfo {
  std::string device;        // "/dev/loopN"
  std::string backing_file;  // as the kernel reports it
};
// Loop devices that are attached now.
std::vector<LoopInfo> ListLoops();
// Clears a loop device (LOOP_CLR_FD). If it is still open elsewhere (e.g.
// mounted), the kernel detaches it on the last close (autoclear).
Status ClearLoop(const std::string& device);

// The file backing the loop device (or a partition of one) with device
// number `dev`, or "" if `dev` is not a loop device.
std::string LoopBackingFileOf(dev_t dev);

// Whether someone holds the block device exclusively (a mount does).
bool BlockDeviceInUse(const std::string& device);

// The filesystem type on `dev` from its superblock ("ext4", "xfs",
// "btrfs"), else what `blkid -o value -s TYPE path` says, else "".
std::string DetectFilesystem(BlockDevice* dev, const std::string& path);

// Runs argv (no shell); returns the exit status and the combined output.
int RunCommand(const std::vector<std::string>& argv, std::string* output);

}  // namespace umbra::daemon
