// umbra-engine-demo: the snapshot engine on a file-backed volume, while a
// writer keeps writing. Shows that a snapshot taken in the middle of the
// writes stays byte-for-byte equal to the volume at its instant, that
// shadow storage only grows with what is overwritten, that deleting a
// middle snapshot keeps the others exact, and that persistent snapshots
// survive a reopen. Cleans up everything it made.
//
// (Until umbrad exists this is the README's main job; it becomes the live
// demo with a real filesystem when the daemon lands.)
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/random.h"
#include "base/units.h"
#include "umbra/engine.h"

namespace fs = std::filesystem;
using namespace umbra;

namespace {

int Fail(const std::string& what, const Status& s) {
  std::fprintf(stderr, "umbra-engine-demo: %s: %s\n", what.c_str(), s.ToString().c_str());
  return 1;
}

// A writer that keeps overwriting random 4-64 KiB ranges. Pause() holds it
// off between writes, the way a filesystem freeze would.
class Writer {
 public:
  Writer(Volume* v, uint64_t size) : v_(v), size_(size), t_([this] { Run(); }) {}
  ~Writer() {
    stop_ = true;
    t_.join();
  }
  std::unique_lock<std::shared_mutex> Pause() { return std::unique_lock(mu_); }
  uint64_t bytes() const { return bytes_; }
  bool failed() const { return failed_; }

 private:
  void Run() {
    Rng r(2026);
    std::vector<std::byte> buf(65536);
    while (!stop_) {
      std::shared_lock l(mu_);
      uint64_t len = 4096 * r.Uniform(1, 16);
      uint64_t off = r.Uniform(0, (size_ - len) / 4096) * 4096;
      r.Fill(std::span(buf.data(), len));
      if (!v_->Write(off, std::span(buf.data(), len)).ok()) failed_ = true;
      bytes_ += len;
    }
  }
  Volume* v_;
  uint64_t size_;
  std::shared_mutex mu_;
  std::atomic<bool> stop_{false}, failed_{false};
  std::atomic<uint64_t> bytes_{0};
  std::thread t_;
};

bool SameAsReference(Volume& v, const std::string& id, const std::vector<std::byte>& ref) {
  std::vector<std::byte> buf(1 << 20);
  for (uint64_t off = 0; off < ref.size(); off += buf.size()) {
    if (!v.ReadSnapshot(id, off, buf).ok()) return false;
    if (std::memcmp(buf.data(), ref.data() + off, buf.size()) != 0) return false;
  }
  return true;
}

void PrintSnapshots(Volume& v) {
  std::printf("    %-36s  %-10s  %-7s  %s\n", "SNAPSHOT", "KIND", "STATE", "OWN STORAGE");
  for (const auto& s : v.ListSnapshots())
    std::printf("    %-36s  %-10s  %-7s  %s\n", s.id.c_str(), s.persistent ? "persistent" : "auto",
                s.valid ? "valid" : "invalid", FormatBytes(s.exclusive_bytes).c_str());
}

void PrintStorage(Volume& v) {
  StorageUsage u = v.GetStorageUsage();
  std::printf("    shadow storage: used %s, allocated %s, maximum %s (%s), %llu chunks copied\n",
              FormatBytes(u.used_bytes).c_str(), FormatBytes(u.allocated_bytes).c_str(),
              u.max_bytes == UINT64_MAX ? "unbounded" : FormatBytes(u.max_bytes).c_str(),
              u.max_size.ToString().c_str(), static_cast<unsigned long long>(u.copies));
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t size = 256ull << 20;
  double seconds = 3;
  std::string base = "/var/tmp";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf(
          "usage: umbra-engine-demo [--size SIZE] [--seconds N] [--dir DIR]\n\n"
          "Creates a file-backed volume (default 256M) under DIR (default /var/tmp),\n"
          "writes to it continuously, takes snapshots while writing and proves they\n"
          "are point-in-time. Removes everything it created when it ends.\n");
      return 0;
    } else if (a == "--size" && i + 1 < argc) {
      auto s = ParseSize(argv[++i]);
      if (!s.ok()) return Fail("--size", s.status());
      size = *s / 65536 * 65536;
    } else if (a == "--seconds" && i + 1 < argc) {
      seconds = std::atof(argv[++i]);
    } else if (a == "--dir" && i + 1 < argc) {
      base = argv[++i];
    } else {
      std::fprintf(stderr, "umbra-engine-demo: unknown argument '%s' (see --help)\n", a.c_str());
      return 2;
    }
  }
  if (size < (16ull << 20)) {
    std::fprintf(stderr, "umbra-engine-demo: --size must be at least 16M\n");
    return 2;
  }
  fs::path dir = fs::path(base) / ("umbra-demo-" + NewUuid().substr(0, 8));
  struct Cleanup {
    fs::path d;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(d, ec);
      std::printf("\ncleaned up %s\n", d.c_str());
    }
  } cleanup{dir};
  fs::create_directories(dir / "volume");
  Env* env = DefaultEnv();

  std::printf("1. A %s volume in a plain file, filled with data\n", FormatBytes(size).c_str());
  VolumeConfig cfg;
  cfg.origin_path = (dir / "volume" / "disk.img").string();
  cfg.shadow_dir = (dir / "shadow").string();
  cfg.max_size = MaxSize::Percent(20);
  {
    auto f = env->Open(cfg.origin_path, OpenMode::kCreate);
    if (!f.ok()) return Fail("create volume file", f.status());
    Rng r(1);
    std::vector<std::byte> buf(1 << 20);
    for (uint64_t off = 0; off < size; off += buf.size()) {
      r.Fill(buf);
      if (Status s = (*f)->WriteAt(off, buf); !s.ok()) return Fail("fill", s);
    }
  }
  auto created = Volume::Create(env, cfg);
  if (!created.ok()) return Fail("create volume", created.status());
  std::unique_ptr<Volume> vol = std::move(created).value();
  cfg.uuid = vol->config().uuid;
  std::printf("    volume %s, chunk %s, shadow storage in %s\n", cfg.uuid.c_str(),
              FormatBytes(vol->config().chunk_size).c_str(), cfg.shadow_dir.c_str());

  std::vector<std::byte> ref(size);
  std::string first, second, third;
  {
    std::printf("\n2. A writer starts overwriting random ranges\n");
    Writer w(vol.get(), size);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));

    std::printf("3. Snapshot while writing: hold writes, copy the volume as the reference, snapshot, release\n");
    {
      auto hold = w.Pause();
      if (Status s = vol->Read(0, ref); !s.ok()) return Fail("read reference", s);
      auto t0 = std::chrono::steady_clock::now();
      auto s = vol->CreateSnapshot({true, "demo", ""});
      auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (!s.ok()) return Fail("snapshot", s.status());
      first = s->id;
      std::printf("    persistent snapshot %s created in %.2f ms\n", first.c_str(), ms);
    }
    std::printf("4. Writing on for %.0f s...\n", seconds);
    uint64_t at_snapshot = w.bytes();
    bool tty = isatty(STDOUT_FILENO);
    for (int i = 0; i < static_cast<int>(seconds * 4); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
      if (tty) {
        std::printf("\r    written %s since the snapshot", FormatBytes(w.bytes() - at_snapshot).c_str());
        std::fflush(stdout);
      }
    }
    std::printf("%s    written %s since the snapshot\n", tty ? "\r" : "",
                FormatBytes(w.bytes() - at_snapshot).c_str());
    auto a = vol->CreateSnapshot({false, "b", ""});
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    auto b = vol->CreateSnapshot({false, "c", ""});
    if (!a.ok() || !b.ok()) return Fail("snapshot", a.ok() ? b.status() : a.status());
    second = a->id;
    third = b->id;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    if (w.failed()) return Fail("writer", Status(Code::kIOError, "a write failed"));
  }

  std::printf("\n5. umbra snapshot list / storage list (what the CLI will show)\n");
  PrintSnapshots(*vol);
  PrintStorage(*vol);

  bool ok = SameAsReference(*vol, first, ref);
  std::printf("\n6. The first snapshot equals the reference taken at its instant: %s\n",
              ok ? "YES (byte for byte)" : "NO");
  std::vector<std::byte> live(size);
  if (Status s = vol->Read(0, live); !s.ok()) return Fail("read live", s);
  std::printf("   ...while the live volume has moved on: %s\n",
              std::memcmp(live.data(), ref.data(), size) != 0 ? "yes, it differs" : "NO (unexpected)");

  std::vector<std::byte> third_ref(size);
  if (Status s = vol->ReadSnapshot(third, 0, third_ref); !s.ok()) return Fail("read", s);
  if (Status s = vol->DeleteSnapshot(second); !s.ok()) return Fail("delete", s);
  bool ok2 = SameAsReference(*vol, first, ref) && SameAsReference(*vol, third, third_ref);
  std::printf("7. Deleted the middle snapshot; the others are unchanged: %s\n", ok2 ? "YES" : "NO");

  if (Status s = vol->Close(); !s.ok()) return Fail("close", s);
  vol.reset();
  auto reopened = Volume::Open(env, cfg);
  if (!reopened.ok()) return Fail("reopen", reopened.status());
  vol = std::move(reopened).value();
  bool ok3 = vol->ListSnapshots().size() == 1 && SameAsReference(*vol, first, ref);
  std::printf("8. Reopened: the persistent snapshot survived and is exact, auto-release ones are gone: %s\n",
              ok3 ? "YES" : "NO");
  PrintSnapshots(*vol);
  if (Status s = vol->Close(); !s.ok()) return Fail("close", s);
  vol.reset();
  bool all = ok && ok2 && ok3;
  std::printf("\n%s\n", all ? "demo: all checks passed" : "demo: a check FAILED");
  return all ? 0 : 1;
}
