// BlockDevice adapters over the engine, on a MemEnv: the live volume passes
// every operation through; a snapshot device reads the snapshot and refuses
// every change with EROFS.
#include "umbra/block_device.h"

#include <gtest/gtest.h>

#include <atomic>
#include <future>

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

// Over a SwappableVolume: calls reach whatever Volume is held now; while
// none is held they fail with kIOError (EIO); a snapshot device keeps
// reading its snapshot across a swap to a reopened Volume.
TEST_F(BlockDeviceTest, SwappableVolumeFollowsTheHeldVolume) {
  ASSERT_TRUE(vol_->Write(0, Pattern(kChunk, 0x22)).ok());
  auto snap = vol_->CreateSnapshot({true, "", ""});
  ASSERT_TRUE(snap.ok()) << snap.status().ToString();
  ASSERT_TRUE(vol_->Write(0, Pattern(kChunk, 0x33)).ok());
  const VolumeConfig cfg = vol_->config();

  SwappableVolume held;
  held.volume = std::move(vol_);
  auto live = VolumeDevice(&held, kSize);
  auto sdev = SnapshotDevice(&held, kSize, snap->id);
  EXPECT_EQ(live->size(), kSize);
  EXPECT_TRUE(sdev->read_only());
  Bytes got(kChunk);
  ASSERT_TRUE(live->Read(0, got).ok());
  EXPECT_EQ(got, Pattern(kChunk, 0x33));
  ASSERT_TRUE(sdev->Read(0, got).ok());
  EXPECT_EQ(got, Pattern(kChunk, 0x22));
  EXPECT_EQ(sdev->Write(0, got, false).ToErrno(), EROFS);

  {
    std::unique_lock l(held.mu);
    ASSERT_TRUE(held.volume->Close().ok());
    held.volume.reset();
  }
  Status closed = live->Read(0, got);
  EXPECT_EQ(closed.code(), Code::kIOError);
  EXPECT_EQ(closed.ToErrno(), EIO);
  EXPECT_EQ(sdev->Read(0, got).code(), Code::kIOError);
  EXPECT_EQ(live->Flush().code(), Code::kIOError);

  {
    std::unique_lock l(held.mu);
    auto v = Volume::Open(&env_, cfg);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    held.volume = std::move(*v);
  }
  ASSERT_TRUE(sdev->Read(0, got).ok()) << "the persistent snapshot survives the reopen";
  EXPECT_EQ(got, Pattern(kChunk, 0x22));
  ASSERT_TRUE(live->Write(kChunk, Pattern(kChunk, 0x44), true).ok());
  ASSERT_TRUE(held.volume->Read(kChunk, got).ok());
  EXPECT_EQ(got, Pattern(kChunk, 0x44));
}

// WriteAsync through the live device: under a snapshot the write is
// finished (possibly on the engine's I/O thread) with the snapshot intact;
// with no volume held, `done` gets EIO at once; a swap waits for writes in
// flight because closing the Volume finishes them.
TEST_F(BlockDeviceTest, WriteAsyncThroughASwappableVolume) {
  ASSERT_TRUE(vol_->Write(0, Pattern(4 * kChunk, 0x22)).ok());
  auto snap = vol_->CreateSnapshot({true, "", ""});
  ASSERT_TRUE(snap.ok()) << snap.status().ToString();
  SwappableVolume held;
  held.volume = std::move(vol_);
  auto live = VolumeDevice(&held, kSize);

  std::promise<Status> p;
  Bytes a = Pattern(4096, 0x55);
  live->WriteAsync(kChunk + 4096, a, false, [&p](Status s) { p.set_value(std::move(s)); });
  ASSERT_TRUE(p.get_future().get().ok());
  Bytes got(4096);
  ASSERT_TRUE(live->Read(kChunk + 4096, got).ok());
  EXPECT_EQ(got, a);
  ASSERT_TRUE(held.volume->ReadSnapshot(snap->id, kChunk + 4096, got).ok());
  EXPECT_EQ(got, Pattern(4096, 0x22));

  std::atomic<int> done{0};
  for (int i = 0; i < 3; ++i)
    live->WriteAsync(i * kChunk, a, false, [&done](Status s) {
      EXPECT_TRUE(s.ok()) << s.ToString();
      done.fetch_add(1);
    });
  {
    std::unique_lock l(held.mu);
    ASSERT_TRUE(held.volume->Close().ok());
    EXPECT_EQ(done.load(), 3) << "Close returned before the writes in flight were done";
    held.volume.reset();
  }
  std::promise<Status> q;
  live->WriteAsync(0, a, false, [&q](Status s) { q.set_value(std::move(s)); });
  EXPECT_EQ(q.get_future().get().ToErrno(), EIO);
}

}  // namespace
}  // namespace umbra
