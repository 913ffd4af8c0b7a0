// Imaging (include/umbra/imaging.h): image create from a file source,
// restore (full and delta), verify, gc, prune selection, the read-only image
// device and filesystem detection, over a directory repository
// (docs/format/repository.md) with 64 KiB chunks. Each test works in its own
// directory under /tmp; sources are sparse regular files made with
// ftruncate + pwrite, so FileSource::Allocated (SEEK_DATA/SEEK_HOLE) sees holes.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/random.h"
#include "system_util.h"
#include "umbra/imaging.h"
#include "umbra/repo.h"

namespace umbra::testing {
namespace {

namespace fs = std::filesystem;
using imaging::CreateOptions;
using imaging::Range;
using imaging::RestoreOptions;
using imaging::RestoreStats;
using repo::ChunkId;
using repo::kZeroChunk;
using repo::Manifest;
using repo::Repository;
using Bytes = std::vector<std::byte>;

constexpr uint64_t kChunk = 64 * 1024;
constexpr size_t kObjectHeader = 20;  // docs/format/repository.md 2.2

Bytes Random(Rng& rng, size_t n) {
  Bytes b(n);
  rng.Fill(b);
  return b;
}

// Text that zstd shrinks a lot.
Bytes Text(size_t n, int seed) {
  std::string s;
  for (int i = 0; s.size() < n; ++i)
    s += "chunk " + std::to_string(seed) + " line " + std::to_string(i % 40) + " of umbra\n";
  s.resize(n);
  Bytes b(n);
  std::memcpy(b.data(), s.data(), n);
  return b;
}

void FlipByte(const std::string& path, uint64_t off) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  ASSERT_TRUE(f.good()) << path;
  f.seekg(static_cast<std::streamoff>(off));
  char c = 0;
  f.read(&c, 1);
  ASSERT_TRUE(f.good()) << path << " has no byte " << off;
  c = static_cast<char>(c ^ 0x5a);
  f.seekp(static_cast<std::streamoff>(off));
  f.write(&c, 1);
  ASSERT_TRUE(f.good()) << path;
}

// A sparse file: `size` bytes of which only `writes` are written (the rest
// are holes).
struct Layout {
  uint64_t size = 0;
  std::vector<std::pair<uint64_t, Bytes>> writes;

  void Put(uint64_t off, Bytes b) { writes.emplace_back(off, std::move(b)); }
  Bytes Content() const {
    Bytes out(size);
    for (const auto& [off, b] : writes) std::memcpy(out.data() + off, b.data(), b.size());
    return out;
  }
  uint64_t WrittenBytes() const {
    uint64_t n = 0;
    for (const auto& w : writes) n += w.second.size();
    return n;
  }
};

void WriteSparse(const std::string& path, const Layout& l) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0) << path << ": " << std::strerror(errno);
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(l.size)), 0) << std::strerror(errno);
  for (const auto& [off, b] : l.writes) {
    ASSERT_LE(off + b.size(), l.size);
    ASSERT_EQ(::pwrite(fd, b.data(), b.size(), static_cast<off_t>(off)),
              static_cast<ssize_t>(b.size()))
        << std::strerror(errno);
  }
  ASSERT_EQ(::fsync(fd), 0);
  ::close(fd);
}

// Chunk indexes whose bytes differ between two equally sized buffers.
uint64_t DifferingChunks(const Bytes& a, const Bytes& b) {
  EXPECT_EQ(a.size(), b.size());
  uint64_t n = 0;
  for (uint64_t off = 0; off < a.size(); off += kChunk) {
    uint64_t len = std::min<uint64_t>(kChunk, a.size() - off);
    if (std::memcmp(a.data() + off, b.data() + off, len) != 0) ++n;
  }
  return n;
}

std::vector<std::string> Sorted(std::vector<std::string> v) {
  std::sort(v.begin(), v.end());
  return v;
}

class ImagingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tmp_ = std::make_unique<test_util::TempDir>("umbra-imaging-test");
    ASSERT_FALSE(tmp_->path().empty());
    dir_ = tmp_->path();
    repo_dir_ = dir_ + "/repo";
    auto store = repo::OpenDirStore(repo_dir_, /*create=*/true);
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    repo::InitOptions opts;
    opts.chunk_size = kChunk;  // the smallest allowed: small test files
    auto r = Repository::Init(std::move(store).value(), opts);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    repo_ = std::shared_ptr<Repository>(std::move(r).value());
    ASSERT_EQ(repo_->chunk_size(), kChunk);
  }
  void TearDown() override {
    repo_.reset();
    tmp_.reset();
  }

  std::unique_ptr<test_util::TempDir> tmp_;

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::string ObjectPath(const ChunkId& id) const {
    std::string h = repo::ChunkIdHex(id);
    return repo_dir_ + "/chunks/" + h.substr(0, 2) + "/" + h;
  }
  std::string ManifestPath(const std::string& id) const { return repo_dir_ + "/images/" + id; }

  // Images the file at `path`; with `store`, writes the manifest too.
  Manifest Build(const std::string& path, const CreateOptions& opts = {}, bool store = true) {
    Manifest m;
    m.id = repo::NewImageId();
    m.repository = repo_->id();
    m.volume = path;
    m.source = "offline";
    m.created_unix_ns = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(
            std::chrono::system_clock::now().time_since_epoch())
            .count());
    auto src = imaging::OpenFileSource(path);
    EXPECT_TRUE(src.ok()) << src.status().ToString();
    if (!src.ok()) return m;
    Status s = imaging::BuildImage(*repo_, **src, opts, &m);
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (store && s.ok()) {
      Status p = repo_->PutManifest(m);
      EXPECT_TRUE(p.ok()) << p.ToString();
    }
    return m;
  }

  Result<RestoreStats> DoRestore(const Manifest& m, const std::string& target,
                                 bool delta = false) {
    RestoreOptions o;
    o.delta = delta;
    return imaging::Restore(*repo_, m, target, o);
  }

  std::vector<std::string> StoredChunks() {
    auto l = repo_->ListChunks();
    EXPECT_TRUE(l.ok()) << l.status().ToString();
    std::vector<std::string> out;
    if (l.ok())
      for (const ChunkId& c : *l) out.push_back(repo::ChunkIdHex(c));
    std::sort(out.begin(), out.end());
    return out;
  }

  uint64_t StoredObjectBytes() {
    uint64_t n = 0;
    for (const auto& h : StoredChunks()) {
      ChunkId id;
      EXPECT_TRUE(repo::ParseChunkId(h, id));
      n += fs::file_size(ObjectPath(id));
    }
    return n;
  }

  std::string dir_, repo_dir_;
  std::shared_ptr<Repository> repo_;
};

// ---- sources ---------------------------------------------------------------

TEST_F(ImagingTest, FileSourceSizeAllocationAndReads) {
  EXPECT_EQ(imaging::OpenFileSource(Path("missing")).status().code(), Code::kNotFound);
  EXPECT_EQ(imaging::OpenFileSource(dir_).status().code(), Code::kInvalidArgument);

  Rng rng(7);
  Layout l{4 * kChunk + 100, {}};
  l.Put(kChunk, Random(rng, kChunk));  // chunk 1 only; the rest holes
  WriteSparse(Path("f"), l);
  auto src = imaging::OpenFileSource(Path("f"));
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  EXPECT_EQ((*src)->size(), l.size);
  auto alloc = (*src)->Allocated();
  ASSERT_TRUE(alloc.ok()) << alloc.status().ToString();
  uint64_t total = 0;
  for (const Range& r : *alloc) {
    total += r.length;
    EXPECT_LE(r.offset + r.length, l.size);
    // Nothing allocated outside the written chunk.
    EXPECT_GE(r.offset, kChunk);
    EXPECT_LE(r.offset + r.length, 2 * kChunk);
  }
  EXPECT_EQ(total, kChunk);

  auto rd = (*src)->NewReader();
  ASSERT_TRUE(rd.ok()) << rd.status().ToString();
  Bytes want = l.Content();
  Bytes got(3000);
  ASSERT_TRUE((*rd)->Read(2 * kChunk - 1000, got).ok());
  EXPECT_EQ(0, std::memcmp(got.data(), want.data() + 2 * kChunk - 1000, got.size()));
}

// ---- create and restore ----------------------------------------------------

TEST_F(ImagingTest, BuildAndRestoreRoundTrip) {
  Rng rng(1);
  Layout l{16 * kChunk + 12345, {}};  // 17 chunks, the last one short
  l.Put(0 * kChunk, Random(rng, kChunk));
  l.Put(1 * kChunk, Text(kChunk, 1));
  l.Put(2 * kChunk, Bytes(kChunk));  // written zeros: allocated but all zero
  // 3: hole
  l.Put(4 * kChunk, Random(rng, kChunk));
  // 5, 6, 7: holes
  l.Put(8 * kChunk, Text(kChunk, 2));
  l.Put(9 * kChunk, Random(rng, kChunk / 2));  // second half a hole
  l.Put(10 * kChunk, Bytes(kChunk));
  l.Put(11 * kChunk + 4096, Random(rng, 8192));  // holes around the data
  l.Put(12 * kChunk, Text(kChunk, 3));
  l.Put(13 * kChunk, Random(rng, 2 * kChunk));  // chunks 13 and 14
  l.Put(15 * kChunk, Text(kChunk, 4));
  l.Put(16 * kChunk, Random(rng, 12345));
  WriteSparse(Path("vol"), l);
  const std::set<uint64_t> zero = {2, 3, 5, 6, 7, 10};
  const uint64_t n = 17, nonzero = n - zero.size();

  Manifest m = Build(Path("vol"));
  ASSERT_EQ(m.size, l.size);
  EXPECT_EQ(m.chunk_size, kChunk);
  ASSERT_EQ(m.chunk_count(), n);
  ASSERT_EQ(m.chunks.size(), n);
  for (uint64_t i = 0; i < n; ++i)
    EXPECT_EQ(m.chunks[i] == kZeroChunk, zero.count(i) == 1) << "chunk " << i;
  EXPECT_EQ(m.stats.zero_chunks, zero.size());
  EXPECT_EQ(m.stats.new_chunks, nonzero);  // all distinct
  EXPECT_EQ(m.stats.reused_chunks, 0u);
  EXPECT_EQ(m.stats.new_chunks + m.stats.reused_chunks + m.stats.zero_chunks, n);
  // Exactly the written (allocated) bytes are read: holes are skipped, also
  // inside chunks (all writes are 4 KiB aligned or end at EOF).
  EXPECT_EQ(m.stats.read_bytes, l.WrittenBytes());
  EXPECT_EQ(StoredChunks().size(), nonzero);
  EXPECT_EQ(m.stats.stored_bytes, StoredObjectBytes());
  // Text compresses: less is stored than the non-zero chunks hold.
  EXPECT_LT(m.stats.stored_bytes, nonzero * kChunk);
  EXPECT_TRUE(m.base.empty());

  auto got = repo_->GetManifest(m.id);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->chunks, m.chunks);
  EXPECT_EQ(got->size, m.size);
  auto rs = DoRestore(*got, Path("restored"));
  ASSERT_TRUE(rs.ok()) << rs.status().ToString();
  EXPECT_EQ(rs->chunks, n);
  EXPECT_EQ(rs->zero_chunks, zero.size());
  EXPECT_EQ(rs->written_chunks, nonzero);
  EXPECT_EQ(rs->same_chunks, 0u);
  EXPECT_TRUE(test_util::ReadBytes(Path("restored")) == l.Content());

  // The same file again: nothing new is stored.
  Manifest m2 = Build(Path("vol"));
  EXPECT_EQ(m2.chunks, m.chunks);
  EXPECT_EQ(m2.stats.new_chunks, 0u);
  EXPECT_EQ(m2.stats.stored_bytes, 0u);
  EXPECT_EQ(m2.stats.reused_chunks, nonzero);
  EXPECT_EQ(m2.stats.zero_chunks, zero.size());
  EXPECT_EQ(StoredChunks().size(), nonzero);
}

TEST_F(ImagingTest, IdenticalChunksAreStoredOnce) {
  Rng rng(2);
  Bytes same = Random(rng, kChunk);
  Layout l{5 * kChunk, {}};
  l.Put(0, same);
  l.Put(1 * kChunk, Random(rng, kChunk));
  l.Put(2 * kChunk, same);
  l.Put(4 * kChunk, same);
  WriteSparse(Path("vol"), l);

  CreateOptions one;
  one.threads = 1;  // deterministic new/reused split
  Manifest m = Build(Path("vol"), one);
  ASSERT_EQ(m.chunks.size(), 5u);
  EXPECT_EQ(m.chunks[0], m.chunks[2]);
  EXPECT_EQ(m.chunks[0], m.chunks[4]);
  EXPECT_NE(m.chunks[0], m.chunks[1]);
  EXPECT_EQ(m.chunks[3], kZeroChunk);
  EXPECT_EQ(m.chunks[0], repo_->Hash(same));
  EXPECT_EQ(m.stats.new_chunks, 2u);
  EXPECT_EQ(m.stats.reused_chunks, 2u);
  EXPECT_EQ(m.stats.zero_chunks, 1u);
  EXPECT_EQ(StoredChunks().size(), 2u);
  EXPECT_EQ(m.stats.stored_bytes, StoredObjectBytes());

  auto rs = DoRestore(m, Path("out"));
  ASSERT_TRUE(rs.ok()) << rs.status().ToString();
  EXPECT_TRUE(test_util::ReadBytes(Path("out")) == l.Content());
}

TEST_F(ImagingTest, IdenticalChunksInParallelAreStoredOnce) {
  Rng rng(3);
  Bytes same = Random(rng, kChunk);
  Layout l{32 * kChunk, {}};
  for (uint64_t i = 0; i < 32; ++i) l.Put(i * kChunk, same);
  WriteSparse(Path("vol"), l);
  CreateOptions many;
  many.threads = 8;
  Manifest m = Build(Path("vol"), many);
  EXPECT_EQ(StoredChunks().size(), 1u);
  EXPECT_EQ(m.stats.new_chunks + m.stats.reused_chunks, 32u);
  // Workers that hash the same new chunk at the same time: one stores it,
  // the others count it reused (BuildImage claims ids before storing).
  EXPECT_EQ(m.stats.new_chunks, 1u);
  EXPECT_EQ(m.stats.reused_chunks, 31u);
  for (const ChunkId& c : m.chunks) EXPECT_EQ(c, m.chunks[0]);
}

TEST_F(ImagingTest, IncrementalReadsOnlyChangedChunks) {
  Rng rng(4);
  Layout l{8 * kChunk, {}};
  l.Put(0, Random(rng, 8 * kChunk));
  WriteSparse(Path("vol"), l);
  Manifest m1 = Build(Path("vol"));
  ASSERT_EQ(m1.stats.new_chunks, 8u);

  // Changed: a range straddling chunks 2/3, and chunk 5. Modify only there.
  std::vector<Range> changed = {{3 * kChunk - 10, 20}, {5 * kChunk + 100, 1000}};
  Bytes b1 = Random(rng, 20), b2 = Random(rng, 1000);
  l.Put(3 * kChunk - 10, b1);
  l.Put(5 * kChunk + 100, b2);
  WriteSparse(Path("vol"), l);

  CreateOptions inc;
  inc.base = &m1;
  inc.changed = changed;
  Manifest m2 = Build(Path("vol"), inc);
  EXPECT_EQ(m2.base, m1.id);
  EXPECT_GT(m2.stats.read_bytes, 0u);
  EXPECT_LE(m2.stats.read_bytes, 3 * kChunk);
  EXPECT_EQ(m2.stats.new_chunks, 3u);
  EXPECT_EQ(m2.stats.reused_chunks, 5u);
  EXPECT_EQ(m2.stats.zero_chunks, 0u);
  for (uint64_t i : {0, 1, 4, 6, 7}) EXPECT_EQ(m2.chunks[i], m1.chunks[i]) << i;
  for (uint64_t i : {2, 3, 5}) EXPECT_NE(m2.chunks[i], m1.chunks[i]) << i;
  auto rs = DoRestore(m2, Path("out"));
  ASSERT_TRUE(rs.ok()) << rs.status().ToString();
  EXPECT_TRUE(test_util::ReadBytes(Path("out")) == l.Content());
}

TEST_F(ImagingTest, IncrementalTakesUnchangedChunksFromBaseWithoutReading) {
  Rng rng(5);
  Layout l{4 * kChunk, {}};
  l.Put(0, Random(rng, 4 * kChunk));
  WriteSparse(Path("vol"), l);
  const Bytes original = l.Content();
  Manifest m1 = Build(Path("vol"));

  // Chunk 3 changes but the change list names only chunk 1: the image must
  // take chunk 3 from the base (it is not read), and chunk 1 from the file.
  l.Put(1 * kChunk, Random(rng, kChunk));
  l.Put(3 * kChunk, Random(rng, kChunk));
  WriteSparse(Path("vol"), l);
  CreateOptions inc;
  inc.base = &m1;
  inc.changed = {{kChunk, kChunk}};
  Manifest m2 = Build(Path("vol"), inc);
  EXPECT_EQ(m2.stats.read_bytes, kChunk);
  EXPECT_EQ(m2.chunks[3], m1.chunks[3]);
  auto rs = DoRestore(m2, Path("out"));
  ASSERT_TRUE(rs.ok()) << rs.status().ToString();
  Bytes want = l.Content();
  std::memcpy(want.data() + 3 * kChunk, original.data() + 3 * kChunk, kChunk);
  EXPECT_TRUE(test_util::ReadBytes(Path("out")) == want);
}

TEST_F(ImagingTest, IncrementalBaseOfAnotherSizeIsIgnored) {
  Rng rng(6);
  Layout a{4 * kChunk, {}};
  a.Put(0, Random(rng, 4 * kChunk));
  WriteSparse(Path("a"), a);
  Manifest m1 = Build(Path("a"));

  Layout b{5 * kChunk + 1, {}};
  Bytes content = a.Content();
  content.resize(b.size);
  Bytes tail = Random(rng, kChunk + 1);
  std::memcpy(content.data() + 4 * kChunk, tail.data(), tail.size());
  b.Put(0, content);
  WriteSparse(Path("b"), b);
  CreateOptions inc;
  inc.base = &m1;
  inc.changed = {};  // nothing changed: would read nothing if the base applied
  Manifest m2 = Build(Path("b"), inc);
  EXPECT_TRUE(m2.base.empty());
  EXPECT_EQ(m2.stats.read_bytes, b.size);
  EXPECT_EQ(m2.stats.new_chunks, 2u);     // chunks 4 and 5
  EXPECT_EQ(m2.stats.reused_chunks, 4u);  // found in the repository by hash
  auto rs = DoRestore(m2, Path("out"));
  ASSERT_TRUE(rs.ok()) << rs.status().ToString();
  EXPECT_TRUE(test_util::ReadBytes(Path("out")) == b.Content());
}

// A volume whose manifest could not be stored (more chunks than one image
// lists) is refused before anything is read or stored.
TEST_F(ImagingTest, VolumeTooLargeForOneManifestIsRefusedUpFront) {
  const uint64_t size = (repo::MaxImageChunks() + 1) * kChunk;
  {
    std::ofstream f(Path("huge"));
  }
  fs::resize_file(Path("huge"), size);  // sparse
  auto src = imaging::OpenFileSource(Path("huge"));
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  Manifest m;
  m.id = repo::NewImageId();
  m.repository = repo_->id();
  Status s = imaging::BuildImage(*repo_, **src, {}, &m);
  ASSERT_EQ(s.code(), Code::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find("larger chunks"), std::string::npos) << s.message();
  EXPECT_TRUE(repo_->ListChunks()->empty());

  // The repository refuses such a manifest too, rather than storing one it
  // could not read back.
  m.size = size;
  m.chunk_size = kChunk;
  m.chunks.assign(m.chunk_count(), repo::kZeroChunk);
  EXPECT_EQ(repo_->PutManifest(m).code(), Code::kInvalidArgument);
  EXPECT_TRUE(repo_->ListImages()->empty());
  m.size = repo::MaxImageChunks() * kChunk;  // the largest that fits is stored and read back
  m.chunks.assign(m.chunk_count(), repo::kZeroChunk);
  ASSERT_TRUE(repo_->PutManifest(m).ok());
  auto back = repo_->GetManifest(m.id);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->chunks.size(), repo::MaxImageChunks());
}

// Resume records, version 2 (docs/format/repository.md 2.5).
imaging::ResumeRecord SampleResume(uint64_t chunks) {
  imaging::ResumeRecord r;
  r.volume_uuid = "0d6c3f1e-7a51-4c64-9a3e-2b8a41f2c001";
  r.size = chunks * kChunk - 100;  // the last chunk is partial
  r.chunk_size = kChunk;
  r.tracking_id = "5f0e2c77-1111-4222-8333-944455556666";
  r.tracking_epoch = 42;
  for (uint64_t i = 0; i < chunks; ++i) {
    ChunkId id{};
    id[0] = static_cast<uint8_t>(i + 1);
    id[31] = 0xa5;
    bool done = i % 3 != 1;
    r.partial.chunks.push_back(done && i % 5 == 4 ? kZeroChunk : (done ? id : kZeroChunk));
    r.partial.done.push_back(done);
  }
  return r;
}

TEST(ResumeRecordTest, LayoutAndRoundTrip) {
  const imaging::ResumeRecord r = SampleResume(19);
  const std::string b = imaging::EncodeResume(r);
  auto le = [&](size_t at, size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= uint64_t{static_cast<uint8_t>(b[at + i])} << (8 * i);
    return v;
  };
  ASSERT_GE(b.size(), 24u + 32u);
  EXPECT_EQ(b.substr(0, 4), "UMBR");
  EXPECT_EQ(le(4, 4), 2u);
  const uint64_t h = le(8, 4);
  EXPECT_EQ(le(12, 4), 32u);
  EXPECT_EQ(le(16, 8), 19u);
  auto header = nlohmann::json::parse(b.substr(24, h));
  EXPECT_EQ(header["format"], "umbra-resume");
  EXPECT_EQ(header["version"], 2);
  EXPECT_EQ(header["volume_uuid"], r.volume_uuid);
  EXPECT_EQ(header["size"], r.size);
  EXPECT_EQ(header["chunk_size"], kChunk);
  EXPECT_EQ(header["tracking"]["id"], r.tracking_id);
  EXPECT_EQ(header["tracking"]["epoch"], 42);
  EXPECT_FALSE(header.contains("chunks"));
  // Done bitmap (3 bytes for 19 chunks, least significant bit first), then
  // the ids of the done chunks in order, then SHA-256 of all before.
  size_t d = 0;
  for (size_t i = 0; i < 19; ++i) {
    bool bit = (static_cast<uint8_t>(b[24 + h + i / 8]) >> (i % 8)) & 1;
    EXPECT_EQ(bit, static_cast<bool>(r.partial.done[i])) << i;
    if (!r.partial.done[i]) continue;
    EXPECT_EQ(std::memcmp(b.data() + 24 + h + 3 + 32 * d, r.partial.chunks[i].data(), 32), 0) << i;
    ++d;
  }
  EXPECT_EQ(static_cast<uint8_t>(b[24 + h + 2]) >> 3, 0) << "unused bits are 0";
  ASSERT_EQ(b.size(), 24 + h + 3 + 32 * d + 32);
  auto body = std::span(reinterpret_cast<const std::byte*>(b.data()), b.size() - 32);
  EXPECT_EQ(std::memcmp(repo::Sha256(body).data(), b.data() + b.size() - 32, 32), 0);

  auto back = imaging::DecodeResume(b);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->volume_uuid, r.volume_uuid);
  EXPECT_EQ(back->size, r.size);
  EXPECT_EQ(back->chunk_size, r.chunk_size);
  EXPECT_EQ(back->tracking_id, r.tracking_id);
  EXPECT_EQ(back->tracking_epoch, r.tracking_epoch);
  EXPECT_EQ(back->partial.done, r.partial.done);
  EXPECT_EQ(back->partial.chunks, r.partial.chunks);
}

TEST(ResumeRecordTest, Version1IsStillRead) {
  ChunkId id{};
  id[0] = 7;
  nlohmann::json j{{"format", "umbra-resume"}, {"version", 1}, {"volume_uuid", "v"},
                   {"size", 3 * kChunk},       {"chunk_size", kChunk},
                   {"tracking", {{"id", "t"}, {"epoch", 9}}},
                   {"chunks", {repo::ChunkIdHex(id), 0, nullptr}}};
  auto r = imaging::DecodeResume(j.dump());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->tracking_epoch, 9u);
  EXPECT_EQ(r->partial.done, (std::vector<bool>{true, true, false}));
  EXPECT_EQ(r->partial.chunks[0], id);
  EXPECT_EQ(r->partial.chunks[1], kZeroChunk);
}

TEST(ResumeRecordTest, DamageIsRefused) {
  const std::string good = imaging::EncodeResume(SampleResume(11));
  for (size_t i = 0; i < good.size(); ++i) {  // every byte flipped: never accepted
    std::string b = good;
    b[i] = static_cast<char>(b[i] ^ 0x40);
    auto r = imaging::DecodeResume(b);
    EXPECT_FALSE(r.ok()) << "flipped byte " << i;
  }
  for (size_t n : {size_t{0}, size_t{10}, good.size() - 1}) {
    auto r = imaging::DecodeResume(good.substr(0, n));
    EXPECT_EQ(r.status().code(), Code::kCorruption) << n;
  }
  auto reseal = [](std::string b) {
    auto body = std::span(reinterpret_cast<const std::byte*>(b.data()), b.size() - 32);
    ChunkId sum = repo::Sha256(body);
    std::memcpy(b.data() + b.size() - 32, sum.data(), 32);
    return b;
  };
  std::string newer = good;
  newer[4] = 3;
  auto rn = imaging::DecodeResume(reseal(newer));
  EXPECT_EQ(rn.status().code(), Code::kUnsupported) << rn.status().ToString();
  // 11 chunks: bits 3..7 of the second bitmap byte are unused; one set (with
  // a matching id and checksum) is still refused.
  const uint64_t h = static_cast<uint8_t>(good[8]) | (static_cast<uint8_t>(good[9]) << 8);
  std::string extra = good;
  extra[24 + h + 1] = static_cast<char>(static_cast<uint8_t>(extra[24 + h + 1]) | 0x80);
  extra.insert(extra.size() - 32, std::string(32, 'x'));
  auto re = imaging::DecodeResume(reseal(extra));
  EXPECT_EQ(re.status().code(), Code::kCorruption) << re.status().ToString();
}

// The largest image's record fits an object and reads back; a record larger
// than an object may be is refused when written (version 1 records of large
// volumes were stored and then could never be read).
TEST_F(ImagingTest, LargestResumeRecordIsStoredAndReadBack) {
  imaging::ResumeRecord r;
  r.volume_uuid = "0d6c3f1e-7a51-4c64-9a3e-2b8a41f2c001";
  r.chunk_size = kChunk;
  r.size = repo::MaxImageChunks() * kChunk;
  r.tracking_id = "5f0e2c77-1111-4222-8333-944455556666";
  ChunkId id{};
  id.fill(0x5a);
  r.partial.chunks.assign(repo::MaxImageChunks(), id);
  r.partial.done.assign(repo::MaxImageChunks(), true);
  const std::string b = imaging::EncodeResume(r);
  ASSERT_TRUE(repo_->PutResume(r.volume_uuid, b).ok());
  auto text = repo_->GetResume(r.volume_uuid);
  ASSERT_TRUE(text.ok()) << text.status().ToString();
  auto back = imaging::DecodeResume(*text);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->partial.chunks.size(), repo::MaxImageChunks());
  EXPECT_EQ(back->partial.chunks.back(), id);

  std::string too_big(64u << 20, '{');
  too_big.push_back('}');
  EXPECT_EQ(repo_->PutResume(r.volume_uuid, too_big).code(), Code::kInvalidArgument);
  EXPECT_TRUE(repo_->GetResume(r.volume_uuid).ok()) << "the stored record is kept";
}

TEST_F(ImagingTest, RestoreRefusesSmallTargetAndDirectory) {
  Rng rng(8);
  Layout l{3 * kChunk + 7, {}};
  l.Put(0, Random(rng, l.size));
  WriteSparse(Path("vol"), l);
  Manifest m = Build(Path("vol"));

  Bytes before = Random(rng, l.size - 1);
  test_util::WriteBytes(Path("small"), before);
  for (bool delta : {false, true}) {
    auto rs = DoRestore(m, Path("small"), delta);
    ASSERT_FALSE(rs.ok());
    EXPECT_EQ(rs.status().code(), Code::kNoSpace) << rs.status().ToString();
    EXPECT_TRUE(test_util::ReadBytes(Path("small")) == before);
  }

  ASSERT_TRUE(fs::create_directory(Path("adir")));
  auto rd = DoRestore(m, Path("adir"));
  EXPECT_FALSE(rd.ok());
  EXPECT_TRUE(fs::is_directory(Path("adir")));
  EXPECT_TRUE(fs::is_empty(Path("adir")));

  // A missing parent directory is an error too, and creates nothing.
  EXPECT_FALSE(DoRestore(m, Path("nodir/out")).ok());
  EXPECT_FALSE(fs::exists(Path("nodir")));

  // A larger target is fine: the image's bytes land at its start.
  Bytes big = Random(rng, l.size + 5000);
  test_util::WriteBytes(Path("big"), big);
  auto rb = DoRestore(m, Path("big"));
  ASSERT_TRUE(rb.ok()) << rb.status().ToString();
  Bytes want = l.Content();
  want.insert(want.end(), big.begin() + static_cast<std::ptrdiff_t>(l.size), big.end());
  EXPECT_TRUE(test_util::ReadBytes(Path("big")) == want);
}

TEST_F(ImagingTest, DeltaRestoreWritesOnlyDifferingChunks) {
  Rng rng(9);
  const uint64_t size = 9 * kChunk + 5000;  // 10 chunks, the last one short
  Layout a{size, {}};
  for (uint64_t i = 0; i < 10; ++i) {
    if (i == 3 || i == 6) continue;  // holes
    a.Put(i * kChunk, i % 2 ? Text(std::min(kChunk, size - i * kChunk), static_cast<int>(i))
                            : Random(rng, std::min(kChunk, size - i * kChunk)));
  }
  WriteSparse(Path("a"), a);
  Layout b = a;
  b.Put(1 * kChunk + 778, Text(10, 99));    // a few bytes
  b.Put(4 * kChunk, Bytes(kChunk));         // data -> zeros
  b.Put(6 * kChunk + 10, Random(rng, 300));  // hole -> data
  b.Put(size - 1, Bytes{std::byte{0xAB}});  // the short last chunk
  WriteSparse(Path("b"), b);
  const Bytes ca = a.Content(), cb = b.Content();
  const uint64_t differ = DifferingChunks(ca, cb);
  ASSERT_EQ(differ, 4u);

  Manifest ma = Build(Path("a"));
  Manifest mb = Build(Path("b"));
  EXPECT_EQ(mb.chunks[4], kZeroChunk);
  EXPECT_NE(ma.chunks[4], kZeroChunk);

  auto r1 = DoRestore(ma, Path("target"));
  ASSERT_TRUE(r1.ok()) << r1.status().ToString();
  ASSERT_TRUE(test_util::ReadBytes(Path("target")) == ca);

  auto r2 = DoRestore(mb, Path("target"), /*delta=*/true);
  ASSERT_TRUE(r2.ok()) << r2.status().ToString();
  EXPECT_EQ(r2->chunks, 10u);
  EXPECT_EQ(r2->written_chunks, differ);
  EXPECT_EQ(r2->same_chunks, 10u - differ);
  EXPECT_EQ(r2->zero_chunks, 2u);  // chunks 3 and 4 of b
  EXPECT_EQ(r2->read_bytes, size);
  EXPECT_TRUE(test_util::ReadBytes(Path("target")) == cb);

  // Again: everything is already there.
  auto r3 = DoRestore(mb, Path("target"), /*delta=*/true);
  ASSERT_TRUE(r3.ok()) << r3.status().ToString();
  EXPECT_EQ(r3->written_chunks, 0u);
  EXPECT_EQ(r3->same_chunks, 10u);
  EXPECT_EQ(r3->written_bytes, 0u);
  EXPECT_TRUE(test_util::ReadBytes(Path("target")) == cb);

  // Delta onto unrelated bytes: every chunk is written, zero chunks too.
  test_util::WriteBytes(Path("junk"), Random(rng, size));
  auto r4 = DoRestore(mb, Path("junk"), /*delta=*/true);
  ASSERT_TRUE(r4.ok()) << r4.status().ToString();
  EXPECT_EQ(r4->written_chunks, 10u);
  EXPECT_EQ(r4->same_chunks, 0u);
  EXPECT_TRUE(test_util::ReadBytes(Path("junk")) == cb);

  // Not delta over an existing file: zero chunks are zeroed as well.
  test_util::WriteBytes(Path("junk2"), Random(rng, size));
  auto r5 = DoRestore(mb, Path("junk2"));
  ASSERT_TRUE(r5.ok()) << r5.status().ToString();
  EXPECT_EQ(r5->written_chunks, 10u);
  EXPECT_EQ(r5->read_bytes, 0u);
  EXPECT_TRUE(test_util::ReadBytes(Path("junk2")) == cb);
}

// ---- verify ----------------------------------------------------------------

class VerifyGcTest : public ImagingTest {
 protected:
  // Three images: i1 = [x, a], i2 = [x, b], i3 = [c, d].
  void MakeImages() {
    Rng rng(10);
    x_ = Random(rng, kChunk);
    Bytes a = Random(rng, kChunk), b = Random(rng, kChunk);
    Layout f1{2 * kChunk, {{0, x_}, {kChunk, a}}};
    Layout f2{2 * kChunk, {{0, x_}, {kChunk, b}}};
    Layout f3{2 * kChunk, {{0, Random(rng, kChunk)}, {kChunk, Random(rng, kChunk)}}};
    WriteSparse(Path("f1"), f1);
    WriteSparse(Path("f2"), f2);
    WriteSparse(Path("f3"), f3);
    c2_ = f2.Content();
    i1_ = Build(Path("f1"));
    i2_ = Build(Path("f2"));
    i3_ = Build(Path("f3"));
    ASSERT_EQ(i1_.chunks[0], i2_.chunks[0]);
    ASSERT_EQ(StoredChunks().size(), 5u);
  }
  Result<imaging::VerifyReport> VerifyAll(const std::vector<std::string>& ids = {}) {
    return imaging::Verify(*repo_, ids, 0, {});
  }

  Bytes x_, c2_;
  Manifest i1_, i2_, i3_;
};

TEST_F(VerifyGcTest, CleanRepositoryHasNoDamage) {
  MakeImages();
  uint64_t calls = 0, last = 0;
  auto rep = imaging::Verify(*repo_, {}, 2, [&](uint64_t done, uint64_t total) {
    ++calls;
    last = done;
    EXPECT_EQ(total, 5u);
  });
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->images, 3u);
  EXPECT_EQ(rep->chunks, 5u);
  EXPECT_EQ(rep->bytes, 5 * kChunk);
  EXPECT_TRUE(rep->damage.empty());
  EXPECT_EQ(calls, 5u);
  EXPECT_EQ(last, 5u);

  auto one = VerifyAll({i3_.id});
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->images, 1u);
  EXPECT_EQ(one->chunks, 2u);
}

TEST_F(VerifyGcTest, FlippedPayloadByteNamesChunkAndItsImages) {
  MakeImages();
  const ChunkId x = i1_.chunks[0];
  FlipByte(ObjectPath(x), kObjectHeader + 1000);
  auto rep = VerifyAll();
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->images, 3u);
  EXPECT_EQ(rep->chunks, 5u);
  EXPECT_EQ(rep->bytes, 4 * kChunk);
  ASSERT_EQ(rep->damage.size(), 1u);
  EXPECT_EQ(rep->damage[0].what, "chunk " + repo::ChunkIdHex(x));
  EXPECT_FALSE(rep->damage[0].error.empty());
  EXPECT_EQ(Sorted(rep->damage[0].images), Sorted({i1_.id, i2_.id}));

  // Only the named images are checked.
  auto only3 = VerifyAll({i3_.id});
  ASSERT_TRUE(only3.ok());
  EXPECT_TRUE(only3->damage.empty());

  // Restoring an image that needs it fails rather than writing bad bytes.
  auto rs = DoRestore(i2_, Path("out"));
  ASSERT_FALSE(rs.ok());
  EXPECT_EQ(rs.status().code(), Code::kCorruption) << rs.status().ToString();
}

TEST_F(VerifyGcTest, MissingObjectIsReported) {
  MakeImages();
  const ChunkId a = i1_.chunks[1];
  ASSERT_TRUE(fs::remove(ObjectPath(a)));
  auto rep = VerifyAll();
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  ASSERT_EQ(rep->damage.size(), 1u);
  EXPECT_EQ(rep->damage[0].what, "chunk " + repo::ChunkIdHex(a));
  EXPECT_EQ(rep->damage[0].images, std::vector<std::string>{i1_.id});
}

TEST_F(VerifyGcTest, TamperedManifestIsReportedByImage) {
  MakeImages();
  const std::string path = ManifestPath(i3_.id);
  const uint64_t len = fs::file_size(path);
  ASSERT_GT(len, kObjectHeader + 10);
  FlipByte(path, kObjectHeader + (len - kObjectHeader) / 2);
  auto rep = VerifyAll();
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->images, 3u);
  EXPECT_EQ(rep->chunks, 3u);  // x, a, b: i3's chunks are unknown now
  ASSERT_EQ(rep->damage.size(), 1u);
  EXPECT_EQ(rep->damage[0].what, "image " + i3_.id);
  EXPECT_EQ(rep->damage[0].images, std::vector<std::string>{i3_.id});
  EXPECT_FALSE(rep->damage[0].error.empty());
}

// ---- gc --------------------------------------------------------------------

TEST_F(VerifyGcTest, GcRemovesOnlyChunksOfDeletedImages) {
  MakeImages();
  ASSERT_TRUE(repo_->DeleteImage(i3_.id).ok());
  ASSERT_TRUE(repo_->DeleteImage(i1_.id).ok());
  ASSERT_TRUE(fs::create_directories(repo_dir_ + "/tmp") || fs::is_directory(repo_dir_ + "/tmp"));
  test_util::WriteBytes(repo_dir_ + "/tmp/leftover", Text(100, 1));

  auto gc = imaging::CollectGarbage(*repo_);
  ASSERT_TRUE(gc.ok()) << gc.status().ToString();
  EXPECT_EQ(gc->chunks_removed, 3u);  // a, and both of i3's
  EXPECT_EQ(gc->chunks_kept, 2u);     // x (shared with i2) and b
  EXPECT_EQ(gc->temporary_removed, 1u);
  EXPECT_FALSE(fs::exists(repo_dir_ + "/tmp/leftover"));
  EXPECT_EQ(StoredChunks(),
            Sorted({repo::ChunkIdHex(i2_.chunks[0]), repo::ChunkIdHex(i2_.chunks[1])}));

  auto rs = DoRestore(i2_, Path("out"));
  ASSERT_TRUE(rs.ok()) << rs.status().ToString();
  EXPECT_TRUE(test_util::ReadBytes(Path("out")) == c2_);
  auto v = VerifyAll();
  ASSERT_TRUE(v.ok());
  EXPECT_TRUE(v->damage.empty());

  auto again = imaging::CollectGarbage(*repo_);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->chunks_removed, 0u);
  EXPECT_EQ(again->chunks_kept, 2u);
}

TEST_F(VerifyGcTest, GcRefusesWhileAManifestIsDamaged) {
  MakeImages();
  ASSERT_TRUE(repo_->DeleteImage(i1_.id).ok());  // a is garbage now
  fs::create_directories(repo_dir_ + "/tmp");
  test_util::WriteBytes(repo_dir_ + "/tmp/leftover", Text(100, 1));
  const auto before = StoredChunks();
  const std::string path = ManifestPath(i2_.id);
  FlipByte(path, kObjectHeader + (fs::file_size(path) - kObjectHeader) / 2);

  auto gc = imaging::CollectGarbage(*repo_);
  ASSERT_FALSE(gc.ok());
  EXPECT_NE(gc.status().message().find(i2_.id), std::string::npos) << gc.status().ToString();
  EXPECT_EQ(StoredChunks(), before);
  EXPECT_TRUE(fs::exists(repo_dir_ + "/tmp/leftover"));
}

// ---- prune selection -------------------------------------------------------

class PruneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (const char* tz = ::getenv("TZ")) old_tz_ = tz;
    ::setenv("TZ", "UTC", 1);
    ::tzset();
  }
  void TearDown() override {
    if (old_tz_)
      ::setenv("TZ", old_tz_->c_str(), 1);
    else
      ::unsetenv("TZ");
    ::tzset();
  }

  static uint64_t At(int y, int mo, int d, int h) {
    struct tm tm {};
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    return static_cast<uint64_t>(::timegm(&tm)) * 1000000000ull + 123;
  }
  static Manifest M(const std::string& id, const std::string& uuid, uint64_t ns,
                    const std::string& volume = "vol") {
    Manifest m;
    m.id = id;
    m.volume = volume;
    m.volume_uuid = uuid;
    m.created_unix_ns = ns;
    return m;
  }
  // Every id of `images` not in `keep`, sorted.
  static std::vector<std::string> AllBut(const std::vector<Manifest>& images,
                                         const std::set<std::string>& keep) {
    std::vector<std::string> out;
    for (const auto& m : images)
      if (!keep.count(m.id)) out.push_back(m.id);
    std::sort(out.begin(), out.end());
    return out;
  }
  static imaging::PrunePolicy P(int last, int daily, int weekly, int monthly) {
    imaging::PrunePolicy p;
    p.keep_last = last;
    p.keep_daily = daily;
    p.keep_weekly = weekly;
    p.keep_monthly = monthly;
    return p;
  }

  std::optional<std::string> old_tz_;
};

TEST_F(PruneTest, PoliciesPerVolume) {
  // Friday 2024-03-15 (ISO week 10 is Mar 4..10, week 11 Mar 11..17). Listed
  // out of order; ids do not sort by time.
  const std::vector<Manifest> v1 = {
      M("q-d1-20h", "v1", At(2024, 3, 14, 20)), M("a-d0-15h", "v1", At(2024, 3, 15, 15)),
      M("z-d0-09h", "v1", At(2024, 3, 15, 9)),  M("m-d2-12h", "v1", At(2024, 3, 13, 12)),
      M("b-d0-21h", "v1", At(2024, 3, 15, 21)), M("k-d1-10h", "v1", At(2024, 3, 14, 10)),
      M("c-d5-12h", "v1", At(2024, 3, 10, 12)), M("y-d40-12h", "v1", At(2024, 2, 4, 12)),
  };
  auto check = [&](const imaging::PrunePolicy& p, const std::set<std::string>& keep) {
    auto got = imaging::PruneSelect(v1, p);
    EXPECT_TRUE(std::is_sorted(got.begin(), got.end()));
    EXPECT_EQ(got, AllBut(v1, keep)) << "last " << p.keep_last << " daily " << p.keep_daily
                                     << " weekly " << p.keep_weekly << " monthly "
                                     << p.keep_monthly;
  };
  check(P(2, 0, 0, 0), {"b-d0-21h", "a-d0-15h"});
  check(P(100, 0, 0, 0), {"q-d1-20h", "a-d0-15h", "z-d0-09h", "m-d2-12h", "b-d0-21h",
                          "k-d1-10h", "c-d5-12h", "y-d40-12h"});
  check(P(0, 3, 0, 0), {"b-d0-21h", "q-d1-20h", "m-d2-12h"});
  check(P(0, 100, 0, 0), {"b-d0-21h", "q-d1-20h", "m-d2-12h", "c-d5-12h", "y-d40-12h"});
  check(P(0, 0, 2, 0), {"b-d0-21h", "c-d5-12h"});
  check(P(0, 0, 3, 0), {"b-d0-21h", "c-d5-12h", "y-d40-12h"});
  check(P(0, 0, 0, 1), {"b-d0-21h"});
  check(P(0, 0, 0, 2), {"b-d0-21h", "y-d40-12h"});
  // Union of policies.
  check(P(1, 2, 0, 0), {"b-d0-21h", "q-d1-20h"});
  check(P(3, 0, 0, 2), {"b-d0-21h", "a-d0-15h", "z-d0-09h", "y-d40-12h"});
  check(P(0, 1, 2, 2), {"b-d0-21h", "c-d5-12h", "y-d40-12h"});
  check(P(2, 2, 0, 0), {"b-d0-21h", "a-d0-15h", "q-d1-20h"});
}

TEST_F(PruneTest, VolumesAreSeparate) {
  std::vector<Manifest> images = {
      M("v1-new", "uuid-1", At(2024, 3, 15, 21)),
      M("v1-old", "uuid-1", At(2024, 3, 14, 21)),
      M("v2-new", "uuid-2", At(2023, 6, 1, 8)),  // older than all of v1
      M("v2-old", "uuid-2", At(2023, 1, 1, 8)),
      // Offline images: no UUID, grouped by path.
      M("sdb-new", "", At(2022, 5, 2, 0), "/dev/sdb"),
      M("sdb-old", "", At(2022, 5, 1, 0), "/dev/sdb"),
      M("sdc-only", "", At(2020, 1, 1, 0), "/dev/sdc"),
  };
  auto last1 = imaging::PruneSelect(images, P(1, 0, 0, 0));
  EXPECT_EQ(last1, Sorted({"v1-old", "v2-old", "sdb-old"}));
  auto monthly1 = imaging::PruneSelect(images, P(0, 0, 0, 1));
  EXPECT_EQ(monthly1, Sorted({"v1-old", "v2-old", "sdb-old"}));
  auto monthly2 = imaging::PruneSelect(images, P(0, 0, 0, 2));
  EXPECT_EQ(monthly2, Sorted({"v1-old", "sdb-old"}));
  EXPECT_TRUE(imaging::PruneSelect({}, P(1, 1, 1, 1)).empty());
}

TEST_F(PruneTest, WeeksAreIsoWeeksAcrossTheYearEnd) {
  // 2024-12-28 is a Saturday (2024-W52); 2024-12-31 and 2025-01-02 are in
  // 2025-W01.
  std::vector<Manifest> images = {
      M("w52", "v", At(2024, 12, 28, 12)),
      M("tue", "v", At(2024, 12, 31, 12)),
      M("thu", "v", At(2025, 1, 2, 12)),
  };
  EXPECT_EQ(imaging::PruneSelect(images, P(0, 0, 2, 0)), std::vector<std::string>{"tue"});
  EXPECT_EQ(imaging::PruneSelect(images, P(0, 0, 0, 2)), std::vector<std::string>{"w52"});
  EXPECT_EQ(imaging::PruneSelect(images, P(0, 2, 0, 0)), std::vector<std::string>{"w52"});
}

TEST_F(PruneTest, DaysFollowLocalTime) {
  // 23:00 and 01:00 UTC the next day are two days in UTC but one in UTC+3.
  std::vector<Manifest> images = {
      M("late", "v", At(2024, 3, 14, 23)),
      M("early", "v", At(2024, 3, 15, 1)),
  };
  EXPECT_TRUE(imaging::PruneSelect(images, P(0, 2, 0, 0)).empty());
  ::setenv("TZ", "XYZ-3", 1);  // POSIX: three hours east of UTC
  ::tzset();
  EXPECT_EQ(imaging::PruneSelect(images, P(0, 2, 0, 0)), std::vector<std::string>{"late"});
}

// ---- the image as a block device -------------------------------------------

TEST_F(ImagingTest, ImageDeviceReadsLikeTheSource) {
  Rng rng(11);
  Layout l{6 * kChunk + 777, {}};
  l.Put(0, Random(rng, 2 * kChunk));
  l.Put(2 * kChunk, Text(kChunk, 5));
  // 3: hole, 4: written zeros
  l.Put(4 * kChunk, Bytes(kChunk));
  l.Put(5 * kChunk, Random(rng, kChunk + 777));
  WriteSparse(Path("vol"), l);
  const Bytes want = l.Content();
  Manifest m = Build(Path("vol"));
  ASSERT_EQ(m.chunks[3], kZeroChunk);
  ASSERT_EQ(m.chunks[4], kZeroChunk);

  auto dev = imaging::ImageDevice(repo_, m);
  repo_.reset();  // the device keeps the repository alive
  ASSERT_NE(dev, nullptr);
  EXPECT_EQ(dev->size(), l.size);
  EXPECT_TRUE(dev->read_only());

  auto read_eq = [&](uint64_t off, uint64_t len) {
    Bytes got(len, std::byte{0xCC});
    Status s = dev->Read(off, got);
    ASSERT_TRUE(s.ok()) << "read " << off << "+" << len << ": " << s.ToString();
    ASSERT_TRUE(std::equal(got.begin(), got.end(), want.begin() + static_cast<std::ptrdiff_t>(off)))
        << "read " << off << "+" << len;
  };
  read_eq(0, l.size);
  read_eq(kChunk - 1, 2);                // across a boundary
  read_eq(kChunk - 100, 2 * kChunk + 3);  // across three chunks
  read_eq(3 * kChunk + 5, kChunk);        // the zero chunks
  read_eq(l.size - 10, 10);               // the end of the short last chunk
  read_eq(l.size, 0);
  for (int i = 0; i < 300; ++i) {
    uint64_t off = rng.Uniform(0, l.size - 1);
    uint64_t len = rng.Uniform(0, std::min<uint64_t>(l.size - off, 3 * kChunk));
    read_eq(off, len);
  }
  {
    Bytes z(kChunk, std::byte{0xCC});
    ASSERT_TRUE(dev->Read(3 * kChunk, z).ok());
    EXPECT_TRUE(std::all_of(z.begin(), z.end(), [](std::byte b) { return b == std::byte{0}; }));
  }

  Bytes buf(16);
  Status w = dev->Write(0, buf, false);
  EXPECT_FALSE(w.ok());
  EXPECT_EQ(w.err(), EROFS);
  EXPECT_EQ(w.ToErrno(), EROFS);
  Status d = dev->Discard(0, kChunk);
  EXPECT_FALSE(d.ok());
  EXPECT_EQ(d.err(), EROFS);
  Status wz = dev->WriteZeroes(0, kChunk);
  EXPECT_FALSE(wz.ok());
  EXPECT_EQ(wz.err(), EROFS);
  EXPECT_TRUE(dev->Flush().ok());
  read_eq(0, 10);  // nothing changed

  EXPECT_EQ(dev->Read(l.size - 10, std::span(buf.data(), 11)).code(), Code::kInvalidArgument);
  EXPECT_EQ(dev->Read(l.size + 1, std::span(buf.data(), 0)).code(), Code::kInvalidArgument);
  EXPECT_EQ(dev->Read(~uint64_t{0} - 3, std::span(buf.data(), 10)).code(),
            Code::kInvalidArgument);
}

TEST(ImageAllocatedTest, MergesNonZeroChunksAndSkipsZeroOnes) {
  ChunkId a{}, b{}, c{}, d{};
  a[0] = 1;
  b[0] = 2;
  c[0] = 3;
  d[31] = 4;
  Manifest m;
  m.chunk_size = kChunk;
  m.size = 5 * kChunk + 100;
  m.chunks = {kZeroChunk, a, b, kZeroChunk, c, d};
  auto r = imaging::ImageAllocated(m);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].offset, kChunk);
  EXPECT_EQ(r[0].length, 2 * kChunk);
  EXPECT_EQ(r[1].offset, 4 * kChunk);
  EXPECT_EQ(r[1].length, kChunk + 100);

  m.chunks = {a, a, a, a, a, a};
  r = imaging::ImageAllocated(m);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].offset, 0u);
  EXPECT_EQ(r[0].length, m.size);

  m.chunks = {a, kZeroChunk, b, kZeroChunk, c, kZeroChunk};
  r = imaging::ImageAllocated(m);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[2].offset, 4 * kChunk);
  EXPECT_EQ(r[2].length, kChunk);

  m.chunks.assign(6, kZeroChunk);
  EXPECT_TRUE(imaging::ImageAllocated(m).empty());
}

// ---- filesystem detection --------------------------------------------------

TEST(DetectFilesystemTest, Magics) {
  Bytes head(128 * 1024);
  EXPECT_EQ(imaging::DetectFilesystem(head), "");
  EXPECT_EQ(imaging::DetectFilesystem({}), "");

  Bytes ext4 = head;
  ext4[1080] = std::byte{0x53};
  ext4[1081] = std::byte{0xEF};
  EXPECT_EQ(imaging::DetectFilesystem(ext4), "ext4");
  // Byte order matters.
  Bytes swapped = head;
  swapped[1080] = std::byte{0xEF};
  swapped[1081] = std::byte{0x53};
  EXPECT_EQ(imaging::DetectFilesystem(swapped), "");
  // Too short to hold the magic: not read past the end.
  EXPECT_EQ(imaging::DetectFilesystem(std::span(ext4.data(), 1081)), "");

  Bytes xfs = head;
  std::memcpy(xfs.data(), "XFSB", 4);
  EXPECT_EQ(imaging::DetectFilesystem(xfs), "xfs");
  EXPECT_EQ(imaging::DetectFilesystem(std::span(xfs.data(), 4)), "xfs");
  EXPECT_EQ(imaging::DetectFilesystem(std::span(xfs.data(), 3)), "");

  Bytes btrfs = head;
  std::memcpy(btrfs.data() + 65536 + 64, "_BHRfS_M", 8);
  EXPECT_EQ(imaging::DetectFilesystem(btrfs), "btrfs");

  Bytes swap = head;
  std::memcpy(swap.data() + 4086, "SWAPSPACE2", 10);
  EXPECT_EQ(imaging::DetectFilesystem(swap), "swap");

  Bytes fat = head;
  std::memcpy(fat.data() + 82, "FAT32   ", 8);
  EXPECT_EQ(imaging::DetectFilesystem(fat), "vfat");
}

}  // namespace
}  // namespace umbra::testing
