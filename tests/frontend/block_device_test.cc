// BlockDevice adapters over the engine, on a MemEnv: the live volume passes
// every operation through; a snapshot device reads the snapshot and refuses
// every change with EROFS.
#include "umbra/block_device.h"

#include <gtest/gtest.h>

#include "engine_harness.h"
#include "io/mem_env.h"
#include "umbra/engine.h"

namespace umbra {
namespace {

using testing::Bytes;
using testing::Pattern;

constexpr uint64_t kSize = 1 << 20;
constexpr uint32_t kChunk = 64 * 1024;

class BlockDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto v = Volume::Create(&env_, testing::MemVolumeConfig(&env_, "v", kSize, kChunk));
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    vol_ = std::move(*v);
  }
  MemEnv env_;
  std::unique_ptr<Volume> vol_;
};

TEST_F(BlockDeviceTest, VolumeDevicePassesEverythingThrough) {
  auto dev = VolumeDevice(vol_.get());
  EXPECT_EQ(dev->size(), kSize);
  EXPECT_FALSE(dev->read_only());
  Bytes a = Pattern(8192, 0xab);
  ASSERT_TRUE(dev->Write(4096, a, false).ok());
  ASSERT_TRUE(dev->Write(12288, a, true).ok());
  ASSERT_TRUE(dev->Flush().ok());
  Bytes got(8192);
  ASSERT_TRUE(dev->Read(4096, got).ok());
  EXPECT_EQ(got, a);
  Bytes direct(8192);
  ASSERT_TRUE(vol_->Read(12288, direct).ok());
  EXPECT_EQ(direct, a);

  ASSERT_TRUE(dev->Discard(4096, 4096).ok());
  ASSERT_TRUE(dev->WriteZeroes(12288, 4096).ok());
  ASSERT_TRUE(dev->Read(4096, got).ok());
  EXPECT_EQ(Bytes(got.begin(), got.begin() + 4096), Pattern(4096, 0));
  EXPECT_EQ(Bytes(got.begin() + 4096, got.end()), Pattern(4096, 0xab));
  ASSERT_TRUE(dev->Read(12288, got).ok());
  EXPECT_EQ(Bytes(got.begin(), got.begin() + 4096), Pattern(4096, 0));

  Status beyond = dev->Write(kSize - 4096, Pattern(8192, 1), false);
  EXPECT_FALSE(beyond.ok());
}

TEST_F(BlockDeviceTest, SnapshotDeviceIsReadOnlyAndPointInTime) {
  ASSERT_TRUE(vol_->Write(0, Pattern(kChunk, 0x11)).ok());
  auto snap = vol_->CreateSnapshot({});
  ASSERT_TRUE(snap.ok()) << snap.status().ToString();
  ASSERT_TRUE(vol_->Write(0, Pattern(kChunk, 0x22)).ok());

  auto dev = SnapshotDevice(vol_.get(), snap->id);
  EXPECT_EQ(dev->size(), kSize);
  EXPECT_TRUE(dev->read_only());
  Bytes got(kChunk);
  ASSERT_TRUE(dev->Read(0, got).ok());
  EXPECT_EQ(got, Pattern(kChunk, 0x11));

  for (const Status& s :
       {dev->Write(0, Pattern(4096, 3), false), dev->Discard(0, 4096), dev->WriteZeroes(0, 4096)}) {
    EXPECT_FALSE(s.ok());
    EXPECT_EQ(s.ToErrno(), EROFS) << s.ToString();
  }
  EXPECT_TRUE(dev->Flush().ok());
  ASSERT_TRUE(dev->Read(0, got).ok());
  EXPECT_EQ(got, Pattern(kChunk, 0x11));

  auto gone = SnapshotDevice(vol_.get(), "no-such-snapshot");
  EXPECT_FALSE(gone->Read(0, got).ok());
  ASSERT_TRUE(vol_->DeleteSnapshot(snap->id).ok());
  EXPECT_FALSE(dev->Read(0, got).ok());
}

}  // namespace
}  // namespace umbra
