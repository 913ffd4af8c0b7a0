// OverlayDevice (src/daemon/devices.h): a throwaway writable layer over a
// read-only device. Seeded random writes, write-zeroes and discards at any
// alignment are checked against a flat byte model; the base never changes.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "base/random.h"
#include "daemon/devices.h"

namespace umbra::daemon {
namespace {

// A read-only device over bytes in memory that counts changes (must stay 0).
class MemDevice final : public BlockDevice {
 public:
  explicit MemDevice(std::vector<std::byte> data) : data_(std::move(data)) {}
  uint64_t size() const override { return data_.size(); }
  bool read_only() const override { return true; }
  Status Read(uint64_t off, std::span<std::byte> buf) override {
    if (off + buf.size() > data_.size()) return Status::InvalidArgument("beyond the end");
    std::memcpy(buf.data(), data_.data() + off, buf.size());
    return Status::Ok();
  }
  Status Write(uint64_t, std::span<const std::byte>, bool) override { return Refuse(); }
  Status Flush() override { return Status::Ok(); }
  Status Discard(uint64_t, uint64_t) override { return Refuse(); }
  Status WriteZeroes(uint64_t, uint64_t) override { return Refuse(); }
  int changes = 0;

 private:
  Status Refuse() {
    ++changes;
    return Status::FromErrno(EROFS, "read-only");
  }
  std::vector<std::byte> data_;
};

TEST(OverlayTest, MatchesByteModelAndLeavesBaseAlone) {
  constexpr uint64_t kSize = 4 << 20;
  Rng rng(20261125);
  std::vector<std::byte> base(kSize);
  rng.Fill(base);
  auto mem = std::make_unique<MemDevice>(base);
  MemDevice* mem_ptr = mem.get();
  auto ov = MakeOverlayDevice(std::move(mem), "/var/tmp");
  ASSERT_TRUE(ov.ok()) << ov.status().ToString();
  BlockDevice& dev = **ov;
  EXPECT_EQ(dev.size(), kSize);
  EXPECT_FALSE(dev.read_only());

  std::vector<std::byte> model = base;
  std::vector<std::byte> buf(1 << 20), got(1 << 20);
  for (int i = 0; i < 2000; ++i) {
    // Mostly block-aligned requests (what a loop device sends), some not.
    const bool aligned = rng.Bernoulli(0.7);
    uint64_t off = rng.Uniform(0, kSize - 1);
    uint64_t len = rng.Uniform(1, std::min<uint64_t>(256 * 1024, kSize - off));
    if (aligned) {
      off = off / 4096 * 4096;
      len = std::max<uint64_t>(4096, len / 4096 * 4096);
      if (off + len > kSize) len = kSize - off;
    }
    const uint64_t what = rng.Uniform(0, 9);
    if (what < 4) {
      rng.Fill(std::span(buf.data(), len));
      ASSERT_TRUE(dev.Write(off, std::span(buf.data(), len), false).ok());
      std::memcpy(model.data() + off, buf.data(), len);
    } else if (what < 5) {
      ASSERT_TRUE(dev.WriteZeroes(off, len).ok());
      std::memset(model.data() + off, 0, len);
    } else if (what < 6) {
      ASSERT_TRUE(dev.Discard(off, len).ok());
      std::memset(model.data() + off, 0, len);
    } else {
      ASSERT_TRUE(dev.Read(off, std::span(got.data(), len)).ok());
      ASSERT_EQ(std::memcmp(got.data(), model.data() + off, len), 0)
          << "op " << i << ": read of " << len << " at " << off;
    }
  }
  std::vector<std::byte> all(kSize);
  ASSERT_TRUE(dev.Read(0, all).ok());
  EXPECT_EQ(all, model);
  EXPECT_EQ(mem_ptr->changes, 0);
  ASSERT_TRUE(mem_ptr->Read(0, all).ok());
  EXPECT_EQ(all, base) << "the overlay changed its base";
  EXPECT_EQ(dev.Read(kSize - 10, std::span(got.data(), 20)).code(), Code::kInvalidArgument);
  EXPECT_TRUE(dev.Flush().ok());
}

}  // namespace
}  // namespace umbra::daemon
