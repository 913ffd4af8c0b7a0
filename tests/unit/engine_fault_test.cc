// Shadow storage overflow, I/O errors, disk full and slow copies: origin
// writes keep succeeding (protection level "volume"), the right snapshots go,
// and reading an invalidated snapshot names the cause.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>

#include "engine_harness.h"
#include "io/fault_env.h"
#include "system_util.h"

namespace umbra::testing {
namespace {

constexpr uint32_t kChunk = 4096;
constexpr uint64_t kSize = 64 * kChunk;

// Every case runs three times: shadow storage on the origin's filesystem
// (writers copy inline), the same with every write through WriteAsync (the
// I/O thread reads the old chunks and finishes the writes), and shadow
// storage on a filesystem of its own (copier threads, bounded wait).
enum class Placement { kOriginFs, kOriginFsAsync, kOwnFs };

class FaultTest : public ::testing::TestWithParam<Placement> {
 protected:
  static bool OwnFilesystem() { return GetParam() == Placement::kOwnFs; }
  static Status VolWrite(Volume& v, uint64_t off, std::span<const std::byte> b) {
    if (GetParam() == Placement::kOriginFsAsync) return WriteAndWait(v, off, b);
    return v.Write(off, b);
  }
  void Open(MaxSize max = MaxSize::Unbounded(),
            ProtectionLevel prot = ProtectionLevel::kVolume, uint32_t timeout_ms = 1000) {
    if (OwnFilesystem()) mem_.SetSeparateFilesystem("/shadow");
    cfg_ = MemVolumeConfig(&mem_, "a", kSize, kChunk);
    cfg_.max_size = max;
    cfg_.protection = prot;
    cfg_.copy_timeout_ms = timeout_ms;
    auto v = Volume::Create(&fault_, cfg_);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    cfg_.uuid = (*v)->config().uuid;
    vol_ = std::move(v).value();
    EXPECT_EQ(vol_->GetStorageUsage().copies_inline, !OwnFilesystem());
    live_.assign(kSize, std::byte{0});
    Write(0, RandomBytes(rng_, kSize));
  }
  void Write(uint64_t off, const Bytes& b) {
    Status s = VolWrite(*vol_, off, b);
    ASSERT_TRUE(s.ok()) << "origin write failed: " << s.ToString();
    std::memcpy(live_.data() + off, b.data(), b.size());
  }
  std::string Snap(bool persistent = true) {
    auto s = vol_->CreateSnapshot({persistent, "", ""});
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    if (!s.ok()) return "";
    snaps_[s->id] = live_;
    return s->id;
  }
  SnapshotInfo Info(const std::string& id) {
    auto s = vol_->GetSnapshot(id);
    EXPECT_TRUE(s.ok());
    return s.ok() ? *s : SnapshotInfo{};
  }
  void ExpectInvalid(const std::string& id, InvalidCause cause) {
    SnapshotInfo i = Info(id);
    EXPECT_FALSE(i.valid);
    EXPECT_EQ(i.cause, cause);
    Bytes b(10);
    Status s = vol_->ReadSnapshot(id, 0, b);
    EXPECT_EQ(s.code(), Code::kSnapshotInvalid);
    EXPECT_NE(s.message().find(std::string(InvalidCauseName(cause))), std::string::npos)
        << s.message();
    EXPECT_EQ(vol_->SnapshotExtents(id).status().code(), Code::kSnapshotInvalid);
  }

  MemEnv mem_;
  FaultEnv fault_{&mem_};
  VolumeConfig cfg_;
  std::unique_ptr<Volume> vol_;
  Bytes live_;
  std::map<std::string, Bytes> snaps_;
  Rng rng_{9};
};

TEST_P(FaultTest, CapDeletesOldestFirstThenInvalidatesTheLastOne) {
  Open(MaxSize::Bytes(20 * kChunk));
  std::string s1 = Snap();
  Write(0, RandomBytes(rng_, 8 * kChunk));  // 8 copies for s1
  std::string s2 = Snap();
  Write(8 * kChunk, RandomBytes(rng_, 8 * kChunk));  // 8 copies for s2 (s1 reads through)
  std::string s3 = Snap();
  EXPECT_EQ(vol_->GetStorageUsage().used_bytes, 16 * kChunk);
  // 8 more copies overflow the cap: the oldest (s1) goes, s2 and s3 stay exact.
  Write(16 * kChunk, RandomBytes(rng_, 8 * kChunk));
  EXPECT_EQ(vol_->GetSnapshot(s1).status().code(), Code::kNotFound);
  EXPECT_TRUE(SnapshotEquals(*vol_, s2, snaps_[s2]));
  EXPECT_TRUE(SnapshotEquals(*vol_, s3, snaps_[s3]));
  EXPECT_LE(vol_->GetStorageUsage().used_bytes, 20 * kChunk);
  // Keep writing: s2 goes next, then s3 (the one being filled) is invalidated.
  Write(24 * kChunk, RandomBytes(rng_, 30 * kChunk));
  EXPECT_EQ(vol_->GetSnapshot(s2).status().code(), Code::kNotFound);
  ExpectInvalid(s3, InvalidCause::kStorageFull);
  EXPECT_EQ(vol_->GetStorageUsage().used_bytes, 0u);
  // Copy-on-write has stopped; the live volume is exact.
  uint64_t copies = vol_->GetStorageUsage().copies;
  Write(0, RandomBytes(rng_, kSize));
  EXPECT_EQ(vol_->GetStorageUsage().copies, copies);
  EXPECT_TRUE(LiveEquals(*vol_, live_));
  // The invalidated snapshot is listed with its cause, also after a reopen.
  ASSERT_TRUE(vol_->Close().ok());
  vol_.reset();
  auto v = Volume::Open(&fault_, cfg_);
  ASSERT_TRUE(v.ok());
  vol_ = std::move(v).value();
  ExpectInvalid(s3, InvalidCause::kStorageFull);
  // A new snapshot works again.
  std::string s4 = Snap();
  Write(0, RandomBytes(rng_, 4 * kChunk));
  EXPECT_TRUE(SnapshotEquals(*vol_, s4, snaps_[s4]));
}

TEST_P(FaultTest, ProtectionLevelSnapshotFailsTheWriteInstead) {
  Open(MaxSize::Bytes(4 * kChunk), ProtectionLevel::kSnapshot);
  std::string s1 = Snap();
  Write(0, RandomBytes(rng_, 4 * kChunk));
  Bytes b = RandomBytes(rng_, kChunk);
  Status s = VolWrite(*vol_, 10 * kChunk, b);
  EXPECT_EQ(s.code(), Code::kNoSpace) << s.ToString();
  EXPECT_NE(s.message().find("full"), std::string::npos);
  EXPECT_TRUE(Info(s1).valid);
  EXPECT_TRUE(SnapshotEquals(*vol_, s1, snaps_[s1]));
  EXPECT_TRUE(LiveEquals(*vol_, live_));  // the refused write changed nothing
  // Already-copied chunks still take writes.
  Write(0, RandomBytes(rng_, kChunk));
}

TEST_P(FaultTest, ShadowWriteErrorInvalidatesAllButTheOriginWriteSucceeds) {
  Open();
  std::string s1 = Snap();
  std::string s2 = Snap(false);
  FaultEnv::Rule r;
  r.path_substr = "umbra-shadow.data";
  r.ops = FaultEnv::Mask(FaultEnv::Op::kWrite);
  r.err = EIO;
  int id = fault_.AddRule(r);
  Write(3 * kChunk, RandomBytes(rng_, 100));
  ExpectInvalid(s1, InvalidCause::kStorageIOError);
  ExpectInvalid(s2, InvalidCause::kStorageIOError);
  EXPECT_TRUE(LiveEquals(*vol_, live_));
  Write(20 * kChunk, RandomBytes(rng_, 3 * kChunk));
  EXPECT_TRUE(LiveEquals(*vol_, live_));
  // Once the storage works again, snapshots can be taken again.
  fault_.RemoveRule(id);
  std::string s3 = Snap();
  Write(0, RandomBytes(rng_, kSize));
  EXPECT_TRUE(SnapshotEquals(*vol_, s3, snaps_[s3]));
}

TEST_P(FaultTest, DiskFullDeletesOldestAndRetriesThenInvalidates) {
  Open();
  std::string s1 = Snap();
  Write(0, RandomBytes(rng_, 4 * kChunk));
  std::string s2 = Snap();
  // The disk holding shadow storage fills up: 2 more chunks fit.
  fault_.SetWriteBudget("umbra-shadow.data", 2 * kChunk);
  Write(10 * kChunk, RandomBytes(rng_, 2 * kChunk));
  EXPECT_TRUE(Info(s1).valid);
  Write(12 * kChunk, RandomBytes(rng_, kChunk));  // ENOSPC: s1 goes, retry still fails
  EXPECT_EQ(vol_->GetSnapshot(s1).status().code(), Code::kNotFound);
  ExpectInvalid(s2, InvalidCause::kStorageFull);
  EXPECT_TRUE(LiveEquals(*vol_, live_));
}

TEST_P(FaultTest, SlowCopyInvalidates) {
  Open(MaxSize::Unbounded(), ProtectionLevel::kVolume, /*timeout_ms=*/50);
  std::string s1 = Snap();
  FaultEnv::Rule r;
  r.path_substr = "umbra-shadow.data";
  r.ops = FaultEnv::Mask(FaultEnv::Op::kWrite);
  r.delay_ns = 200'000'000;  // MemEnv's clock: advances, does not sleep
  fault_.AddRule(r);
  Write(0, RandomBytes(rng_, 10));
  ExpectInvalid(s1, InvalidCause::kCopyTooSlow);
  EXPECT_TRUE(LiveEquals(*vol_, live_));
}

// SetCopyTimeout changes the bound at once and is journaled: a reopen with
// another configured value restores it (the daemon then applies its own).
TEST_P(FaultTest, SetCopyTimeoutAppliesAndPersists) {
  Open(MaxSize::Unbounded(), ProtectionLevel::kVolume, /*timeout_ms=*/1000);
  std::string s1 = Snap();
  FaultEnv::Rule r;
  r.path_substr = "umbra-shadow.data";
  r.ops = FaultEnv::Mask(FaultEnv::Op::kWrite);
  r.delay_ns = 200'000'000;  // MemEnv's clock: within 1000 ms, past 50 ms
  r.count = 1;
  fault_.AddRule(r);
  Write(0, RandomBytes(rng_, 10));
  EXPECT_TRUE(Info(s1).valid) << "a 200 ms copy is within the 1000 ms bound";
  EXPECT_EQ(vol_->SetCopyTimeout(0).code(), Code::kInvalidArgument);
  ASSERT_TRUE(vol_->SetCopyTimeout(50).ok());
  EXPECT_EQ(vol_->config().copy_timeout_ms, 50u);
  fault_.AddRule(r);
  Write(kChunk, RandomBytes(rng_, 10));
  ExpectInvalid(s1, InvalidCause::kCopyTooSlow);

  ASSERT_TRUE(vol_->Close().ok());
  vol_.reset();
  VolumeConfig c = cfg_;
  c.copy_timeout_ms = 1000;
  auto v = Volume::Open(&fault_, c);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ((*v)->config().copy_timeout_ms, 50u) << "the journaled value is restored";
  ASSERT_TRUE((*v)->SetCopyTimeout(1000).ok());
  EXPECT_EQ((*v)->config().copy_timeout_ms, 1000u);
}

TEST_P(FaultTest, JournalFailureFailsPersistentCreateCleanly) {
  Open();
  FaultEnv::Rule r;
  r.path_substr = "umbra-shadow.jnl";
  r.err = EIO;
  r.ops = FaultEnv::Mask(FaultEnv::Op::kSync);
  int id = fault_.AddRule(r);
  auto s = vol_->CreateSnapshot({true, "x", ""});
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().ToString().find("shadow storage"), std::string::npos) << s.status().ToString();
  for (auto& info : vol_->ListSnapshots()) EXPECT_FALSE(info.valid) << "a failed create left a snapshot";
  Write(0, RandomBytes(rng_, kChunk));
  EXPECT_TRUE(LiveEquals(*vol_, live_));
  fault_.RemoveRule(id);
  std::string ok = Snap();
  Write(0, RandomBytes(rng_, kChunk));
  EXPECT_TRUE(SnapshotEquals(*vol_, ok, snaps_[ok]));
}

TEST_P(FaultTest, OriginErrorsAreReported) {
  Open();
  FaultEnv::Rule r;
  r.path_substr = "/vol/a.img";
  r.err = EIO;
  r.ops = FaultEnv::Mask(FaultEnv::Op::kWrite);
  fault_.AddRule(r);
  Bytes b(100);
  Status s = VolWrite(*vol_, 0, b);
  EXPECT_EQ(s.code(), Code::kIOError);
}

// Reading the old chunk fails: the write fails and changes nothing, the
// snapshot stays valid and exact, and the next write copies the chunk.
TEST_P(FaultTest, OriginReadErrorUnderASnapshotFailsOnlyThatWrite) {
  Open();
  std::string s1 = Snap();
  FaultEnv::Rule r;
  r.path_substr = "/vol/a.img";
  r.err = EIO;
  r.ops = FaultEnv::Mask(FaultEnv::Op::kRead);
  r.count = 1;
  int id = fault_.AddRule(r);
  Status s = VolWrite(*vol_, kChunk + 100, RandomBytes(rng_, 200));
  EXPECT_EQ(s.code(), Code::kIOError) << s.ToString();
  EXPECT_NE(s.message().find("preserve"), std::string::npos) << s.ToString();
  fault_.RemoveRule(id);
  EXPECT_TRUE(LiveEquals(*vol_, live_));
  EXPECT_TRUE(Info(s1).valid);
  EXPECT_EQ(vol_->GetStorageUsage().copies, 0u);
  Write(kChunk + 100, RandomBytes(rng_, 200));
  EXPECT_TRUE(LiveEquals(*vol_, live_));
  EXPECT_TRUE(SnapshotEquals(*vol_, s1, snaps_[s1]));
  EXPECT_EQ(vol_->GetStorageUsage().copies, 1u);
}

// Every single shadow storage operation failing in turn: origin writes never
// fail, every snapshot is either exact or invalid with a cause, and the
// store reopens.
TEST_P(FaultTest, EachShadowOperationFailingInTurn) {
  for (uint64_t n = 1; n <= 120; ++n) {
    SCOPED_TRACE("failing shadow operation #" + std::to_string(n));
    MemEnv mem;
    if (OwnFilesystem()) mem.SetSeparateFilesystem("/shadow");
    FaultEnv fault(&mem);
    VolumeConfig cfg = MemVolumeConfig(&mem, "f", kSize, kChunk);
    auto v = Volume::Create(&fault, cfg);
    ASSERT_TRUE(v.ok());
    cfg.uuid = (*v)->config().uuid;
    Rng rng(n);
    Bytes live = RandomBytes(rng, kSize);
    ASSERT_TRUE(VolWrite(**v, 0, live).ok());
    FaultEnv::Rule r;
    r.path_substr = "/shadow/";
    r.err = n % 2 ? EIO : ENOSPC;
    r.skip = n - 1;
    r.count = 1;
    fault.AddRule(r);
    std::map<std::string, Bytes> expect;
    for (int step = 0; step < 12; ++step) {
      auto s = (*v)->CreateSnapshot({step % 3 != 0, "", ""});
      if (s.ok()) expect[s->id] = live;
      for (int w = 0; w < 4; ++w) {
        Bytes b = RandomBytes(rng, rng.Uniform(1, 2 * kChunk));
        uint64_t off = rng.Uniform(0, kSize - b.size());
        Status ws = w == 3 ? (*v)->Discard(off, b.size()) : VolWrite(**v, off, b);
        ASSERT_TRUE(ws.ok()) << ws.ToString();
        if (w == 3) {
          std::memset(live.data() + off, 0, b.size());
        } else {
          std::memcpy(live.data() + off, b.data(), b.size());
        }
      }
      (*v)->Flush().IgnoreError();  // may report the failure; the volume is fine
    }
    ASSERT_TRUE(LiveEquals(**v, live));
    for (auto& info : (*v)->ListSnapshots()) {
      if (!info.valid) {
        EXPECT_NE(info.cause, InvalidCause::kNone);
        continue;
      }
      ASSERT_TRUE(SnapshotEquals(**v, info.id, expect[info.id]));
    }
    (*v)->Close().IgnoreError();  // may fail to checkpoint; reopen recovers
    v->reset();
    auto v2 = Volume::Open(&fault, cfg);
    ASSERT_TRUE(v2.ok()) << v2.status().ToString();
    ASSERT_TRUE(LiveEquals(**v2, live));
    for (auto& info : (*v2)->ListSnapshots()) {
      if (info.valid) {
        ASSERT_TRUE(SnapshotEquals(**v2, info.id, expect[info.id]));
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shadow, FaultTest,
                         ::testing::Values(Placement::kOriginFs, Placement::kOriginFsAsync,
                                           Placement::kOwnFs),
                         [](const ::testing::TestParamInfo<Placement>& p) {
                           switch (p.param) {
                             case Placement::kOriginFs: return "OnOriginFilesystem";
                             case Placement::kOriginFsAsync: return "OnOriginFilesystemAsync";
                             case Placement::kOwnFs: break;
                           }
                           return "OnOwnFilesystem";
                         });

// A real volume whose shadow storage stalls for 1.5 s on its first data write
// (real sleep, real files), copy timeout 100 ms. Returns how the snapshot
// ended up and how long the origin write took.
struct HungCopy {
  SnapshotInfo info;
  double write_seconds = 0;
};
HungCopy WriteWhileShadowStorageHangs(const std::string& origin_parent,
                                      const std::string& shadow_parent) {
  test_util::TempDir origin_dir("umbra-fault-test", origin_parent);
  test_util::TempDir shadow_dir("umbra-fault-test", shadow_parent);
  HungCopy out;
  EXPECT_FALSE(origin_dir.path().empty() || shadow_dir.path().empty());
  if (origin_dir.path().empty() || shadow_dir.path().empty()) return out;
  const std::filesystem::path dir = origin_dir.path();
  const std::filesystem::path sdir = shadow_dir.path();
  FaultEnv fault(DefaultEnv());
  {
    auto f = DefaultEnv()->Open((dir / "vol.img").string(), OpenMode::kCreate);
    EXPECT_TRUE(f.ok() && (*f)->Truncate(1 << 20).ok());
  }
  VolumeConfig c;
  c.origin_path = (dir / "vol.img").string();
  c.shadow_dir = (sdir / "shadow").string();
  c.copy_timeout_ms = 100;
  auto v = Volume::Create(&fault, c);
  EXPECT_TRUE(v.ok()) << v.status().ToString();
  if (!v.ok()) return out;
  auto s = (*v)->CreateSnapshot({false, "", ""});
  EXPECT_TRUE(s.ok());
  if (!s.ok()) return out;
  FaultEnv::Rule r;
  r.path_substr = "umbra-shadow.data";
  r.ops = FaultEnv::Mask(FaultEnv::Op::kWrite);
  r.delay_ns = 1'500'000'000;
  r.count = 1;
  fault.AddRule(r);
  Bytes b(4096, std::byte{7});
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE((*v)->Write(0, b).ok());
  out.write_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto info = (*v)->GetSnapshot(s->id);
  EXPECT_TRUE(info.ok());
  if (info.ok()) out.info = *info;
  Bytes got(4096);
  EXPECT_TRUE((*v)->Read(0, got).ok());
  EXPECT_EQ(got, b);
  EXPECT_TRUE((*v)->Close().ok());
  return out;
}

// Shadow storage on a filesystem of its own (tmpfs here) that hangs cannot
// hold an origin write for longer than the copy timeout: the writer gives up
// waiting ("exceeded") rather than noticing afterwards that it took too long.
TEST(FaultPosixTest, HungShadowStorageOnItsOwnFilesystemDoesNotHoldTheOrigin) {
  ASSERT_FALSE(DefaultEnv()->SameFilesystem("/var/tmp", "/dev/shm").value())
      << "needs /dev/shm on a filesystem other than /var/tmp";
  HungCopy h = WriteWhileShadowStorageHangs("/var/tmp", "/dev/shm");
  EXPECT_FALSE(h.info.valid);
  EXPECT_EQ(h.info.cause, InvalidCause::kCopyTooSlow);
  EXPECT_NE(h.info.invalid_message.find("exceeded"), std::string::npos) << h.info.invalid_message;
  EXPECT_LT(h.write_seconds, 1.5) << "the origin write waited for the hung copy";
}

// Shadow storage on the origin's filesystem: a stall there stalls the origin
// anyway, so the writer copies inline. The slow copy is waited for and then
// invalidates the snapshot ("took"), and the origin write lands.
TEST(FaultPosixTest, SlowShadowStorageOnTheOriginFilesystemIsWaitedForThenInvalidated) {
  HungCopy h = WriteWhileShadowStorageHangs("/var/tmp", "/var/tmp");
  EXPECT_FALSE(h.info.valid);
  EXPECT_EQ(h.info.cause, InvalidCause::kCopyTooSlow);
  EXPECT_NE(h.info.invalid_message.find("took"), std::string::npos) << h.info.invalid_message;
  EXPECT_GE(h.write_seconds, 1.5) << "the copy was not written by the writer";
}

}  // namespace
}  // namespace umbra::testing
