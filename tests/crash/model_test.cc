// Seeded, model-based randomized test of the engine: random writes, discards,
// write-zeroes, flushes, snapshot create/delete (any position, sets across
// volumes, persistent or not) and clean reopens on two volumes, checked
// against an in-memory model of every snapshot's expected bytes.
//
// CI runs a fixed set of seeds. Long mode: UMBRA_MODEL_SEEDS=N (or
// UMBRA_TEST_LONG=1 for 5000) runs more; UMBRA_MODEL_SEED=S runs one seed.
// A failure message names its seed; rerun it with UMBRA_MODEL_SEED.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

#include "engine_harness.h"

namespace umbra::testing {
namespace {

uint64_t EnvU64(const char* name, uint64_t def) {
  const char* v = std::getenv(name);
  return v ? std::strtoull(v, nullptr, 10) : def;
}

class ModelRun {
 public:
  explicit ModelRun(uint64_t seed) : seed_(seed), rng_(seed) {}

  void Run(int steps) {
    chunk_ = rng_.Bernoulli(0.5) ? 4096 : 8192;
    // Sizes that are not a multiple of the chunk size exercise the tail.
    size_ = chunk_ * rng_.Uniform(12, 48) + (rng_.Bernoulli(0.3) ? 512 * rng_.Uniform(1, 7) : 0);
    // Odd seeds: shadow storage on a filesystem of its own (copier threads);
    // even seeds: on the origin's (writers copy inline).
    if (seed_ % 2 == 1) env_.SetSeparateFilesystem("/shadow");
    for (int i = 0; i < 2; ++i) {
      cfgs_.push_back(MemVolumeConfig(&env_, "v" + std::to_string(i), size_, chunk_));
      if (rng_.Bernoulli(0.3)) cfgs_.back().max_size = MaxSize::Bytes(chunk_ * rng_.Uniform(20, 200));
      auto v = Volume::Create(&env_, cfgs_.back());
      ASSERT_TRUE(v.ok()) << v.status().ToString();
      cfgs_.back().uuid = (*v)->config().uuid;
      vols_.push_back(std::move(v).value());
      models_.emplace_back();
      models_.back().live.assign(size_, std::byte{0});
      copies_at_snap_.push_back(0);
    }
    for (int step = 0; step < steps; ++step) {
      step_ = step;
      Step();
      if (::testing::Test::HasFatalFailure()) return;
      if (step % 25 == 24) VerifyAll();
      if (::testing::Test::HasFatalFailure()) return;
    }
    VerifyAll();
  }

 private:
  std::string Where() const {
    return "seed " + std::to_string(seed_) + " step " + std::to_string(step_) +
           " (rerun: UMBRA_MODEL_SEED=" + std::to_string(seed_) + ")";
  }

  void Trace(const std::string& what) {
    if (std::getenv("UMBRA_MODEL_TRACE")) std::fprintf(stderr, "[%d] %s\n", step_, what.c_str());
  }

  void Step() {
    size_t vi = rng_.Uniform(0, 1);
    Volume& v = *vols_[vi];
    VolumeModel& m = models_[vi];
    uint64_t r = rng_.Uniform(0, 99);
    if (r < 40) {  // write
      uint64_t len = rng_.Bernoulli(0.3) ? chunk_ * rng_.Uniform(1, 3) : rng_.Uniform(1, 3 * chunk_);
      len = std::min<uint64_t>(len, size_);
      uint64_t off = rng_.Uniform(0, size_ - len);
      if (rng_.Bernoulli(0.3)) off = off / chunk_ * chunk_;
      if (off + len > size_) off = size_ - len;
      Bytes b = RandomBytes(rng_, len);
      Trace("v" + std::to_string(vi) + " write " + std::to_string(off) + "+" + std::to_string(len));
      bool fua = rng_.Bernoulli(0.05);
      // Half the writes go through WriteAsync (the I/O thread finishes them).
      Status s = rng_.Bernoulli(0.5) ? WriteAndWait(v, off, b, fua) : v.Write(off, b, fua);
      ASSERT_TRUE(s.ok()) << Where() << ": " << s.ToString();
      m.Write(off, b);
      CheckCopyOnce(vi);
    } else if (r < 48 || (r < 53)) {  // discard or write-zeroes
      uint64_t len = rng_.Uniform(1, 4 * chunk_);
      len = std::min<uint64_t>(len, size_);
      uint64_t off = rng_.Uniform(0, size_ - len);
      Trace("v" + std::to_string(vi) + (r < 48 ? " discard " : " zeroes ") + std::to_string(off) + "+" + std::to_string(len));
      Status s = r < 48 ? v.Discard(off, len) : v.WriteZeroes(off, len);
      ASSERT_TRUE(s.ok()) << Where() << ": " << s.ToString();
      m.Zero(off, len);
      CheckCopyOnce(vi);
    } else if (r < 58) {
      ASSERT_TRUE(v.Flush().ok()) << Where();
    } else if (r < 68) {  // snapshot (sometimes a set of both volumes)
      SnapshotOptions o{rng_.Bernoulli(0.5), "s" + std::to_string(step_), ""};
      if (rng_.Bernoulli(0.3)) {
        Volume* vs[] = {vols_[0].get(), vols_[1].get()};
        auto set = CreateSnapshotSet(vs, o);
        ASSERT_TRUE(set.ok()) << Where() << ": " << set.status().ToString();
        for (int i = 0; i < 2; ++i) Record(i, (*set)[i], o.persistent);
        Trace("set " + (*set)[0].id + " " + (*set)[1].id);
      } else {
        auto s = v.CreateSnapshot(o);
        ASSERT_TRUE(s.ok()) << Where() << ": " << s.status().ToString();
        Record(vi, *s, o.persistent);
        Trace("v" + std::to_string(vi) + " snap " + s->id + " seq " + std::to_string(s->seq) + (o.persistent ? " P" : " A"));
      }
    } else if (r < 76) {  // delete any snapshot: oldest, newest or middle
      if (m.snaps.empty()) return;
      auto list = v.ListSnapshots();
      ASSERT_FALSE(list.empty()) << Where();
      const auto& victim = list[rng_.Uniform(0, list.size() - 1)];
      Trace("v" + std::to_string(vi) + " delete " + victim.id + " seq " + std::to_string(victim.seq));
      ASSERT_TRUE(v.DeleteSnapshot(victim.id).ok()) << Where();
      m.snaps.erase(victim.id);
      m.persistent.erase(victim.id);
    } else if (r < 78) {  // clean reopen: auto-release snapshots go away
      Trace("reopen");
      Reopen();
    } else {  // spot check a random range of live or a snapshot
      uint64_t len = rng_.Uniform(1, 3 * chunk_);
      len = std::min<uint64_t>(len, size_);
      uint64_t off = rng_.Uniform(0, size_ - len);
      Bytes got(len);
      if (m.snaps.empty() || rng_.Bernoulli(0.3)) {
        ASSERT_TRUE(v.Read(off, got).ok()) << Where();
        ASSERT_EQ(FirstDiff(got, std::span(m.live).subspan(off, len)), -1)
            << Where() << ": live differs at " << off;
      } else {
        auto it = m.snaps.begin();
        std::advance(it, rng_.Uniform(0, m.snaps.size() - 1));
        Status s = v.ReadSnapshot(it->first, off, got);
        if (s.code() == Code::kSnapshotInvalid && cfgs_[vi].max_size.kind == MaxSize::Kind::kBytes) {
          m.snaps.erase(it);  // the cap invalidated it: allowed, and reading says why
          return;
        }
        ASSERT_TRUE(s.ok()) << Where() << ": " << s.ToString();
        int64_t d = FirstDiff(got, std::span(it->second).subspan(off, len));
        ASSERT_EQ(d, -1) << Where() << ": snapshot " << it->first << " differs at "
                         << off + static_cast<uint64_t>(d);
      }
    }
    // Keep the snapshot count bounded; a cap may have deleted some.
    SyncModelWithList(vi);
    if (m.snaps.size() > 40) {
      auto list = v.ListSnapshots();
      ASSERT_TRUE(v.DeleteSnapshot(list.front().id).ok());
      m.snaps.erase(list.front().id);
    }
  }

  void Record(size_t vi, const SnapshotInfo& s, bool persistent) {
    models_[vi].snaps[s.id] = models_[vi].live;
    models_[vi].persistent[s.id] = persistent;
    copies_at_snap_[vi] = vols_[vi]->GetStorageUsage().copies;
  }

  // Copy once: since the newest snapshot, at most one copy per chunk.
  void CheckCopyOnce(size_t vi) {
    uint64_t copies = vols_[vi]->GetStorageUsage().copies;
    uint64_t chunks = (size_ + chunk_ - 1) / chunk_;
    ASSERT_LE(copies - copies_at_snap_[vi], chunks) << Where() << ": a chunk was copied twice";
  }

  // Snapshots the engine deleted (oldest first, to respect a cap) or
  // invalidated leave the model; with no cap nothing may disappear.
  void SyncModelWithList(size_t vi) {
    auto list = vols_[vi]->ListSnapshots();
    std::map<std::string, bool> valid;
    for (auto& s : list) valid[s.id] = s.valid;
    for (auto it = models_[vi].snaps.begin(); it != models_[vi].snaps.end();) {
      bool present = valid.count(it->first) && valid[it->first];
      if (!present) {
        ASSERT_EQ(cfgs_[vi].max_size.kind, MaxSize::Kind::kBytes)
            << Where() << ": snapshot " << it->first << " vanished without a cap";
        it = models_[vi].snaps.erase(it);
      } else {
        ++it;
      }
    }
  }

  void Reopen() {
    for (size_t i = 0; i < vols_.size(); ++i) {
      ASSERT_TRUE(vols_[i]->Close().ok()) << Where();
      vols_[i].reset();
      auto v = Volume::Open(&env_, cfgs_[i]);
      ASSERT_TRUE(v.ok()) << Where() << ": " << v.status().ToString();
      vols_[i] = std::move(v).value();
      for (auto it = models_[i].snaps.begin(); it != models_[i].snaps.end();) {
        if (!models_[i].persistent[it->first]) {
          it = models_[i].snaps.erase(it);
        } else {
          ++it;
        }
      }
      copies_at_snap_[i] = 0;
    }
  }

  void VerifyAll() {
    for (size_t i = 0; i < vols_.size(); ++i) {
      ASSERT_TRUE(LiveEquals(*vols_[i], models_[i].live)) << Where();
      SyncModelWithList(i);
      for (auto& [id, bytes] : models_[i].snaps)
        ASSERT_TRUE(SnapshotEquals(*vols_[i], id, bytes)) << Where();
    }
  }

  uint64_t seed_;
  Rng rng_;
  int step_ = 0;
  uint32_t chunk_ = 4096;
  uint64_t size_ = 0;
  MemEnv env_;
  std::vector<VolumeConfig> cfgs_;
  std::vector<std::unique_ptr<Volume>> vols_;
  std::vector<VolumeModel> models_;
  std::vector<uint64_t> copies_at_snap_;
};

TEST(ModelTest, RandomizedAgainstModel) {
  uint64_t one = EnvU64("UMBRA_MODEL_SEED", 0);
  uint64_t seeds = EnvU64("UMBRA_MODEL_SEEDS", std::getenv("UMBRA_TEST_LONG") ? 5000 : 150);
  uint64_t first = one ? one : 1;
  uint64_t last = one ? one : seeds;
  for (uint64_t seed = first; seed <= last; ++seed) {
    ModelRun run(seed);
    run.Run(400);
    if (HasFatalFailure()) {
      ADD_FAILURE() << "model test failed with seed " << seed;
      return;
    }
  }
}

}  // namespace
}  // namespace umbra::testing
