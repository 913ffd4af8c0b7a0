// Unit tests for the base helpers (Status, Crc32, Rng/UUID, sizes) and the
// three Envs: PosixEnv (in a temporary directory), MemEnv (durability and
// crash simulation) and FaultEnv (injected errors, delays, ENOSPC budgets).
#include "umbra/io.h"

#include <gtest/gtest.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "base/checksum.h"
#include "base/random.h"
#include "base/rwlock.h"
#include "base/units.h"
#include "io/fault_env.h"
#include "io/mem_env.h"
#include "io/posix_env.h"
#include "umbra/status.h"

namespace umbra {
namespace {

std::vector<std::byte> Bytes(size_t n, uint8_t fill) {
  return std::vector<std::byte>(n, static_cast<std::byte>(fill));
}

std::vector<std::byte> Bytes(std::string_view s) {
  std::vector<std::byte> v(s.size());
  std::memcpy(v.data(), s.data(), s.size());
  return v;
}

std::vector<std::byte> Read(File& f, uint64_t off, size_t n) {
  std::vector<std::byte> buf(n, std::byte{0xEE});
  Status s = f.ReadAt(off, buf);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return buf;
}

bool AllEqual(const std::vector<std::byte>& v, uint8_t b) {
  for (std::byte x : v) {
    if (x != static_cast<std::byte>(b)) return false;
  }
  return true;
}

std::unique_ptr<File> MustOpen(Env& env, const std::string& path, OpenMode mode) {
  auto r = env.Open(path, mode);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? std::move(r).value() : nullptr;
}

// ---------------------------------------------------------------- Status --

TEST(StatusTest, FromErrnoMapsCodesAndMessage) {
  EXPECT_EQ(Status::FromErrno(ENOSPC, "x").code(), Code::kNoSpace);
  EXPECT_EQ(Status::FromErrno(EDQUOT, "x").code(), Code::kNoSpace);
  EXPECT_EQ(Status::FromErrno(ENOENT, "x").code(), Code::kNotFound);
  EXPECT_EQ(Status::FromErrno(EEXIST, "x").code(), Code::kAlreadyExists);
  EXPECT_EQ(Status::FromErrno(EACCES, "x").code(), Code::kPermissionDenied);
  EXPECT_EQ(Status::FromErrno(EPERM, "x").code(), Code::kPermissionDenied);
  EXPECT_EQ(Status::FromErrno(ETIMEDOUT, "x").code(), Code::kTimedOut);
  Status s = Status::FromErrno(EIO, "write /a");
  EXPECT_EQ(s.code(), Code::kIOError);
  EXPECT_EQ(s.err(), EIO);
  EXPECT_EQ(s.message(), std::string("write /a: ") + std::strerror(EIO));
  EXPECT_EQ(s.ToString(), "IOError: " + s.message());
  EXPECT_EQ(Status::Ok().ToString(), "OK");
}

TEST(StatusTest, AnnotateKeepsCodeAndErrno) {
  Status s = Status::FromErrno(ENOSPC, "write").Annotate("shadow store");
  EXPECT_EQ(s.code(), Code::kNoSpace);
  EXPECT_EQ(s.err(), ENOSPC);
  EXPECT_EQ(s.message().rfind("shadow store: write: ", 0), 0u) << s.message();
  EXPECT_TRUE(Status::Ok().Annotate("ctx").ok());
}

TEST(StatusTest, ToErrno) {
  EXPECT_EQ(Status::Ok().ToErrno(), 0);
  EXPECT_EQ(Status::NoSpace("x").ToErrno(), ENOSPC);
  EXPECT_EQ(Status::NotFound("x").ToErrno(), ENOENT);
  EXPECT_EQ(Status::InvalidArgument("x").ToErrno(), EINVAL);
  EXPECT_EQ(Status::SnapshotInvalid("x").ToErrno(), EIO);
  EXPECT_EQ(Status::Corruption("x").ToErrno(), EIO);
  EXPECT_EQ(Status(Code::kIOError, "x").ToErrno(), EIO);
  EXPECT_EQ(Status::FromErrno(EROFS, "x").ToErrno(), EROFS);
  EXPECT_EQ(Status::TimedOut("x").ToErrno(), ETIMEDOUT);
  EXPECT_EQ(CodeName(Code::kSnapshotInvalid), "SnapshotInvalid");
}

// -------------------------------------------------------------- checksum --

TEST(ChecksumTest, KnownVectorAndIncremental) {
  auto data = Bytes("123456789");
  EXPECT_EQ(Crc32(data), 0xCBF43926u);
  const uint32_t first = Crc32(std::span<const std::byte>(data).first(4));
  EXPECT_EQ(Crc32(std::span<const std::byte>(data).subspan(4), first), 0xCBF43926u);
  EXPECT_EQ(Crc32({}), 0u);
}

// ---------------------------------------------------------------- random --

TEST(RandomTest, RngIsDeterministicAndInRange) {
  Rng a(42), b(42), c(43);
  bool differs = false;
  for (int i = 0; i < 100; ++i) {
    const uint64_t x = a.Next();
    EXPECT_EQ(x, b.Next());
    differs |= x != c.Next();
  }
  EXPECT_TRUE(differs);
  std::set<uint64_t> seen;
  for (int i = 0; i < 1000; ++i) {
    const uint64_t v = a.Uniform(5, 9);
    EXPECT_GE(v, 5u);
    EXPECT_LE(v, 9u);
    seen.insert(v);
  }
  EXPECT_EQ(seen.size(), 5u);
  EXPECT_EQ(a.Uniform(7, 7), 7u);
  int heads = 0;
  for (int i = 0; i < 10000; ++i) heads += a.Bernoulli(0.25) ? 1 : 0;
  EXPECT_GT(heads, 2000);
  EXPECT_LT(heads, 3000);
  EXPECT_FALSE(a.Bernoulli(0.0));
  EXPECT_TRUE(a.Bernoulli(1.0));
  std::vector<std::byte> buf1(37), buf2(37);
  Rng f1(7), f2(7);
  f1.Fill(buf1);
  f2.Fill(buf2);
  EXPECT_EQ(buf1, buf2);
  EXPECT_FALSE(AllEqual(buf1, 0));
}

TEST(RandomTest, UuidFormatParseRoundTrip) {
  const std::string u = NewUuid();
  ASSERT_EQ(u.size(), 36u);
  EXPECT_EQ(u[14], '4');  // version 4
  EXPECT_TRUE(u[19] == '8' || u[19] == '9' || u[19] == 'a' || u[19] == 'b');
  EXPECT_NE(u, NewUuid());
  Uuid parsed;
  ASSERT_TRUE(ParseUuid(u, parsed));
  EXPECT_EQ(FormatUuid(parsed), u);
  ASSERT_TRUE(ParseUuid("3F2A9C1E-8B7D-4E2F-A1B0-0123456789AB", parsed));
  EXPECT_EQ(parsed[0], 0x3f);
  EXPECT_EQ(parsed[15], 0xab);
  EXPECT_EQ(FormatUuid(parsed), "3f2a9c1e-8b7d-4e2f-a1b0-0123456789ab");
  EXPECT_FALSE(ParseUuid("3f2a9c1e-8b7d-4e2f-a1b0-0123456789a", parsed));
  EXPECT_FALSE(ParseUuid("3f2a9c1e-8b7d-4e2f-a1b0_0123456789ab", parsed));
  EXPECT_FALSE(ParseUuid("3f2a9c1e-8b7d-4e2f-a1b0-0123456789ag", parsed));
}

// ----------------------------------------------------------------- units --

TEST(UnitsTest, ParseSize) {
  struct Case {
    const char* text;
    uint64_t want;
  } cases[] = {
      {"4096", 4096},
      {"0", 0},
      {"64K", 65536},
      {"64k", 65536},
      {"64KiB", 65536},
      {"64KB", 65536},
      {"1G", 1ull << 30},
      {"1.5GiB", 3ull << 29},
      {"10M", 10ull << 20},
      {"2 MiB", 2ull << 20},
      {"512B", 512},
      {"1.5K", 1536},
      {"1T", 1ull << 40},
      {"15E", 15ull << 60},
      {"18446744073709551615", UINT64_MAX},
  };
  for (const auto& c : cases) {
    auto r = ParseSize(c.text);
    ASSERT_TRUE(r.ok()) << c.text << ": " << r.status().ToString();
    EXPECT_EQ(r.value(), c.want) << c.text;
  }
  for (const char* bad : {"", "K", "abc", "12Q", "-1", "1.", ".5K", "1.5", "0.1K", "64KiBx", "16E",
                          "18446744073709551616", "99999999999999999999G", "1 2", "64  K", "1e3"}) {
    auto r = ParseSize(bad);
    EXPECT_FALSE(r.ok()) << "accepted \"" << bad << "\"";
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << bad;
    }
  }
}

TEST(UnitsTest, FormatBytes) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(1023), "1023 B");
  EXPECT_EQ(FormatBytes(1024), "1 KiB");
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
  EXPECT_EQ(FormatBytes(64 << 10), "64 KiB");
  EXPECT_EQ(FormatBytes(3ull << 29), "1.5 GiB");
  EXPECT_EQ(FormatBytes((1ull << 20) - 1), "1 MiB");  // rounds up into the next unit
  EXPECT_EQ(FormatBytes(UINT64_MAX), "16 EiB");
  // Round-trips through ParseSize for the exact cases.
  for (uint64_t v : {1536ull, 65536ull, 3ull << 29, 10ull << 20}) {
    std::string s = FormatBytes(v);
    s.erase(s.find(' '), 1);
    EXPECT_EQ(ParseSize(s).value(), v) << s;
  }
}

// RwLock: readers share, a writer excludes everyone, a waiting writer keeps
// new readers out, and a hold may be released by another thread.
TEST(RwLockTest, ExclusionAndReleaseFromAnotherThread) {
  RwLock l;
  l.lock_shared();
  l.lock_shared();  // readers share
  std::atomic<int> stage{0};
  std::thread w([&] {
    l.lock();  // waits for both readers
    stage.store(1);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(stage.load(), 0) << "a writer got in while readers held the lock";
  std::atomic<bool> reader_in{false};
  std::thread r([&] {
    l.lock_shared();  // a writer waits: this reader waits behind it
    reader_in.store(true);
    l.unlock_shared();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(reader_in.load()) << "a reader overtook a waiting writer";
  std::thread([&] { l.unlock_shared(); }).join();  // released by another thread
  l.unlock_shared();
  w.join();
  EXPECT_EQ(stage.load(), 1);
  EXPECT_FALSE(reader_in.load()) << "a reader got in while the writer held the lock";
  std::thread([&] { l.unlock(); }).join();  // the writer's hold, released elsewhere
  r.join();
  EXPECT_TRUE(reader_in.load());
  l.lock();  // free again
  l.unlock();
}

// -------------------------------------------------------------- PosixEnv --

class PosixEnvTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = getenv("TMPDIR");
    std::string tmpl =
        std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/umbra_io_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  Env& env() { return *DefaultEnv(); }
  std::string dir_;
};

TEST_F(PosixEnvTest, ReadWriteSizeSync) {
  const std::string p = dir_ + "/f";
  auto f = MustOpen(env(), p, OpenMode::kCreateNew);
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->path(), p);
  ASSERT_TRUE(f->WriteAt(100, Bytes("hello")).ok());
  ASSERT_TRUE(f->Sync().ok());
  EXPECT_EQ(f->Size().value(), 105u);
  EXPECT_EQ(Read(*f, 100, 5), Bytes("hello"));
  EXPECT_TRUE(AllEqual(Read(*f, 0, 100), 0));
  // Past EOF: zeros, never a short read.
  auto tail = Read(*f, 103, 10);
  EXPECT_EQ(std::vector<std::byte>(tail.begin(), tail.begin() + 2), Bytes("lo"));
  EXPECT_TRUE(AllEqual(std::vector<std::byte>(tail.begin() + 2, tail.end()), 0));
  EXPECT_TRUE(AllEqual(Read(*f, 1 << 20, 4096), 0));
  EXPECT_TRUE(f->ReadAt(0, std::span<std::byte>()).ok());
  EXPECT_TRUE(f->WriteAt(0, std::span<const std::byte>()).ok());

  ASSERT_TRUE(f->Truncate(3).ok());
  EXPECT_EQ(f->Size().value(), 3u);

  auto again = env().Open(p, OpenMode::kCreateNew);
  EXPECT_EQ(again.status().code(), Code::kAlreadyExists);
  auto missing = env().Open(dir_ + "/nope", OpenMode::kReadOnly);
  EXPECT_EQ(missing.status().code(), Code::kNotFound);
  auto ro = MustOpen(env(), p, OpenMode::kReadOnly);
  EXPECT_FALSE(ro->WriteAt(0, Bytes("x")).ok());
}

TEST_F(PosixEnvTest, PunchHoleFreesSpaceAndReadsZeros) {
  const std::string p = dir_ + "/sparse";
  auto f = MustOpen(env(), p, OpenMode::kCreate);
  ASSERT_NE(f, nullptr);
  const auto data = Bytes(1 << 20, 0xAB);
  ASSERT_TRUE(f->WriteAt(0, data).ok());
  ASSERT_TRUE(f->Sync().ok());
  const uint64_t before = f->AllocatedBytes().value();
  EXPECT_GE(before, 1u << 20);
  ASSERT_TRUE(f->PunchHole(256 << 10, 512 << 10).ok());
  ASSERT_TRUE(f->Sync().ok());
  EXPECT_EQ(f->Size().value(), 1u << 20);  // size kept
  EXPECT_TRUE(AllEqual(Read(*f, 256 << 10, 512 << 10), 0));
  EXPECT_TRUE(AllEqual(Read(*f, 0, 256 << 10), 0xAB));
  EXPECT_TRUE(AllEqual(Read(*f, 768 << 10, 256 << 10), 0xAB));
  EXPECT_LE(f->AllocatedBytes().value(), before - (512 << 10));
  EXPECT_TRUE(f->PunchHole(0, 0).ok());
}

TEST_F(PosixEnvTest, Namespace) {
  const std::string sub = dir_ + "/sub";
  ASSERT_TRUE(env().CreateDir(sub).ok());
  ASSERT_TRUE(env().CreateDir(sub).ok());  // idempotent
  ASSERT_TRUE(MustOpen(env(), sub + "/a", OpenMode::kCreate)->WriteAt(0, Bytes("A")).ok());
  ASSERT_TRUE(MustOpen(env(), sub + "/b", OpenMode::kCreate) != nullptr);
  EXPECT_EQ(env().ListDir(sub).value(), (std::vector<std::string>{"a", "b"}));
  ASSERT_TRUE(env().Rename(sub + "/a", sub + "/b").ok());  // replaces b
  ASSERT_TRUE(env().SyncDir(sub).ok());
  EXPECT_FALSE(env().Exists(sub + "/a").value());
  EXPECT_EQ(Read(*MustOpen(env(), sub + "/b", OpenMode::kReadOnly), 0, 1), Bytes("A"));
  EXPECT_EQ(env().Remove(sub).code(), Code::kIOError);  // not empty
  ASSERT_TRUE(env().Remove(sub + "/b").ok());
  EXPECT_EQ(env().Remove(sub + "/b").code(), Code::kNotFound);
  ASSERT_TRUE(env().Remove(sub).ok());
  EXPECT_FALSE(env().Exists(sub).value());
  EXPECT_EQ(env().SyncDir(sub).code(), Code::kNotFound);
  EXPECT_EQ(env().ListDir(sub).status().code(), Code::kNotFound);
  EXPECT_EQ(env().CreateDir(dir_ + "/x/y").code(), Code::kNotFound);  // no parents
}

// st_dev decides; a block or character device is on no filesystem of files.
TEST_F(PosixEnvTest, SameFilesystem) {
  const std::string img = dir_ + "/vol.img";
  ASSERT_TRUE(MustOpen(env(), img, OpenMode::kCreate)->Truncate(1 << 20).ok());
  ASSERT_TRUE(env().CreateDir(dir_ + "/shadow").ok());
  EXPECT_TRUE(env().SameFilesystem(dir_ + "/shadow", img).value());
  auto other = env().SameFilesystem("/dev/shm", img);  // tmpfs on Debian
  ASSERT_TRUE(other.ok()) << other.status().ToString();
  EXPECT_FALSE(other.value());
  EXPECT_FALSE(env().SameFilesystem("/dev", "/dev/null").value()) << "a device node is no file";
  EXPECT_EQ(env().SameFilesystem(dir_ + "/none", img).status().code(), Code::kNotFound);
}

TEST_F(PosixEnvTest, StatFsVolumeAndClock) {
  auto st = env().StatFs(dir_);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_GT(st->total_bytes, 0u);
  EXPECT_LE(st->free_bytes, st->total_bytes);

  // A plain file that is not attached to a loop device holds no directory.
  const std::string img = dir_ + "/vol.img";
  ASSERT_TRUE(MustOpen(env(), img, OpenMode::kCreate)->Truncate(1 << 20).ok());
  auto on = env().IsOnVolume(dir_, img);
  ASSERT_TRUE(on.ok()) << on.status().ToString();
  EXPECT_FALSE(on.value());
  EXPECT_EQ(env().IsOnVolume(dir_, dir_).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(env().IsOnVolume(dir_ + "/none", img).status().code(), Code::kNotFound);

  const uint64_t t0 = env().NowNanos();
  env().SleepNanos(2'000'000);
  EXPECT_GE(env().NowNanos() - t0, 2'000'000u);
}

// Runs a shell command, returning its stdout (trailing newline stripped), or
// nullopt if it exited non-zero.
std::optional<std::string> RunShell(const std::string& cmd) {
  FILE* p = popen((cmd + " 2>/dev/null").c_str(), "r");
  if (p == nullptr) return std::nullopt;
  std::string out;
  char buf[256];
  while (fgets(buf, sizeof(buf), p) != nullptr) out += buf;
  if (pclose(p) != 0) return std::nullopt;
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

// Needs root and working loop devices (skipped otherwise): a directory on an
// ext4 filesystem inside a loop-mounted image file is "on" that image file
// and on the loop device, and nothing else is.
TEST_F(PosixEnvTest, IsOnVolumeWithLoopDevice) {
  if (geteuid() != 0 || !RunShell("command -v losetup && command -v mkfs.ext4")) {
    GTEST_SKIP() << "needs root, losetup and mkfs.ext4";
  }
  const std::string img = dir_ + "/vol.img";
  const std::string mnt = dir_ + "/mnt";
  ASSERT_TRUE(env().CreateDir(mnt).ok());
  ASSERT_TRUE(MustOpen(env(), img, OpenMode::kCreate)->Truncate(32 << 20).ok());
  ASSERT_TRUE(RunShell("mkfs.ext4 -q -F " + img));
  const auto loop = RunShell("losetup -f --show " + img);
  if (!loop) GTEST_SKIP() << "no loop devices available";
  const bool mounted = RunShell("mount " + *loop + " " + mnt).has_value();
  if (mounted) {
    ASSERT_TRUE(env().CreateDir(mnt + "/shadow").ok());
    EXPECT_TRUE(env().IsOnVolume(mnt + "/shadow", img).value());
    EXPECT_TRUE(env().IsOnVolume(mnt + "/shadow", *loop).value());
    EXPECT_FALSE(env().IsOnVolume(dir_, img).value());
    EXPECT_FALSE(env().IsOnVolume(dir_, *loop).value());
    auto st = env().StatFs(mnt);
    ASSERT_TRUE(st.ok());
    EXPECT_GT(st->total_bytes, 16u << 20);
    EXPECT_LE(st->total_bytes, 32u << 20);
    EXPECT_TRUE(RunShell("umount " + mnt));
  }
  // The block device itself: size via BLKGETSIZE64, AllocatedBytes == Size.
  {
    auto dev = MustOpen(env(), *loop, OpenMode::kReadOnly);
    ASSERT_NE(dev, nullptr);
    EXPECT_EQ(dev->Size().value(), 32u << 20);
    EXPECT_EQ(dev->AllocatedBytes().value(), 32u << 20);
  }
  EXPECT_TRUE(RunShell("losetup -d " + *loop));
  if (!mounted) GTEST_SKIP() << "mount not permitted";
}

// ---------------------------------------------------------------- MemEnv --

// Creates `path` with `data`, syncs the file and its directory.
void CreateDurable(MemEnv& env, const std::string& path, const std::vector<std::byte>& data) {
  auto f = MustOpen(env, path, OpenMode::kCreate);
  ASSERT_NE(f, nullptr);
  ASSERT_TRUE(f->WriteAt(0, data).ok());
  ASSERT_TRUE(f->Sync().ok());
  const std::string dir = path.substr(0, path.rfind('/'));
  ASSERT_TRUE(env.SyncDir(dir.empty() ? "/" : dir).ok());
}

TEST(MemEnvTest, UnsyncedWriteDroppedSyncedKept) {
  MemEnv env;
  ASSERT_TRUE(env.CreateDir("/d").ok());
  CreateDurable(env, "/d/f", Bytes(8192, 1));
  auto f = MustOpen(env, "/d/f", OpenMode::kReadWrite);
  ASSERT_TRUE(f->WriteAt(0, Bytes(4096, 2)).ok());
  ASSERT_TRUE(f->Sync().ok());
  ASSERT_TRUE(f->WriteAt(4096, Bytes(8192, 3)).ok());  // unsynced, extends
  ASSERT_TRUE(f->Truncate(20000).ok());                // unsynced
  EXPECT_EQ(Read(*f, 4096, 1), Bytes(1, 3));           // visible before crash
  env.Crash(CrashMode::kDropUnsynced, 1);
  auto g = MustOpen(env, "/d/f", OpenMode::kReadOnly);
  EXPECT_EQ(g->Size().value(), 8192u);
  EXPECT_TRUE(AllEqual(Read(*g, 0, 4096), 2));
  EXPECT_TRUE(AllEqual(Read(*g, 4096, 4096), 1));
}

TEST(MemEnvTest, CreateAndRenameNeedSyncDir) {
  MemEnv env;
  ASSERT_TRUE(env.CreateDir("/d").ok());
  {
    auto f = MustOpen(env, "/d/new", OpenMode::kCreate);
    ASSERT_TRUE(f->WriteAt(0, Bytes("x")).ok());
    ASSERT_TRUE(f->Sync().ok());  // data durable, name not
  }
  env.Crash(CrashMode::kDropUnsynced, 1);
  EXPECT_FALSE(env.Exists("/d/new").value());
  EXPECT_TRUE(env.Exists("/d").value());  // directories are immediately durable

  CreateDurable(env, "/d/tmp", Bytes("v2"));
  CreateDurable(env, "/d/cur", Bytes("v1"));
  ASSERT_TRUE(env.Rename("/d/tmp", "/d/cur").ok());
  EXPECT_FALSE(env.Exists("/d/tmp").value());
  EXPECT_EQ(env.ReadWholeFile("/d/cur").value(), Bytes("v2"));
  env.Crash(CrashMode::kDropUnsynced, 1);
  EXPECT_TRUE(env.Exists("/d/tmp").value());
  EXPECT_EQ(env.ReadWholeFile("/d/cur").value(), Bytes("v1"));

  ASSERT_TRUE(env.Rename("/d/tmp", "/d/cur").ok());
  ASSERT_TRUE(env.SyncDir("/d").ok());
  env.Crash(CrashMode::kDropUnsynced, 1);
  EXPECT_FALSE(env.Exists("/d/tmp").value());
  EXPECT_EQ(env.ReadWholeFile("/d/cur").value(), Bytes("v2"));

  ASSERT_TRUE(env.Remove("/d/cur").ok());
  env.Crash(CrashMode::kDropUnsynced, 1);
  EXPECT_TRUE(env.Exists("/d/cur").value());  // removal was not synced
  ASSERT_TRUE(env.Remove("/d/cur").ok());
  ASSERT_TRUE(env.SyncDir("/d").ok());
  env.Crash(CrashMode::kDropUnsynced, 1);
  EXPECT_FALSE(env.Exists("/d/cur").value());
}

// Builds the same history in a fresh MemEnv: a durable 16-page file of
// zeros, then 16 unsynced page writes (page i filled with i+1), then crashes
// with `mode`/`seed` and returns the file's contents.
std::vector<std::byte> CrashAfterPageWrites(MemEnv::CrashMode mode, uint64_t seed) {
  MemEnv env;
  EXPECT_TRUE(env.CreateDir("/d").ok());
  CreateDurable(env, "/d/f", Bytes(16 * 4096, 0));
  auto f = MustOpen(env, "/d/f", OpenMode::kReadWrite);
  for (int i = 0; i < 16; ++i) {
    EXPECT_TRUE(f->WriteAt(i * 4096, Bytes(4096, static_cast<uint8_t>(i + 1))).ok());
  }
  env.Crash(mode, seed);
  return env.ReadWholeFile("/d/f").value();
}

TEST(MemEnvTest, KeepRandomSubsetIsRandomButDeterministic) {
  std::set<std::vector<bool>> outcomes;
  int partial = 0;
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    const auto data = CrashAfterPageWrites(CrashMode::kKeepRandomSubset, seed);
    ASSERT_EQ(data.size(), 16u * 4096);
    EXPECT_EQ(data, CrashAfterPageWrites(CrashMode::kKeepRandomSubset, seed));
    std::vector<bool> kept;
    for (int i = 0; i < 16; ++i) {
      std::vector<std::byte> page(data.begin() + i * 4096, data.begin() + (i + 1) * 4096);
      const bool is_new = AllEqual(page, static_cast<uint8_t>(i + 1));
      EXPECT_TRUE(is_new || AllEqual(page, 0)) << "page " << i << " is neither old nor new";
      kept.push_back(is_new);
    }
    const auto n = std::count(kept.begin(), kept.end(), true);
    partial += (n > 0 && n < 16) ? 1 : 0;
    outcomes.insert(kept);
  }
  EXPECT_GE(partial, 18);           // P(all or nothing) per seed is 2^-15
  EXPECT_GE(outcomes.size(), 15u);  // different seeds, different subsets
}

TEST(MemEnvTest, KeepRandomSubsetKeepsNamespacePrefix) {
  // Pending: create a, create b, create c (in that order). Any surviving
  // set must be a prefix: {}, {a}, {a,b}, {a,b,c}.
  std::set<int> seen;
  for (uint64_t seed = 0; seed < 40; ++seed) {
    MemEnv env;
    ASSERT_TRUE(env.CreateDir("/d").ok());
    for (const char* n : {"/d/a", "/d/b", "/d/c"}) {
      auto f = MustOpen(env, n, OpenMode::kCreate);
      ASSERT_TRUE(f->WriteAt(0, Bytes("z")).ok());
      ASSERT_TRUE(f->Sync().ok());
    }
    env.Crash(CrashMode::kKeepRandomSubset, seed);
    const auto names = env.ListDir("/d").value();
    const std::vector<std::string> all{"a", "b", "c"};
    ASSERT_LE(names.size(), 3u);
    EXPECT_EQ(names, std::vector<std::string>(all.begin(), all.begin() + names.size()));
    seen.insert(static_cast<int>(names.size()));
    for (const auto& n : names) EXPECT_EQ(env.ReadWholeFile("/d/" + n).value(), Bytes("z"));
  }
  EXPECT_EQ(seen.size(), 4u);
}

TEST(MemEnvTest, TornSectors) {
  int torn_pages = 0;
  for (uint64_t seed = 1; seed <= 10; ++seed) {
    const auto data = CrashAfterPageWrites(CrashMode::kTornSectors, seed);
    EXPECT_EQ(data, CrashAfterPageWrites(CrashMode::kTornSectors, seed));
    for (int i = 0; i < 16; ++i) {
      int new_sectors = 0;
      for (int s = 0; s < 8; ++s) {
        std::vector<std::byte> sector(data.begin() + i * 4096 + s * 512,
                                      data.begin() + i * 4096 + (s + 1) * 512);
        const bool is_new = AllEqual(sector, static_cast<uint8_t>(i + 1));
        EXPECT_TRUE(is_new || AllEqual(sector, 0));  // sectors are atomic
        new_sectors += is_new ? 1 : 0;
      }
      torn_pages += (new_sectors > 0 && new_sectors < 8) ? 1 : 0;
    }
  }
  EXPECT_GT(torn_pages, 100);  // ~98% of 160 pages are torn
}

TEST(MemEnvTest, StateAfterCrashIsDurable) {
  MemEnv env;
  ASSERT_TRUE(env.CreateDir("/d").ok());
  CreateDurable(env, "/d/f", Bytes(16 * 4096, 0));
  auto f = MustOpen(env, "/d/f", OpenMode::kReadWrite);
  for (int i = 0; i < 16; ++i) ASSERT_TRUE(f->WriteAt(i * 4096, Bytes(4096, 9)).ok());
  env.Crash(CrashMode::kKeepRandomSubset, 5);
  const auto after = env.ReadWholeFile("/d/f").value();
  env.Crash(CrashMode::kDropUnsynced, 0);
  EXPECT_EQ(env.ReadWholeFile("/d/f").value(), after);
}

TEST(MemEnvTest, HandlesFromBeforeCrashAreDead) {
  MemEnv env;
  CreateDurable(env, "/f", Bytes("abc"));
  auto old = MustOpen(env, "/f", OpenMode::kReadWrite);
  env.Crash(CrashMode::kDropUnsynced, 0);
  std::vector<std::byte> buf(3);
  for (Status s :
       {old->ReadAt(0, buf), old->WriteAt(0, Bytes("x")), old->Sync(), old->PunchHole(0, 1),
        old->Truncate(0), old->Size().status(), old->AllocatedBytes().status()}) {
    EXPECT_EQ(s.code(), Code::kIOError);
    EXPECT_NE(s.message().find("file handle from before crash"), std::string::npos) << s.message();
  }
  auto fresh = MustOpen(env, "/f", OpenMode::kReadWrite);
  EXPECT_EQ(Read(*fresh, 0, 3), Bytes("abc"));  // the dead write changed nothing
}

TEST(MemEnvTest, SparseHugeFileIsCheap) {
  MemEnv env;
  constexpr uint64_t kSize = 256ull << 20;
  auto f = MustOpen(env, "/big", OpenMode::kCreate);
  ASSERT_TRUE(f->Truncate(kSize).ok());
  ASSERT_TRUE(f->WriteAt(0, Bytes(4096, 1)).ok());
  ASSERT_TRUE(f->WriteAt(kSize / 2 + 100, Bytes(10, 2)).ok());  // one partial page
  ASSERT_TRUE(f->WriteAt(kSize - 4096, Bytes(4096, 3)).ok());
  ASSERT_TRUE(f->Sync().ok());
  EXPECT_EQ(f->Size().value(), kSize);
  EXPECT_EQ(f->AllocatedBytes().value(), 3u * 4096);
  EXPECT_TRUE(AllEqual(Read(*f, 4096, 1 << 20), 0));
  EXPECT_TRUE(f->ReadAt(0, std::span<std::byte>()).ok());  // empty span: no-op
  EXPECT_TRUE(f->WriteAt(0, std::span<const std::byte>()).ok());
  EXPECT_EQ(f->Size().value(), kSize);
  EXPECT_TRUE(AllEqual(Read(*f, kSize / 2 + 100, 10), 2));
  EXPECT_TRUE(AllEqual(Read(*f, kSize - 4096, 4096), 3));
  // Punch: whole pages are freed, partial ones zeroed.
  ASSERT_TRUE(f->PunchHole(kSize / 2 + 105, kSize / 2).ok());
  EXPECT_EQ(f->AllocatedBytes().value(), 2u * 4096);
  const auto partial = Read(*f, kSize / 2 + 100, 10);
  EXPECT_TRUE(AllEqual({partial.begin(), partial.begin() + 5}, 2));
  EXPECT_TRUE(AllEqual({partial.begin() + 5, partial.end()}, 0));
  EXPECT_EQ(f->Size().value(), kSize);
  ASSERT_TRUE(f->PunchHole(0, 4096).ok());
  EXPECT_EQ(f->AllocatedBytes().value(), 4096u);
  ASSERT_TRUE(f->Truncate(100).ok());
  EXPECT_EQ(f->AllocatedBytes().value(), 0u);
  ASSERT_TRUE(f->Truncate(8192).ok());
  EXPECT_TRUE(AllEqual(Read(*f, 0, 8192), 0));
}

TEST(MemEnvTest, OpenModesAndDirectories) {
  MemEnv env;
  EXPECT_EQ(env.Open("/no/such/dir/f", OpenMode::kCreate).status().code(), Code::kNotFound);
  EXPECT_EQ(env.Open("/f", OpenMode::kReadWrite).status().code(), Code::kNotFound);
  ASSERT_TRUE(env.CreateDir("/a/b").ok());  // creates /a too
  EXPECT_TRUE(env.Exists("/a").value());
  auto f = MustOpen(env, "/a/b/f", OpenMode::kCreateNew);
  EXPECT_EQ(env.Open("/a/b/f", OpenMode::kCreateNew).status().code(), Code::kAlreadyExists);
  auto ro = MustOpen(env, "/a/b/f", OpenMode::kReadOnly);
  EXPECT_FALSE(ro->WriteAt(0, Bytes("x")).ok());
  EXPECT_EQ(env.ListDir("/a").value(), std::vector<std::string>{"b"});
  EXPECT_EQ(env.ListDir("/a/b").value(), std::vector<std::string>{"f"});
  EXPECT_FALSE(env.Remove("/a/b").ok());  // not empty
  ASSERT_TRUE(env.Remove("/a/b/f").ok());
  ASSERT_TRUE(env.Remove("/a/b").ok());
  EXPECT_FALSE(env.Exists("/a/b").value());
  // Direct handles insist on 512-byte alignment, like O_DIRECT.
  auto d = env.Open("/a/direct", OpenMode::kCreate, /*direct=*/true);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ((*d)->WriteAt(1, Bytes(512, 1)).code(), Code::kInvalidArgument);
}

TEST(MemEnvTest, ClockSyncCountStatsVolumes) {
  MemEnv env;
  EXPECT_EQ(env.NowNanos(), 1'000'000'000u);
  env.SleepNanos(5);
  env.AdvanceClock(10);
  EXPECT_EQ(env.NowNanos(), 1'000'000'015u);

  EXPECT_EQ(env.sync_count(), 0u);
  auto f = MustOpen(env, "/f", OpenMode::kCreate);
  ASSERT_TRUE(f->WriteAt(0, Bytes(10000, 1)).ok());
  ASSERT_TRUE(f->Sync().ok());
  ASSERT_TRUE(env.SyncDir("/").ok());
  EXPECT_EQ(env.sync_count(), 2u);

  auto st = env.StatFs("/").value();
  EXPECT_EQ(st.total_bytes - st.free_bytes, 3u * 4096);
  env.SetFsStats({1000, 10});
  st = env.StatFs("/").value();
  EXPECT_EQ(st.total_bytes, 1000u);
  EXPECT_EQ(st.free_bytes, 10u);

  env.SetVolumeDir("/shadow", "/dev/vol0");
  EXPECT_TRUE(env.IsOnVolume("/shadow", "/dev/vol0").value());
  EXPECT_TRUE(env.IsOnVolume("/shadow/sub", "/dev/vol0").value());
  EXPECT_FALSE(env.IsOnVolume("/shadow2", "/dev/vol0").value());
  EXPECT_FALSE(env.IsOnVolume("/shadow", "/dev/vol1").value());
  EXPECT_FALSE(env.IsOnVolume("/other", "/dev/vol0").value());

  // One filesystem, until a tree is made a filesystem of its own.
  for (const char* d : {"/vol", "/shadow", "/shadow/a", "/shadow/a/inner", "/other"})
    ASSERT_TRUE(env.CreateDir(d).ok()) << d;
  MustOpen(env, "/vol/a.img", OpenMode::kCreate);
  EXPECT_TRUE(env.SameFilesystem("/shadow/a", "/vol/a.img").value());
  EXPECT_EQ(env.SameFilesystem("/shadow/none", "/vol/a.img").status().code(), Code::kNotFound);
  env.SetSeparateFilesystem("/shadow");
  env.SetSeparateFilesystem("/shadow/a/inner");
  EXPECT_FALSE(env.SameFilesystem("/shadow/a", "/vol/a.img").value());
  EXPECT_TRUE(env.SameFilesystem("/shadow/a", "/shadow").value());
  EXPECT_TRUE(env.SameFilesystem("/other", "/vol/a.img").value());
  EXPECT_FALSE(env.SameFilesystem("/shadow/a/inner", "/shadow/a").value());
}

// Random writes, punches, truncates, syncs and crashes at unaligned offsets,
// checked against a flat byte-vector model of the current and durable
// contents.
TEST(MemEnvTest, RandomOpsMatchFlatModel) {
  for (uint64_t seed = 1; seed <= 30; ++seed) {
    MemEnv env;
    Rng rng(seed);
    CreateDurable(env, "/f", {});
    auto f = MustOpen(env, "/f", OpenMode::kReadWrite);
    std::vector<std::byte> cur, durable;
    for (int step = 0; step < 300; ++step) {
      const uint64_t r = rng.Uniform(0, 99);
      const uint64_t off = rng.Uniform(0, 40000);
      const uint64_t len = rng.Uniform(0, 10000);
      if (r < 45) {
        std::vector<std::byte> data(len);
        rng.Fill(data);
        ASSERT_TRUE(f->WriteAt(off, data).ok());
        if (off + len > cur.size() && len > 0) cur.resize(off + len);
        std::copy(data.begin(), data.end(), cur.begin() + static_cast<ptrdiff_t>(off));
      } else if (r < 60) {
        ASSERT_TRUE(f->PunchHole(off, len).ok());
        for (uint64_t i = off; i < std::min<uint64_t>(off + len, cur.size()); ++i) {
          cur[i] = std::byte{0};
        }
      } else if (r < 68) {
        ASSERT_TRUE(f->Truncate(off).ok());
        cur.resize(off);
      } else if (r < 78) {
        ASSERT_TRUE(f->Sync().ok());
        durable = cur;
      } else if (r < 81) {
        env.Crash(CrashMode::kDropUnsynced, seed);
        cur = durable;
        f = MustOpen(env, "/f", OpenMode::kReadWrite);
      } else {
        auto got = Read(*f, off, len);
        std::vector<std::byte> want(len);
        for (uint64_t i = 0; i < len; ++i) {
          want[i] = off + i < cur.size() ? cur[off + i] : std::byte{0};
        }
        ASSERT_EQ(got, want) << "seed " << seed << " step " << step;
      }
      ASSERT_EQ(f->Size().value(), cur.size()) << "seed " << seed << " step " << step;
      ASSERT_LE(f->AllocatedBytes().value(), (cur.size() + 4095) / 4096 * 4096);
    }
    ASSERT_EQ(env.ReadWholeFile("/f").value(), cur) << "seed " << seed;
  }
}

TEST(MemEnvTest, ConcurrentWritersAreSafe) {
  MemEnv env;
  auto f = MustOpen(env, "/f", OpenMode::kCreate);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        const uint64_t page = static_cast<uint64_t>(t * 200 + i);
        EXPECT_TRUE(f->WriteAt(page * 4096, Bytes(4096, static_cast<uint8_t>(t + 1))).ok());
        if (i % 50 == 0) {
          EXPECT_TRUE(f->Sync().ok());
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) {
    EXPECT_TRUE(AllEqual(Read(*f, static_cast<uint64_t>(t * 200) * 4096, 200 * 4096),
                         static_cast<uint8_t>(t + 1)));
  }
}

// -------------------------------------------------------------- FaultEnv --

TEST(FaultEnvTest, FailNthFailsOnceWithoutEffect) {
  MemEnv mem;
  FaultEnv env(&mem);
  auto f = MustOpen(env, "/f", OpenMode::kCreate);
  env.FailNth(3, EIO, FaultEnv::kWrite);
  EXPECT_TRUE(f->WriteAt(0, Bytes("a")).ok());
  EXPECT_TRUE(f->Sync().ok());  // does not match kWrite, not counted
  EXPECT_TRUE(f->WriteAt(1, Bytes("b")).ok());
  Status s = f->WriteAt(2, Bytes("c"));
  EXPECT_EQ(s.code(), Code::kIOError);
  EXPECT_EQ(s.err(), EIO);
  EXPECT_NE(s.message().find("injected"), std::string::npos);
  EXPECT_EQ(mem.ReadWholeFile("/f").value(), Bytes("ab"));  // failed write had no effect
  EXPECT_TRUE(f->WriteAt(2, Bytes("c")).ok());              // only once
  EXPECT_EQ(mem.ReadWholeFile("/f").value(), Bytes("abc"));

  // Default: all mutating ops count; reads do not.
  env.FailNth(2, ENOSPC);
  std::vector<std::byte> buf(1);
  EXPECT_TRUE(f->ReadAt(0, buf).ok());
  EXPECT_TRUE(env.CreateDir("/d").ok());
  Status r = env.Rename("/f", "/d/g");
  EXPECT_EQ(r.code(), Code::kNoSpace);
  EXPECT_TRUE(mem.Exists("/f").value());
  EXPECT_FALSE(mem.Exists("/d/g").value());
  EXPECT_EQ(env.op_count(FaultEnv::Op::kWrite), 4u);
  EXPECT_EQ(env.op_count(FaultEnv::Op::kRename), 1u);
  EXPECT_EQ(env.op_count(FaultEnv::Op::kRead), 1u);
  env.Reset();
  EXPECT_EQ(env.op_count(FaultEnv::Op::kWrite), 0u);
}

TEST(FaultEnvTest, RulesWithSkipAndCount) {
  MemEnv mem;
  FaultEnv env(&mem);
  auto journal = MustOpen(env, "/journal", OpenMode::kCreate);
  auto data = MustOpen(env, "/data", OpenMode::kCreate);
  const int id = env.AddRule({.path_substr = "journal",
                              .ops = FaultEnv::kSync | FaultEnv::Op::kTruncate,
                              .err = EIO,
                              .skip = 2,
                              .count = 2});
  EXPECT_TRUE(journal->Sync().ok());
  EXPECT_TRUE(data->Sync().ok());                     // other path: not even seen
  EXPECT_TRUE(journal->WriteAt(0, Bytes("x")).ok());  // other op
  EXPECT_TRUE(journal->Sync().ok());
  EXPECT_EQ(journal->Sync().err(), EIO);
  EXPECT_EQ(journal->Truncate(0).err(), EIO);
  EXPECT_EQ(mem.ReadWholeFile("/journal").value(), Bytes("x"));  // truncate had no effect
  EXPECT_TRUE(journal->Sync().ok());                             // count exhausted
  EXPECT_TRUE(data->Sync().ok());

  env.RemoveRule(id);
  env.AddRule({.path_substr = "data", .ops = FaultEnv::kAllMutating, .err = EROFS});
  EXPECT_EQ(data->WriteAt(0, Bytes("y")).err(), EROFS);
  EXPECT_EQ(env.Rename("/journal", "/data2").err(), EROFS);  // matches the target path
  EXPECT_TRUE(env.Exists("/journal").value());
  env.ClearRules();
  EXPECT_TRUE(data->WriteAt(0, Bytes("y")).ok());
}

TEST(FaultEnvTest, DelaysAdvanceMemEnvClock) {
  MemEnv mem;
  FaultEnv env(&mem);
  EXPECT_EQ(env.Open("/slow/f", OpenMode::kCreate).status().code(), Code::kNotFound);
  ASSERT_TRUE(env.CreateDir("/slow").ok());
  auto f = MustOpen(env, "/slow/f", OpenMode::kCreate);
  env.AddRule({.path_substr = "/slow/", .ops = FaultEnv::kWrite, .delay_ns = 5'000'000});
  const uint64_t t0 = env.NowNanos();
  EXPECT_TRUE(f->WriteAt(0, Bytes("a")).ok());  // delayed, not failed
  EXPECT_TRUE(f->WriteAt(1, Bytes("b")).ok());
  EXPECT_TRUE(f->Sync().ok());  // not delayed
  EXPECT_EQ(env.NowNanos() - t0, 10'000'000u);
  EXPECT_EQ(mem.NowNanos() - t0, 10'000'000u);
  EXPECT_EQ(mem.ReadWholeFile("/slow/f").value(), Bytes("ab"));

  env.AddRule({.path_substr = "/slow/",
               .ops = FaultEnv::kSync,
               .err = ETIMEDOUT,
               .delay_ns = 1'000'000'000});
  EXPECT_EQ(f->Sync().code(), Code::kTimedOut);
  EXPECT_EQ(env.NowNanos() - t0, 1'010'000'000u);
}

TEST(FaultEnvTest, WriteBudgetGivesEnospcWithNothingWritten) {
  MemEnv mem;
  FaultEnv env(&mem);
  auto shadow = MustOpen(env, "/shadow.dat", OpenMode::kCreate);
  auto other = MustOpen(env, "/other.dat", OpenMode::kCreate);
  env.SetWriteBudget("shadow", 10000);
  EXPECT_TRUE(shadow->WriteAt(0, Bytes(8192, 1)).ok());
  Status s = shadow->WriteAt(8192, Bytes(4096, 2));
  EXPECT_EQ(s.code(), Code::kNoSpace);
  EXPECT_EQ(s.err(), ENOSPC);
  EXPECT_EQ(shadow->Size().value(), 8192u);
  EXPECT_EQ(mem.ReadWholeFile("/shadow.dat").value(), Bytes(8192, 1));
  EXPECT_TRUE(other->WriteAt(0, Bytes(65536, 3)).ok());     // not covered
  EXPECT_TRUE(shadow->WriteAt(8192, Bytes(1808, 4)).ok());  // exactly fills the budget
  EXPECT_EQ(shadow->WriteAt(10000, Bytes(1, 5)).code(), Code::kNoSpace);
  env.SetWriteBudget("shadow", 1);  // resets the tally
  EXPECT_TRUE(shadow->WriteAt(10000, Bytes(1, 5)).ok());
  env.ClearWriteBudgets();
  EXPECT_TRUE(shadow->WriteAt(0, Bytes(100000, 6)).ok());
}

TEST(FaultEnvTest, WrapsPosixEnvToo) {
  FaultEnv env(DefaultEnv());
  char tmpl[] = "/tmp/umbra_fault_test.XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  {
    auto f = MustOpen(env, dir + "/f", OpenMode::kCreate);
    env.AddRule({.path_substr = "/f", .ops = FaultEnv::kWrite, .delay_ns = 1'000'000});
    const uint64_t t0 = env.NowNanos();
    EXPECT_TRUE(f->WriteAt(0, Bytes("q")).ok());
    EXPECT_GE(env.NowNanos() - t0, 1'000'000u);  // really slept
    env.FailNth(1, EIO, FaultEnv::Op::kSync);
    EXPECT_EQ(f->Sync().err(), EIO);
    EXPECT_TRUE(f->Sync().ok());
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

}  // namespace
}  // namespace umbra
