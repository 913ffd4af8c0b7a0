// The image repository (docs/format/repository.md): config, chunk objects,
// manifests, encryption, locks. Each test works in its own directory under
// /tmp through the directory store.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <thread>

#include <zstd.h>

#include <nlohmann/json.hpp>

#include "base/checksum.h"
#include "base/random.h"
#include "system_util.h"
#include "umbra/repo.h"

namespace umbra::testing {
namespace {

namespace fs = std::filesystem;
using repo::ChunkId;
using repo::InitOptions;
using repo::Manifest;
using repo::Repository;
using Bytes = std::vector<std::byte>;

constexpr uint32_t kChunk = 64 * 1024;
constexpr size_t kObjectHeader = 20;

Bytes FromString(const std::string& s) {
  Bytes b(s.size());
  std::memcpy(b.data(), s.data(), s.size());
  return b;
}

// An object (docs 2.2) around `plain`: raw codec, no cipher.
Bytes RawObject(const Bytes& plain) {
  Bytes o(kObjectHeader + plain.size());
  std::memcpy(o.data(), "UMBO", 4);
  o[4] = std::byte{1};
  const uint32_t n = static_cast<uint32_t>(plain.size());
  std::memcpy(o.data() + 8, &n, 4);
  std::memcpy(o.data() + 12, &n, 4);
  const uint32_t crc = Crc32(std::span<const std::byte>(o.data(), 16));
  std::memcpy(o.data() + 16, &crc, 4);
  std::memcpy(o.data() + kObjectHeader, plain.data(), plain.size());
  return o;
}

// The plain bytes of an object of a plain repository (raw or zstd).
Bytes PlainOf(const Bytes& obj) {
  uint32_t pn, mn;
  std::memcpy(&pn, obj.data() + 8, 4);
  std::memcpy(&mn, obj.data() + 12, 4);
  Bytes plain(pn);
  if (obj[5] == std::byte{0}) {
    std::memcpy(plain.data(), obj.data() + kObjectHeader, pn);
  } else {
    size_t n = ZSTD_decompress(plain.data(), pn, obj.data() + kObjectHeader, mn);
    EXPECT_EQ(n, pn);
  }
  return plain;
}

uint32_t Le32At(const Bytes& b, size_t off) {
  uint32_t v;
  std::memcpy(&v, b.data() + off, 4);
  return v;
}

bool Contains(const Bytes& hay, std::span<const std::byte> needle) {
  return std::search(hay.begin(), hay.end(), needle.begin(), needle.end()) != hay.end();
}

// Text that zstd shrinks a lot.
Bytes Compressible(size_t n, int seed) {
  std::string s;
  for (int i = 0; s.size() < n; ++i)
    s += "block " + std::to_string(seed) + " line " + std::to_string(i % 50) + " of umbra\n";
  s.resize(n);
  return FromString(s);
}

Bytes Random(Rng& rng, size_t n) {
  Bytes b(n);
  rng.Fill(b);
  return b;
}

// Relative paths of every regular file under `dir`, sorted.
std::vector<std::string> FilesUnder(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  if (!fs::exists(dir, ec)) return out;
  for (auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) out.push_back(fs::relative(e.path(), dir).string());
  std::sort(out.begin(), out.end());
  return out;
}

class RepoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tmp_ = std::make_unique<test_util::TempDir>("umbra-repo-test");
    ASSERT_FALSE(tmp_->path().empty());
    dir_ = tmp_->path();
  }
  void TearDown() override { tmp_.reset(); }

  std::unique_ptr<test_util::TempDir> tmp_;

  std::unique_ptr<repo::Store> Store(const std::string& dir) {
    auto s = repo::OpenDirStore(dir, /*create=*/true);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? std::move(s).value() : nullptr;
  }
  std::unique_ptr<Repository> Init(const InitOptions& opts = {kChunk, "", 32768},
                                   const std::string& dir = "") {
    auto r = Repository::Init(Store(dir.empty() ? dir_ : dir), opts);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::move(r).value() : nullptr;
  }
  Result<std::unique_ptr<Repository>> Open(const std::string& passphrase = "",
                                           const std::string& dir = "") {
    return Repository::Open(Store(dir.empty() ? dir_ : dir), passphrase);
  }
  std::string ObjectPath(const ChunkId& id, const std::string& dir = "") const {
    std::string h = repo::ChunkIdHex(id);
    return (dir.empty() ? dir_ : dir) + "/chunks/" + h.substr(0, 2) + "/" + h;
  }
  // Stores `data` and checks the answer; returns its id.
  ChunkId Put(Repository& r, const Bytes& data) {
    ChunkId id = r.Hash(data);
    auto n = r.PutChunk(id, data);
    EXPECT_TRUE(n.ok()) << n.status().ToString();
    return id;
  }
  Manifest SampleManifest(Repository& r, const std::string& image_id) {
    Manifest m;
    m.id = image_id;
    m.repository = r.id();
    m.volume = "db";
    m.volume_uuid = NewUuid();
    m.size = 5 * uint64_t{r.chunk_size()} + 123;  // 6 chunks, the last one short
    m.chunk_size = r.chunk_size();
    m.created_unix_ns = 1'767'225'600'123'456'789ull;
    m.source = "snapshot";
    m.snapshot_id = NewUuid();
    m.snapshot_set_id = NewUuid();
    m.snapshot_created_unix_ns = 1'767'225'599'000'000'001ull;
    m.writers = "frozen";
    m.filesystem = "ext4";
    m.tracking_id = NewUuid();
    m.tracking_epoch = 41;
    m.base = "65a0b1c2d3e4f506";
    m.stats = {uint64_t{5} * r.chunk_size() + 123, 3, 1, 2, 98765, 12.345};
    ChunkId a = Put(r, Compressible(r.chunk_size(), 1));
    ChunkId b = Put(r, Compressible(123, 2));
    m.chunks = {a, repo::kZeroChunk, a, Put(r, Compressible(r.chunk_size(), 3)),
                repo::kZeroChunk, b};
    return m;
  }

  std::string dir_;
  Rng rng_{99};
};

void ExpectSameManifest(const Manifest& got, const Manifest& m) {
  EXPECT_EQ(got.id, m.id);
  EXPECT_EQ(got.repository, m.repository);
  EXPECT_EQ(got.volume, m.volume);
  EXPECT_EQ(got.volume_uuid, m.volume_uuid);
  EXPECT_EQ(got.size, m.size);
  EXPECT_EQ(got.chunk_size, m.chunk_size);
  EXPECT_EQ(got.created_unix_ns, m.created_unix_ns);
  EXPECT_EQ(got.source, m.source);
  EXPECT_EQ(got.snapshot_id, m.snapshot_id);
  EXPECT_EQ(got.snapshot_set_id, m.snapshot_set_id);
  EXPECT_EQ(got.snapshot_created_unix_ns, m.snapshot_created_unix_ns);
  EXPECT_EQ(got.writers, m.writers);
  EXPECT_EQ(got.filesystem, m.filesystem);
  EXPECT_EQ(got.tracking_id, m.tracking_id);
  EXPECT_EQ(got.tracking_epoch, m.tracking_epoch);
  EXPECT_EQ(got.base, m.base);
  EXPECT_EQ(got.stats.read_bytes, m.stats.read_bytes);
  EXPECT_EQ(got.stats.new_chunks, m.stats.new_chunks);
  EXPECT_EQ(got.stats.reused_chunks, m.stats.reused_chunks);
  EXPECT_EQ(got.stats.zero_chunks, m.stats.zero_chunks);
  EXPECT_EQ(got.stats.stored_bytes, m.stats.stored_bytes);
  EXPECT_EQ(got.stats.seconds, m.stats.seconds);
  EXPECT_TRUE(got.chunks == m.chunks);
}

// ---- config ---------------------------------------------------------------

TEST_F(RepoTest, InitThenOpenRoundTrip) {
  std::string where = dir_ + "/new/repo";  // made by the store
  auto r = Init({128 * 1024, "", 32768}, where);
  ASSERT_NE(r, nullptr);
  Uuid u;
  EXPECT_TRUE(ParseUuid(r->id(), u)) << r->id();
  EXPECT_EQ(r->chunk_size(), 128u * 1024);
  EXPECT_FALSE(r->encrypted());
  std::string cfg;
  {
    Bytes b = test_util::ReadBytes(where + "/umbra-repo.json");
    cfg.assign(reinterpret_cast<const char*>(b.data()), b.size());
  }
  EXPECT_NE(cfg.find("umbra-repository"), std::string::npos) << cfg;
  EXPECT_NE(cfg.find(r->id()), std::string::npos) << cfg;

  auto o = Open("", where);
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ((*o)->id(), r->id());
  EXPECT_EQ((*o)->chunk_size(), 128u * 1024);
  EXPECT_FALSE((*o)->encrypted());

  // Another repository gets another id.
  auto r2 = Init({kChunk, "", 32768}, dir_ + "/second");
  ASSERT_NE(r2, nullptr);
  EXPECT_NE(r2->id(), r->id());
  EXPECT_EQ(r2->chunk_size(), kChunk);
}

TEST_F(RepoTest, InitRejectsBadChunkSizesAndWritesNothing) {
  for (uint32_t c : {32u * 1024, 100'000u, 32u << 20}) {
    auto r = Repository::Init(Store(dir_), {c, "", 32768});
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << c;
  }
  EXPECT_TRUE(FilesUnder(dir_).empty());
  EXPECT_NE(Init({16u << 20, "", 32768}), nullptr);  // both ends are allowed
}

TEST_F(RepoTest, OpenEmptyMissingOrForeignDirectory) {
  EXPECT_EQ(Open().status().code(), Code::kNotFound);
  EXPECT_EQ(repo::OpenDirStore(dir_ + "/absent", false).status().code(), Code::kNotFound);
  EXPECT_FALSE(fs::exists(dir_ + "/absent"));

  const std::string cfg = dir_ + "/umbra-repo.json";
  test_util::WriteBytes(cfg, R"({"format": "something-else", "version": 1, "id": "x"})");
  EXPECT_EQ(Open().status().code(), Code::kCorruption);
  test_util::WriteBytes(cfg, "not json at all {");
  EXPECT_EQ(Open().status().code(), Code::kCorruption);
  test_util::WriteBytes(cfg, R"({"format": "umbra-repository", "version": 2, "id": "x"})");
  EXPECT_EQ(Open().status().code(), Code::kUnsupported);
  test_util::WriteBytes(cfg, R"({"format": "umbra-repository", "version": 1, "id": "x",
                     "chunk_size": 65536, "hash": "md5", "encryption": null})");
  EXPECT_EQ(Open().status().code(), Code::kUnsupported);
  // Refused without writing anything.
  EXPECT_EQ(FilesUnder(dir_), std::vector<std::string>{"umbra-repo.json"});
}

TEST_F(RepoTest, InitRefusesNonEmptyDirectoryAndExistingRepository) {
  test_util::WriteBytes(dir_ + "/notes.txt", "mine");
  auto r = Repository::Init(Store(dir_), {kChunk, "", 32768});
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_FALSE(fs::exists(dir_ + "/umbra-repo.json"));

  std::string other = dir_ + "/other";
  auto first = Init({kChunk, "", 32768}, other);
  ASSERT_NE(first, nullptr);
  Bytes before = test_util::ReadBytes(other + "/umbra-repo.json");
  auto again = Repository::Init(Store(other), {kChunk * 2, "", 32768});
  EXPECT_EQ(again.status().code(), Code::kAlreadyExists);
  EXPECT_TRUE(test_util::ReadBytes(other + "/umbra-repo.json") == before);
  auto o = Open("", other);
  ASSERT_TRUE(o.ok());
  EXPECT_EQ((*o)->id(), first->id());
}

// ---- chunks ---------------------------------------------------------------

TEST_F(RepoTest, CompressibleChunkRoundTrip) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  Bytes data = Compressible(kChunk, 7);
  ChunkId id = r->Hash(data);
  EXPECT_FALSE(*r->HasChunk(id));
  auto n = r->PutChunk(id, data);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_GT(*n, kObjectHeader);
  EXPECT_LT(*n, data.size() / 4);
  EXPECT_TRUE(*r->HasChunk(id));
  Bytes obj = test_util::ReadBytes(ObjectPath(id));
  ASSERT_EQ(obj.size(), *n);
  EXPECT_EQ(std::memcmp(obj.data(), "UMBO", 4), 0);
  EXPECT_EQ(obj[5], std::byte{1});  // zstd
  EXPECT_EQ(obj[6], std::byte{0});  // not encrypted
  Bytes back;
  ASSERT_TRUE(r->GetChunk(id, &back).ok());
  EXPECT_TRUE(back == data);

  // A short (last) chunk too.
  Bytes tail = Compressible(1000, 8);
  ChunkId tid = Put(*r, tail);
  ASSERT_TRUE(r->GetChunk(tid, &back).ok());
  EXPECT_TRUE(back == tail);
  auto list = r->ListChunks();
  ASSERT_TRUE(list.ok());
  std::vector<ChunkId> want{id, tid};
  std::sort(want.begin(), want.end());
  std::sort(list->begin(), list->end());
  EXPECT_TRUE(*list == want);
}

TEST_F(RepoTest, IncompressibleChunkIsStoredRaw) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  Bytes data = Random(rng_, kChunk);
  ChunkId id = r->Hash(data);
  auto n = r->PutChunk(id, data);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, kObjectHeader + kChunk);
  Bytes obj = test_util::ReadBytes(ObjectPath(id));
  ASSERT_EQ(obj.size(), kObjectHeader + kChunk);
  EXPECT_EQ(obj[5], std::byte{0});  // raw
  EXPECT_EQ(std::memcmp(obj.data() + kObjectHeader, data.data(), kChunk), 0);
  Bytes back;
  ASSERT_TRUE(r->GetChunk(id, &back).ok());
  EXPECT_TRUE(back == data);
}

TEST_F(RepoTest, PutOfExistingChunkWritesNothing) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  Bytes data = Compressible(kChunk, 1);
  ChunkId id = Put(*r, data);
  auto files = FilesUnder(dir_);
  // Rule 3.4: an existing object is kept as it is, never rewritten. Replace
  // it by a marker to see that nothing touches it.
  test_util::WriteBytes(ObjectPath(id), "marker");
  auto n = r->PutChunk(id, data);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0u);
  auto reopened = Open();
  ASSERT_TRUE(reopened.ok());
  n = (*reopened)->PutChunk(id, data);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0u);
  EXPECT_TRUE(test_util::ReadBytes(ObjectPath(id)) == FromString("marker"));
  EXPECT_EQ(FilesUnder(dir_), files);  // nothing new, nothing left in tmp/
}

TEST_F(RepoTest, IdenticalContentHasIdenticalIdAndIsStoredOnce) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  // A plain repository's ids are SHA-256 (FIPS 180-2 test vector).
  EXPECT_EQ(repo::ChunkIdHex(r->Hash(FromString("abc"))),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  Bytes a = Random(rng_, kChunk);
  Bytes copy = a;
  Bytes other = a;
  other[kChunk / 2] ^= std::byte{1};
  EXPECT_EQ(r->Hash(a), r->Hash(copy));
  EXPECT_NE(r->Hash(a), r->Hash(other));
  auto n1 = r->PutChunk(r->Hash(a), a);
  auto n2 = r->PutChunk(r->Hash(copy), copy);
  auto n3 = r->PutChunk(r->Hash(other), other);
  ASSERT_TRUE(n1.ok() && n2.ok() && n3.ok());
  EXPECT_GT(*n1, 0u);
  EXPECT_EQ(*n2, 0u);
  EXPECT_GT(*n3, 0u);
  EXPECT_EQ(r->ListChunks()->size(), 2u);

  ChunkId parsed;
  ASSERT_TRUE(repo::ParseChunkId(repo::ChunkIdHex(r->Hash(a)), parsed));
  EXPECT_EQ(parsed, r->Hash(a));
  EXPECT_FALSE(repo::ParseChunkId(repo::ChunkIdHex(r->Hash(a)).substr(1), parsed));
  EXPECT_FALSE(repo::ParseChunkId(std::string(63, 'a') + "g", parsed));
}

TEST_F(RepoTest, DamagedObjectIsCorruption) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  Bytes back;
  EXPECT_EQ(r->GetChunk(r->Hash(FromString("never stored")), &back).code(), Code::kNotFound);

  // Raw object: any flipped byte, header or payload, is caught.
  Bytes raw = Random(rng_, kChunk);
  ChunkId rid = Put(*r, raw);
  const Bytes good_raw = test_util::ReadBytes(ObjectPath(rid));
  std::vector<size_t> where;
  for (size_t i = 0; i < kObjectHeader; ++i) where.push_back(i);
  for (size_t i = kObjectHeader; i < good_raw.size(); i += 997) where.push_back(i);
  where.push_back(good_raw.size() - 1);
  for (size_t i : where) {
    Bytes bad = good_raw;
    bad[i] ^= std::byte{0x04};
    test_util::WriteBytes(ObjectPath(rid), bad);
    Status s = r->GetChunk(rid, &back);
    ASSERT_EQ(s.code(), Code::kCorruption) << "byte " << i << ": " << s.ToString();
    EXPECT_NE(s.message().find(repo::ChunkIdHex(rid)), std::string::npos) << s.message();
  }
  test_util::WriteBytes(ObjectPath(rid), good_raw);
  ASSERT_TRUE(r->GetChunk(rid, &back).ok());

  // Compressed object: every single flipped byte is either caught or (where
  // zstd does not care) decodes to the very same bytes; never wrong data.
  Bytes text = Compressible(kChunk, 5);
  ChunkId cid = Put(*r, text);
  const Bytes good = test_util::ReadBytes(ObjectPath(cid));
  int caught = 0;
  for (size_t i = 0; i < good.size(); ++i) {
    Bytes bad = good;
    bad[i] ^= std::byte{0x10};
    test_util::WriteBytes(ObjectPath(cid), bad);
    back.clear();
    Status s = r->GetChunk(cid, &back);
    if (s.ok()) {
      ASSERT_TRUE(back == text) << "byte " << i << " gave wrong data";
    } else {
      ASSERT_EQ(s.code(), Code::kCorruption) << "byte " << i << ": " << s.ToString();
      ++caught;
    }
  }
  EXPECT_GE(caught, static_cast<int>(good.size()) * 9 / 10);
  // A truncated object, and another chunk's object under this name.
  test_util::WriteBytes(ObjectPath(cid), std::span(good).first(good.size() - 1));
  EXPECT_EQ(r->GetChunk(cid, &back).code(), Code::kCorruption);
  test_util::WriteBytes(ObjectPath(cid), good_raw);
  EXPECT_EQ(r->GetChunk(cid, &back).code(), Code::kCorruption);
}

// ---- manifests ------------------------------------------------------------

TEST_F(RepoTest, ManifestRoundTripsEveryField) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  Manifest m = SampleManifest(*r, repo::NewImageId());
  ASSERT_TRUE(r->PutManifest(m).ok());
  auto got = r->GetManifest(m.id);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectSameManifest(*got, m);
  EXPECT_EQ(got->chunks[1], repo::kZeroChunk);
  EXPECT_EQ(got->chunk_count(), 6u);
  // Through a fresh open too.
  auto o = Open();
  ASSERT_TRUE(o.ok());
  got = (*o)->GetManifest(m.id);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectSameManifest(*got, m);

  // An offline image without snapshot, tracking or base; all zero chunks.
  Manifest off;
  off.id = repo::NewImageId();
  while (off.id == m.id) off.id = repo::NewImageId();
  off.repository = r->id();
  off.volume = "/dev/sdz";
  off.size = 3 * kChunk;
  off.chunk_size = kChunk;
  off.source = "offline";
  off.chunks.assign(3, repo::kZeroChunk);
  ASSERT_TRUE(r->PutManifest(off).ok());
  got = r->GetManifest(off.id);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectSameManifest(*got, off);

  EXPECT_EQ(r->PutManifest(m).code(), Code::kAlreadyExists);
  EXPECT_EQ(r->GetManifest("0123456789abcdef").status().code(), Code::kNotFound);
}

// The bytes on disk follow docs/format/repository.md 2.3 (version 2).
TEST_F(RepoTest, ManifestIsTheDocumentedVersion2Layout) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  Manifest m = SampleManifest(*r, repo::NewImageId());
  ASSERT_TRUE(r->PutManifest(m).ok());
  const Bytes b = PlainOf(test_util::ReadBytes(dir_ + "/images/" + m.id));
  ASSERT_GE(b.size(), 24u + 32u);
  EXPECT_EQ(std::memcmp(b.data(), "UMBI", 4), 0);
  EXPECT_EQ(Le32At(b, 4), 2u);
  const uint32_t h = Le32At(b, 8);
  EXPECT_EQ(Le32At(b, 12), 32u);
  uint64_t c;
  std::memcpy(&c, b.data() + 16, 8);
  ASSERT_EQ(c, 6u);
  ASSERT_EQ(b.size(), 24 + h + 32 * c + 32);
  auto j = nlohmann::json::parse(reinterpret_cast<const char*>(b.data()) + 24,
                                 reinterpret_cast<const char*>(b.data()) + 24 + h);
  EXPECT_EQ(j.at("format"), "umbra-image");
  EXPECT_EQ(j.at("version"), 2);
  EXPECT_EQ(j.at("id"), m.id);
  EXPECT_EQ(j.at("size"), m.size);
  EXPECT_EQ(j.at("tracking").at("epoch"), 41);
  EXPECT_FALSE(j.contains("chunks"));
  EXPECT_FALSE(j.contains("checksum"));
  for (uint64_t i = 0; i < c; ++i)
    EXPECT_EQ(std::memcmp(b.data() + 24 + h + 32 * i, m.chunks[i].data(), 32), 0) << i;
  // A zero chunk is 32 zero bytes; the checksum is SHA-256 of all before it
  // (the id of a plain repository is SHA-256 too).
  EXPECT_TRUE(std::all_of(b.begin() + 24 + h + 32, b.begin() + 24 + h + 64,
                          [](std::byte x) { return x == std::byte{0}; }));
  ChunkId sum = r->Hash(std::span<const std::byte>(b.data(), b.size() - 32));
  EXPECT_EQ(std::memcmp(sum.data(), b.data() + b.size() - 32, 32), 0);
}

// Version 1 manifests (all JSON) written before 2026-11-30 are still read.
TEST_F(RepoTest, Version1ManifestIsStillRead) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  Manifest m = SampleManifest(*r, repo::NewImageId());
  using Json = nlohmann::json;
  Json chunks = Json::array();
  for (const ChunkId& id : m.chunks)
    chunks.push_back(id == repo::kZeroChunk ? Json(0) : Json(repo::ChunkIdHex(id)));
  Json j{{"format", "umbra-image"}, {"version", 1}, {"id", m.id}, {"repository", m.repository},
         {"volume", m.volume}, {"volume_uuid", m.volume_uuid}, {"size", m.size},
         {"chunk_size", m.chunk_size}, {"created", m.created_unix_ns}, {"source", m.source},
         {"snapshot", {{"id", m.snapshot_id}, {"set_id", m.snapshot_set_id},
                       {"created", m.snapshot_created_unix_ns}}},
         {"writers", m.writers}, {"filesystem", m.filesystem},
         {"tracking", {{"id", m.tracking_id}, {"epoch", m.tracking_epoch}}}, {"base", m.base},
         {"stats", {{"read", m.stats.read_bytes}, {"new", m.stats.new_chunks},
                    {"reused", m.stats.reused_chunks}, {"zero", m.stats.zero_chunks},
                    {"stored", m.stats.stored_bytes}, {"seconds", m.stats.seconds}}},
         {"chunks", chunks}};
  const std::string body = j.dump();
  j["checksum"] = repo::ChunkIdHex(r->Hash(FromString(body)));
  fs::create_directories(dir_ + "/images");
  test_util::WriteBytes(dir_ + "/images/" + m.id, RawObject(FromString(j.dump())));
  auto got = r->GetManifest(m.id);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectSameManifest(*got, m);

  // Its checksum is still checked.
  j["volume"] = "other";
  test_util::WriteBytes(dir_ + "/images/" + m.id, RawObject(FromString(j.dump())));
  EXPECT_EQ(r->GetManifest(m.id).status().code(), Code::kCorruption);
}

// A newer manifest version with a good checksum is refused as unsupported,
// not as damage; lengths that do not add up are damage.
TEST_F(RepoTest, NewerOrMisframedVersion2Manifest) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  Manifest m = SampleManifest(*r, repo::NewImageId());
  ASSERT_TRUE(r->PutManifest(m).ok());
  const std::string path = dir_ + "/images/" + m.id;
  const Bytes good = PlainOf(test_util::ReadBytes(path));
  auto reseal = [&](Bytes b) {
    ChunkId sum = r->Hash(std::span<const std::byte>(b.data(), b.size() - 32));
    std::memcpy(b.data() + b.size() - 32, sum.data(), 32);
    return b;
  };
  Bytes newer = good;
  ASSERT_GT(newer.size(), 56u);
  newer.at(4) = std::byte{3};
  test_util::WriteBytes(path, RawObject(reseal(newer)));
  auto got = r->GetManifest(m.id);
  EXPECT_EQ(got.status().code(), Code::kUnsupported) << got.status().ToString();
  EXPECT_NE(got.status().message().find("version 3"), std::string::npos);

  Bytes more = good;  // one entry more than the size needs
  uint64_t c = 7;
  std::memcpy(more.data() + 16, &c, 8);
  more.insert(more.end() - 32, 32, std::byte{0});
  test_util::WriteBytes(path, RawObject(reseal(more)));
  got = r->GetManifest(m.id);
  EXPECT_EQ(got.status().code(), Code::kCorruption);
  EXPECT_NE(got.status().message().find("entries"), std::string::npos) << got.status().message();

  Bytes shorter(good.begin(), good.end() - 1);
  test_util::WriteBytes(path, RawObject(shorter));
  EXPECT_EQ(r->GetManifest(m.id).status().code(), Code::kCorruption);
}

TEST_F(RepoTest, ManifestWithWrongChunkCountIsRejected) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  Manifest m = SampleManifest(*r, "0000000100000001");
  Manifest fewer = m;
  fewer.chunks.pop_back();
  EXPECT_EQ(r->PutManifest(fewer).code(), Code::kInvalidArgument);
  Manifest more = m;
  more.chunks.push_back(repo::kZeroChunk);
  EXPECT_EQ(r->PutManifest(more).code(), Code::kInvalidArgument);
  Manifest bigger = m;
  bigger.size += kChunk;
  EXPECT_EQ(r->PutManifest(bigger).code(), Code::kInvalidArgument);
  EXPECT_TRUE(r->ListImages()->empty());
  EXPECT_TRUE(FilesUnder(dir_ + "/images").empty());
}

TEST_F(RepoTest, TamperedManifestIsCorruption) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  Manifest m = SampleManifest(*r, "0000000100000001");
  ASSERT_TRUE(r->PutManifest(m).ok());
  const std::string path = dir_ + "/images/" + m.id;
  const Bytes good = test_util::ReadBytes(path);
  for (size_t i = 0; i < good.size(); ++i) {
    Bytes bad = good;
    bad[i] ^= std::byte{0x01};
    test_util::WriteBytes(path, bad);
    auto got = r->GetManifest(m.id);
    if (got.ok()) {
      // zstd ignored the flip: the manifest must be the very same.
      ExpectSameManifest(*got, m);
      continue;
    }
    ASSERT_EQ(got.status().code(), Code::kCorruption)
        << "byte " << i << ": " << got.status().ToString();
    EXPECT_NE(got.status().message().find(m.id), std::string::npos) << got.status().message();
  }
  test_util::WriteBytes(path, good);
  ASSERT_TRUE(r->GetManifest(m.id).ok());

  // The same manifest under another image's name, or in another repository.
  test_util::WriteBytes(dir_ + "/images/0000000200000002", good);
  EXPECT_EQ(r->GetManifest("0000000200000002").status().code(), Code::kCorruption);
  auto other = Init({kChunk, "", 32768}, dir_ + "/other");
  ASSERT_NE(other, nullptr);
  fs::create_directories(dir_ + "/other/images");
  test_util::WriteBytes(dir_ + "/other/images/" + m.id, good);
  EXPECT_EQ(other->GetManifest(m.id).status().code(), Code::kCorruption);
}

TEST_F(RepoTest, ListResolveAndDeleteImages) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  const std::string a = "1234aaaa00000001", b = "1234bbbb00000002", c = "5678cccc00000003";
  for (const auto& id : {c, a, b}) {
    Manifest m = SampleManifest(*r, id);
    ASSERT_TRUE(r->PutManifest(m).ok()) << id;
  }
  test_util::WriteBytes(dir_ + "/images/README", "not an image");
  auto list = r->ListImages();
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(*list, (std::vector<std::string>{a, b, c}));

  EXPECT_EQ(*r->ResolveImage("1234a"), a);
  EXPECT_EQ(*r->ResolveImage("1234bbbb"), b);
  EXPECT_EQ(*r->ResolveImage("5678"), c);
  EXPECT_EQ(*r->ResolveImage(c), c);
  EXPECT_EQ(r->ResolveImage("1234").status().code(), Code::kInvalidArgument);  // ambiguous
  EXPECT_NE(r->ResolveImage("1234").status().message().find("ambiguous"), std::string::npos);
  EXPECT_EQ(r->ResolveImage("567").status().code(), Code::kInvalidArgument);  // too short
  EXPECT_EQ(r->ResolveImage("").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(r->ResolveImage("9999").status().code(), Code::kNotFound);
  EXPECT_EQ(r->ResolveImage(c + "0").status().code(), Code::kNotFound);

  Manifest gone = *r->GetManifest(a);
  ASSERT_TRUE(r->DeleteImage(a).ok());
  EXPECT_EQ(r->GetManifest(a).status().code(), Code::kNotFound);
  EXPECT_EQ(r->DeleteImage(a).code(), Code::kNotFound);
  EXPECT_EQ(*r->ListImages(), (std::vector<std::string>{b, c}));
  EXPECT_EQ(*r->ResolveImage("1234"), b);
  // Rule 3.7: only the manifest goes; its objects stay.
  for (const ChunkId& id : gone.chunks) {
    if (id != repo::kZeroChunk) {
      EXPECT_TRUE(*r->HasChunk(id));
    }
  }
}

// ---- encryption -----------------------------------------------------------

TEST_F(RepoTest, EncryptedRepository) {
  const std::string pass = "correct horse battery staple";
  const std::string plain_dir = dir_ + "/plain", enc_dir = dir_ + "/enc";
  auto plain = Init({kChunk, "", 32768}, plain_dir);
  auto r = Init({kChunk, pass, 1024}, enc_dir);
  ASSERT_NE(plain, nullptr);
  ASSERT_NE(r, nullptr);
  EXPECT_TRUE(r->encrypted());
  {
    Bytes cfg = test_util::ReadBytes(enc_dir + "/umbra-repo.json");
    EXPECT_TRUE(Contains(cfg, FromString("hmac-sha256")));
    EXPECT_TRUE(Contains(cfg, FromString("aes-256-gcm")));
    EXPECT_FALSE(Contains(cfg, FromString(pass)));
  }

  // Random data with a recognisable marker: stored raw, so a plain
  // repository's object holds the marker, an encrypted one's must not.
  const Bytes marker = FromString("THE-PLAINTEXT-MARKER-0123456789abcdefghijklmnopqrstuvwxyz");
  Bytes secret = Random(rng_, kChunk);
  std::memcpy(secret.data() + 1000, marker.data(), marker.size());
  Bytes text = Compressible(kChunk, 9);

  ChunkId pid = Put(*plain, secret);
  EXPECT_TRUE(Contains(test_util::ReadBytes(ObjectPath(pid, plain_dir)), marker));
  ChunkId sid = Put(*r, secret);
  ChunkId tid = Put(*r, text);
  EXPECT_NE(sid, plain->Hash(secret));  // keyed ids, not SHA-256
  EXPECT_NE(tid, plain->Hash(text));
  for (const ChunkId& id : {sid, tid}) {
    Bytes obj = test_util::ReadBytes(ObjectPath(id, enc_dir));
    EXPECT_EQ(obj[6], std::byte{1});  // AES-256-GCM
    EXPECT_FALSE(Contains(obj, marker));
    EXPECT_FALSE(Contains(obj, std::span(text).subspan(100, 32)));
  }
  Bytes back;
  ASSERT_TRUE(r->GetChunk(sid, &back).ok());
  EXPECT_TRUE(back == secret);
  ASSERT_TRUE(r->GetChunk(tid, &back).ok());
  EXPECT_TRUE(back == text);
  Manifest m = SampleManifest(*r, "0000000100000001");
  ASSERT_TRUE(r->PutManifest(m).ok());
  EXPECT_EQ(test_util::ReadBytes(enc_dir + "/images/" + m.id)[6], std::byte{1});

  // The objects are bound to their names: another chunk's object is refused.
  const Bytes tobj = test_util::ReadBytes(ObjectPath(tid, enc_dir));
  test_util::WriteBytes(ObjectPath(tid, enc_dir), test_util::ReadBytes(ObjectPath(sid, enc_dir)));
  EXPECT_EQ(r->GetChunk(tid, &back).code(), Code::kCorruption);
  test_util::WriteBytes(ObjectPath(tid, enc_dir), tobj);

  // Reopened with the passphrase: same keys, same ids, everything readable.
  auto o = Open(pass, enc_dir);
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_TRUE((*o)->encrypted());
  EXPECT_EQ((*o)->id(), r->id());
  EXPECT_EQ((*o)->Hash(secret), sid);
  ASSERT_TRUE((*o)->GetChunk(sid, &back).ok());
  EXPECT_TRUE(back == secret);
  auto got = (*o)->GetManifest(m.id);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectSameManifest(*got, m);

  EXPECT_EQ(Open("correct horse battery stapler", enc_dir).status().code(),
            Code::kPermissionDenied);
  EXPECT_EQ(Open("", enc_dir).status().code(), Code::kPermissionDenied);
  // Another encrypted repository with the same passphrase has other keys.
  auto r2 = Init({kChunk, pass, 1024}, dir_ + "/enc2");
  ASSERT_NE(r2, nullptr);
  EXPECT_NE(r2->Hash(secret), sid);
}

// ---- store: locks, temporary files ----------------------------------------

TEST_F(RepoTest, SharedLocksCoexistExclusiveWaitsForThem) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  auto s1 = r->store().Lock(false, false);
  auto s2 = r->store().Lock(false, false);
  ASSERT_TRUE(s1.ok()) << s1.status().ToString();
  ASSERT_TRUE(s2.ok()) << s2.status().ToString();
  EXPECT_EQ(r->store().Lock(true, false).status().code(), Code::kBusy);
  s1->reset();
  EXPECT_EQ(r->store().Lock(true, false).status().code(), Code::kBusy);
  s2->reset();
  auto x = r->store().Lock(true, false);
  ASSERT_TRUE(x.ok()) << x.status().ToString();
  // Another store on the same directory sees the same lock.
  auto other = Store(dir_);
  EXPECT_EQ(other->Lock(false, false).status().code(), Code::kBusy);
  EXPECT_EQ(other->Lock(true, false).status().code(), Code::kBusy);
  x->reset();
  EXPECT_TRUE(other->Lock(false, false).ok());
}

TEST_F(RepoTest, CleanTemporaryRemovesOnlyTmpFiles) {
  auto r = Init();
  ASSERT_NE(r, nullptr);
  ChunkId id = Put(*r, Compressible(kChunk, 1));
  fs::create_directories(dir_ + "/tmp");
  test_util::WriteBytes(dir_ + "/tmp/left-over-1", "partial");
  test_util::WriteBytes(dir_ + "/tmp/left-over-2", "partial");
  auto n = r->store().CleanTemporary();
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 2u);
  EXPECT_TRUE(FilesUnder(dir_ + "/tmp").empty());
  EXPECT_TRUE(*r->HasChunk(id));
  EXPECT_TRUE(fs::exists(dir_ + "/umbra-repo.json"));
  EXPECT_EQ(*r->store().CleanTemporary(), 0u);
  EXPECT_TRUE(Open().ok());
}

TEST(RepoImageIdTest, SixteenHexDigitsThatSortByTime) {
  uint64_t before = static_cast<uint64_t>(std::time(nullptr));
  std::string a = repo::NewImageId();
  std::string a2 = repo::NewImageId();
  uint64_t after = static_cast<uint64_t>(std::time(nullptr));
  ASSERT_EQ(a.size(), 16u);
  EXPECT_EQ(a.find_first_not_of("0123456789abcdef"), std::string::npos) << a;
  uint64_t secs = std::stoull(a.substr(0, 8), nullptr, 16);
  EXPECT_GE(secs, before);
  EXPECT_LE(secs, after);
  EXPECT_NE(a, a2);  // the random half
  // One second later, the id sorts after.
  while (static_cast<uint64_t>(std::time(nullptr)) <= after)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::string b = repo::NewImageId();
  EXPECT_LT(a, b);
  EXPECT_LT(a2, b);
}

}  // namespace
}  // namespace umbra::testing
