// Shared helpers for engine tests: an expected-state model of a volume and
// its snapshots, random data, and volume set-up on a MemEnv.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "base/random.h"
#include "io/mem_env.h"
#include "umbra/engine.h"

namespace umbra::testing {

using Bytes = std::vector<std::byte>;

inline Bytes RandomBytes(Rng& rng, size_t n) {
  Bytes b(n);
  rng.Fill(b);
  return b;
}

inline Bytes Pattern(size_t n, uint8_t v) { return Bytes(n, std::byte{v}); }

// The expected contents of one volume and of each of its snapshots.
struct VolumeModel {
  Bytes live;
  std::map<std::string, Bytes> snaps;  // id -> contents at the instant
  std::map<std::string, bool> persistent;

  void Write(uint64_t off, std::span<const std::byte> data) {
    std::memcpy(live.data() + off, data.data(), data.size());
  }
  void Zero(uint64_t off, uint64_t len) { std::memset(live.data() + off, 0, len); }
};

// Volume::WriteAsync, waited for: returns what `done` was called with.
inline Status WriteAndWait(Volume& v, uint64_t off, std::span<const std::byte> data,
                           bool fua = false) {
  std::promise<Status> p;
  auto f = p.get_future();
  v.WriteAsync(off, data, fua, [&p](Status s) { p.set_value(std::move(s)); });
  return f.get();
}

// First differing offset, or -1.
inline int64_t FirstDiff(std::span<const std::byte> a, std::span<const std::byte> b) {
  size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i)
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  return a.size() == b.size() ? -1 : static_cast<int64_t>(n);
}

inline ::testing::AssertionResult LiveEquals(Volume& v, const Bytes& expect) {
  Bytes got(expect.size());
  Status s = v.Read(0, got);
  if (!s.ok()) return ::testing::AssertionFailure() << "live read failed: " << s.ToString();
  int64_t d = FirstDiff(got, expect);
  if (d >= 0) return ::testing::AssertionFailure() << "live volume differs at byte " << d;
  return ::testing::AssertionSuccess();
}

inline ::testing::AssertionResult SnapshotEquals(Volume& v, const std::string& id,
                                                 const Bytes& expect) {
  Bytes got(expect.size());
  Status s = v.ReadSnapshot(id, 0, got);
  if (!s.ok()) return ::testing::AssertionFailure() << "snapshot read failed: " << s.ToString();
  int64_t d = FirstDiff(got, expect);
  if (d >= 0)
    return ::testing::AssertionFailure()
           << "snapshot " << id << " differs at byte " << d << " (chunk "
           << d / static_cast<int64_t>(v.config().chunk_size) << ")";
  return ::testing::AssertionSuccess();
}

// Makes an origin file of `size` bytes (zeros) and a shadow dir on a MemEnv.
inline VolumeConfig MemVolumeConfig(Env* env, const std::string& name, uint64_t size,
                                    uint32_t chunk) {
  EXPECT_TRUE(env->CreateDir("/vol").ok());
  auto f = env->Open("/vol/" + name + ".img", OpenMode::kCreate);
  EXPECT_TRUE(f.ok());
  EXPECT_TRUE((*f)->Truncate(size).ok());
  EXPECT_TRUE((*f)->Sync().ok());
  EXPECT_TRUE(env->SyncDir("/vol").ok());
  VolumeConfig c;
  c.origin_path = "/vol/" + name + ".img";
  c.shadow_dir = "/shadow/" + name;
  c.chunk_size = chunk;
  return c;
}

}  // namespace umbra::testing
