// System test of the block-device front end: an engine volume exported by
// FuseExport, turned into a block device by LoopDevice (direct I/O), with a
// real ext4 or XFS on it under a write load. A snapshot taken while the
// filesystem is frozen must equal, byte for byte, a copy of the device made
// during the same freeze, and must pass the filesystem's own checker.
//
// Needs root, /dev/fuse, /dev/loop-control and the filesystem tools; skips
// (with the reason) otherwise. Everything lives under a fresh directory in
// /var/tmp; guards unmount, thaw, detach and remove it even when an
// assertion fails half-way.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/random.h"
#include "frontend/fuse/fuse_export.h"
#include "frontend/loop_device.h"
#include "system_util.h"
#include "umbra/block_device.h"
#include "umbra/engine.h"

namespace umbra {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

using test_util::AlignedBuffer;
using test_util::CopyDevice;
using test_util::HaveTool;
using test_util::kMiB;
using test_util::SameBytes;
using test_util::Sh;

// A fresh directory under /var/tmp, removed with everything in it.
class TempDir : public test_util::TempDir {
 public:
  TempDir() : test_util::TempDir("umbra-fuse-loop") {}
};

// Why this machine cannot run the test, or "" if it can.
std::string MissingPrerequisite(const std::vector<std::string>& tools) {
  if (::geteuid() != 0) return "needs root";
  if (::access("/dev/fuse", R_OK | W_OK) != 0) return "no usable /dev/fuse";
  if (::access("/dev/loop-control", R_OK | W_OK) != 0) return "no usable /dev/loop-control";
  for (const auto& t : tools)
    if (!HaveTool(t)) return t + " not installed";
  return "";
}

// Whether this process may mark threads as I/O flushers (needs
// CAP_SYS_RESOURCE; containers often drop it). Probed on a throwaway thread.
bool IoFlusherAllowed() {
  bool ok = false;
  std::thread([&] { ok = ::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0; }).join();
  return ok;
}

// Serving threads are I/O flushers whenever the process may make them so.
void ExpectServedByIoFlushers(uint64_t calls, uint64_t flusher_calls) {
  if (IoFlusherAllowed()) {
    EXPECT_EQ(calls, flusher_calls) << "a serving thread is not PR_SET_IO_FLUSHER";
  } else {
    EXPECT_EQ(flusher_calls, 0u);
    std::printf("[          ] note: PR_SET_IO_FLUSHER not permitted here (no CAP_SYS_RESOURCE)\n");
  }
}

// ---- guards ------------------------------------------------------------------

// A filesystem mounted on `dir`; unmounted on destruction (lazily if it
// stays busy).
class MountGuard {
 public:
  MountGuard() = default;
  MountGuard(const MountGuard&) = delete;
  MountGuard& operator=(const MountGuard&) = delete;
  ~MountGuard() { Unmount(); }
  int Mount(const std::string& dev, const std::string& dir, const std::string& opts,
            std::string* out) {
    int rc = Sh("mount " + (opts.empty() ? "" : "-o " + opts + " ") + dev + " " + dir, out);
    if (rc == 0) dir_ = dir;
    return rc;
  }
  bool Unmount() {
    if (dir_.empty()) return true;
    std::string dir = std::exchange(dir_, "");
    for (int i = 0; i < 20; ++i) {
      if (::umount2(dir.c_str(), 0) == 0) return true;
      std::this_thread::sleep_for(100ms);
    }
    std::fprintf(stderr, "fuse_loop_test: %s busy, unmounting lazily\n", dir.c_str());
    ::umount2(dir.c_str(), MNT_DETACH);
    return false;
  }

 private:
  std::string dir_;
};

// Thaws a frozen filesystem on destruction if the test did not.
class FreezeGuard {
 public:
  FreezeGuard() = default;
  FreezeGuard(const FreezeGuard&) = delete;
  FreezeGuard& operator=(const FreezeGuard&) = delete;
  ~FreezeGuard() { Thaw(nullptr); }
  int Freeze(const std::string& dir, std::string* out) {
    int rc = Sh("fsfreeze -f " + dir, out);
    if (rc == 0) dir_ = dir;
    return rc;
  }
  int Thaw(std::string* out) {
    if (dir_.empty()) return 0;
    return Sh("fsfreeze -u " + std::exchange(dir_, ""), out);
  }

 private:
  std::string dir_;
};

// Counts what reaches the device and whether the serving thread is marked
// as an I/O flusher. Decorates any BlockDevice.
class CountingDevice final : public BlockDevice {
 public:
  explicit CountingDevice(std::unique_ptr<BlockDevice> inner) : inner_(std::move(inner)) {}
  uint64_t size() const override { return inner_->size(); }
  bool read_only() const override { return inner_->read_only(); }
  Status Read(uint64_t off, std::span<std::byte> buf) override {
    Note();
    return inner_->Read(off, buf);
  }
  Status Write(uint64_t off, std::span<const std::byte> buf, bool fua) override {
    Note();
    ++writes;
    if (fua) ++fua_writes;
    return inner_->Write(off, buf, fua);
  }
  Status Flush() override {
    Note();
    ++flushes;
    return inner_->Flush();
  }
  Status Discard(uint64_t off, uint64_t len) override {
    Note();
    ++discards;
    discarded_bytes += len;
    return inner_->Discard(off, len);
  }
  Status WriteZeroes(uint64_t off, uint64_t len) override {
    Note();
    ++write_zeroes;
    return inner_->WriteZeroes(off, len);
  }

  std::atomic<uint64_t> writes{0}, fua_writes{0}, flushes{0}, discards{0}, discarded_bytes{0},
      write_zeroes{0};
  std::atomic<uint64_t> calls{0}, flusher_calls{0};

 private:
  void Note() {
    ++calls;
    if (::prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) == 1) ++flusher_calls;
  }
  std::unique_ptr<BlockDevice> inner_;
};

// Writes, overwrites and deletes files of random sizes with fsync in `dir`
// until stopped (or a hard deadline passes).
class FileLoad {
 public:
  explicit FileLoad(std::string dir) : dir_(std::move(dir)), t_([this] { Run(); }) {}
  ~FileLoad() { Stop(); }
  FileLoad(const FileLoad&) = delete;
  FileLoad& operator=(const FileLoad&) = delete;
  void Stop() {
    stop_ = true;
    if (t_.joinable()) t_.join();
  }
  uint64_t ops() const { return ops_; }
  const std::string& error() const { return error_; }  // read after Stop()

 private:
  void Run() {
    Rng rng(20260611);
    std::vector<std::byte> buf(2 * kMiB);
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (!stop_ && std::chrono::steady_clock::now() < deadline) {
      std::string path = dir_ + "/f" + std::to_string(rng.Uniform(0, 47));
      uint64_t what = rng.Uniform(0, 9);
      if (what < 2) {  // delete
        if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Fail("unlink " + path);
      } else {  // create/replace (what < 6) or overwrite part of a file in place
        bool in_place = what >= 6;
        int fd =
            ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (in_place ? 0 : O_TRUNC), 0644);
        if (fd < 0) return Fail("open " + path);
        size_t len = static_cast<size_t>(rng.Uniform(1, 512)) * 4096 - rng.Uniform(0, 4095);
        off_t off = in_place ? static_cast<off_t>(rng.Uniform(0, 255) * 4096) : 0;
        rng.Fill(std::span(buf.data(), len));
        bool ok =
            ::pwrite(fd, buf.data(), len, off) == static_cast<ssize_t>(len) && ::fsync(fd) == 0;
        int e = errno;
        ::close(fd);
        errno = e;
        if (!ok) return Fail("write+fsync " + path);
      }
      ++ops_;
    }
  }
  void Fail(const std::string& what) { error_ = what + ": " + std::strerror(errno); }

  std::string dir_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> ops_{0};
  std::string error_;
  std::thread t_;
};

// ---- fixture -----------------------------------------------------------------

// Members are destroyed in reverse order: loops detach before the FUSE
// export unmounts, which happens before the devices and the volume go and
// the directory is removed. Filesystem mounts, freezes and loads are guards
// local to each test body, so they go first.
class FuseLoopTest : public ::testing::Test {
 protected:
  // Creates the temp dir, a volume of `size` on a file in it (shadow storage
  // in another directory) and the FUSE mount.
  void MakeVolume(uint64_t size) {
    ASSERT_FALSE(tmp_.path().empty()) << "mkdtemp in /var/tmp: " << std::strerror(errno);
    const std::string origin = tmp_.path() + "/volume.img";
    {
      int fd = ::open(origin.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
      ASSERT_GE(fd, 0) << std::strerror(errno);
      int rc = ::ftruncate(fd, static_cast<off_t>(size));
      ::close(fd);
      ASSERT_EQ(rc, 0);
    }
    VolumeConfig cfg;
    cfg.origin_path = origin;
    cfg.shadow_dir = tmp_.path() + "/shadow";
    auto v = Volume::Create(DefaultEnv(), cfg);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    volume_ = std::move(*v);

    mnt_fuse_ = tmp_.path() + "/export";
    mnt_fs_ = tmp_.path() + "/mnt";
    ASSERT_EQ(::mkdir(mnt_fuse_.c_str(), 0700), 0);
    ASSERT_EQ(::mkdir(mnt_fs_.c_str(), 0755), 0);
    auto ex = FuseExport::Mount(mnt_fuse_);
    ASSERT_TRUE(ex.ok()) << ex.status().ToString();
    export_ = std::move(*ex);

    live_ = std::make_unique<CountingDevice>(VolumeDevice(volume_.get()));
    ASSERT_TRUE(export_->Add("vol", live_.get(), 0600).ok());
  }

  void RunFilesystemOracle(const std::string& kind);

  TempDir tmp_;
  std::unique_ptr<Volume> volume_;
  std::unique_ptr<CountingDevice> live_;
  std::unique_ptr<BlockDevice> snap_dev_;
  std::unique_ptr<FuseExport> export_;
  LoopDevice live_loop_;
  LoopDevice snap_loop_;
  std::string mnt_fuse_, mnt_fs_;
};

void FuseLoopTest::RunFilesystemOracle(const std::string& kind) {
  const bool ext4 = kind == "ext4";
  std::string why = MissingPrerequisite(
      ext4 ? std::vector<std::string>{"mkfs.ext4", "e2fsck", "fsfreeze", "fstrim"}
           : std::vector<std::string>{"mkfs.xfs", "xfs_repair", "fsfreeze", "fstrim"});
  if (!why.empty()) GTEST_SKIP() << why;

  constexpr uint64_t kSize = 512 * kMiB;
  MakeVolume(kSize);
  if (HasFatalFailure()) return;

  // The live volume: FUSE file -> loop device with direct I/O -> filesystem.
  const std::string vol_file = export_->PathOf("vol");
  struct stat st;
  ASSERT_EQ(::stat(vol_file.c_str(), &st), 0) << std::strerror(errno);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kSize);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_EQ(st.st_uid, 0u);
  // kReleased: served by this process (see LoopDevice: a kill must not hang).
  auto loop = LoopDevice::Attach(vol_file, /*read_only=*/false, /*direct_io=*/true, 4096,
                                 LoopDevice::Hold::kReleased);
  ASSERT_TRUE(loop.ok()) << loop.status().ToString();
  live_loop_ = std::move(*loop);
  EXPECT_TRUE(live_loop_.direct_io()) << live_loop_.path() << " fell back to buffered I/O";

  std::string out;
  const std::string mkfs =
      ext4 ? "mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 " : "mkfs.xfs -q -f ";
  ASSERT_EQ(Sh(mkfs + live_loop_.path(), &out), 0) << out;
  MountGuard mounted;
  ASSERT_EQ(mounted.Mount(live_loop_.path(), mnt_fs_, "", &out), 0) << out;

  // Snapshot instant: frozen filesystem, copy of the device, snapshot.
  std::string reference = tmp_.path() + "/reference.img";
  std::string snap_id;
  {
    FileLoad load(mnt_fs_);
    FreezeGuard frozen;  // destroyed (thawed) before the load is joined
    std::this_thread::sleep_for(1500ms);
    ASSERT_EQ(frozen.Freeze(mnt_fs_, &out), 0) << out;
    ASSERT_TRUE(CopyDevice(live_loop_.path(), kSize, reference));
    auto snap = volume_->CreateSnapshot({});
    ASSERT_TRUE(snap.ok()) << snap.status().ToString();
    snap_id = snap->id;
    ASSERT_EQ(frozen.Thaw(&out), 0) << out;

    // Keep changing the filesystem: overwrites, deletes, and trims.
    const uint64_t discards_before = live_->discards;
    for (int i = 0; i < 3; ++i) {
      std::this_thread::sleep_for(1s);
      EXPECT_EQ(Sh("fstrim " + mnt_fs_, &out), 0) << out;
    }
    load.Stop();
    EXPECT_EQ(load.error(), "");
    EXPECT_GT(load.ops(), 20u) << "the load barely ran";
    EXPECT_GT(live_->discards, discards_before) << "fstrim did not reach the engine";
    std::printf(
        "[          ] %s: %llu load operations; device saw %llu writes (%llu FUA), %llu flushes, "
        "%llu discards (%llu MiB), %llu write-zeroes\n",
        kind.c_str(), static_cast<unsigned long long>(load.ops()),
        static_cast<unsigned long long>(live_->writes.load()),
        static_cast<unsigned long long>(live_->fua_writes.load()),
        static_cast<unsigned long long>(live_->flushes.load()),
        static_cast<unsigned long long>(live_->discards.load()),
        static_cast<unsigned long long>(live_->discarded_bytes.load() / kMiB),
        static_cast<unsigned long long>(live_->write_zeroes.load()));
  }
  EXPECT_GT(live_->flushes, 0u) << "fsync never reached the engine";
  ExpectServedByIoFlushers(live_->calls, live_->flusher_calls);
  EXPECT_GT(volume_->GetStorageUsage().copies, 0u);

  // Discards reached the engine: a snapshot now has free chunks.
  ASSERT_EQ(Sh("sync -f " + mnt_fs_, &out), 0) << out;
  {
    auto after = volume_->CreateSnapshot({});
    ASSERT_TRUE(after.ok()) << after.status().ToString();
    auto extents = volume_->SnapshotExtents(after->id);
    ASSERT_TRUE(extents.ok()) << extents.status().ToString();
    uint64_t allocated = 0;
    for (const Extent& e : *extents) allocated += e.length;
    EXPECT_LT(allocated, kSize / 2) << "trimmed space is not free in the engine";
    ASSERT_TRUE(volume_->DeleteSnapshot(after->id).ok());
  }

  // The snapshot, read-only through its own FUSE file and loop device,
  // equals the copy made during the freeze and passes fsck.
  snap_dev_ = SnapshotDevice(volume_.get(), snap_id);
  ASSERT_TRUE(export_->Add("snap", snap_dev_.get(), 0400).ok());
  auto sloop = LoopDevice::Attach(export_->PathOf("snap"), /*read_only=*/true, /*direct_io=*/true,
                                  4096, LoopDevice::Hold::kReleased);
  ASSERT_TRUE(sloop.ok()) << sloop.status().ToString();
  snap_loop_ = std::move(*sloop);
  EXPECT_TRUE(SameBytes(snap_loop_.path(), reference, kSize));
  const std::string check = ext4 ? "e2fsck -fn " : "xfs_repair -n ";
  out.clear();
  int rc = Sh(check + snap_loop_.path(), &out);
  if (!ext4 && rc == 1 && out.find("valuable metadata changes in a log") != std::string::npos) {
    // XFS leaves its log dirty across a freeze on this kernel, so a frozen
    // snapshot needs log recovery, which cannot happen on a read-only
    // device. The reference is byte-for-byte the snapshot (checked above):
    // replay its log on a plain loop device, then check it.
    std::printf(
        "[          ] note: XFS snapshot has a dirty log (freeze does not clean it); "
        "checking the byte-identical reference after log replay\n");
    auto rloop = LoopDevice::Attach(reference, /*read_only=*/false, /*direct_io=*/false);
    ASSERT_TRUE(rloop.ok()) << rloop.status().ToString();
    const std::string rmnt = tmp_.path() + "/reference-mnt";
    ASSERT_EQ(::mkdir(rmnt.c_str(), 0755), 0);
    {
      MountGuard replay;
      ASSERT_EQ(replay.Mount(rloop->path(), rmnt, "nouuid", &out), 0) << out;
      ASSERT_TRUE(replay.Unmount());
    }
    out.clear();
    EXPECT_EQ(Sh(check + rloop->path(), &out), 0) << out;
    EXPECT_TRUE(rloop->Detach().ok());
  } else {
    EXPECT_EQ(rc, 0) << out;
  }

  // The live filesystem is fine too.
  ASSERT_TRUE(mounted.Unmount());
  EXPECT_EQ(Sh(check + live_loop_.path(), &out), 0) << out;

  // Tear down in the daemon's order; files cannot go while a loop holds them.
  EXPECT_EQ(export_->Remove("snap").code(), Code::kBusy);
  EXPECT_TRUE(snap_loop_.Detach().ok());
  EXPECT_TRUE(live_loop_.Detach().ok());
  EXPECT_TRUE(export_->Remove("snap", 5s).ok());
  EXPECT_TRUE(export_->Remove("vol", 5s).ok());
  EXPECT_TRUE(export_->Unmount().ok());
}

TEST_F(FuseLoopTest, Ext4SnapshotIsPointInTime) { RunFilesystemOracle("ext4"); }

TEST_F(FuseLoopTest, XfsSnapshotIsPointInTime) { RunFilesystemOracle("xfs"); }

// Flushes, FUA, discards and write-zeroes on the FUSE file reach the device;
// the snapshot file refuses writes.
TEST_F(FuseLoopTest, FileOperationsReachTheDevice) {
  std::string why = MissingPrerequisite({});
  if (!why.empty()) GTEST_SKIP() << why;
  constexpr uint64_t kSize = 64 * kMiB;
  MakeVolume(kSize);
  if (HasFatalFailure()) return;

  const std::string path = export_->PathOf("vol");
  int fd = ::open(path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  ASSERT_GE(fd, 0) << "O_DIRECT open of the FUSE file: " << std::strerror(errno);
  struct FdCloser {
    int& fd;
    ~FdCloser() {
      if (fd >= 0) ::close(fd);
    }
  } closer{fd};

  AlignedBuffer data(kMiB), got(kMiB);
  Rng rng(7);
  rng.Fill(std::span(data.p, kMiB));
  ASSERT_EQ(::pwrite(fd, data.p, kMiB, kMiB), static_cast<ssize_t>(kMiB)) << std::strerror(errno);
  const uint64_t flushes = live_->flushes;
  ASSERT_EQ(::fdatasync(fd), 0) << std::strerror(errno);
  EXPECT_GT(live_->flushes, flushes) << "fdatasync did not reach Flush";
  ASSERT_EQ(::fsync(fd), 0);
  EXPECT_GT(live_->flushes, flushes + 1) << "fsync did not reach Flush";
  ASSERT_EQ(::pread(fd, got.p, kMiB, kMiB), static_cast<ssize_t>(kMiB));
  EXPECT_EQ(std::memcmp(got.p, data.p, kMiB), 0);

  // RWF_DSYNC on one write is seen as FUA.
  {
    const uint64_t fua = live_->fua_writes;
    struct iovec iov = {data.p, 4096};
    ASSERT_EQ(::pwritev2(fd, &iov, 1, 8 * kMiB, RWF_DSYNC), 4096) << std::strerror(errno);
    EXPECT_EQ(live_->fua_writes, fua + 1);
    ASSERT_EQ(::pwrite(fd, data.p, 4096, 8 * kMiB), 4096);
    EXPECT_EQ(live_->fua_writes, fua + 1);
  }

  // The snapshot sees the data as of now.
  auto snap = volume_->CreateSnapshot({});
  ASSERT_TRUE(snap.ok()) << snap.status().ToString();
  snap_dev_ = SnapshotDevice(volume_.get(), snap->id);
  ASSERT_TRUE(export_->Add("snap", snap_dev_.get(), 0400).ok());

  // PUNCH_HOLE -> Discard, ZERO_RANGE -> WriteZeroes; both read back zeros.
  const uint64_t discards = live_->discards, zeroes = live_->write_zeroes;
  ASSERT_EQ(::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, kMiB, 256 * 1024), 0)
      << std::strerror(errno);
  EXPECT_EQ(live_->discards, discards + 1);
  ASSERT_EQ(
      ::fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, kMiB + 512 * 1024, 128 * 1024), 0)
      << std::strerror(errno);
  EXPECT_EQ(live_->write_zeroes, zeroes + 1);
  errno = 0;
  EXPECT_NE(::fallocate(fd, 0, 0, 4096), 0);
  EXPECT_EQ(errno, EOPNOTSUPP);
  ASSERT_EQ(::pread(fd, got.p, kMiB, kMiB), static_cast<ssize_t>(kMiB));
  std::vector<std::byte> expect(data.p, data.p + kMiB);
  std::memset(expect.data(), 0, 256 * 1024);
  std::memset(expect.data() + 512 * 1024, 0, 128 * 1024);
  EXPECT_EQ(std::memcmp(got.p, expect.data(), kMiB), 0);

  // Reads and writes at the end of the file.
  EXPECT_EQ(::pread(fd, got.p, 4096, kSize), 0);
  errno = 0;
  EXPECT_EQ(::pwrite(fd, data.p, 4096, kSize), -1);
  EXPECT_EQ(errno, ENOSPC);
  EXPECT_EQ(::ftruncate(fd, 4096), -1);

  // The snapshot file: read-only, old contents.
  const std::string spath = export_->PathOf("snap");
  struct stat st;
  ASSERT_EQ(::stat(spath.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0400u);
  errno = 0;
  int w = ::open(spath.c_str(), O_RDWR | O_CLOEXEC);
  EXPECT_LT(w, 0) << "the snapshot file opened for writing";
  if (w >= 0) ::close(w);
  EXPECT_TRUE(errno == EROFS || errno == EPERM || errno == EACCES) << std::strerror(errno);
  int r = ::open(spath.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  ASSERT_GE(r, 0) << std::strerror(errno);
  EXPECT_EQ(::pread(r, got.p, kMiB, kMiB), static_cast<ssize_t>(kMiB));
  EXPECT_EQ(std::memcmp(got.p, data.p, kMiB), 0) << "snapshot is not point-in-time";
  EXPECT_NE(::fallocate(r, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096), 0);

  // Files cannot be removed while open; the mount lists them.
  EXPECT_EQ(export_->Remove("snap").code(), Code::kBusy);
  EXPECT_EQ(export_->Add("snap", snap_dev_.get(), 0400).code(), Code::kAlreadyExists);
  EXPECT_EQ(export_->Add("rw-snap", snap_dev_.get(), 0600).code(), Code::kInvalidArgument);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(mnt_fuse_)) names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"snap", "vol"}));
  ::close(r);
  EXPECT_TRUE(export_->Remove("snap", 5s).ok());
  EXPECT_NE(::access(spath.c_str(), F_OK), 0);
  ExpectServedByIoFlushers(live_->calls, live_->flusher_calls);

  // Unmount with the file still open: lazy, never leaks the mount.
  Status s = export_->Unmount();
  EXPECT_EQ(s.code(), Code::kBusy) << s.ToString();
  std::string mounts;
  Sh("cat /proc/self/mountinfo", &mounts);
  EXPECT_EQ(mounts.find(mnt_fuse_), std::string::npos) << "FUSE mount leaked";
  errno = 0;
  EXPECT_EQ(::pread(fd, got.p, 4096, 0), -1) << "I/O on an aborted export should fail";
}

// ---- LoopDevice lifetimes -------------------------------------------------

std::string LoopAttr(const LoopDevice& d, const char* attr) {
  FILE* f =
      std::fopen(("/sys/block/loop" + std::to_string(d.number()) + "/loop/" + attr).c_str(), "r");
  if (f == nullptr) return "";
  char buf[4096] = {};
  if (std::fgets(buf, sizeof(buf), f) == nullptr) buf[0] = 0;
  std::fclose(f);
  std::string v = buf;
  while (!v.empty() && v.back() == '\n') v.pop_back();
  return v;
}

// Whether this process has a descriptor open on `dev`.
bool ProcessHolds(const std::string& dev) {
  for (const auto& e : fs::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    if (fs::read_symlink(e.path(), ec) == dev) return true;
  }
  return false;
}

std::string MakeFile(const std::string& path, uint64_t size) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0) return std::strerror(errno);
  ::close(fd);
  return "";
}

// kReleased keeps no descriptor and no auto-clear (so a kill of the serving
// process cannot make its exit the device's last close); Detach still clears
// it. kHoldOpen keeps both.
TEST(LoopDeviceTest, ReleasedKeepsNothingOpenAndDetaches) {
  std::string why = MissingPrerequisite({});
  if (!why.empty()) GTEST_SKIP() << why;
  TempDir dir;
  const std::string file = dir.path() + "/backing";
  ASSERT_EQ(MakeFile(file, 8 * kMiB), "");

  auto held = LoopDevice::Attach(file, false, false, 4096, LoopDevice::Hold::kHoldOpen);
  ASSERT_TRUE(held.ok()) << held.status().ToString();
  EXPECT_EQ(LoopAttr(*held, "autoclear"), "1");
  EXPECT_TRUE(ProcessHolds(held->path()));
  ASSERT_TRUE(held->Detach().ok());

  auto rel = LoopDevice::Attach(file, false, false, 4096, LoopDevice::Hold::kReleased);
  ASSERT_TRUE(rel.ok()) << rel.status().ToString();
  const int n = rel->number();
  EXPECT_TRUE(rel->attached());
  EXPECT_EQ(LoopAttr(*rel, "autoclear"), "0");
  EXPECT_EQ(LoopAttr(*rel, "backing_file"), file);
  EXPECT_FALSE(ProcessHolds(rel->path())) << "kReleased must not keep " << rel->path() << " open";
  const std::string path = rel->path();
  ASSERT_TRUE(rel->Detach().ok());
  EXPECT_FALSE(rel->attached());
  EXPECT_FALSE(fs::exists("/sys/block/loop" + std::to_string(n) + "/loop/backing_file"))
      << path << " still attached after Detach";
}

// A kReleased device that someone else detached (and perhaps reused for
// another file) is left alone by Detach.
TEST(LoopDeviceTest, ReleasedDetachLeavesAReusedDeviceAlone) {
  std::string why = MissingPrerequisite({"losetup"});
  if (!why.empty()) GTEST_SKIP() << why;
  TempDir dir;
  const std::string a = dir.path() + "/a", b = dir.path() + "/b";
  ASSERT_EQ(MakeFile(a, 8 * kMiB), "");
  ASSERT_EQ(MakeFile(b, 8 * kMiB), "");
  auto first = LoopDevice::Attach(a, false, false, 4096, LoopDevice::Hold::kReleased);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  const std::string path = first->path();
  ASSERT_EQ(Sh("losetup -d " + path), 0);
  // The freed number is the lowest free one again: b very likely lands on it.
  auto second = LoopDevice::Attach(b, false, false, 4096, LoopDevice::Hold::kHoldOpen);
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_TRUE(first->Detach().ok());
  EXPECT_EQ(LoopAttr(*second, "backing_file"), b) << "Detach cleared a device it no longer owned";
  EXPECT_TRUE(second->Detach().ok());
}

}  // namespace
}  // namespace umbra
