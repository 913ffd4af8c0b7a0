// Change tracking (docs/format/shadow-storage.md section 6): which regions a
// volume's writes, discards and zeroings touched after a snapshot, and when
// the map survives a reopen and when it must be reset. On MemEnv; a FaultEnv
// in front of it simulates a killed process (nothing more reaches the files,
// but everything written so far stays: the page cache survives).
#include <gtest/gtest.h>

#include <sstream>

#include "engine/change_map.h"
#include "engine_harness.h"
#include "io/fault_env.h"

namespace umbra::testing {
namespace {

constexpr uint32_t kChunk = 4096;
constexpr uint64_t kRegion = engine::kChangeRegionSize;  // 256 KiB
constexpr uint64_t kRegions = 16;
constexpr uint64_t kSize = kRegions * kRegion;

// [first, first+count) regions as one byte extent.
Extent Regions(uint64_t first, uint64_t count = 1) { return {first * kRegion, count * kRegion}; }

std::string Show(const std::vector<Extent>& v) {
  std::ostringstream o;
  o << "{";
  for (const Extent& e : v) o << " [" << e.offset << "+" << e.length << ")";
  o << " }";
  return o.str();
}

::testing::AssertionResult ChangedAre(Volume& v, const std::string& tracking, uint64_t epoch,
                                      const std::vector<Extent>& expect) {
  auto got = v.ChangedSince(tracking, epoch);
  if (!got.ok())
    return ::testing::AssertionFailure() << "ChangedSince failed: " << got.status().ToString();
  bool same = got->size() == expect.size();
  for (size_t i = 0; same && i < expect.size(); ++i)
    same = (*got)[i].offset == expect[i].offset && (*got)[i].length == expect[i].length;
  if (!same)
    return ::testing::AssertionFailure()
           << "changed since epoch " << epoch << ": got " << Show(*got) << ", expected "
           << Show(expect);
  return ::testing::AssertionSuccess();
}

// True if some extent of `v` covers [off, off+len).
bool Covers(const std::vector<Extent>& v, uint64_t off, uint64_t len) {
  for (const Extent& e : v)
    if (e.offset <= off && off + len <= e.offset + e.length) return true;
  return false;
}

class ChangeMapTest : public ::testing::Test {
 protected:
  void SetUp() override {
    boot_ = NewUuid();
    cfg_ = MemVolumeConfig(&mem_, "a", kSize, kChunk);
    cfg_.boot_id = boot_;
    auto v = Volume::Create(&fault_, cfg_);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    vol_ = std::move(v).value();
    cfg_.uuid = vol_->config().uuid;
    model_.live.assign(kSize, std::byte{0});
  }

  void Write(uint64_t off, uint64_t len) {
    Bytes b = RandomBytes(rng_, len);
    ASSERT_TRUE(vol_->Write(off, b).ok());
    model_.Write(off, b);
  }
  SnapshotInfo Snap() {
    auto s = vol_->CreateSnapshot({true, "", ""});
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? *s : SnapshotInfo{};
  }
  void Open(const std::string& boot_id) {
    cfg_.boot_id = boot_id;
    auto v = Volume::Open(&fault_, cfg_);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    vol_ = std::move(v).value();
  }
  void CloseAndOpen(const std::string& boot_id) {
    ASSERT_TRUE(vol_->Close().ok());
    vol_.reset();
    Open(boot_id);
  }
  // The process dies: from now on nothing it would still write reaches the
  // files (its destructor's Close achieves nothing), but what it wrote stays.
  void Kill() {
    FaultEnv::Rule rule;
    rule.err = EIO;
    fault_.AddRule(rule);
    vol_.reset();
    fault_.ClearRules();
  }
  std::string MapPath() const { return cfg_.shadow_dir + "/" + engine::kChangeMapName; }
  void FlipMapByte(uint64_t off) {
    auto f = mem_.Open(MapPath(), OpenMode::kReadWrite);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    std::array<std::byte, 1> b;
    ASSERT_TRUE((*f)->ReadAt(off, b).ok());
    b[0] ^= std::byte{0x20};
    ASSERT_TRUE((*f)->WriteAt(off, b).ok());
    ASSERT_TRUE((*f)->Sync().ok());
  }
  // Expectations after the map was reset: the old position is unknown, the
  // new tracking is different and records only what happens from now on.
  void ExpectReset(const SnapshotInfo& old) {
    EXPECT_FALSE(vol_->ChangeMapResetReason().empty());
    EXPECT_EQ(vol_->ChangedSince(old.tracking_id, old.change_epoch).status().code(),
              Code::kNotFound);
    SnapshotInfo s = Snap();
    EXPECT_NE(s.tracking_id, old.tracking_id);
    Uuid u;
    EXPECT_TRUE(ParseUuid(s.tracking_id, u)) << s.tracking_id;
    EXPECT_TRUE(ChangedAre(*vol_, s.tracking_id, s.change_epoch, {}));
    Write(12 * kRegion + 7, 9);
    EXPECT_TRUE(ChangedAre(*vol_, s.tracking_id, s.change_epoch, {Regions(12)}));
  }

  MemEnv mem_;
  FaultEnv fault_{&mem_};
  std::string boot_;
  VolumeConfig cfg_;
  std::unique_ptr<Volume> vol_;
  VolumeModel model_;
  Rng rng_{1234};
};

TEST_F(ChangeMapTest, WritesAfterSnapshotAreReportedPerRegionAndNothingElse) {
  Write(0, 100);  // before the snapshot
  Write(5 * kRegion + 3 * kChunk, kChunk);
  SnapshotInfo s = Snap();
  Uuid u;
  ASSERT_TRUE(ParseUuid(s.tracking_id, u)) << "'" << s.tracking_id << "'";
  EXPECT_GE(s.change_epoch, 1u);
  EXPECT_TRUE(vol_->ChangeMapResetReason().empty());
  EXPECT_TRUE(ChangedAre(*vol_, s.tracking_id, s.change_epoch, {}));

  Write(3 * kRegion + 100, 1);  // one byte inside region 3
  Write(7 * kRegion - 10, kChunk);  // straddles regions 6 and 7
  Write(kSize - 1, 1);  // the volume's last byte
  Write(9 * kRegion, kRegion);  // exactly region 9
  EXPECT_TRUE(ChangedAre(*vol_, s.tracking_id, s.change_epoch,
                         {Regions(3), Regions(6, 2), Regions(9), Regions(15)}));
  // Rewriting a region already reported changes nothing in the answer.
  Write(3 * kRegion, 10);
  EXPECT_TRUE(ChangedAre(*vol_, s.tracking_id, s.change_epoch,
                         {Regions(3), Regions(6, 2), Regions(9), Regions(15)}));
  // Since the map was made (epoch 0), the writes before the snapshot count too.
  EXPECT_TRUE(ChangedAre(*vol_, s.tracking_id, 0,
                         {Regions(0), Regions(3), Regions(5, 3), Regions(9), Regions(15)}));
  EXPECT_TRUE(LiveEquals(*vol_, model_.live));
}

TEST_F(ChangeMapTest, WritesBeforeSnapshotAreNotReported) {
  Write(0, kSize);
  Write(4 * kRegion + 1, 3 * kRegion);
  SnapshotInfo s = Snap();
  EXPECT_TRUE(ChangedAre(*vol_, s.tracking_id, s.change_epoch, {}));
  // Reads, flushes and snapshots are not changes.
  Bytes b(kSize);
  ASSERT_TRUE(vol_->Read(0, b).ok());
  ASSERT_TRUE(vol_->Flush().ok());
  ASSERT_TRUE(vol_->ReadSnapshot(s.id, 0, b).ok());
  SnapshotInfo s2 = Snap();
  EXPECT_TRUE(ChangedAre(*vol_, s.tracking_id, s.change_epoch, {}));
  EXPECT_TRUE(ChangedAre(*vol_, s2.tracking_id, s2.change_epoch, {}));
}

TEST_F(ChangeMapTest, DiscardsAndZeroingOfAllocatedChunksAreChanges) {
  Write(0, kSize);
  SnapshotInfo s = Snap();
  ASSERT_TRUE(vol_->Discard(2 * kRegion + 4 * kChunk, 8 * kChunk).ok());  // whole chunks
  ASSERT_TRUE(vol_->WriteZeroes(11 * kRegion, kRegion).ok());            // a whole region
  ASSERT_TRUE(vol_->Discard(8 * kRegion + 100, 50).ok());                // part of one chunk
  model_.Zero(2 * kRegion + 4 * kChunk, 8 * kChunk);
  model_.Zero(11 * kRegion, kRegion);
  model_.Zero(8 * kRegion + 100, 50);
  EXPECT_TRUE(LiveEquals(*vol_, model_.live));
  EXPECT_TRUE(
      ChangedAre(*vol_, s.tracking_id, s.change_epoch, {Regions(2), Regions(8), Regions(11)}));
}

TEST_F(ChangeMapTest, LaterSnapshotHasLargerEpochAndEarlierOneCoversBoth) {
  SnapshotInfo s1 = Snap();
  Write(1 * kRegion, 10);
  SnapshotInfo s2 = Snap();
  EXPECT_EQ(s2.tracking_id, s1.tracking_id);
  EXPECT_GT(s2.change_epoch, s1.change_epoch);
  Write(2 * kRegion, 10);
  EXPECT_TRUE(ChangedAre(*vol_, s1.tracking_id, s1.change_epoch, {Regions(1, 2)}));
  EXPECT_TRUE(ChangedAre(*vol_, s2.tracking_id, s2.change_epoch, {Regions(2)}));
  // A region changed before s2 and again after it is reported for s2.
  Write(1 * kRegion + 5, 1);
  EXPECT_TRUE(ChangedAre(*vol_, s2.tracking_id, s2.change_epoch, {Regions(1, 2)}));
  SnapshotInfo s3 = Snap();
  EXPECT_GT(s3.change_epoch, s2.change_epoch);
  EXPECT_TRUE(ChangedAre(*vol_, s3.tracking_id, s3.change_epoch, {}));
  EXPECT_TRUE(ChangedAre(*vol_, s1.tracking_id, s1.change_epoch, {Regions(1, 2)}));
}

TEST_F(ChangeMapTest, RegionIsChunkSizeWhenLargerAndLastRegionIsClipped) {
  // 512 KiB chunks: regions are chunks. 16 chunks and 12 KiB more.
  constexpr uint32_t kBig = 512 * 1024;
  constexpr uint64_t kOdd = 16 * uint64_t{kBig} + 3 * 4096;
  VolumeConfig c = MemVolumeConfig(&mem_, "big", kOdd, kBig);
  c.boot_id = boot_;
  auto v = Volume::Create(&mem_, c);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  SnapshotInfo s = *(*v)->CreateSnapshot({true, "", ""});
  ASSERT_TRUE((*v)->Write(3 * uint64_t{kBig} + 1, Pattern(1, 7)).ok());
  ASSERT_TRUE((*v)->Write(kOdd - 1, Pattern(1, 7)).ok());
  EXPECT_TRUE(ChangedAre(**v, s.tracking_id, s.change_epoch,
                         {{3 * uint64_t{kBig}, kBig}, {16 * uint64_t{kBig}, 3 * 4096}}));
}

TEST_F(ChangeMapTest, CleanCloseAndOpenKeepTrackingAndChanges) {
  SnapshotInfo s = Snap();
  Write(3 * kRegion, 10);
  CloseAndOpen(boot_);
  EXPECT_TRUE(vol_->ChangeMapResetReason().empty()) << vol_->ChangeMapResetReason();
  EXPECT_TRUE(ChangedAre(*vol_, s.tracking_id, s.change_epoch, {Regions(3)}));
  Write(10 * kRegion, 10);
  EXPECT_TRUE(ChangedAre(*vol_, s.tracking_id, s.change_epoch, {Regions(3), Regions(10)}));
  SnapshotInfo s2 = Snap();
  EXPECT_EQ(s2.tracking_id, s.tracking_id);
  EXPECT_GT(s2.change_epoch, s.change_epoch);
  EXPECT_TRUE(ChangedAre(*vol_, s2.tracking_id, s2.change_epoch, {}));

  // A clean close is trusted whatever boot opens the map next (a reboot
  // after a clean shutdown), even one that cannot tell its boot id.
  Write(13 * kRegion, 10);
  CloseAndOpen(NewUuid());
  EXPECT_TRUE(vol_->ChangeMapResetReason().empty()) << vol_->ChangeMapResetReason();
  CloseAndOpen("");
  EXPECT_TRUE(vol_->ChangeMapResetReason().empty()) << vol_->ChangeMapResetReason();
  EXPECT_TRUE(ChangedAre(*vol_, s.tracking_id, s.change_epoch,
                         {Regions(3), Regions(10), Regions(13)}));
  EXPECT_TRUE(ChangedAre(*vol_, s2.tracking_id, s2.change_epoch, {Regions(13)}));
  EXPECT_TRUE(LiveEquals(*vol_, model_.live));
}

TEST_F(ChangeMapTest, KilledProcessReopenedBySameBootKeepsTracking) {
  Write(0, kRegion);
  SnapshotInfo s = Snap();
  Write(3 * kRegion, 10);
  Write(14 * kRegion + 5, 2 * kChunk);
  SnapshotInfo s2 = Snap();  // header now holds an epoch never synced
  Write(6 * kRegion, 10);
  Kill();
  Open(boot_);
  EXPECT_TRUE(vol_->ChangeMapResetReason().empty()) << vol_->ChangeMapResetReason();
  EXPECT_TRUE(LiveEquals(*vol_, model_.live));
  EXPECT_TRUE(
      ChangedAre(*vol_, s.tracking_id, s.change_epoch, {Regions(3), Regions(6), Regions(14)}));
  EXPECT_TRUE(ChangedAre(*vol_, s2.tracking_id, s2.change_epoch, {Regions(6)}));
  // Writes after the restart belong to a later epoch than either snapshot.
  Write(1 * kRegion, 1);
  EXPECT_TRUE(ChangedAre(*vol_, s2.tracking_id, s2.change_epoch, {Regions(1), Regions(6)}));
  SnapshotInfo s3 = Snap();
  EXPECT_EQ(s3.tracking_id, s.tracking_id);
  EXPECT_GT(s3.change_epoch, s2.change_epoch);
  EXPECT_TRUE(ChangedAre(*vol_, s3.tracking_id, s3.change_epoch, {}));
  // Killed twice in a row, the second time right after opening.
  Kill();
  Open(boot_);
  Kill();
  Open(boot_);
  EXPECT_TRUE(vol_->ChangeMapResetReason().empty()) << vol_->ChangeMapResetReason();
  EXPECT_TRUE(ChangedAre(*vol_, s2.tracking_id, s2.change_epoch, {Regions(1), Regions(6)}));
}

TEST_F(ChangeMapTest, UncleanStopThenAnotherBootResets) {
  SnapshotInfo s = Snap();
  Write(3 * kRegion, 10);
  Kill();
  Open(NewUuid());
  EXPECT_TRUE(LiveEquals(*vol_, model_.live));
  ExpectReset(s);
}

TEST_F(ChangeMapTest, UncleanStopWithoutBootIdResets) {
  ASSERT_TRUE(vol_->Close().ok());
  vol_.reset();
  Open("");
  SnapshotInfo s = Snap();
  Write(3 * kRegion, 10);
  Kill();
  Open("");
  ExpectReset(s);
}

TEST_F(ChangeMapTest, PowerLossResets) {
  SnapshotInfo s = Snap();
  Write(3 * kRegion, 10);
  ASSERT_TRUE(vol_->Flush().ok());
  Kill();
  mem_.Crash(CrashMode::kDropUnsynced, 1);
  Open(NewUuid());
  ExpectReset(s);
}

TEST_F(ChangeMapTest, CorruptHeaderResets) {
  SnapshotInfo s = Snap();
  Write(3 * kRegion, 10);
  ASSERT_TRUE(vol_->Close().ok());
  vol_.reset();
  FlipMapByte(57);  // inside the epoch
  Open(boot_);
  EXPECT_NE(vol_->ChangeMapResetReason().find("checksum"), std::string::npos)
      << vol_->ChangeMapResetReason();
  ExpectReset(s);
}

TEST_F(ChangeMapTest, ForeignOrMissingMapResets) {
  SnapshotInfo s = Snap();
  Write(3 * kRegion, 10);
  ASSERT_TRUE(vol_->Close().ok());
  vol_.reset();
  FlipMapByte(0);  // the magic
  Open(boot_);
  ExpectReset(s);

  SnapshotInfo s2 = Snap();
  Write(4 * kRegion, 10);
  ASSERT_TRUE(vol_->Close().ok());
  vol_.reset();
  ASSERT_TRUE(mem_.Remove(MapPath()).ok());
  Open(boot_);
  EXPECT_EQ(vol_->ChangedSince(s2.tracking_id, s2.change_epoch).status().code(),
            Code::kNotFound);
}

TEST_F(ChangeMapTest, ShortMapNeverLosesChanges) {
  SnapshotInfo s = Snap();
  Write(9 * kRegion, 10);
  ASSERT_TRUE(vol_->Close().ok());
  vol_.reset();
  {
    auto f = mem_.Open(MapPath(), OpenMode::kReadWrite);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->Truncate(engine::kChangeHeaderSize + 8).ok());  // region 0 only
    ASSERT_TRUE((*f)->Sync().ok());
  }
  Open(boot_);
  // Either the map is reset (the old position is unknown) or region 9 is
  // still reported; never a silent miss.
  auto c = vol_->ChangedSince(s.tracking_id, s.change_epoch);
  if (c.ok()) {
    EXPECT_TRUE(Covers(*c, 9 * kRegion, kRegion)) << "region 9 lost: " << Show(*c);
  } else {
    EXPECT_EQ(c.status().code(), Code::kNotFound);
    EXPECT_FALSE(vol_->ChangeMapResetReason().empty());
  }
}

TEST_F(ChangeMapTest, FailedMapWriteNeverLosesTheChange) {
  SnapshotInfo s = Snap();
  FaultEnv::Rule rule;
  rule.path_substr = engine::kChangeMapName;
  rule.ops = FaultEnv::kWrite;
  rule.err = EIO;
  rule.count = 1;
  fault_.AddRule(rule);
  // The change cannot be recorded. Whether the write is refused or let
  // through with the tracking given up, the region must never be missing
  // from an answer, in this run or (after a kill) the next.
  Status first = vol_->Write(5 * kRegion, Pattern(10, 1));
  fault_.ClearRules();
  if (first.ok()) model_.Write(5 * kRegion, Pattern(10, 1));
  Write(5 * kRegion + 100, 10);  // the map can be written again
  auto expect_region_5 = [&](const char* when) {
    auto c = vol_->ChangedSince(s.tracking_id, s.change_epoch);
    if (c.ok()) {
      EXPECT_TRUE(Covers(*c, 5 * kRegion, kRegion)) << when << ": region 5 lost: " << Show(*c);
    } else {
      EXPECT_EQ(c.status().code(), Code::kNotFound) << when << ": " << c.status().ToString();
    }
  };
  expect_region_5("before the kill");
  Kill();
  Open(boot_);
  EXPECT_TRUE(LiveEquals(*vol_, model_.live));
  expect_region_5("after the kill");
}

TEST_F(ChangeMapTest, UnknownTrackingIdIsNotFound) {
  SnapshotInfo s = Snap();
  EXPECT_EQ(vol_->ChangedSince(NewUuid(), s.change_epoch).status().code(), Code::kNotFound);
  EXPECT_EQ(vol_->ChangedSince("", 0).status().code(), Code::kNotFound);
  EXPECT_TRUE(ChangedAre(*vol_, s.tracking_id, s.change_epoch, {}));
}

}  // namespace
}  // namespace umbra::testing
