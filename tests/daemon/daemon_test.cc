// System tests of umbrad: the real daemon as a subprocess (temp state dir,
// socket and FUSE dir under /var/tmp), driven through umbra::control::Client,
// with real ext4 on the loop devices it attaches.
//
// Needs root, /dev/fuse, /dev/loop-control, mkfs.ext4 and fsfreeze; skips
// with the reason otherwise. The fixture's guard kills the daemon and
// removes every mount and loop device under its directory even when an
// assertion fails half-way.
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <linux/loop.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "control/protocol.h"
#include "system_util.h"

namespace umbra {
namespace {

namespace fs = std::filesystem;
using control::Client;
using control::Json;
using namespace std::chrono_literals;

using test_util::CopyDevice;
using test_util::kMiB;
using test_util::ReadFile;
using test_util::SameBytes;
using test_util::Sh;
using Buffer = test_util::AlignedBuffer;

std::string MissingPrerequisite() {
  if (::geteuid() != 0) return "needs root";
  if (::access("/dev/fuse", R_OK | W_OK) != 0) return "no usable /dev/fuse";
  if (::access("/dev/loop-control", R_OK | W_OK) != 0) return "no usable /dev/loop-control";
  for (const char* t : {"mkfs.ext4", "fsfreeze"})
    if (Sh(std::string("command -v ") + t + " || test -x /sbin/" + t) != 0)
      return std::string(t) + " not installed";
  return "";
}

void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::trunc);
  out << data;
}

// Mount targets and loop devices under `prefix`, for cleanup and for
// checking that nothing leaked.
std::vector<std::string> MountsUnder(const std::string& prefix) {
  std::vector<std::string> out;
  std::istringstream in(ReadFile("/proc/self/mountinfo"));
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ss(line);
    std::string a, b, c, d, target;
    ss >> a >> b >> c >> d >> target;
    if (target.rfind(prefix, 0) == 0) out.push_back(target);
  }
  return out;
}

std::vector<std::string> LoopsUnder(const std::string& prefix) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator("/sys/block")) {
    std::string name = e.path().filename();
    if (name.rfind("loop", 0) != 0) continue;
    std::string backing = ReadFile(e.path().string() + "/loop/backing_file");
    if (backing.rfind(prefix, 0) == 0) out.push_back("/dev/" + name);
  }
  return out;
}

// A temp directory holding one umbrad's state, socket, FUSE dir and mount
// points. The destructor stops the daemon and removes every mount and loop
// device under the directory, then the directory.
class DaemonEnv {
 public:
  DaemonEnv() {
    char tmpl[] = "/var/tmp/umbra-daemon-test-XXXXXX";
    if (::mkdtemp(tmpl) != nullptr) dir_ = tmpl;
    ::chmod(dir_.c_str(), 0755);  // a non-root test child must reach the socket
  }
  ~DaemonEnv() {
    Stop(SIGKILL);
    if (::testing::Test::HasFailure() || std::getenv("UMBRA_TEST_VERBOSE") != nullptr)
      std::printf("---- umbrad log (%s) ----\n%s", log().c_str(), ReadFile(log()).c_str());
    for (int pass = 0; pass < 2; ++pass) {
      auto mounts = MountsUnder(dir_ + "/");
      for (auto it = mounts.rbegin(); it != mounts.rend(); ++it) {
        if (*it == fuse_dir() && pass == 0) continue;  // loops first, FUSE last
        ::umount2(it->c_str(), MNT_DETACH);
      }
      for (const std::string& loop : LoopsUnder(dir_ + "/")) {
        int fd = ::open(loop.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
          ::ioctl(fd, LOOP_CLR_FD, 0);
          ::close(fd);
        }
      }
    }
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  DaemonEnv(const DaemonEnv&) = delete;
  DaemonEnv& operator=(const DaemonEnv&) = delete;

  const std::string& dir() const { return dir_; }
  std::string socket() const { return dir_ + "/umbrad.sock"; }
  std::string fuse_dir() const { return dir_ + "/dev"; }
  std::string state_dir() const { return dir_ + "/state"; }
  std::string log() const { return dir_ + "/umbrad.log"; }

  // Starts umbrad and waits until it answers daemon.hello.
  ::testing::AssertionResult Start(const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args = {UMBRAD_PATH, "--foreground", "--state-dir", state_dir(),
                                     "--socket",  socket(),       "--fuse-dir",  fuse_dir()};
    args.insert(args.end(), extra.begin(), extra.end());
    pid_ = ::fork();
    if (pid_ == 0) {
      int fd = ::open(log().c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      ::dup2(fd, 2);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + 20s;
    while (std::chrono::steady_clock::now() < deadline) {
      int st;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        return ::testing::AssertionFailure() << "umbrad exited at start-up:\n" << ReadFile(log());
      }
      auto c = Client::Connect(socket());
      if (c.ok() && c->Call("daemon.hello", {{"version", 1}}).ok())
        return ::testing::AssertionSuccess();
      std::this_thread::sleep_for(50ms);
    }
    return ::testing::AssertionFailure() << "umbrad did not become ready:\n" << ReadFile(log());
  }

  // Sends `sig` and waits for the exit; returns the exit status (128+N for a
  // signal), escalating to SIGKILL after 30 s.
  int Stop(int sig = SIGTERM) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, sig);
    int st = 0;
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (::waitpid(pid_, &st, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &st, 0);
        break;
      }
      std::this_thread::sleep_for(20ms);
    }
    pid_ = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }

  Client Connect() {
    auto c = Client::Connect(socket());
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return std::move(c).value();
  }

 private:
  std::string dir_;
  pid_t pid_ = -1;
};

// Calls `op` and expects success; returns the result (null on failure).
Json Ok(Client& c, const std::string& op, const Json& args = Json::object()) {
  auto r = c.Call(op, args);
  EXPECT_TRUE(r.ok()) << op << " " << args.dump() << ": " << r.status().ToString();
  return r.ok() ? *r : Json();
}

// Calls `op`, expects failure with `code`; returns the message.
std::string Fails(Client& c, const std::string& op, const Json& args, Code code) {
  auto r = c.Call(op, args);
  EXPECT_FALSE(r.ok()) << op << " " << args.dump() << " succeeded: " << (r.ok() ? r->dump() : "");
  if (r.ok()) return "";
  EXPECT_EQ(r.status().code(), code) << op << " " << args.dump() << ": " << r.status().ToString();
  EXPECT_FALSE(r.status().message().empty());
  return r.status().message();
}

class DaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why = MissingPrerequisite();
    if (!why.empty()) GTEST_SKIP() << why;
    ASSERT_FALSE(env_.dir().empty()) << "mkdtemp: " << std::strerror(errno);
  }
  DaemonEnv env_;
};

// The whole life of a persistent snapshot: ext4 on an attached volume, a
// snapshot taken under fsfreeze equals a copy of the device made during the
// freeze, mounts showing the old files, survives kill -9, and reverting to
// it restores the volume byte for byte.
TEST_F(DaemonTest, PersistentSnapshotLifecycle) {
  ASSERT_TRUE(env_.Start());
  Client c = env_.Connect();
  constexpr uint64_t kSize = 64 * kMiB;
  Json vol = Ok(c, "volume.create", {{"name", "data"}, {"size", kSize}});
  ASSERT_EQ(vol.value("size", 0u), kSize);
  EXPECT_EQ(vol["kind"], "file");
  EXPECT_EQ(vol["origin"], env_.state_dir() + "/volumes/data.img");
  const std::string dev = Ok(c, "volume.attach", {{"name", "data"}}).value("device", "");
  ASSERT_EQ(dev.rfind("/dev/loop", 0), 0u) << dev;
  struct stat st;
  ASSERT_EQ(::stat((env_.fuse_dir() + "/vol-data").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);

  std::string out;
  ASSERT_EQ(Sh("mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 " + dev, &out), 0) << out;
  const std::string mnt = env_.dir() + "/mnt";
  ASSERT_EQ(::mkdir(mnt.c_str(), 0755), 0);
  ASSERT_EQ(Sh("mount " + dev + " " + mnt, &out), 0) << out;
  WriteFile(mnt + "/before", "written before the snapshot\n");
  WriteFile(mnt + "/changed", "old contents\n");
  ASSERT_EQ(Sh("sync -f " + mnt), 0);

  // Shadow storage on the volume's own filesystem is refused, nothing changes.
  const std::string loc = Ok(c, "storage.list", {{"volume", "data"}})["storage"][0]["location"];
  std::string msg =
      Fails(c, "storage.add", {{"volume", "data"}, {"on", mnt}}, Code::kInvalidArgument);
  EXPECT_NE(msg.find("on the volume itself"), std::string::npos) << msg;
  EXPECT_EQ(Ok(c, "storage.list", {{"volume", "data"}})["storage"][0]["location"], loc);

  // The snapshot instant: frozen filesystem, reference copy, snapshot.
  const std::string reference = env_.dir() + "/reference.img";
  std::string id;
  {
    ASSERT_EQ(Sh("fsfreeze -f " + mnt, &out), 0) << out;
    bool copied = CopyDevice(dev, kSize, reference);
    auto snap = c.Call("snapshot.create",
                       {{"volumes", {"data"}}, {"persistent", true}, {"name", "before-change"}});
    EXPECT_EQ(Sh("fsfreeze -u " + mnt, &out), 0) << out;
    ASSERT_TRUE(copied);
    ASSERT_TRUE(snap.ok()) << snap.status().ToString();
    id = (*snap)["id"];
    EXPECT_EQ((*snap)["snapshots"].size(), 1u);
    EXPECT_EQ((*snap)["snapshots"][0]["persistent"], true);
    EXPECT_EQ((*snap)["snapshots"][0]["name"], "before-change");
  }
  WriteFile(mnt + "/changed", "new contents\n");
  WriteFile(mnt + "/after", "written after the snapshot\n");
  ASSERT_EQ(Sh("sync -f " + mnt), 0);

  // Reverting needs the volume detached; deleting it needs no snapshots.
  Fails(c, "snapshot.revert", {{"id", id}}, Code::kBusy);
  Fails(c, "volume.delete", {{"name", "data"}}, Code::kBusy);
  Fails(c, "volume.detach", {{"name", "data"}}, Code::kBusy);  // still mounted

  // The snapshot's device is the reference, byte for byte.
  const std::string sdev = Ok(c, "snapshot.attach", {{"id", id}}).value("device", "");
  ASSERT_EQ(sdev.rfind("/dev/loop", 0), 0u) << sdev;
  EXPECT_TRUE(SameBytes(sdev, reference, kSize));
  Fails(c, "snapshot.attach", {{"id", id}}, Code::kAlreadyExists);
  Fails(c, "snapshot.delete", {{"id", id}}, Code::kBusy);

  // Mounted, it shows the files as they were.
  const std::string smnt = env_.dir() + "/snapshot-view";
  Json m = Ok(c, "snapshot.mount", {{"id", id}, {"dir", smnt}});
  EXPECT_EQ(m["dir"], smnt);
  EXPECT_EQ(ReadFile(smnt + "/before"), "written before the snapshot\n");
  EXPECT_EQ(ReadFile(smnt + "/changed"), "old contents\n");
  EXPECT_NE(::access((smnt + "/after").c_str(), F_OK), 0);
  EXPECT_NE(::open((smnt + "/new").c_str(), O_WRONLY | O_CREAT, 0644), 0);  // read-only
  EXPECT_EQ(errno, EROFS);
  Json listed = Ok(c, "snapshot.list", {{"volume", "data"}})["snapshots"];
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0]["attached_device"], sdev);
  EXPECT_EQ(listed[0]["mount"], smnt);
  Ok(c, "snapshot.unmount", {{"dir", smnt}});
  EXPECT_NE(::access(smnt.c_str(), F_OK), 0) << "the mount point umbrad created is left";
  Ok(c, "snapshot.detach", {{"id", id}});
  EXPECT_EQ(ReadFile(mnt + "/changed"), "new contents\n");  // the live volume is untouched

  ASSERT_EQ(Sh("umount " + mnt, &out), 0) << out;
  Ok(c, "volume.detach", {{"name", "data"}});
  EXPECT_EQ(LoopsUnder(env_.dir() + "/"), std::vector<std::string>{});

  // kill -9 and restart: the persistent snapshot is still there and intact.
  EXPECT_EQ(env_.Stop(SIGKILL), 128 + SIGKILL);
  ASSERT_TRUE(env_.Start());
  Client c2 = env_.Connect();
  listed = Ok(c2, "snapshot.list")["snapshots"];
  ASSERT_EQ(listed.size(), 1u) << listed.dump();
  EXPECT_EQ(listed[0]["id"], id);
  EXPECT_EQ(listed[0]["valid"], true);
  const std::string sdev2 = Ok(c2, "snapshot.attach", {{"id", id}}).value("device", "");
  EXPECT_TRUE(SameBytes(sdev2, reference, kSize));
  Ok(c2, "snapshot.detach", {{"id", id}});

  // Revert: the volume becomes the snapshot again.
  Ok(c2, "snapshot.revert", {{"id", id}});
  const std::string dev2 = Ok(c2, "volume.attach", {{"name", "data"}}).value("device", "");
  EXPECT_TRUE(SameBytes(dev2, reference, kSize));

  // A clean stop leaves no loop device or mount behind, and exits 0.
  EXPECT_EQ(env_.Stop(SIGTERM), 0) << ReadFile(env_.log());
  EXPECT_EQ(LoopsUnder(env_.dir() + "/"), std::vector<std::string>{});
  EXPECT_EQ(MountsUnder(env_.dir() + "/"), std::vector<std::string>{});
}

// A snapshot taken without freezing, while files are being written, is
// crash-consistent: its journal (ext4) or log (XFS) needs replaying, which
// snapshot.mount does into a throwaway overlay; every file synced before
// the snapshot is there, and the snapshot itself is unchanged.
TEST_F(DaemonTest, CrashConsistentSnapshotsMountCleanly) {
  ASSERT_TRUE(env_.Start());
  Client c = env_.Connect();
  std::vector<std::string> kinds = {"ext4"};
  if (Sh("command -v mkfs.xfs || test -x /sbin/mkfs.xfs") == 0) kinds.push_back("xfs");
  for (const std::string& kind : kinds) {
    SCOPED_TRACE(kind);
    const uint64_t size = (kind == "xfs" ? 320 : 64) * kMiB;  // XFS needs 300 MiB
    Ok(c, "volume.create", {{"name", kind}, {"size", size}});
    const std::string dev = Ok(c, "volume.attach", {{"name", kind}}).value("device", "");
    std::string out;
    ASSERT_EQ(Sh((kind == "xfs" ? "mkfs.xfs -q -f " : "mkfs.ext4 -q -F ") + dev, &out), 0) << out;
    const std::string mnt = env_.dir() + "/mnt-" + kind;
    ASSERT_EQ(::mkdir(mnt.c_str(), 0755), 0);
    ASSERT_EQ(Sh("mount " + dev + " " + mnt, &out), 0) << out;
    for (int i = 0; i < 20; ++i) WriteFile(mnt + "/synced" + std::to_string(i), "data " + kind);
    ASSERT_EQ(Sh("sync -f " + mnt), 0);
    WriteFile(mnt + "/unsynced", "maybe");
    const std::string id =
        Ok(c, "snapshot.create", {{"volumes", {kind}}, {"persistent", true}}).value("id", "");
    const std::string sdev = Ok(c, "snapshot.attach", {{"id", id}}).value("device", "");
    const std::string before = env_.dir() + "/before-" + kind + ".img";
    ASSERT_TRUE(CopyDevice(sdev, size, before));
    Ok(c, "snapshot.detach", {{"id", id}});

    const std::string view = env_.dir() + "/view-" + kind;
    Json m = Ok(c, "snapshot.mount", {{"id", id}, {"dir", view}});
    for (int i = 0; i < 20; ++i)
      EXPECT_EQ(ReadFile(view + "/synced" + std::to_string(i)), "data " + kind) << i;
    Ok(c, "snapshot.unmount", {{"id", id}});

    // Mounting replayed into the overlay only: the snapshot is unchanged.
    const std::string sdev2 = Ok(c, "snapshot.attach", {{"id", id}}).value("device", "");
    EXPECT_TRUE(SameBytes(sdev2, before, size));
    Ok(c, "snapshot.detach", {{"id", id}});
    ASSERT_EQ(Sh("umount " + mnt, &out), 0) << out;
    Ok(c, "volume.detach", {{"name", kind}});
    ::unlink(before.c_str());
  }
}

// An existing block device adopted in place: its data is served as it was,
// snapshots and revert work through it, and deleting the volume leaves the
// device alone.
TEST_F(DaemonTest, AdoptedDeviceKeepsItsData) {
  ASSERT_TRUE(env_.Start());
  Client c = env_.Connect();
  constexpr uint64_t kSize = 16 * kMiB;
  const std::string img = env_.dir() + "/disk.img", reference = env_.dir() + "/reference.img";
  {
    std::vector<char> data(kSize);
    for (uint64_t i = 0; i < kSize; ++i) data[i] = static_cast<char>((i * 2654435761u) >> 13);
    std::ofstream(img, std::ios::binary).write(data.data(), kSize);
    std::ofstream(reference, std::ios::binary).write(data.data(), kSize);
  }
  std::string disk;
  ASSERT_EQ(Sh("losetup --show -f " + img, &disk), 0) << disk;
  while (!disk.empty() && disk.back() == '\n') disk.pop_back();

  Json vol = Ok(c, "volume.adopt", {{"name", "disk"}, {"device", disk}});
  EXPECT_EQ(vol["kind"], "device");
  EXPECT_EQ(vol["origin"], disk);
  EXPECT_EQ(vol["size"], kSize);
  Fails(c, "volume.adopt", {{"name", "again"}, {"device", disk}}, Code::kAlreadyExists);
  const std::string dev = Ok(c, "volume.attach", {{"name", "disk"}}).value("device", "");
  EXPECT_TRUE(SameBytes(dev, reference, kSize)) << "adopting changed the data";

  const std::string id = Ok(c, "snapshot.create", {{"volumes", {"disk"}}}).value("id", "");
  {
    int fd = ::open(dev.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
    ASSERT_GE(fd, 0) << std::strerror(errno);
    Buffer b(kMiB);
    std::memset(b.p, 0x5a, kMiB);
    EXPECT_EQ(::pwrite(fd, b.p, kMiB, 4 * kMiB), static_cast<ssize_t>(kMiB));
    EXPECT_EQ(::fsync(fd), 0);
    ::close(fd);
  }
  EXPECT_FALSE(SameBytes(dev, reference, kSize));
  const std::string sdev = Ok(c, "snapshot.attach", {{"id", id}}).value("device", "");
  EXPECT_TRUE(SameBytes(sdev, reference, kSize));
  Ok(c, "snapshot.detach", {{"id", id}});
  Ok(c, "volume.detach", {{"name", "disk"}});
  Ok(c, "snapshot.revert", {{"id", id}});
  const std::string dev2 = Ok(c, "volume.attach", {{"name", "disk"}}).value("device", "");
  EXPECT_TRUE(SameBytes(dev2, reference, kSize)) << "revert did not restore the snapshot";
  Ok(c, "volume.detach", {{"name", "disk"}});
  Ok(c, "snapshot.delete", {{"id", id}});
  Ok(c, "volume.delete", {{"name", "disk"}});
  EXPECT_TRUE(SameBytes(disk, reference, kSize));
  EXPECT_EQ(Sh("losetup -d " + disk), 0);
  EXPECT_TRUE(fs::exists(img)) << "deleting an adopted volume removed its device's data";
}

// kill -9 with a volume attached, a snapshot attached and another mounted:
// the next umbrad unmounts the dead snapshot mount, removes the mount point
// it had created, detaches the dead loop devices and the dead FUSE mount,
// and serves the persistent snapshots again; only the auto-release one is
// gone. A multi-volume set survives as a set.
TEST_F(DaemonTest, RestartAfterKillCleansUp) {
  ASSERT_TRUE(env_.Start());
  Client c = env_.Connect();
  Ok(c, "volume.create", {{"name", "a"}, {"size", 64 * kMiB}});
  Ok(c, "volume.create", {{"name", "b"}, {"size", 16 * kMiB}});
  const std::string dev = Ok(c, "volume.attach", {{"name", "a"}}).value("device", "");
  std::string out;
  ASSERT_EQ(Sh("mkfs.ext4 -q -F " + dev, &out), 0) << out;
  Json set = Ok(c, "snapshot.create", {{"volumes", {"a", "b"}}, {"persistent", true}});
  ASSERT_EQ(set["snapshots"].size(), 2u);
  EXPECT_EQ(set["snapshots"][0]["set_size"], 2);
  EXPECT_EQ(set["snapshots"][0]["set_id"], set["snapshots"][1]["set_id"]);
  const std::string id = set["id"];
  Ok(c, "snapshot.create", {{"volumes", {"a"}}});  // auto-release: gone after a crash
  const std::string sdev = Ok(c, "snapshot.attach", {{"id", id}}).value("device", "");
  const std::string view = env_.dir() + "/view";
  Ok(c, "snapshot.mount", {{"id", id}, {"dir", view}});
  ASSERT_TRUE(fs::exists(view + "/lost+found"));

  EXPECT_EQ(env_.Stop(SIGKILL), 128 + SIGKILL);
  ASSERT_TRUE(env_.Start());
  EXPECT_FALSE(fs::exists(view)) << "the stale mount point is left";
  EXPECT_EQ(LoopsUnder(env_.dir() + "/"), std::vector<std::string>{});
  EXPECT_EQ(MountsUnder(env_.dir() + "/"), std::vector<std::string>{env_.fuse_dir()});
  Client c2 = env_.Connect();
  Json listed = Ok(c2, "snapshot.list")["snapshots"];
  ASSERT_EQ(listed.size(), 2u) << listed.dump();
  for (const Json& s : listed) {
    EXPECT_EQ(s["set_id"], set["set_id"]);
    EXPECT_EQ(s["persistent"], true);
    EXPECT_EQ(s["attached_device"], nullptr);
    EXPECT_EQ(s["mount"], nullptr);
  }
  Json m = Ok(c2, "snapshot.mount", {{"id", id}, {"dir", view}});
  EXPECT_TRUE(fs::exists(view + "/lost+found"));
  Ok(c2, "volume.attach", {{"name", "a"}});
  EXPECT_EQ(env_.Stop(SIGTERM), 0);
  EXPECT_FALSE(fs::exists(view));
  EXPECT_EQ(LoopsUnder(env_.dir() + "/"), std::vector<std::string>{});
  EXPECT_EQ(MountsUnder(env_.dir() + "/"), std::vector<std::string>{});
}

// SIGTERM while a filesystem is still mounted on an attached volume: umbrad
// syncs it first, exits 0, and its loop device goes when it is unmounted;
// the data written before the stop is on the volume.
TEST_F(DaemonTest, StopWithVolumeStillMounted) {
  ASSERT_TRUE(env_.Start());
  Client c = env_.Connect();
  Ok(c, "volume.create", {{"name", "v"}, {"size", 64 * kMiB}});
  const std::string dev = Ok(c, "volume.attach", {{"name", "v"}}).value("device", "");
  std::string out;
  ASSERT_EQ(Sh("mkfs.ext4 -q -F " + dev, &out), 0) << out;
  const std::string mnt = env_.dir() + "/mnt";
  ASSERT_EQ(::mkdir(mnt.c_str(), 0755), 0);
  ASSERT_EQ(Sh("mount " + dev + " " + mnt, &out), 0) << out;
  const std::string data(3 * kMiB + 17, 'd');
  WriteFile(mnt + "/file", data);  // dirty in the page cache, not synced
  EXPECT_EQ(env_.Stop(SIGTERM), 0);
  EXPECT_NE(ReadFile(env_.log()).find("still mounted"), std::string::npos);
  ASSERT_EQ(Sh("umount " + mnt, &out), 0) << out;
  for (int i = 0; i < 50 && !LoopsUnder(env_.dir() + "/").empty(); ++i)
    std::this_thread::sleep_for(20ms);
  EXPECT_EQ(LoopsUnder(env_.dir() + "/"), std::vector<std::string>{});

  ASSERT_TRUE(env_.Start());
  Client c2 = env_.Connect();
  const std::string dev2 = Ok(c2, "volume.attach", {{"name", "v"}}).value("device", "");
  ASSERT_EQ(Sh("mount -o ro " + dev2 + " " + mnt, &out), 0) << out;
  EXPECT_TRUE(ReadFile(mnt + "/file") == data) << "data written before SIGTERM was lost";
  ASSERT_EQ(Sh("umount " + mnt, &out), 0) << out;
}

// Shadow storage moves while the volume is attached and its filesystem is
// being written: the engine Volume is swapped under the exported device
// without the filesystem noticing, and snapshots use the new location.
TEST_F(DaemonTest, StorageMovesUnderAMountedFilesystem) {
  ASSERT_TRUE(env_.Start());
  Client c = env_.Connect();
  Json vol = Ok(c, "volume.create", {{"name", "m"}, {"size", 64 * kMiB}});
  const std::string dev = Ok(c, "volume.attach", {{"name", "m"}}).value("device", "");
  std::string out;
  ASSERT_EQ(Sh("mkfs.ext4 -q -F " + dev, &out), 0) << out;
  const std::string mnt = env_.dir() + "/mnt";
  ASSERT_EQ(::mkdir(mnt.c_str(), 0755), 0);
  ASSERT_EQ(Sh("mount " + dev + " " + mnt, &out), 0) << out;
  std::atomic<bool> stop{false};
  std::atomic<int> writes{0};
  std::thread writer([&] {
    for (int i = 0; !stop; ++i) {
      WriteFile(mnt + "/f" + std::to_string(i % 8), std::string(64 * 1024, 'a' + i % 26));
      if (Sh("sync -f " + mnt) != 0) break;
      ++writes;
    }
  });
  const std::string other = env_.dir() + "/elsewhere";
  ASSERT_EQ(::mkdir(other.c_str(), 0700), 0);
  std::this_thread::sleep_for(200ms);
  Json st = Ok(c, "storage.add", {{"volume", "m"}, {"on", other}, {"max_size", "unbounded"}});
  const int before = writes;
  std::this_thread::sleep_for(300ms);
  stop = true;
  writer.join();
  EXPECT_GT(writes, before) << "writes stopped after the storage moved";
  EXPECT_EQ(st["location"], other + "/umbra-shadow-" + vol["uuid"].get<std::string>());
  EXPECT_EQ(st["max"], nullptr);
  EXPECT_EQ(st["max_size"], "unbounded");
  const std::string id = Ok(c, "snapshot.create", {{"volumes", {"m"}}}).value("id", "");
  WriteFile(mnt + "/f0", "changed after the snapshot");
  ASSERT_EQ(Sh("sync -f " + mnt), 0);
  EXPECT_GT(Ok(c, "storage.list", {{"volume", "m"}})["storage"][0].value("used", 0u), 0u);
  const std::string view = env_.dir() + "/view";
  Ok(c, "snapshot.mount", {{"id", id}, {"dir", view}});
  EXPECT_EQ(ReadFile(view + "/f0").size(), 64u * 1024);
  Ok(c, "snapshot.unmount", {{"id", id}});
  ASSERT_EQ(Sh("umount " + mnt, &out), 0) << out;
  EXPECT_EQ(Sh("e2fsck -fn " + dev, &out), 0) << out;
}

// storage.list reports how full shadow storage is and warns at 80% and 90%.
TEST_F(DaemonTest, StorageWarnsWhenNearlyFull) {
  ASSERT_TRUE(env_.Start());
  Client c = env_.Connect();
  Ok(c, "volume.create", {{"name", "w"}, {"size", 16 * kMiB}, {"chunk_size", 16384}});
  Json st = Ok(c, "storage.resize", {{"volume", "w"}, {"max_size", "1M"}});
  EXPECT_EQ(st["max"], kMiB);
  EXPECT_EQ(st["warning"], nullptr);
  const std::string dev = Ok(c, "volume.attach", {{"name", "w"}}).value("device", "");
  int fd = ::open(dev.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  Buffer b(16384);
  // A new volume is all free (nothing to preserve): write the first chunks
  // before the snapshot so that overwriting them copies.
  std::memset(b.p, 2, 16384);
  for (int i = 0; i < 64; ++i)
    ASSERT_EQ(::pwrite(fd, b.p, 16384, static_cast<off_t>(i) * 16384), 16384);
  ASSERT_EQ(::fsync(fd), 0);
  Ok(c, "snapshot.create", {{"volumes", {"w"}}});
  std::memset(b.p, 1, 16384);
  // Overwrite whole chunks: each first write copies one 16 KiB chunk.
  auto fill_to = [&](int chunks) {
    for (int i = 0; i < chunks; ++i)
      EXPECT_EQ(::pwrite(fd, b.p, 16384, static_cast<off_t>(i) * 16384), 16384);
    EXPECT_EQ(::fsync(fd), 0);
    return Ok(c, "storage.list", {{"volume", "w"}})["storage"][0];
  };
  st = fill_to(52);  // 832 KiB of 1 MiB: 81.25%
  EXPECT_EQ(st["used"], 52u * 16384);
  EXPECT_NEAR(st.value("percent", 0.0), 81.25, 0.01);
  EXPECT_EQ(st["warning"], "80%");
  st = fill_to(60);  // 960 KiB: 93.75%
  EXPECT_EQ(st["warning"], "90%");
  ::close(fd);
  Ok(c, "volume.detach", {{"name", "w"}});
}

// A volume umbrad creates starts all free: writing it under a snapshot
// copies nothing, and the snapshot still reads the zeros it had.
TEST_F(DaemonTest, NewVolumeIsFreeUntilWritten) {
  ASSERT_TRUE(env_.Start());
  Client c = env_.Connect();
  Ok(c, "volume.create", {{"name", "n"}, {"size", 16 * kMiB}});
  const std::string id = Ok(c, "snapshot.create", {{"volumes", {"n"}}}).value("id", "");
  const std::string dev = Ok(c, "volume.attach", {{"name", "n"}}).value("device", "");
  int fd = ::open(dev.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  Buffer b(kMiB);
  std::memset(b.p, 7, kMiB);
  ASSERT_EQ(::pwrite(fd, b.p, kMiB, 0), static_cast<ssize_t>(kMiB));
  ASSERT_EQ(::fsync(fd), 0);
  ::close(fd);
  EXPECT_EQ(Ok(c, "storage.list", {{"volume", "n"}})["storage"][0].value("used", 1u), 0u);
  const std::string sdev = Ok(c, "snapshot.attach", {{"id", id}}).value("device", "");
  int sfd = ::open(sdev.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  ASSERT_GE(sfd, 0) << std::strerror(errno);
  ASSERT_EQ(::pread(sfd, b.p, kMiB, 0), static_cast<ssize_t>(kMiB));
  ::close(sfd);
  EXPECT_EQ(std::count(b.p, b.p + kMiB, std::byte{0}), static_cast<long>(kMiB));
  Ok(c, "snapshot.detach", {{"id", id}});
  Ok(c, "volume.detach", {{"name", "n"}});
}

TEST_F(DaemonTest, ReleaseOnDisconnect) {
  ASSERT_TRUE(env_.Start());
  Client c = env_.Connect();
  Ok(c, "volume.create", {{"name", "v"}, {"size", "16M"}});
  std::string id;
  {
    Client requester = env_.Connect();
    Fails(requester, "snapshot.create",
          {{"volumes", {"v"}}, {"persistent", true}, {"release_on_disconnect", true}},
          Code::kInvalidArgument);
    Json r =
        Ok(requester, "snapshot.create", {{"volumes", {"v"}}, {"release_on_disconnect", true}});
    id = r.value("id", "");
    Json kept = Ok(requester, "snapshot.create", {{"volumes", {"v"}}});
    EXPECT_EQ(Ok(c, "snapshot.list", {{"volume", "v"}})["snapshots"].size(), 2u);
  }
  // The requester closed its connection: only its released snapshot goes.
  Json listed;
  for (int i = 0; i < 100; ++i) {
    listed = Ok(c, "snapshot.list", {{"volume", "v"}})["snapshots"];
    if (listed.size() == 1) break;
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_EQ(listed.size(), 1u) << listed.dump();
  EXPECT_NE(listed[0]["id"], id);
  Json deleted = Ok(c, "snapshot.delete", {{"volume", "v"}, {"all", true}})["deleted"];
  EXPECT_EQ(deleted.size(), 1u);
  Ok(c, "volume.delete", {{"name", "v"}});
  EXPECT_NE(::access((env_.state_dir() + "/volumes/v.img").c_str(), F_OK), 0);
}

// Runs `op` as uid 65534 (gid `gid`) in a forked child; returns the
// child's {"hello": ..., "code": ...} report.
Json CallAsNobody(const std::string& socket, gid_t gid, const std::string& op) {
  int p[2];
  if (::pipe(p) != 0) return Json();
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(p[0]);
    Json report;
    if (::setgroups(0, nullptr) != 0 || ::setgid(gid) != 0 || ::setuid(65534) != 0) {
      report["error"] = std::string("setuid: ") + std::strerror(errno);
    } else {
      auto c = Client::Connect(socket);
      if (!c.ok()) {
        report["error"] = c.status().ToString();
      } else {
        auto h = c->Call("daemon.hello", {{"version", 1}});
        report["hello"] = h.ok() ? *h : Json(h.status().ToString());
        auto r = c->Call(op, Json::object());
        report["code"] = r.ok() ? "ok" : control::WireCode(r.status().code());
        report["message"] = r.ok() ? "" : r.status().message();
      }
    }
    std::string s = report.dump();
    if (::write(p[1], s.data(), s.size()) < 0) ::_exit(2);
    ::_exit(0);
  }
  ::close(p[1]);
  std::string s;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(p[0], buf, sizeof buf)) > 0) s.append(buf, static_cast<size_t>(n));
  ::close(p[0]);
  ::waitpid(pid, nullptr, 0);
  return Json::parse(s, nullptr, false);
}

TEST_F(DaemonTest, OnlyRootOrAdminGroup) {
  // No admin_group: the socket is root:root 0660; a child with uid nobody
  // and gid root can connect but may only say hello.
  ASSERT_TRUE(env_.Start());
  Json r = CallAsNobody(env_.socket(), 0, "volume.list");
  ASSERT_TRUE(r.contains("hello")) << r.dump();
  EXPECT_EQ(r["hello"]["uid"], 65534);
  EXPECT_EQ(r["hello"]["allowed"], false);
  EXPECT_EQ(r["code"], "permission_denied") << r.dump();
  EXPECT_EQ(env_.Stop(), 0);

  // admin_group from the config file: its members may do everything.
  struct group* g = ::getgrgid(65534);
  if (g == nullptr) GTEST_SKIP() << "no group 65534 to use as admin_group";
  const std::string conf = env_.dir() + "/umbrad.toml";
  WriteFile(conf, std::string("admin_group = \"") + g->gr_name + "\"\ncopy_timeout_ms = 5000\n");
  ASSERT_TRUE(env_.Start({"--config", conf}));
  struct stat st;
  ASSERT_EQ(::stat(env_.socket().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  EXPECT_EQ(st.st_gid, 65534u);
  r = CallAsNobody(env_.socket(), 65534, "volume.list");
  EXPECT_EQ(r["code"], "ok") << r.dump();
  EXPECT_EQ(r["hello"]["allowed"], true) << r.dump();
}

TEST_F(DaemonTest, BadInputChangesNothing) {
  ASSERT_TRUE(env_.Start());
  Client c = env_.Connect();
  Ok(c, "volume.create", {{"name", "a"}, {"size", 8 * kMiB}});
  const Json before = Ok(c, "volume.list");

  EXPECT_NE(Fails(c, "volume.attach", {{"name", "nope"}}, Code::kNotFound).find("nope"),
            std::string::npos);
  Fails(c, "volume.create", {{"name", "a"}, {"size", 8 * kMiB}}, Code::kAlreadyExists);
  Fails(c, "volume.create", {{"name", "b"}, {"size", "lots"}}, Code::kInvalidArgument);
  Fails(c, "volume.create", {{"name", "b"}, {"size", 0}}, Code::kInvalidArgument);
  Fails(c, "volume.create", {{"name", "b"}, {"size", -5}}, Code::kInvalidArgument);
  Fails(c, "volume.create", {{"name", "b"}}, Code::kInvalidArgument);
  Fails(c, "volume.create", {{"name", "../x"}, {"size", 8 * kMiB}}, Code::kInvalidArgument);
  Fails(c, "volume.create", {{"name", "b"}, {"size", 8 * kMiB}, {"backing", "relative.img"}},
        Code::kInvalidArgument);
  Fails(c, "volume.adopt", {{"name", "b"}, {"device", env_.state_dir() + "/volumes/a.img"}},
        Code::kInvalidArgument);
  Fails(c, "snapshot.create", {{"volumes", {"a", "nope"}}}, Code::kNotFound);
  Fails(c, "snapshot.create", {{"volumes", Json::array()}}, Code::kInvalidArgument);
  Fails(c, "snapshot.delete", {{"id", "00000000-0000-4000-8000-000000000000"}}, Code::kNotFound);
  Fails(c, "snapshot.delete", {{"id", "not-a-uuid"}}, Code::kInvalidArgument);
  Fails(c, "snapshot.delete", {{"volume", "a"}, {"oldest", true}}, Code::kNotFound);
  Fails(c, "storage.resize", {{"volume", "a"}, {"max_size", "250%"}}, Code::kInvalidArgument);
  Fails(c, "storage.add", {{"volume", "a"}, {"on", env_.dir() + "/missing"}}, Code::kNotFound);
  Fails(c, "volume.detach", {{"name", "a"}}, Code::kInvalidArgument);
  EXPECT_EQ(Ok(c, "volume.list"), before);
  EXPECT_FALSE(fs::exists(env_.state_dir() + "/volumes/b.img"));

  // An existing backing file is used in place and kept when the volume goes.
  const std::string mine = env_.dir() + "/mine.img";
  WriteFile(mine, std::string(4 * kMiB, 'x'));
  Fails(c, "volume.create", {{"name", "m"}, {"size", 8 * kMiB}, {"backing", mine}},
        Code::kInvalidArgument);  // not its size
  Json m = Ok(c, "volume.create", {{"name", "m"}, {"backing", mine}});
  EXPECT_EQ(m["size"], 4 * kMiB);
  Ok(c, "volume.delete", {{"name", "m"}});
  EXPECT_EQ(ReadFile(mine), std::string(4 * kMiB, 'x'));

  // Protocol errors: an unknown op and a malformed frame; the bad frame
  // closes only its own connection.
  auto unknown = c.Call("volume.explode");
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("unknown operation"), std::string::npos);
  {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, env_.socket().c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    const char garbage[] = "\x05\x00\x00\x00{{{{{";
    ASSERT_EQ(::write(fd, garbage, 9), 9);
    auto reply = control::ReadFrame(fd);  // one protocol error, then EOF
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
    EXPECT_EQ((*reply)["error"]["code"], "protocol");
    EXPECT_FALSE(control::ReadFrame(fd).ok());
    ::close(fd);
  }
  EXPECT_EQ(Ok(c, "volume.list"), before);

  // Storage moves only while the volume has no snapshots.
  const std::string other = env_.dir() + "/other-storage";
  ASSERT_EQ(::mkdir(other.c_str(), 0700), 0);
  Json moved = Ok(c, "storage.add", {{"volume", "a"}, {"on", other}, {"max_size", "20%"}});
  const std::string uuid = before["volumes"][0]["uuid"];
  EXPECT_EQ(moved["location"], other + "/umbra-shadow-" + uuid);
  EXPECT_EQ(moved["max_size"], "20%");
  EXPECT_EQ(moved["copy_mode"], "inline") << "same filesystem as the volume's file";
  EXPECT_TRUE(fs::exists(other + "/umbra-shadow-" + uuid));
  EXPECT_FALSE(fs::exists(env_.state_dir() + "/shadow/" + uuid));
  Json snap = Ok(c, "snapshot.create", {{"volumes", {"a"}}, {"persistent", true}});
  Fails(c, "storage.add", {{"volume", "a"}, {"on", env_.dir()}}, Code::kBusy);
  Fails(c, "storage.delete", {{"volume", "a"}}, Code::kBusy);
  Json resized = Ok(c, "storage.resize", {{"volume", "a"}, {"max_size", "1G"}});
  EXPECT_EQ(resized["max"], 1u << 30);
  EXPECT_EQ(resized["max_size"], "1 GiB");
  EXPECT_EQ(Ok(c, "snapshot.delete", {{"volume", "a"}, {"oldest", true}})["deleted"][0],
            snap["id"]);
  Ok(c, "storage.delete", {{"volume", "a"}});
  Json storage = Ok(c, "storage.list")["storage"];
  ASSERT_EQ(storage.size(), 1u);
  EXPECT_EQ(storage[0]["location"], env_.state_dir() + "/shadow/" + uuid);
  EXPECT_EQ(storage[0]["copy_mode"], "inline");
  EXPECT_FALSE(fs::exists(other + "/umbra-shadow-" + uuid));

  // On another filesystem (tmpfs), copier threads copy with a bounded wait.
  test_util::TempDir shm("umbra-daemon-test", "/dev/shm");
  ASSERT_FALSE(shm.path().empty());
  EXPECT_EQ(Ok(c, "storage.add", {{"volume", "a"}, {"on", shm.path()}})["copy_mode"], "copier");
  EXPECT_EQ(Ok(c, "storage.list")["storage"][0]["copy_mode"], "copier");
  Ok(c, "storage.delete", {{"volume", "a"}});
}

}  // namespace
}  // namespace umbra
