// The volume registry, <state_dir>/volumes.json: which volumes umbrad
// protects and where their shadow storage is. Written atomically (temp file,
// fsync, rename, fsync of the directory), so a crash leaves the old or the
// new registry, never a torn one. Holds no state of work in progress.
//
//   {"version": 1, "volumes": [{"name", "uuid", "origin", "kind": "file"|"device",
//     "size", "chunk_size", "storage": dir, "created_backing": bool}]}
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "umbra/status.h"

namespace umbra::daemon {

struct VolumeRecord {
  std::string name;
  std::string uuid;
  std::string origin;  // backing file or block device, used in place
  std::string kind;    // "file" or "device"
  uint64_t size = 0;
  uint32_t chunk_size = 0;
  std::string storage;           // shadow storage directory
  bool created_backing = false;  // umbrad created `origin` (delete removes it)
};

// A missing file is an empty registry. A corrupt one is kCorruption.
Result<std::vector<VolumeRecord>> LoadRegistry(const std::string& path);
Status SaveRegistry(const std::string& path, const std::vector<VolumeRecord>& volumes);

// Writes `content` to `path` atomically: path.tmp, fsync, rename, fsync dir.
Status WriteFileAtomic(const std::string& path, const std::string& content);

}  // namespace umbra::daemon
