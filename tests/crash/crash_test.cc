// Power-loss test. At a seeded crash point N, every mutating I/O from the
// N-th on fails (the machine is gone), then MemEnv::Crash drops unsynced
// data (all of it, a random subset, or random 512-byte sectors). The volume
// is reopened and checked against the expected-state oracle:
//   * every persistent snapshot whose creation returned OK, and whose
//     deletion did not return OK, exists and equals its instant byte for byte;
//   * any other surviving snapshot is a persistent one we tried to create or
//     delete, and equals its instant; auto-release snapshots are gone;
//   * every byte of the origin not touched since the last successful Flush
//     holds what it held at that flush;
//   * the recovered volume works: more writes, a snapshot, a reopen.
// CI covers UMBRA_CRASH_POINTS (default 1200) crash points; UMBRA_TEST_LONG=1
// runs 20000. UMBRA_CRASH_SEED=S reruns one.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

#include "engine_harness.h"
#include "engine/journal.h"
#include "io/fault_env.h"

namespace umbra::testing {
namespace {

struct Totals {
  uint64_t runs = 0, crashed_mid_workload = 0, snapshots_verified = 0, bytes_checked = 0;
} totals;

uint64_t EnvU64(const char* name, uint64_t def) {
  const char* v = std::getenv(name);
  return v ? std::strtoull(v, nullptr, 10) : def;
}

struct Expect {
  Bytes bytes;
  bool persistent;
  bool create_ok;
  bool delete_tried = false;
  bool delete_ok = false;
};

class CrashRun {
 public:
  explicit CrashRun(uint64_t seed) : seed_(seed), rng_(seed), fault_(&mem_) {}

  void Run() {
    chunk_ = 4096;
    size_ = chunk_ * rng_.Uniform(16, 40);
    cfg_ = MemVolumeConfig(&mem_, "v", size_, chunk_);
    // Odd seeds: shadow storage on a filesystem of its own (copier threads);
    // even seeds: on the origin's (writers copy inline).
    if (seed_ % 2 == 1) mem_.SetSeparateFilesystem("/shadow");
    if (rng_.Bernoulli(0.2)) cfg_.max_size = MaxSize::Bytes(chunk_ * rng_.Uniform(8, 64));
    auto v = Volume::Create(&fault_, cfg_);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    cfg_.uuid = (*v)->config().uuid;
    vol_ = std::move(v).value();
    live_.assign(size_, std::byte{0});
    flushed_ = live_;
    touched_.assign(size_, false);

    // From the N-th mutating operation on, nothing reaches the disk.
    uint64_t crash_at = rng_.Uniform(1, 600);
    FaultEnv::Rule rule;
    rule.err = EIO;
    rule.skip = crash_at - 1;
    fault_.AddRule(rule);

    for (int step = 0; step < 300 && !stopped_; ++step) Step(step);
    ++totals.runs;
    if (stopped_) ++totals.crashed_mid_workload;
    // The machine is gone: closing now cannot write anything (every mutating
    // operation fails), so this is the same as the process vanishing.
    vol_.reset();
    auto mode = static_cast<MemEnv::CrashMode>(seed_ % 3);
    mem_.Crash(mode, seed_);
    fault_.ClearRules();
    Verify();
  }

 private:
  std::string Where() const {
    return "seed " + std::to_string(seed_) + " (rerun: UMBRA_CRASH_SEED=" +
           std::to_string(seed_) + ")";
  }

  void Touch(uint64_t off, uint64_t len) {
    for (uint64_t i = off; i < off + len; ++i) touched_[i] = true;
  }

  void Step(int step) {
    uint64_t r = rng_.Uniform(0, 99);
    if (r < 45) {
      uint64_t len = std::min<uint64_t>(rng_.Uniform(1, 3 * chunk_), size_);
      uint64_t off = rng_.Uniform(0, size_ - len);
      Bytes b = RandomBytes(rng_, len);
      Touch(off, len);
      bool fua = rng_.Bernoulli(0.05);
      Status s = rng_.Bernoulli(0.5) ? WriteAndWait(*vol_, off, b, fua) : vol_->Write(off, b, fua);
      if (!s.ok()) return Stop();
      std::memcpy(live_.data() + off, b.data(), len);
    } else if (r < 55) {
      uint64_t len = std::min<uint64_t>(rng_.Uniform(1, 4 * chunk_), size_);
      uint64_t off = rng_.Uniform(0, size_ - len);
      Touch(off, len);
      if (!vol_->Discard(off, len).ok()) return Stop();
      std::memset(live_.data() + off, 0, len);
    } else if (r < 68) {
      if (!vol_->Flush().ok()) return Stop();
      flushed_ = live_;
      touched_.assign(size_, false);
    } else if (r < 85) {
      bool persistent = rng_.Bernoulli(0.7);
      std::string name = "s" + std::to_string(step);
      auto s = vol_->CreateSnapshot({persistent, name, ""});
      snaps_[name] = Expect{live_, persistent, s.ok()};
      if (!s.ok()) return Stop();
    } else {
      auto list = vol_->ListSnapshots();
      if (list.empty()) return;
      const auto& victim = list[rng_.Uniform(0, list.size() - 1)];
      Expect& e = snaps_.at(victim.name);
      e.delete_tried = true;
      e.delete_ok = vol_->DeleteSnapshot(victim.id).ok();
      if (!e.delete_ok) return Stop();
    }
    SyncWithEngine();
  }

  // With a cap, the engine may delete or invalidate snapshots itself (also
  // in a step that then failed).
  void SyncWithEngine() {
    std::map<std::string, bool> present;
    for (const auto& s : vol_->ListSnapshots()) {
      present[s.name] = true;
      if (!s.valid) snaps_.at(s.name).delete_tried = true;
    }
    for (auto& [name, e] : snaps_) {
      if (e.create_ok && !present.count(name) && !e.delete_tried) {
        ASSERT_EQ(cfg_.max_size.kind, MaxSize::Kind::kBytes) << Where() << ": " << name << " vanished";
        e.delete_tried = true;
      }
    }
  }

  void Stop() {
    stopped_ = true;
    SyncWithEngine();
  }

  void Dump() {
    auto names = mem_.ListDir(cfg_.shadow_dir);
    for (const auto& n : names.value()) std::fprintf(stderr, "file %s\n", n.c_str());
    auto res = engine::ReadAndReplay(
        &mem_, cfg_.shadow_dir, [](const engine::CheckpointHeader&) { return Status::Ok(); },
        [](const engine::Record& r) {
          std::fprintf(stderr, "lsn %llu %s seq=%llu chunk=%llu key=%llu slot=%llu %s\n",
                       static_cast<unsigned long long>(r.lsn),
                       std::string(engine::RecordTypeName(r.type)).c_str(),
                       static_cast<unsigned long long>(r.seq),
                       static_cast<unsigned long long>(r.chunk),
                       static_cast<unsigned long long>(r.key),
                       static_cast<unsigned long long>(r.slot), r.name.c_str());
          return Status::Ok();
        });
    if (!res.ok()) std::fprintf(stderr, "dump: %s\n", res.status().ToString().c_str());
  }

  void Verify() {
    if (std::getenv("UMBRA_CRASH_DUMP")) Dump();
    auto v = Volume::Open(&mem_, cfg_);
    ASSERT_TRUE(v.ok()) << Where() << ": reopen failed: " << v.status().ToString();
    std::map<std::string, SnapshotInfo> found;
    for (const auto& s : (*v)->ListSnapshots()) found[s.name] = s;
    for (const auto& [name, s] : found) {
      ASSERT_TRUE(snaps_.count(name)) << Where() << ": unknown snapshot " << name;
      const Expect& e = snaps_.at(name);
      ASSERT_TRUE(e.persistent) << Where() << ": auto-release snapshot " << name << " survived";
      ASSERT_FALSE(e.delete_ok) << Where() << ": deleted snapshot " << name << " came back";
      if (!s.valid) continue;  // invalidated before the crash: says so, holds no data
      ASSERT_TRUE(SnapshotEquals(**v, s.id, e.bytes)) << Where() << " snapshot " << name;
      ++totals.snapshots_verified;
    }
    for (const auto& [name, e] : snaps_) {
      if (e.persistent && e.create_ok && !e.delete_tried) {
        ASSERT_TRUE(found.count(name)) << Where() << ": persistent snapshot " << name << " lost";
      }
    }
    Bytes origin(size_);
    ASSERT_TRUE((*v)->Read(0, origin).ok());
    for (uint64_t i = 0; i < size_; ++i) {
      ASSERT_TRUE(touched_[i] || origin[i] == flushed_[i])
          << Where() << ": flushed byte " << i << " lost";
      totals.bytes_checked += touched_[i] ? 0 : 1;
    }
    // The recovered store keeps working.
    ASSERT_TRUE((*v)->SetMaxSize(MaxSize::Unbounded()).ok());
    Rng r(seed_ ^ 0x5eed);
    Bytes b = RandomBytes(r, size_);
    ASSERT_TRUE((*v)->Write(0, b).ok());
    auto s = (*v)->CreateSnapshot({true, "after", ""});
    ASSERT_TRUE(s.ok()) << Where() << ": " << s.status().ToString();
    ASSERT_TRUE((*v)->Write(0, RandomBytes(r, size_)).ok());
    ASSERT_TRUE((*v)->Close().ok());
    v->reset();
    auto v2 = Volume::Open(&mem_, cfg_);
    ASSERT_TRUE(v2.ok()) << Where() << ": " << v2.status().ToString();
    ASSERT_TRUE(SnapshotEquals(**v2, s->id, b)) << Where();
  }

  uint64_t seed_;
  Rng rng_;
  MemEnv mem_;
  FaultEnv fault_;
  VolumeConfig cfg_;
  std::unique_ptr<Volume> vol_;
  uint32_t chunk_ = 4096;
  uint64_t size_ = 0;
  Bytes live_, flushed_;
  std::vector<bool> touched_;
  std::map<std::string, Expect> snaps_;
  bool stopped_ = false;
};

TEST(CrashTest, PowerLossAtSeededPoints) {
  uint64_t one = EnvU64("UMBRA_CRASH_SEED", 0);
  uint64_t n = EnvU64("UMBRA_CRASH_POINTS", std::getenv("UMBRA_TEST_LONG") ? 20000 : 1200);
  for (uint64_t seed = one ? one : 1; seed <= (one ? one : n); ++seed) {
    CrashRun run(seed);
    run.Run();
    if (HasFatalFailure()) {
      ADD_FAILURE() << "crash test failed with seed " << seed;
      return;
    }
  }
  std::printf("crash points: %llu (%llu inside the workload), persistent snapshots verified: %llu, "
              "flushed bytes verified: %llu\n",
              static_cast<unsigned long long>(totals.runs),
              static_cast<unsigned long long>(totals.crashed_mid_workload),
              static_cast<unsigned long long>(totals.snapshots_verified),
              static_cast<unsigned long long>(totals.bytes_checked));
  EXPECT_GE(totals.crashed_mid_workload, totals.runs / 2) << "crash points must mostly fall inside the workload";
}

}  // namespace
}  // namespace umbra::testing
