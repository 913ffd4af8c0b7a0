// libext2fs block bitmap reader (offline images of unmounted ext2/3/4).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "umbra/imaging.h"

namespace umbra::imaging {

// Ranges of `path` (a device or file of `size` bytes holding ext2/3/4) that
// the filesystem uses, merged and in order; nullopt (and why in `why_not`)
// if it is not ext2/3/4 or its bitmap cannot be trusted (not cleanly
// unmounted).
std::optional<std::vector<Range>> Ext4Allocated(const std::string& path, uint64_t size,
                                                std::string* why_not);

}  // namespace umbra::imaging
