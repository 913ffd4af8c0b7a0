// Functional tests of the snapshot engine (on MemEnv unless stated).
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <mutex>
#include <set>
#include <thread>

#include "engine/format.h"
#include "engine_harness.h"
#include "io/posix_env.h"
#include "system_util.h"

namespace umbra::testing {
namespace {

constexpr uint32_t kChunk = 4096;
constexpr uint64_t kSize = 64 * kChunk;

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg_ = MemVolumeConfig(&env_, "a", kSize, kChunk);
    auto v = Volume::Create(&env_, cfg_);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    vol_ = std::move(v).value();
    cfg_.uuid = vol_->config().uuid;
    model_.live.assign(kSize, std::byte{0});
  }
  void Write(uint64_t off, const Bytes& b) {
    ASSERT_TRUE(vol_->Write(off, b).ok());
    model_.Write(off, b);
  }
  std::string Snap(bool persistent = false) {
    auto s = vol_->CreateSnapshot({persistent, "", ""});
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    model_.snaps[s->id] = model_.live;
    return s->id;
  }
  void Reopen() {
    ASSERT_TRUE(vol_->Close().ok());
    vol_.reset();
    auto v = Volume::Open(&env_, cfg_);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    vol_ = std::move(v).value();
  }
  uint64_t Copies() { return vol_->GetStorageUsage().copies; }

  MemEnv env_;
  VolumeConfig cfg_;
  std::unique_ptr<Volume> vol_;
  VolumeModel model_;
  Rng rng_{42};
};

TEST_F(EngineTest, SnapshotIsPointInTime) {
  Write(0, RandomBytes(rng_, kSize));
  std::string s1 = Snap();
  Write(100, RandomBytes(rng_, 3 * kChunk + 17));
  Write(40 * kChunk, RandomBytes(rng_, kChunk));
  EXPECT_TRUE(SnapshotEquals(*vol_, s1, model_.snaps[s1]));
  EXPECT_TRUE(LiveEquals(*vol_, model_.live));
  EXPECT_NE(FirstDiff(model_.live, model_.snaps[s1]), -1);
}

TEST_F(EngineTest, FirstWriteCopiesOnceLaterWritesCopyNothing) {
  Write(0, RandomBytes(rng_, kSize));
  Snap();
  EXPECT_EQ(Copies(), 0u);
  Write(5 * kChunk + 10, RandomBytes(rng_, 100));
  EXPECT_EQ(Copies(), 1u);
  Write(5 * kChunk + 500, RandomBytes(rng_, 100));
  Write(5 * kChunk, RandomBytes(rng_, kChunk));
  EXPECT_EQ(Copies(), 1u);
  Write(5 * kChunk + kChunk - 1, RandomBytes(rng_, 2));  // spills into chunk 6
  EXPECT_EQ(Copies(), 2u);
  EXPECT_EQ(vol_->GetStorageUsage().used_bytes, 2 * kChunk);
}

TEST_F(EngineTest, WriteCopiesAtMostOnceWhatever512SnapshotsExist) {
  Write(0, RandomBytes(rng_, kSize));
  std::vector<std::string> ids;
  for (int i = 0; i < 512; ++i) {
    ids.push_back(Snap());
    // Between snapshots, touch one chunk: exactly one copy each time.
    uint64_t before = Copies();
    Write((i % 64) * kChunk, RandomBytes(rng_, 64));
    ASSERT_EQ(Copies(), before + 1) << "snapshot " << i;
  }
  // Every write after the last snapshot copies at most once per chunk.
  uint64_t before = Copies();
  Write(0, RandomBytes(rng_, kSize));
  EXPECT_LE(Copies() - before, 64u);
  for (size_t i = 0; i < ids.size(); i += 37)
    ASSERT_TRUE(SnapshotEquals(*vol_, ids[i], model_.snaps[ids[i]]));
  ASSERT_TRUE(SnapshotEquals(*vol_, ids.back(), model_.snaps[ids.back()]));
}

TEST_F(EngineTest, DeletingMiddleOldestNewestKeepsOthersExact) {
  std::vector<std::string> ids;
  for (int i = 0; i < 8; ++i) {
    Write(rng_.Uniform(0, kSize - 3 * kChunk), RandomBytes(rng_, 3 * kChunk));
    ids.push_back(Snap(i % 2 == 0));
  }
  Write(0, RandomBytes(rng_, kSize / 2));
  for (int idx : {3, 0, 7, 5}) {
    ASSERT_TRUE(vol_->DeleteSnapshot(ids[idx]).ok());
    model_.snaps.erase(ids[idx]);
    for (auto& [id, bytes] : model_.snaps) ASSERT_TRUE(SnapshotEquals(*vol_, id, bytes));
    Write(rng_.Uniform(0, kSize - kChunk), RandomBytes(rng_, kChunk));
  }
  EXPECT_EQ(vol_->ListSnapshots().size(), 4u);
  // Deleting everything frees all shadow storage.
  for (auto& [id, bytes] : model_.snaps) ASSERT_TRUE(vol_->DeleteSnapshot(id).ok());
  EXPECT_EQ(vol_->GetStorageUsage().used_bytes, 0u);
}

TEST_F(EngineTest, DiscardedChunksCopyNothingReadZerosAndAreNotAllocated) {
  Write(0, RandomBytes(rng_, kSize));
  ASSERT_TRUE(vol_->Discard(8 * kChunk, 4 * kChunk).ok());
  model_.Zero(8 * kChunk, 4 * kChunk);
  EXPECT_TRUE(LiveEquals(*vol_, model_.live));
  std::string s = Snap();
  Write(8 * kChunk, RandomBytes(rng_, 4 * kChunk));  // free at the snapshot: no copy
  EXPECT_EQ(Copies(), 0u);
  EXPECT_EQ(vol_->GetStorageUsage().zero_copies, 4u);
  EXPECT_TRUE(SnapshotEquals(*vol_, s, model_.snaps[s]));
  auto ext = vol_->SnapshotExtents(s);
  ASSERT_TRUE(ext.ok());
  ASSERT_EQ(ext->size(), 2u);
  EXPECT_EQ((*ext)[0].offset, 0u);
  EXPECT_EQ((*ext)[0].length, 8 * kChunk);
  EXPECT_EQ((*ext)[1].offset, 12 * kChunk);
  EXPECT_EQ((*ext)[1].length, kSize - 12 * kChunk);

  // The live volume: the rewritten chunks are allocated again; discard two
  // more and ask for a range that starts and ends inside chunks.
  ASSERT_TRUE(vol_->Discard(20 * kChunk, 2 * kChunk).ok());
  auto live = vol_->LiveExtents(18 * kChunk + 10, 6 * kChunk);
  ASSERT_TRUE(live.ok()) << live.status().ToString();
  ASSERT_EQ(live->size(), 2u);
  EXPECT_EQ((*live)[0].offset, 18 * kChunk + 10);
  EXPECT_EQ((*live)[0].length, 2 * kChunk - 10);
  EXPECT_EQ((*live)[1].offset, 22 * kChunk);
  EXPECT_EQ((*live)[1].length, 2 * kChunk + 10);
  auto all = vol_->LiveExtents(0, kSize);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ((*all)[0].length, 20 * kChunk);
  EXPECT_EQ((*all)[1].offset, 22 * kChunk);
  EXPECT_EQ(vol_->LiveExtents(kSize, 1).status().code(), Code::kInvalidArgument);
  EXPECT_TRUE(vol_->LiveExtents(kSize, 0)->empty());
}

TEST_F(EngineTest, DiscardAfterSnapshotKeepsSnapshotExactAndPartialDiscardReadsZeros) {
  Write(0, RandomBytes(rng_, kSize));
  std::string s = Snap();
  ASSERT_TRUE(vol_->Discard(2 * kChunk + 100, 5 * kChunk).ok());
  model_.Zero(2 * kChunk + 100, 5 * kChunk);
  EXPECT_TRUE(LiveEquals(*vol_, model_.live));
  EXPECT_TRUE(SnapshotEquals(*vol_, s, model_.snaps[s]));
  // Writing into a discarded chunk: the rest of the chunk stays zero.
  Write(4 * kChunk + 10, Pattern(10, 0xAB));
  EXPECT_TRUE(LiveEquals(*vol_, model_.live));
  EXPECT_TRUE(SnapshotEquals(*vol_, s, model_.snaps[s]));
  ASSERT_TRUE(vol_->WriteZeroes(20 * kChunk, 3 * kChunk).ok());
  model_.Zero(20 * kChunk, 3 * kChunk);
  EXPECT_TRUE(LiveEquals(*vol_, model_.live));
  EXPECT_TRUE(SnapshotEquals(*vol_, s, model_.snaps[s]));
}

TEST_F(EngineTest, PersistentSnapshotsSurviveReopenAutoReleaseDoNot) {
  Write(0, RandomBytes(rng_, kSize));
  std::string p = Snap(true);
  Write(0, RandomBytes(rng_, kSize / 2));
  std::string a = Snap(false);
  Write(kSize / 4, RandomBytes(rng_, kSize / 2));
  Reopen();
  auto list = vol_->ListSnapshots();
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].id, p);
  EXPECT_TRUE(list[0].persistent);
  EXPECT_TRUE(SnapshotEquals(*vol_, p, model_.snaps[p]));
  EXPECT_EQ(vol_->ReadSnapshot(a, 0, std::span<std::byte>()).code(), Code::kNotFound);
  EXPECT_TRUE(LiveEquals(*vol_, model_.live));
  // The auto-release snapshot's storage is free again; a new one works.
  Write(0, RandomBytes(rng_, kSize));
  EXPECT_TRUE(SnapshotEquals(*vol_, p, model_.snaps[p]));
  std::string b = Snap(true);
  Write(0, RandomBytes(rng_, kChunk));
  Reopen();
  EXPECT_TRUE(SnapshotEquals(*vol_, p, model_.snaps[p]));
  EXPECT_TRUE(SnapshotEquals(*vol_, b, model_.snaps[b]));
}

TEST_F(EngineTest, AtomicSetAcrossVolumes) {
  VolumeConfig c2 = MemVolumeConfig(&env_, "b", kSize, kChunk);
  auto v2 = Volume::Create(&env_, c2);
  ASSERT_TRUE(v2.ok());
  ASSERT_TRUE(vol_->Write(0, Pattern(kChunk, 1)).ok());
  ASSERT_TRUE((*v2)->Write(0, Pattern(kChunk, 1)).ok());
  // A writer hammers both volumes while the set is taken; at the instant
  // both volumes hold the same generation number.
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    for (uint8_t gen = 2; !stop; ++gen) {  // wraps; compared modulo 256
      // Volume a first, then b: a snapshot set sees b == a or b == a - 1.
      EXPECT_TRUE(vol_->Write(0, Pattern(kChunk, gen)).ok());
      EXPECT_TRUE((*v2)->Write(0, Pattern(kChunk, gen)).ok());
    }
  });
  Volume* vs[] = {vol_.get(), v2->get()};
  for (int i = 0; i < 20; ++i) {
    auto set = CreateSnapshotSet(vs, {true, "set", ""});
    ASSERT_TRUE(set.ok()) << set.status().ToString();
    ASSERT_EQ(set->size(), 2u);
    EXPECT_EQ((*set)[0].set_id, (*set)[1].set_id);
    EXPECT_EQ((*set)[0].set_size, 2u);
    Bytes a(kChunk), b(kChunk);
    ASSERT_TRUE(vol_->ReadSnapshot((*set)[0].id, 0, a).ok());
    ASSERT_TRUE((*v2)->ReadSnapshot((*set)[1].id, 0, b).ok());
    uint8_t ga = std::to_integer<uint8_t>(a[0]), gb = std::to_integer<uint8_t>(b[0]);
    uint8_t lag = static_cast<uint8_t>(ga - gb);
    EXPECT_TRUE(lag == 0 || lag == 1) << int(ga) << " vs " << int(gb);
  }
  stop = true;
  writer.join();
  // Reconcile: a complete set is kept.
  auto r = ReconcileSnapshotSets(vs);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 0u);
  // An incomplete set (b's member gone) is removed from a.
  for (auto& s : (*v2)->ListSnapshots()) ASSERT_TRUE((*v2)->DeleteSnapshot(s.id).ok());
  r = ReconcileSnapshotSets(vs);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 20u);
  EXPECT_TRUE(vol_->ListSnapshots().empty());
}

TEST_F(EngineTest, ConcurrentWritersAndSnapshotReaders) {
  Write(0, RandomBytes(rng_, kSize));
  std::string s = Snap();
  std::atomic<bool> stop{false};
  std::vector<std::thread> ts;
  for (int t = 0; t < 3; ++t) {
    ts.emplace_back([&, t] {
      Rng r(t + 100);
      while (!stop) {
        Bytes b = RandomBytes(r, r.Uniform(1, 3 * kChunk));
        uint64_t off = r.Uniform(0, kSize - b.size());
        EXPECT_TRUE(vol_->Write(off, b).ok());
      }
    });
  }
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(SnapshotEquals(*vol_, s, model_.snaps[s]));
  stop = true;
  for (auto& t : ts) t.join();
  ASSERT_TRUE(SnapshotEquals(*vol_, s, model_.snaps[s]));
}

// ---- bad input: clear errors, nothing modified ----

TEST_F(EngineTest, RefusesShadowStorageOnTheVolumeItself) {
  VolumeConfig c = MemVolumeConfig(&env_, "c", kSize, kChunk);
  env_.SetVolumeDir(c.shadow_dir, c.origin_path);
  auto v = Volume::Create(&env_, c);
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), Code::kInvalidArgument);
  EXPECT_NE(v.status().message().find("on the volume itself"), std::string::npos);
}

TEST_F(EngineTest, RejectsBadConfig) {
  VolumeConfig c = MemVolumeConfig(&env_, "d", kSize, 3000);
  EXPECT_EQ(Volume::Create(&env_, c).status().code(), Code::kInvalidArgument);
  c.chunk_size = 1 << 20;  // larger than the volume
  EXPECT_EQ(Volume::Create(&env_, c).status().code(), Code::kInvalidArgument);
  // Creating twice in one place.
  EXPECT_EQ(Volume::Create(&env_, cfg_).status().code(), Code::kAlreadyExists);
  // Opening needs a UUID; unknown directory.
  VolumeConfig o = cfg_;
  o.uuid.clear();
  EXPECT_EQ(Volume::Open(&env_, o).status().code(), Code::kInvalidArgument);
  o = cfg_;
  o.shadow_dir = "/nowhere";
  EXPECT_EQ(Volume::Open(&env_, o).status().code(), Code::kNotFound);
}

TEST_F(EngineTest, UnknownSnapshotAndOutOfRange) {
  EXPECT_EQ(vol_->DeleteSnapshot("nope").code(), Code::kNotFound);
  Bytes b(10);
  EXPECT_EQ(vol_->ReadSnapshot("nope", 0, b).code(), Code::kNotFound);
  EXPECT_EQ(vol_->Write(kSize - 5, b).code(), Code::kInvalidArgument);
  EXPECT_EQ(vol_->Read(kSize, b).code(), Code::kInvalidArgument);
  EXPECT_EQ(vol_->SetMaxSize(MaxSize::Bytes(100)).code(), Code::kInvalidArgument);
  EXPECT_EQ(MaxSize::Parse("0").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(MaxSize::Parse("101%").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(MaxSize::Parse("garbage").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(MaxSize::Parse("20%")->value, 20u);
  EXPECT_EQ(MaxSize::Parse("1G")->value, 1ull << 30);
  EXPECT_EQ(MaxSize::Parse("unbounded")->kind, MaxSize::Kind::kUnbounded);
}

class CorruptMetadataTest : public EngineTest {
 protected:
  // Closes the volume; returns every shadow file's bytes for later comparison.
  std::map<std::string, Bytes> CloseAndSnapshotFiles() {
    EXPECT_TRUE(vol_->Close().ok());
    vol_.reset();
    std::map<std::string, Bytes> files;
    auto names = env_.ListDir(cfg_.shadow_dir);
    EXPECT_TRUE(names.ok());
    for (const auto& n : names.value()) files[n] = env_.ReadWholeFile(cfg_.shadow_dir + "/" + n).value();
    return files;
  }
  void ExpectUnchanged(const std::map<std::string, Bytes>& before) {
    auto names = env_.ListDir(cfg_.shadow_dir);
    ASSERT_TRUE(names.ok());
    EXPECT_EQ(names.value().size(), before.size());
    for (const auto& [n, b] : before) {
      auto got = env_.ReadWholeFile(cfg_.shadow_dir + "/" + n);
      ASSERT_TRUE(got.ok()) << n;
      EXPECT_TRUE(got.value() == b) << n << " was modified";
    }
  }
  void Overwrite(const std::string& name, uint64_t off, const Bytes& b) {
    auto f = env_.Open(cfg_.shadow_dir + "/" + name, OpenMode::kReadWrite);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->WriteAt(off, b).ok());
    ASSERT_TRUE((*f)->Sync().ok());
  }
};

TEST_F(CorruptMetadataTest, FlippedByteInCheckpoint) {
  Write(0, RandomBytes(rng_, kSize));
  Snap(true);
  Write(0, RandomBytes(rng_, kSize));
  auto files = CloseAndSnapshotFiles();
  Bytes ck = files[engine::kCheckpointName];
  for (uint64_t off : {uint64_t{3}, uint64_t{40}, uint64_t{130}, ck.size() - 1}) {
    Bytes b = {ck[off] ^ std::byte{0x5a}};
    Overwrite(engine::kCheckpointName, off, b);
    auto before = files;
    before[engine::kCheckpointName][off] = b[0];
    auto v = Volume::Open(&env_, cfg_);
    ASSERT_FALSE(v.ok()) << "offset " << off;
    EXPECT_EQ(v.status().code(), Code::kCorruption) << v.status().ToString();
    ExpectUnchanged(before);
    Overwrite(engine::kCheckpointName, off, {ck[off]});
  }
  EXPECT_TRUE(Volume::Open(&env_, cfg_).ok());
}

TEST_F(CorruptMetadataTest, TruncatedCheckpointAndMissingJournal) {
  Snap(true);
  auto files = CloseAndSnapshotFiles();
  {
    auto f = env_.Open(cfg_.shadow_dir + "/" + engine::kCheckpointName, OpenMode::kReadWrite);
    ASSERT_TRUE((*f)->Truncate(60).ok());
  }
  auto v = Volume::Open(&env_, cfg_);
  EXPECT_EQ(v.status().code(), Code::kCorruption);
  EXPECT_NE(v.status().message().find("truncated"), std::string::npos) << v.status().ToString();
  Overwrite(engine::kCheckpointName, 0, files[engine::kCheckpointName]);
  // Remove the journal the checkpoint names.
  for (auto& [n, b] : files) {
    if (n.rfind(engine::kJournalPrefix, 0) == 0) {
      ASSERT_TRUE(env_.Remove(cfg_.shadow_dir + "/" + n).ok());
    }
  }
  v = Volume::Open(&env_, cfg_);
  EXPECT_EQ(v.status().code(), Code::kCorruption);
  EXPECT_NE(v.status().message().find("missing"), std::string::npos) << v.status().ToString();
}

TEST_F(CorruptMetadataTest, ForeignVolume) {
  auto files = CloseAndSnapshotFiles();
  VolumeConfig other = cfg_;
  other.uuid = NewUuid();
  auto v = Volume::Open(&env_, other);
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("belongs to another volume"), std::string::npos)
      << v.status().ToString();
  ExpectUnchanged(files);
  // Same UUID, different origin size.
  auto f = env_.Open(cfg_.origin_path, OpenMode::kReadWrite);
  ASSERT_TRUE((*f)->Truncate(kSize * 2).ok());
  v = Volume::Open(&env_, cfg_);
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("was made for a volume of"), std::string::npos);
  ExpectUnchanged(files);
  // Different chunk size.
  ASSERT_TRUE((*f)->Truncate(kSize).ok());
  VolumeConfig c = cfg_;
  c.chunk_size = 2 * kChunk;
  v = Volume::Open(&env_, c);
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("chunk size"), std::string::npos);
  ExpectUnchanged(files);
}

TEST_F(CorruptMetadataTest, NotShadowStorageAtAll) {
  auto files = CloseAndSnapshotFiles();
  Bytes junk(300, std::byte{'x'});
  Overwrite(engine::kCheckpointName, 0, junk);
  auto v = Volume::Open(&env_, cfg_);
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("bad magic"), std::string::npos) << v.status().ToString();
}

// ---- the real filesystem ----

TEST(EnginePosixTest, FileBackedVolumeRoundTrip) {
  namespace fs = std::filesystem;
  fs::path dir = fs::temp_directory_path() / ("umbra-engine-test-" + NewUuid());
  fs::create_directories(dir);
  struct Cleanup {
    fs::path d;
    ~Cleanup() { fs::remove_all(d); }
  } cleanup{dir};
  Env* env = DefaultEnv();
  {
    auto f = env->Open((dir / "vol.img").string(), OpenMode::kCreate);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->Truncate(8 << 20).ok());
  }
  VolumeConfig c;
  c.origin_path = (dir / "vol.img").string();
  c.shadow_dir = (dir / "shadow").string();
  Rng rng(7);
  Bytes base = RandomBytes(rng, 8 << 20);
  std::string id;
  {
    auto v = Volume::Create(env, c);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    c.uuid = (*v)->config().uuid;
    ASSERT_TRUE((*v)->Write(0, base).ok());
    auto s = (*v)->CreateSnapshot({true, "posix", ""});
    ASSERT_TRUE(s.ok());
    id = s->id;
    ASSERT_TRUE((*v)->Write(12345, RandomBytes(rng, 3 << 20)).ok());
    ASSERT_TRUE((*v)->Discard(5 << 20, 1 << 20).ok());
    ASSERT_TRUE((*v)->Flush().ok());
    EXPECT_GT((*v)->GetStorageUsage().allocated_bytes, 3u << 20);
  }
  auto v = Volume::Open(env, c);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_TRUE(SnapshotEquals(**v, id, base));
}

}  // namespace
}  // namespace umbra::testing

namespace umbra::testing {
namespace {

using engine::Record;
using engine::RecordType;

std::vector<Record> SampleRecords() {
  std::vector<Record> rs;
  Record r;
  r.type = RecordType::kConfig;
  r.max_kind = 1;
  r.max_value = 20;
  r.protection = 1;
  r.copy_timeout_ms = 1234;
  rs.push_back(r);
  r = Record{};
  r.type = RecordType::kSnapCreate;
  r.seq = 7;
  r.snap_uuid[3] = 9;
  r.flags = 1;
  r.created_unix_ns = 123456789;
  r.set_uuid[15] = 4;
  r.set_size = 3;
  r.name = "nightly";
  rs.push_back(r);
  r = Record{};
  r.type = RecordType::kSnapInvalidate;
  r.seq = 7;
  r.cause = 2;
  r.name = "EIO";
  rs.push_back(r);
  r = Record{};
  r.type = RecordType::kException;
  r.chunk = 99;
  r.key = 7;
  r.slot = engine::kZeroSlot;
  rs.push_back(r);
  for (auto t : {RecordType::kFree, RecordType::kAlloc, RecordType::kNewestFree}) {
    r = Record{};
    r.type = t;
    r.chunk = 5;
    r.count = 6;
    rs.push_back(r);
  }
  for (auto t : {RecordType::kSnapDelete, RecordType::kNextSeq}) {
    r = Record{};
    r.type = t;
    r.seq = 42;
    rs.push_back(r);
  }
  return rs;
}

TEST(FormatTest, RecordsRoundTripAndAnyFlippedByteIsRejected) {
  uint64_t lsn = 1;
  for (Record r : SampleRecords()) {
    r.lsn = lsn++;
    std::vector<std::byte> enc;
    engine::EncodeRecord(r, enc);
    Record d;
    ASSERT_EQ(engine::DecodeRecord(enc, d), enc.size()) << engine::RecordTypeName(r.type);
    EXPECT_EQ(d.type, r.type);
    EXPECT_EQ(d.lsn, r.lsn);
    EXPECT_EQ(d.seq, r.seq);
    EXPECT_EQ(d.chunk, r.chunk);
    EXPECT_EQ(d.key, r.key);
    EXPECT_EQ(d.slot, r.slot);
    EXPECT_EQ(d.count, r.count);
    EXPECT_EQ(d.name, r.name);
    EXPECT_EQ(d.snap_uuid, r.snap_uuid);
    EXPECT_EQ(d.set_size, r.set_size);
    for (size_t i = 0; i < enc.size(); ++i) {
      auto bad = enc;
      bad[i] ^= std::byte{0x01};
      EXPECT_EQ(engine::DecodeRecord(bad, d), 0u) << "flip at " << i << " accepted";
    }
    // Every truncation is rejected too.
    for (size_t n = 0; n < enc.size(); ++n)
      EXPECT_EQ(engine::DecodeRecord(std::span(enc.data(), n), d), 0u);
  }
}

TEST(FormatTest, RandomBytesNeverDecodeOrCrash) {
  Rng rng(77);
  Record d;
  size_t accepted = 0;
  for (int i = 0; i < 200000; ++i) {
    Bytes b = RandomBytes(rng, rng.Uniform(0, 64));
    accepted += engine::DecodeRecord(b, d) != 0;
  }
  EXPECT_EQ(accepted, 0u);
}

TEST(FormatTest, HeadersRoundTrip) {
  engine::CheckpointHeader h;
  h.volume_uuid[0] = 1;
  h.volume_size = 1 << 30;
  h.chunk_size = 65536;
  h.journal_gen = 3;
  h.next_lsn = 77;
  h.body_length = 5;
  h.body_crc = 0xabcdef;
  auto enc = engine::EncodeCheckpointHeader(h);
  engine::CheckpointHeader d;
  ASSERT_TRUE(engine::DecodeCheckpointHeader(enc, d).ok());
  EXPECT_EQ(d.volume_size, h.volume_size);
  EXPECT_EQ(d.journal_gen, 3u);
  EXPECT_EQ(d.next_lsn, 77u);
  EXPECT_EQ(d.body_crc, h.body_crc);
  engine::JournalHeader jh{h.volume_uuid, 9, 100};
  auto jenc = engine::EncodeJournalHeader(jh);
  engine::JournalHeader jd;
  ASSERT_TRUE(engine::DecodeJournalHeader(jenc, jd).ok());
  EXPECT_EQ(jd.generation, 9u);
  EXPECT_EQ(jd.first_lsn, 100u);
  jenc[40] ^= std::byte{1};
  EXPECT_EQ(engine::DecodeJournalHeader(jenc, jd).code(), Code::kCorruption);
}

// ------------------------------------------------------ WriteAsync --

// Four threads write 4 KiB blocks through WriteAsync under a snapshot; each
// block has one writer, and every 16 KiB chunk is shared by all four, so
// first writes of the same chunk race. Every `done` is called exactly once,
// the snapshot keeps the instant, the live volume has every write, and each
// chunk was copied once.
void ConcurrentAsyncFirstWrites(Env* env, const VolumeConfig& cfg, uint64_t size) {
  constexpr uint64_t kBlock = 4096;
  auto v = Volume::Create(env, cfg);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  Rng rng(42);
  Bytes base = RandomBytes(rng, size);
  ASSERT_TRUE((*v)->Write(0, base).ok());
  auto snap = (*v)->CreateSnapshot({false, "", ""});
  ASSERT_TRUE(snap.ok()) << snap.status().ToString();
  Bytes live = base;
  const uint64_t blocks = size / kBlock;
  std::vector<Bytes> data(blocks);
  for (uint64_t b = 0; b < blocks; ++b) {
    data[b] = RandomBytes(rng, kBlock);
    std::memcpy(live.data() + b * kBlock, data[b].data(), kBlock);
  }
  std::atomic<uint64_t> done_calls{0}, errors{0}, other_thread{0};
  std::vector<std::atomic<int>> calls(blocks);
  std::vector<std::thread> threads;
  for (uint64_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<uint64_t> mine;
      for (uint64_t b = t; b < blocks; b += 4) mine.push_back(b);
      Rng r(t + 1);
      for (size_t i = mine.size(); i > 1; --i) std::swap(mine[i - 1], mine[r.Uniform(0, i - 1)]);
      const auto me = std::this_thread::get_id();
      for (uint64_t b : mine) {
        (*v)->WriteAsync(b * kBlock, data[b], false, [&, b, me](Status s) {
          if (!s.ok()) errors.fetch_add(1);
          if (std::this_thread::get_id() != me) other_thread.fetch_add(1);
          calls[b].fetch_add(1);
          done_calls.fetch_add(1);
        });
      }
    });
  }
  for (auto& th : threads) th.join();
  // A snapshot instant waits for every write in flight.
  auto snap2 = (*v)->CreateSnapshot({false, "", ""});
  ASSERT_TRUE(snap2.ok()) << snap2.status().ToString();
  EXPECT_EQ(done_calls.load(), blocks);
  EXPECT_EQ(errors.load(), 0u);
  for (uint64_t b = 0; b < blocks; ++b) ASSERT_EQ(calls[b].load(), 1) << "block " << b;
  // The point of the asynchronous path: writes finished on the I/O thread.
  EXPECT_GT(other_thread.load(), 0u);
  EXPECT_TRUE(LiveEquals(**v, live));
  EXPECT_TRUE(SnapshotEquals(**v, snap->id, base));
  EXPECT_TRUE(SnapshotEquals(**v, snap2->id, live));
  EXPECT_EQ((*v)->GetStorageUsage().copies, size / cfg.chunk_size);
}

// A volume on real files in `dir`: a zero-filled origin of `size` bytes and
// shadow storage beside it, 16 KiB chunks. origin_path is empty on failure.
VolumeConfig RealFileVolumeConfig(const test_util::TempDir& dir, uint64_t size) {
  VolumeConfig c;
  EXPECT_FALSE(dir.path().empty());
  if (dir.path().empty()) return c;
  const std::string origin = (std::filesystem::path(dir.path()) / "vol.img").string();
  auto f = DefaultEnv()->Open(origin, OpenMode::kCreate);
  EXPECT_TRUE(f.ok() && (*f)->Truncate(size).ok());
  if (!f.ok()) return c;
  c.origin_path = origin;
  c.shadow_dir = (std::filesystem::path(dir.path()) / "shadow").string();
  c.chunk_size = 16384;
  return c;
}

TEST(AsyncWriteTest, ConcurrentFirstWritesOnRealFiles) {
  test_util::TempDir dir("umbra-engine-test");
  const uint64_t size = 4 << 20;
  VolumeConfig c = RealFileVolumeConfig(dir, size);
  ASSERT_FALSE(c.origin_path.empty());
  ConcurrentAsyncFirstWrites(DefaultEnv(), c, size);
}

TEST(AsyncWriteTest, ConcurrentFirstWritesInMemory) {
  MemEnv env;
  const uint64_t size = 1 << 20;
  VolumeConfig c = MemVolumeConfig(&env, "a", size, 16384);
  ConcurrentAsyncFirstWrites(&env, c, size);
}

// Closing the volume with writes still in flight finishes them first: every
// `done` has been called when the Volume is gone, and a persistent snapshot
// reopens exact.
TEST(AsyncWriteTest, DestroyFinishesWritesInFlight) {
  test_util::TempDir dir("umbra-engine-test");
  const uint64_t size = 1 << 20;
  VolumeConfig c = RealFileVolumeConfig(dir, size);
  ASSERT_FALSE(c.origin_path.empty());
  Rng rng(7);
  Bytes base = RandomBytes(rng, size);
  Bytes live = base;
  std::string id;
  std::atomic<int> done_calls{0}, errors{0};
  int issued = 0;
  {
    auto v = Volume::Create(DefaultEnv(), c);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    c.uuid = (*v)->config().uuid;
    ASSERT_TRUE((*v)->Write(0, base).ok());
    auto snap = (*v)->CreateSnapshot({true, "", ""});
    ASSERT_TRUE(snap.ok());
    id = snap->id;
    for (uint64_t off = 0; off < size; off += 16384, ++issued) {
      Bytes b = RandomBytes(rng, 512);
      std::memcpy(live.data() + off + 1000, b.data(), b.size());
      (*v)->WriteAsync(off + 1000, b, false, [&](Status s) {
        if (!s.ok()) errors.fetch_add(1);
        done_calls.fetch_add(1);
      });
    }
  }  // ~Volume
  EXPECT_EQ(done_calls.load(), issued);
  EXPECT_EQ(errors.load(), 0);
  auto v = Volume::Open(DefaultEnv(), c);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_TRUE(LiveEquals(**v, live));
  EXPECT_TRUE(SnapshotEquals(**v, id, base));
}

// Long first writes read the old chunks with O_DIRECT (past the page cache)
// and write them to shadow storage the same way. The origin's latest
// contents are still dirty in the page cache here (no sync since they were
// written, and a non-persistent snapshot does not sync the origin), so a
// direct read that did not see them would preserve the zeros on disk
// instead: the snapshots must still read the old contents, also after the
// volume is reopened (the persistent one).
TEST(CopyReadTest, LongFirstWritesPreserveContentsStillInThePageCache) {
  test_util::TempDir dir("umbra-engine-test");
  const uint64_t size = 8 << 20;
  VolumeConfig c = RealFileVolumeConfig(dir, size);
  ASSERT_FALSE(c.origin_path.empty());
  auto v = Volume::Create(DefaultEnv(), c);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  Rng rng(11);
  Bytes base = RandomBytes(rng, size);
  ASSERT_TRUE((*v)->Write(0, base).ok());
  auto a = (*v)->CreateSnapshot({false, "a", ""});
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  Bytes live = base;
  auto write = [&](uint64_t off, size_t len) {
    Bytes b = RandomBytes(rng, len);
    std::memcpy(live.data() + off, b.data(), len);
    Status s = (*v)->Write(off, b);
    EXPECT_TRUE(s.ok()) << s.ToString();
  };
  write(3 * 16384 + 4096, (1 << 20) + 8192);  // 65 chunks, unaligned at both ends
  write(2 << 20, 1 << 20);                     // 64 chunks, aligned
  write((4 << 20) + 512, 300 << 10);           // a 19-chunk run
  write(size - (512 << 10), 512 << 10);        // the last chunks of the volume
  Bytes after_a = live;
  auto b = (*v)->CreateSnapshot({true, "b", ""});
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  write(1 << 20, 3 << 20);  // copied and uncopied chunks for a, all new for b
  EXPECT_TRUE(SnapshotEquals(**v, a->id, base));
  EXPECT_TRUE(SnapshotEquals(**v, b->id, after_a));
  EXPECT_TRUE(LiveEquals(**v, live));
  c.uuid = (*v)->config().uuid;
  v->reset();
  auto r = Volume::Open(DefaultEnv(), c);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(SnapshotEquals(**r, b->id, after_a));
  EXPECT_TRUE(LiveEquals(**r, live));
}

}  // namespace
}  // namespace umbra::testing
