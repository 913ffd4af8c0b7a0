// umbra-engine-bench: the snapshot engine on a file-backed volume on this
// machine's disk, as ratios against writing the same file directly in the
// same run. Results and the command that produced them: docs/benchmarks.md.
//
//   write throughput  4 KiB random and 1 MiB sequential *first* writes (every
//                     write lands on a chunk not yet copied) with 0, 1 and 16
//                     snapshots, auto-release and persistent
//   chunk size sweep  the same with 1 snapshot for 4 KiB..256 KiB chunks
//   create latency    snapshot creation at 1 GiB and 64 GiB volume size
//   memory            engine memory per GiB of volume, and per GiB copied
#include <fcntl.h>
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "base/random.h"
#include "umbra/engine.h"

namespace fs = std::filesystem;
using namespace umbra;

namespace {

struct Options {
  std::string dir = "/var/tmp/umbra-bench";
  uint64_t volume_bytes = 1ull << 30;
  int threads = 4;
  bool direct = true;
  uint64_t random_writes = 16384;
  bool quick = false;
  int repeat = 3;  // each figure is the median of this many runs
};

template <typename F>
double Median(int n, F f) {
  std::vector<double> v;
  for (int i = 0; i < n; ++i) v.push_back(f());
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct AlignedBuf {
  explicit AlignedBuf(size_t n) : p(static_cast<std::byte*>(std::aligned_alloc(4096, n))), size(n) {
    Rng r(n);
    r.Fill(std::span(p, n));
  }
  ~AlignedBuf() { std::free(p); }
  std::byte* p;
  size_t size;
};

void Die(const std::string& what, const Status& s) {
  std::fprintf(stderr, "umbra-engine-bench: %s: %s\n", what.c_str(), s.ToString().c_str());
  std::exit(1);
}

// The write pattern: (offset, length) pairs, split among threads.
std::vector<std::pair<uint64_t, uint32_t>> RandomFirstWrites(const Options& o, uint32_t chunk) {
  // One 4 KiB write inside each of N distinct chunks (at least 64 KiB apart so
  // that every chunk size up to 64 KiB sees only first writes), shuffled.
  uint64_t stride = std::max<uint64_t>(chunk, 65536);
  uint64_t n = std::min<uint64_t>(o.random_writes, o.volume_bytes / stride);
  std::vector<std::pair<uint64_t, uint32_t>> w;
  Rng r(1234);
  for (uint64_t i = 0; i < n; ++i) w.push_back({i * stride + r.Uniform(0, stride / 4096 - 1) * 4096, 4096});
  for (size_t i = w.size(); i > 1; --i) std::swap(w[i - 1], w[r.Uniform(0, i - 1)]);
  return w;
}

std::vector<std::pair<uint64_t, uint32_t>> SequentialWrites(const Options& o) {
  std::vector<std::pair<uint64_t, uint32_t>> w;
  for (uint64_t off = 0; off < o.volume_bytes; off += 1 << 20) w.push_back({off, 1 << 20});
  return w;
}

// Runs `io(off, len, buf)` over the pattern on o.threads threads (each takes
// every threads-th item: concurrent requests, like a block front end).
template <typename F>
double RunPattern(const Options& o, const std::vector<std::pair<uint64_t, uint32_t>>& w, F io) {
  AlignedBuf buf(1 << 20);
  double t0 = Now();
  std::vector<std::thread> ts;
  for (int t = 0; t < o.threads; ++t) {
    ts.emplace_back([&, t] {
      for (size_t i = t; i < w.size(); i += o.threads) io(w[i].first, w[i].second, buf.p);
    });
  }
  for (auto& t : ts) t.join();
  double dt = Now() - t0;
  uint64_t bytes = 0;
  for (auto& x : w) bytes += x.second;
  return bytes / dt / (1 << 20);  // MiB/s
}

std::string OriginPath(const Options& o) { return o.dir + "/origin.img"; }

void PrepareOrigin(const Options& o) {
  fs::create_directories(o.dir);
  int fd = ::open(OriginPath(o).c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) Die("create origin", Status::FromErrno(errno, OriginPath(o)));
  AlignedBuf buf(1 << 20);
  for (uint64_t off = 0; off < o.volume_bytes; off += buf.size)
    if (::pwrite(fd, buf.p, buf.size, static_cast<off_t>(off)) != static_cast<ssize_t>(buf.size))
      Die("fill origin", Status::FromErrno(errno, "pwrite"));
  ::fdatasync(fd);
  ::close(fd);
}

double Baseline(const Options& o, const std::vector<std::pair<uint64_t, uint32_t>>& w) {
  int fd = ::open(OriginPath(o).c_str(), O_RDWR | (o.direct ? O_DIRECT : 0));
  if (fd < 0) Die("open origin", Status::FromErrno(errno, OriginPath(o)));
  double mbs = RunPattern(o, w, [&](uint64_t off, uint32_t len, std::byte* b) {
    if (::pwrite(fd, b, len, static_cast<off_t>(off)) != static_cast<ssize_t>(len)) std::abort();
  });
  ::close(fd);
  return mbs;
}

std::unique_ptr<Volume> NewVolume(const Options& o, uint32_t chunk) {
  fs::remove_all(o.dir + "/shadow");
  VolumeConfig c;
  c.origin_path = OriginPath(o);
  c.shadow_dir = o.dir + "/shadow";
  c.chunk_size = chunk;
  c.direct_io = o.direct;
  auto v = Volume::Create(DefaultEnv(), c);
  if (!v.ok()) Die("create volume", v.status());
  return std::move(v).value();
}

double EngineRun(const Options& o, uint32_t chunk, int snaps, bool persistent,
                 const std::vector<std::pair<uint64_t, uint32_t>>& w, uint64_t* copies) {
  auto v = NewVolume(o, chunk);
  for (int i = 0; i < snaps; ++i) {
    auto s = v->CreateSnapshot({persistent, "", ""});
    if (!s.ok()) Die("snapshot", s.status());
  }
  double mbs = RunPattern(o, w, [&](uint64_t off, uint32_t len, std::byte* b) {
    Status s = v->Write(off, std::span<const std::byte>(b, len));
    if (!s.ok()) Die("write", s);
  });
  *copies = v->GetStorageUsage().copies;
  if (!v->Close().ok()) Die("close", Status(Code::kIOError, "close"));
  return mbs;
}

// Heap bytes in use (glibc): exact, unlike RSS, which keeps freed pages.
uint64_t HeapBytes() {
  struct mallinfo2 m = mallinfo2();
  return m.uordblks + m.hblkhd;
}

void CreateLatency(const Options& o, uint64_t size, bool persistent) {
  std::string img = o.dir + "/sparse.img";
  fs::remove(img);
  {
    int fd = ::open(img.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0) Die("sparse", Status::FromErrno(errno, img));
    ::close(fd);
  }
  fs::remove_all(o.dir + "/shadow-lat");
  VolumeConfig c;
  c.origin_path = img;
  c.shadow_dir = o.dir + "/shadow-lat";
  auto v = Volume::Create(DefaultEnv(), c);
  if (!v.ok()) Die("create", v.status());
  std::vector<double> ms;
  AlignedBuf buf(65536);
  Rng r(5);
  for (int i = 0; i < 20; ++i) {
    // Some writes between snapshots, as in real use.
    for (int k = 0; k < 64; ++k) {
      uint64_t off = r.Uniform(0, size / 65536 - 1) * 65536;
      if (!(*v)->Write(off, std::span<const std::byte>(buf.p, 65536)).ok()) Die("write", Status());
    }
    double t0 = Now();
    auto s = (*v)->CreateSnapshot({persistent, "", ""});
    ms.push_back((Now() - t0) * 1000);
    if (!s.ok()) Die("snapshot", s.status());
  }
  std::sort(ms.begin(), ms.end());
  std::printf("| %s | %s | %.3f | %.3f | %.3f |\n", size >= (64ull << 30) ? "64 GiB" : "1 GiB",
              persistent ? "persistent" : "auto-release", ms[ms.size() / 2], ms[ms.size() * 9 / 10],
              ms.back());
  (*v)->Close().IgnoreError();
  v->reset();
  fs::remove(img);
  fs::remove_all(o.dir + "/shadow-lat");
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--dir") o.dir = next();
    else if (a == "--threads") o.threads = std::atoi(next().c_str());
    else if (a == "--buffered") o.direct = false;
    else if (a == "--quick") { o.quick = true; o.volume_bytes = 256ull << 20; o.random_writes = 2048; o.repeat = 1; }
    else if (a == "--repeat") o.repeat = std::max(1, std::atoi(next().c_str()));
    else if (a == "--help" || a == "-h") {
      std::printf(
          "usage: umbra-engine-bench [--dir DIR] [--threads N] [--buffered] [--repeat N] [--quick]\n\n"
          "Measures the snapshot engine on a file-backed volume in DIR (default\n"
          "/var/tmp/umbra-bench; needs ~2.5 GiB free; removed afterwards) against\n"
          "writing the same file directly, in the same run. Prints Markdown tables.\n"
          "  --threads N  concurrent writers (default 4)\n"
          "  --buffered   page-cache I/O instead of O_DIRECT for origin and baseline\n"
          "  --repeat N   report the median of N runs of each figure (default 3)\n"
          "  --quick      256 MiB volume, fewer writes (smoke run)\n");
      return 0;
    } else {
      std::fprintf(stderr, "umbra-engine-bench: unknown option %s (see --help)\n", a.c_str());
      return 2;
    }
  }
  std::printf("# umbra-engine-bench: volume %llu MiB, %d threads, %s I/O\n\n",
              static_cast<unsigned long long>(o.volume_bytes >> 20), o.threads,
              o.direct ? "O_DIRECT" : "buffered");
  PrepareOrigin(o);

  const uint32_t def_chunk = VolumeConfig{}.chunk_size;
  auto rnd64 = RandomFirstWrites(o, 65536);
  auto seq = SequentialWrites(o);
  struct Work {
    const char* name;
    const std::vector<std::pair<uint64_t, uint32_t>>* w;
  } works[] = {{"4 KiB random first writes", &rnd64}, {"1 MiB sequential first writes", &seq}};

  std::printf("## Write throughput, default chunk (%u KiB); ratio = engine / direct file, same run\n\n",
              def_chunk / 1024);
  std::printf("| workload | config | MiB/s | ratio | copies |\n|---|---|---|---|---|\n");
  for (auto& wk : works) {
    double base = Median(o.repeat, [&] { return Baseline(o, *wk.w); });
    std::printf("| %s | direct file (baseline) | %.1f | 1.00 | - |\n", wk.name, base);
    struct Cfg {
      const char* name;
      int snaps;
      bool persistent;
    } cfgs[] = {{"engine, 0 snapshots", 0, false},
                {"engine, 1 auto-release snapshot", 1, false},
                {"engine, 16 auto-release snapshots", 16, false},
                {"engine, 1 persistent snapshot", 1, true},
                {"engine, 16 persistent snapshots", 16, true}};
    double zero = 0;
    for (auto& c : cfgs) {
      uint64_t copies = 0;
      double mbs = Median(o.repeat, [&] { return EngineRun(o, def_chunk, c.snaps, c.persistent, *wk.w, &copies); });
      if (c.snaps == 0) zero = mbs;
      std::printf("| %s | %s | %.1f | %.2f | %llu |\n", wk.name, c.name, mbs, mbs / base,
                  static_cast<unsigned long long>(copies));
    }
    (void)zero;
    std::fflush(stdout);
  }

  std::printf("\n## Chunk size sweep: 1 auto-release snapshot, first writes; ratio to direct file\n\n");
  std::printf("| chunk | 4 KiB random MiB/s | ratio | 1 MiB seq MiB/s | ratio |\n|---|---|---|---|---|\n");
  double base_r = Median(o.repeat, [&] { return Baseline(o, rnd64); });
  double base_s = Median(o.repeat, [&] { return Baseline(o, seq); });
  for (uint32_t chunk : {4096u, 16384u, 65536u, 262144u}) {
    uint64_t copies = 0;
    auto rnd = RandomFirstWrites(o, chunk);
    double br = chunk > 65536 ? Median(o.repeat, [&] { return Baseline(o, rnd); }) : base_r;
    double r = Median(o.repeat, [&] { return EngineRun(o, chunk, 1, false, rnd, &copies); });
    double s = Median(o.repeat, [&] { return EngineRun(o, chunk, 1, false, seq, &copies); });
    std::printf("| %u KiB | %.1f | %.2f | %.1f | %.2f |\n", chunk / 1024, r, r / br, s, s / base_s);
    std::fflush(stdout);
  }

  std::printf("\n## Snapshot creation latency (ms, 20 snapshots, 64 random 64 KiB writes between)\n\n");
  std::printf("| volume | kind | p50 | p90 | max |\n|---|---|---|---|---|\n");
  for (uint64_t size : {1ull << 30, 64ull << 30})
    for (bool p : {false, true}) CreateLatency(o, size, p);

  std::printf("\n## Engine memory\n\n");
  {
    uint64_t r0 = HeapBytes();
    auto v = NewVolume(o, def_chunk);
    uint64_t r1 = HeapBytes();
    auto s = v->CreateSnapshot({false, "", ""});
    if (!s.ok()) Die("snapshot", s.status());
    uint64_t copies = 0;
    double mbs = RunPattern(o, seq, [&](uint64_t off, uint32_t len, std::byte* b) {
      if (!v->Write(off, std::span<const std::byte>(b, len)).ok()) std::abort();
    });
    (void)mbs;
    uint64_t r2 = HeapBytes();
    copies = v->GetStorageUsage().copies;
    // Deleting the snapshot frees its index; buffer pools stay. The
    // difference is what the snapshot's copies cost in memory.
    if (!v->DeleteSnapshot(s->id).ok()) Die("delete", Status());
    uint64_t r3 = HeapBytes();
    double gib = static_cast<double>(o.volume_bytes) / (1 << 30);
    double index = r2 > r3 ? static_cast<double>(r2 - r3) : 0;
    std::printf("| what | heap bytes |\n|---|---|\n");
    std::printf("| per GiB of volume, no snapshot (bitmaps) | %.0f |\n", (r1 > r0 ? r1 - r0 : 0) / gib);
    std::printf("| per GiB of volume per snapshot, whole volume overwritten (%llu copies) | %.0f |\n",
                static_cast<unsigned long long>(copies), index / gib);
    std::printf("| per copied chunk | %.0f |\n", copies ? index / copies : 0.0);
    std::printf("| copy buffer pools (bounded, shared by all snapshots) | %.0f |\n",
                r3 > r1 ? static_cast<double>(r3 - r1) : 0.0);
    v->Close().IgnoreError();
  }
  fs::remove_all(o.dir);
  return 0;
}
