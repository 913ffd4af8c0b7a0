// ChangeMap: which regions of a volume changed since a tracking epoch, kept in
// a small file beside the shadow storage so incremental images read only what
// changed. Format and rules: docs/format/shadow-storage.md section 6.
//
// Thread-safety: Mark may be called from many threads at once; CloseEpoch is
// called with every block operation held off (the snapshot instant), so no
// Mark runs concurrently with it. ChangedSince and Close may run any time.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "umbra/engine.h"
#include "umbra/io.h"

namespace umbra::engine {

inline constexpr const char* kChangeMapName = "umbra-changes.map";
inline constexpr uint32_t kChangeRegionSize = 256 * 1024;
inline constexpr size_t kChangeHeaderSize = 4096;

class ChangeMap {
 public:
  // Opens (or creates, or resets: rule 4) the map in `dir`. `reset_reason`
  // is set to why an existing map could not be trusted ("" if it was kept or
  // is new; "missing" if `expect_existing` and there is none). Errors only
  // if the file cannot be written at all.
  static Result<std::unique_ptr<ChangeMap>> Open(Env* env, const std::string& dir,
                                                 const std::array<uint8_t, 16>& volume_uuid,
                                                 uint64_t volume_size, uint32_t chunk_size,
                                                 const std::string& boot_id,
                                                 bool expect_existing, std::string* reset_reason);

  // Records that [off, off+len) changes in the current epoch. Call before
  // issuing the change (rule 1). Never fails the change: if the map cannot
  // be written, tracking stops (Break) and the change goes ahead.
  void Mark(uint64_t off, uint64_t len);
  // Closes the current epoch and returns it (rule 2).
  uint64_t CloseEpoch();
  // Stops tracking: ChangedSince reports kNotFound from now on, tracking_id()
  // is "", Close does not mark the map clean, and the next open resets it.
  void Break(const Status& why);
  // Byte ranges (region granular, clipped to the volume, merged) changed
  // after `epoch`. kNotFound if `tracking_id` is not this map's (reset).
  Result<std::vector<Extent>> ChangedSince(const std::string& tracking_id, uint64_t epoch) const;
  // "" once tracking has stopped.
  std::string tracking_id() const;
  uint64_t region_size() const { return region_; }
  // Syncs the entries and marks the map closed cleanly.
  Status Close();

 private:
  ChangeMap(std::unique_ptr<File> file, uint64_t size, uint32_t region);
  Status WriteHeader(uint32_t state);

  std::unique_ptr<File> file_;
  uint64_t size_;
  uint32_t region_;
  std::array<uint8_t, 16> volume_uuid_{};
  std::array<uint8_t, 16> tracking_{};
  std::array<uint8_t, 16> boot_{};
  std::string tracking_text_;
  std::atomic<uint64_t> epoch_{1};
  std::unique_ptr<std::atomic<uint64_t>[]> entries_;
  uint64_t count_ = 0;
  mutable std::mutex header_mu_;
  bool closed_ = false;
  std::atomic<bool> broken_{false};
  std::string broken_reason_;  // guarded by header_mu_
};

}  // namespace umbra::engine
