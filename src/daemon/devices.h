// BlockDevices the daemon serves through the front end.
//
// VolumeHolder: the engine Volume of one protected volume behind a
// shared_mutex. Block I/O takes it shared; the daemon takes it exclusively
// to swap the Volume (moving shadow storage re-creates the engine Volume on
// the new location) while the volume stays exported and attached, so the
// loop device and the filesystem on it never see the swap (their I/O waits
// for the instant of the swap).
//
// OverlayDevice: a throwaway writable layer over a read-only device. Reads
// come from the base except for 4 KiB blocks written since; writes go to an
// unlinked temporary file (O_TMPFILE) and a bitmap of written blocks, all
// discarded when the device is destroyed. Used to mount a crash-consistent
// snapshot: ext4 and XFS must replay their journal/log before they can be
// mounted, which needs a writable device; the replay lands in the overlay
// and the snapshot itself is never changed.
#pragma once

#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <vector>

#include "umbra/block_device.h"
#include "umbra/engine.h"

namespace umbra::daemon {

// The engine Volume of one protected volume; the daemon serves it with the
// front end's VolumeDevice/SnapshotDevice over this holder.
using VolumeHolder = SwappableVolume;

// A writable overlay over `base` (size a multiple of 4096); the temporary
// file is created (unlinked) in `tmp_dir`.
Result<std::unique_ptr<BlockDevice>> MakeOverlayDevice(std::unique_ptr<BlockDevice> base,
                                                       const std::string& tmp_dir);

}  // namespace umbra::daemon
