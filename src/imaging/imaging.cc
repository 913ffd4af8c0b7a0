// Image create (BuildImage), restore, verify, gc and prune selection.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "base/endian.h"
#include "umbra/imaging.h"

namespace umbra::imaging {
namespace {

using repo::ChunkId;
using repo::kZeroChunk;

struct IdHash {
  size_t operator()(const ChunkId& id) const {
    size_t h;
    std::memcpy(&h, id.data(), sizeof h);
    return h;
  }
};

// Default workers: two per CPU, at least 4, so that reads waiting on the disk
// overlap hashing and compression (measured: docs/benchmarks.md).
int Threads(int wanted) {
  if (wanted > 0) return wanted;
  int n = static_cast<int>(std::thread::hardware_concurrency());
  return std::max(4, 2 * n);
}

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool AllZero(std::span<const std::byte> b) {
  const size_t words = b.size() / 8;
  const auto* p = b.data();
  for (size_t i = 0; i < words; ++i) {
    uint64_t v;
    std::memcpy(&v, p + 8 * i, 8);
    if (v != 0) return false;
  }
  for (size_t i = words * 8; i < b.size(); ++i)
    if (b[i] != std::byte{0}) return false;
  return true;
}

// Runs `work(i, worker)` for i in [0, n) on `threads` workers; stops at the
// first error and returns it.
Status Parallel(uint64_t n, int threads, const std::function<Status(int)>& init,
                const std::function<Status(uint64_t, int)>& work) {
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  Status first;
  auto fail = [&](Status s) {
    std::lock_guard l(mu);
    if (first.ok()) first = std::move(s);
    failed = true;
  };
  std::vector<std::thread> ts;
  for (int w = 0; w < threads; ++w) {
    ts.emplace_back([&, w] {
      if (Status s = init(w); !s.ok()) return fail(std::move(s));
      while (!failed.load()) {
        uint64_t i = next.fetch_add(1);
        if (i >= n) break;
        if (Status s = work(i, w); !s.ok()) return fail(std::move(s));
      }
    });
  }
  for (auto& t : ts) t.join();
  return first;
}

// Per-chunk ranges to read: the parts of [off, off+len) inside `ranges`
// (sorted, merged).
void Overlap(const std::vector<Range>& ranges, uint64_t off, uint64_t len,
             std::vector<Range>* out) {
  out->clear();
  auto it = std::upper_bound(ranges.begin(), ranges.end(), off,
                             [](uint64_t v, const Range& r) { return v < r.offset; });
  if (it != ranges.begin()) --it;
  for (; it != ranges.end() && it->offset < off + len; ++it) {
    uint64_t a = std::max(off, it->offset), b = std::min(off + len, it->offset + it->length);
    if (a < b) out->push_back({a, b - a});
  }
}

Status FromErrno(const std::string& what) { return Status::FromErrno(errno, what); }

// major:minor of every mounted filesystem's device.
std::set<dev_t> MountedDevices() {
  std::set<dev_t> out;
  std::ifstream f("/proc/self/mountinfo");
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream ss(line);
    std::string id, parent, majmin;
    ss >> id >> parent >> majmin;
    unsigned ma = 0, mi = 0;
    if (std::sscanf(majmin.c_str(), "%u:%u", &ma, &mi) == 2) out.insert(makedev(ma, mi));
  }
  return out;
}

}  // namespace

Status BuildImage(repo::Repository& repo, Source& src, const CreateOptions& opts,
                  repo::Manifest* m) {
  const auto t0 = std::chrono::steady_clock::now();
  const uint64_t cs = repo.chunk_size();
  m->size = src.size();
  m->chunk_size = static_cast<uint32_t>(cs);
  const uint64_t n = m->chunk_count();
  if (n > repo::MaxImageChunks())
    // Refused before reading anything: the manifest could not be stored.
    return Status::InvalidArgument(
        "a volume of " + std::to_string(m->size) + " bytes is " + std::to_string(n) +
        " chunks of " + std::to_string(cs) + " bytes; one image lists at most " +
        std::to_string(repo::MaxImageChunks()) +
        " (use a repository with larger chunks: umbra repo init --chunk-size)");
  m->chunks.assign(n, kZeroChunk);
  const repo::Manifest* base = opts.base;
  if (base != nullptr && (base->size != m->size || base->chunk_size != cs)) base = nullptr;
  if (base != nullptr) m->base = base->id;

  UMBRA_ASSIGN_OR_RETURN(std::vector<Range> alloc, src.Allocated());
  auto chunks_of = [&](const std::vector<Range>& ranges) {
    std::vector<bool> out(n, false);
    for (const Range& r : ranges) {
      if (r.length == 0 || r.offset >= m->size) continue;
      uint64_t last = std::min(m->size, r.offset + r.length) - 1;
      for (uint64_t c = r.offset / cs; c <= last / cs; ++c) out[c] = true;
    }
    return out;
  };
  std::vector<bool> changed;
  if (base != nullptr) changed = chunks_of(opts.changed);
  const Partial* resume = opts.resume;
  if (resume != nullptr && (resume->chunks.size() != n || resume->done.size() != n))
    resume = nullptr;
  std::vector<bool> resume_changed;
  if (resume != nullptr) resume_changed = chunks_of(opts.resume_changed);
  // Chunks done: set (release) after m->chunks[i] is final, read (acquire)
  // by the checkpoint thread before it reads m->chunks[i].
  std::unique_ptr<std::atomic<uint8_t>[]> finished(new std::atomic<uint8_t>[n]);
  for (uint64_t i = 0; i < n; ++i) finished[i].store(0, std::memory_order_relaxed);

  const int threads = Threads(opts.threads);
  std::vector<std::unique_ptr<Reader>> readers(threads);
  std::vector<std::vector<std::byte>> bufs(threads);
  std::atomic<uint64_t> read_bytes{0}, fresh{0}, reused{0}, zero{0}, stored{0}, done{0};
  std::mutex progress_mu;
  std::mutex claim_mu;
  std::unordered_set<ChunkId, IdHash> claimed;  // ids this image stores or found stored
  std::unordered_set<ChunkId, IdHash> pending;  // claimed, PutChunk not finished yet
  // A worker connects its reader at its first read: an incremental image
  // with few changed chunks does not pay for connections it never uses.
  auto init = [&](int) -> Status { return Status::Ok(); };
  auto work = [&](uint64_t i, int w) -> Status {
    const uint64_t off = i * cs, len = std::min(cs, m->size - off);
    thread_local std::vector<Range> parts;
    Overlap(alloc, off, len, &parts);
    auto finish = [&] {
      finished[i].store(1, std::memory_order_release);
      uint64_t d = done.fetch_add(len) + len;
      if (opts.progress) {
        std::lock_guard l(progress_mu);
        opts.progress(d, m->size);
      }
      return Status::Ok();
    };
    if (parts.empty()) {
      ++zero;
      return finish();
    }
    if (resume != nullptr && resume->done[i] && !resume_changed[i]) {
      // Stored and made durable by the interrupted create (rule 3.7).
      m->chunks[i] = resume->chunks[i];
      ++(m->chunks[i] == kZeroChunk ? zero : reused);
      return finish();
    }
    if (base != nullptr && !changed[i]) {
      const ChunkId& b = base->chunks[i];
      if (b == kZeroChunk) {
        ++zero;
        return finish();
      }
      // The base manifest is in the repository and we hold the shared lock,
      // so gc cannot have removed its chunks (rule 3.5); verify checks them.
      m->chunks[i] = b;
      ++reused;
      return finish();
    }
    if (!readers[w]) {
      UMBRA_ASSIGN_OR_RETURN(readers[w], src.NewReader());
      bufs[w].resize(cs);
    }
    std::span<std::byte> buf(bufs[w].data(), len);
    std::memset(buf.data(), 0, len);
    for (const Range& p : parts) {
      UMBRA_RETURN_IF_ERROR(readers[w]->Read(p.offset, buf.subspan(p.offset - off, p.length)));
      read_bytes += p.length;
    }
    if (AllZero(buf)) {
      ++zero;
      return finish();
    }
    ChunkId id = repo.Hash(buf);
    m->chunks[i] = id;
    {
      // A chunk another worker of this image already took (duplicate data)
      // is not compressed and stored again, and counts as reused.
      std::lock_guard l(claim_mu);
      if (!claimed.insert(id).second) {
        ++reused;
        return finish();
      }
      pending.insert(id);
    }
    auto put = repo.PutChunk(id, buf);
    {
      std::lock_guard l(claim_mu);
      pending.erase(id);
    }
    UMBRA_ASSIGN_OR_RETURN(uint64_t wrote, std::move(put));
    if (wrote > 0) {
      ++fresh;
      stored += wrote;
    } else {
      ++reused;
    }
    return finish();
  };
  std::mutex cp_mu;
  std::condition_variable cp_cv;
  bool cp_stop = false;
  std::thread cp;
  if (opts.checkpoint) {
    cp = std::thread([&] {
      std::unique_lock l(cp_mu);
      while (!cp_cv.wait_for(l, std::chrono::duration<double>(opts.checkpoint_seconds),
                             [&] { return cp_stop; })) {
        Partial p;
        p.chunks.assign(n, kZeroChunk);
        p.done.assign(n, false);
        {
          // A duplicate of a chunk still being stored is not done yet for a
          // resume: its object may not exist (rule 3.7).
          std::lock_guard cl(claim_mu);
          for (uint64_t i = 0; i < n; ++i) {
            if (finished[i].load(std::memory_order_acquire) == 0) continue;
            if (m->chunks[i] != kZeroChunk && pending.count(m->chunks[i])) continue;
            p.done[i] = true;
            p.chunks[i] = m->chunks[i];
          }
        }
        opts.checkpoint(p);
      }
    });
  }
  Status run = Parallel(n, threads, init, work);
  if (cp.joinable()) {
    {
      std::lock_guard l(cp_mu);
      cp_stop = true;
    }
    cp_cv.notify_all();
    cp.join();
  }
  UMBRA_RETURN_IF_ERROR(run);
  m->stats.read_bytes = read_bytes;
  m->stats.new_chunks = fresh;
  m->stats.reused_chunks = reused;
  m->stats.zero_chunks = zero;
  m->stats.stored_bytes = stored;
  m->stats.seconds = Since(t0);
  return Status::Ok();
}

Result<RestoreStats> Restore(repo::Repository& repo, const repo::Manifest& m,
                             const std::string& target, const RestoreOptions& opts) {
  const auto t0 = std::chrono::steady_clock::now();
  bool created = false, regular = false;
  int fd = ::open(target.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) {
    fd = ::open(target.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    created = fd >= 0;
  }
  if (fd < 0) return FromErrno("opening restore target " + target);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) return FromErrno("stat " + target);
  uint64_t tsize = 0;
  if (S_ISBLK(st.st_mode)) {
    if (::ioctl(fd, BLKGETSIZE64, &tsize) != 0) return FromErrno("size of " + target);
    if (MountedDevices().count(st.st_rdev))
      return Status::Busy("restore target " + target + " is mounted; unmount it first");
  } else if (S_ISREG(st.st_mode)) {
    regular = true;
    tsize = static_cast<uint64_t>(st.st_size);
    if (created) {
      if (::ftruncate(fd, static_cast<off_t>(m.size)) != 0) {
        Status s = FromErrno("sizing " + target);
        ::unlink(target.c_str());
        return s;
      }
      tsize = m.size;
    }
  } else {
    return Status::InvalidArgument("restore target " + target +
                                   " is neither a block device nor a file");
  }
  if (tsize < m.size)
    return Status::NoSpace("restore target " + target + " has " + std::to_string(tsize) +
                           " bytes; image " + m.id + " needs " + std::to_string(m.size));
  const bool delta = opts.delta && !created;

  const uint64_t cs = m.chunk_size, n = m.chunk_count();
  const int threads = Threads(opts.threads);
  std::atomic<uint64_t> written{0}, same{0}, zeros{0}, wbytes{0}, rbytes{0}, done{0};
  std::mutex progress_mu;
  std::vector<std::vector<std::byte>> bufs(threads), cur(threads);
  auto init = [&](int w) -> Status {
    cur[w].resize(cs);
    return Status::Ok();
  };
  auto pwrite_all = [&](std::span<const std::byte> b, uint64_t off) -> Status {
    for (size_t d = 0; d < b.size();) {
      ssize_t k = ::pwrite(fd, b.data() + d, b.size() - d, static_cast<off_t>(off + d));
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) return FromErrno("writing " + target + " at offset " + std::to_string(off + d));
      d += static_cast<size_t>(k);
    }
    wbytes += b.size();
    return Status::Ok();
  };
  auto work = [&](uint64_t i, int w) -> Status {
    const uint64_t off = i * cs, len = std::min(cs, m.size - off);
    const ChunkId& id = m.chunks[i];
    std::span<std::byte> have(cur[w].data(), len);
    bool differs = true;
    if (delta) {
      for (size_t d = 0; d < len;) {
        ssize_t k = ::pread(fd, have.data() + d, len - d, static_cast<off_t>(off + d));
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return FromErrno("reading " + target + " at offset " + std::to_string(off + d));
        d += static_cast<size_t>(k);
      }
      rbytes += len;
      differs = id == kZeroChunk ? !AllZero(have) : repo.Hash(have) != id;
    }
    if (id == kZeroChunk) ++zeros;
    if (!differs) {
      ++same;
    } else if (id == kZeroChunk) {
      if (!created) {
        bool punched = regular && ::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                              static_cast<off_t>(off), static_cast<off_t>(len)) == 0;
        if (!punched) {
          std::memset(have.data(), 0, len);
          UMBRA_RETURN_IF_ERROR(pwrite_all(have, off));
        }
        ++written;
      }
    } else {
      UMBRA_RETURN_IF_ERROR(repo.GetChunk(id, &bufs[w]));
      if (bufs[w].size() != len)
        return Status::Corruption("chunk " + repo::ChunkIdHex(id) + " has " +
                                  std::to_string(bufs[w].size()) + " bytes, image " + m.id +
                                  " needs " + std::to_string(len) + " at offset " +
                                  std::to_string(off));
      UMBRA_RETURN_IF_ERROR(pwrite_all(bufs[w], off));
      ++written;
    }
    uint64_t d = done.fetch_add(len) + len;
    if (opts.progress) {
      std::lock_guard l(progress_mu);
      opts.progress(d, m.size);
    }
    return Status::Ok();
  };
  Status s = Parallel(n, threads, init, work);
  if (s.ok() && ::fdatasync(fd) != 0) s = FromErrno("syncing " + target);
  if (!s.ok()) return s;
  RestoreStats r;
  r.chunks = n;
  r.written_chunks = written;
  r.same_chunks = same;
  r.zero_chunks = zeros;
  r.written_bytes = wbytes;
  r.read_bytes = rbytes;
  r.seconds = Since(t0);
  return r;
}

Result<VerifyReport> Verify(repo::Repository& repo, const std::vector<std::string>& images,
                            int threads, Progress progress) {
  const auto t0 = std::chrono::steady_clock::now();
  VerifyReport rep;
  std::vector<std::string> ids = images;
  if (ids.empty()) {
    UMBRA_ASSIGN_OR_RETURN(ids, repo.ListImages());
  }
  std::unordered_map<ChunkId, std::vector<std::string>, IdHash> users;
  std::vector<ChunkId> order;
  for (const std::string& id : ids) {
    auto m = repo.GetManifest(id);
    ++rep.images;
    if (!m.ok()) {
      rep.damage.push_back({"image " + id, m.status().message(), {id}});
      continue;
    }
    for (const ChunkId& c : m->chunks) {
      if (c == kZeroChunk) continue;
      auto& u = users[c];
      if (u.empty()) order.push_back(c);
      if (u.empty() || u.back() != id) u.push_back(id);
    }
  }
  std::mutex mu;
  std::atomic<uint64_t> bytes{0}, done{0};
  std::vector<std::vector<std::byte>> bufs(Threads(threads));
  Status s = Parallel(
      order.size(), Threads(threads), [](int) { return Status::Ok(); },
      [&](uint64_t i, int w) -> Status {
        Status g = repo.GetChunk(order[i], &bufs[w]);
        std::lock_guard l(mu);
        if (!g.ok())
          rep.damage.push_back({"chunk " + repo::ChunkIdHex(order[i]), g.message(),
                                users[order[i]]});
        else
          bytes += bufs[w].size();
        uint64_t d = ++done;
        if (progress) progress(d, order.size());
        return Status::Ok();
      });
  UMBRA_RETURN_IF_ERROR(s);
  rep.chunks = order.size();
  rep.bytes = bytes;
  rep.seconds = Since(t0);
  return rep;
}

// Resume record version 2 (docs/format/repository.md 2.5): "UMBR", version,
// header length, id length, chunk count; JSON header; done bitmap; the ids
// of the done chunks; SHA-256 of all before.
namespace {
constexpr char kResumeMagic[4] = {'U', 'M', 'B', 'R'};
constexpr uint32_t kResumeVersion = 2;
constexpr size_t kResumeFrame = 24;
constexpr size_t kMaxResumeHeader = 1u << 20;

std::span<const std::byte> Bytes(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

Result<ResumeRecord> DecodeResumeV1(const std::string& text) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  ResumeRecord r;
  try {
    if (!j.is_object() || j.at("format") != "umbra-resume" || j.at("version") != 1)
      return Status::Corruption("not a version 1 resume record");
    r.volume_uuid = j.at("volume_uuid").get<std::string>();
    r.size = j.at("size").get<uint64_t>();
    r.chunk_size = j.at("chunk_size").get<uint32_t>();
    r.tracking_id = j.at("tracking").at("id").get<std::string>();
    r.tracking_epoch = j.at("tracking").at("epoch").get<uint64_t>();
    for (const auto& c : j.at("chunks")) {
      ChunkId id = kZeroChunk;
      bool done = !c.is_null();
      if (c.is_string() && !repo::ParseChunkId(c.get<std::string>(), id))
        return Status::Corruption("bad chunk id in resume record");
      r.partial.chunks.push_back(id);
      r.partial.done.push_back(done);
    }
  } catch (const std::exception& e) {
    return Status::Corruption(std::string("malformed resume record: ") + e.what());
  }
  return r;
}
}  // namespace

std::string EncodeResume(const ResumeRecord& r) {
  const std::string header =
      nlohmann::json{{"format", "umbra-resume"},
                     {"version", kResumeVersion},
                     {"volume_uuid", r.volume_uuid},
                     {"size", r.size},
                     {"chunk_size", r.chunk_size},
                     {"tracking", {{"id", r.tracking_id}, {"epoch", r.tracking_epoch}}}}
          .dump();
  const size_t c = r.partial.chunks.size();
  const size_t bitmap = (c + 7) / 8;
  size_t d = 0;
  for (size_t i = 0; i < c; ++i) d += r.partial.done[i] ? 1 : 0;
  constexpr size_t k = sizeof(ChunkId);
  std::string out(kResumeFrame + header.size() + bitmap + k * d + 32, '\0');
  std::byte* p = reinterpret_cast<std::byte*>(out.data());
  std::memcpy(p, kResumeMagic, 4);
  PutU32(p + 4, kResumeVersion);
  PutU32(p + 8, static_cast<uint32_t>(header.size()));
  PutU32(p + 12, static_cast<uint32_t>(k));
  PutU64(p + 16, c);
  std::memcpy(out.data() + kResumeFrame, header.data(), header.size());
  char* bits = out.data() + kResumeFrame + header.size();
  char* ids = bits + bitmap;
  for (size_t i = 0; i < c; ++i) {
    if (!r.partial.done[i]) continue;
    bits[i / 8] = static_cast<char>(static_cast<uint8_t>(bits[i / 8]) | (1u << (i % 8)));
    std::memcpy(ids, r.partial.chunks[i].data(), k);
    ids += k;
  }
  const size_t body = out.size() - 32;
  const ChunkId sum = repo::Sha256(Bytes(std::string_view(out).substr(0, body)));
  std::memcpy(out.data() + body, sum.data(), 32);
  return out;
}

Result<ResumeRecord> DecodeResume(const std::string& data) {
  if (!data.empty() && data.front() == '{') return DecodeResumeV1(data);
  const std::string_view b(data);
  auto bad = [](const std::string& why) { return Status::Corruption("resume record: " + why); };
  if (b.size() < kResumeFrame + 32 || b.substr(0, 4) != std::string_view(kResumeMagic, 4))
    return bad("not a resume record");
  const auto* p = reinterpret_cast<const std::byte*>(b.data());
  const uint64_t version = GetU32(p + 4), h = GetU32(p + 8), k = GetU32(p + 12);
  const uint64_t c = GetU64(p + 16);
  if (k != sizeof(ChunkId) || h > kMaxResumeHeader || c > b.size() * 8)
    return bad("bad frame lengths");
  const uint64_t bitmap = (c + 7) / 8;
  if (kResumeFrame + h + bitmap + 32 > b.size()) return bad("truncated");
  const std::string_view bits = b.substr(kResumeFrame + h, bitmap);
  uint64_t d = 0;
  for (char x : bits) d += static_cast<uint64_t>(std::popcount(static_cast<uint8_t>(x)));
  if (kResumeFrame + h + bitmap + k * d + 32 != b.size())
    return bad("length does not match its bitmap");
  const size_t body = b.size() - 32;
  const ChunkId sum = repo::Sha256(Bytes(b.substr(0, body)));
  if (std::memcmp(sum.data(), b.data() + body, 32) != 0) return bad("checksum mismatch");
  if (version != kResumeVersion)
    return Status::Unsupported("resume record version " + std::to_string(version) +
                               " is newer than this umbra reads");
  if (c % 8 != 0 && (static_cast<uint8_t>(bits.back()) >> (c % 8)) != 0)
    return bad("bits set past the last chunk");
  ResumeRecord r;
  auto j = nlohmann::json::parse(b.substr(kResumeFrame, h), nullptr, false);
  try {
    if (!j.is_object() || j.at("format") != "umbra-resume" || j.at("version") != kResumeVersion)
      return bad("bad header");
    r.volume_uuid = j.at("volume_uuid").get<std::string>();
    r.size = j.at("size").get<uint64_t>();
    r.chunk_size = j.at("chunk_size").get<uint32_t>();
    r.tracking_id = j.at("tracking").at("id").get<std::string>();
    r.tracking_epoch = j.at("tracking").at("epoch").get<uint64_t>();
  } catch (const std::exception& e) {
    return bad(std::string("malformed header: ") + e.what());
  }
  if (r.chunk_size == 0 || c != r.size / r.chunk_size + (r.size % r.chunk_size != 0 ? 1 : 0))
    return bad("chunk count does not match size and chunk size");
  r.partial.chunks.assign(c, kZeroChunk);
  r.partial.done.assign(c, false);
  const char* ids = b.data() + kResumeFrame + h + bitmap;
  for (uint64_t i = 0; i < c; ++i) {
    if (((static_cast<uint8_t>(bits[i / 8]) >> (i % 8)) & 1) == 0) continue;
    r.partial.done[i] = true;
    std::memcpy(r.partial.chunks[i].data(), ids, k);
    ids += k;
  }
  return r;
}

Result<GcReport> CollectGarbage(repo::Repository& repo) {
  UMBRA_ASSIGN_OR_RETURN(auto lock, repo.store().Lock(/*exclusive=*/true, /*wait=*/true));
  GcReport rep;
  // Rule 3.7: no create runs now; interrupted ones start over after gc.
  UMBRA_ASSIGN_OR_RETURN(auto resumes, repo.ListResume());
  for (const std::string& v : resumes) UMBRA_RETURN_IF_ERROR(repo.RemoveResume(v));
  UMBRA_ASSIGN_OR_RETURN(auto ids, repo.ListImages());
  std::unordered_set<ChunkId, IdHash> live;
  for (const std::string& id : ids) {
    auto m = repo.GetManifest(id);
    if (!m.ok())
      return Status(m.status().code(), "cannot read image " + id + " (" + m.status().message() +
                                           "); not collecting garbage until it is repaired or "
                                           "deleted");
    for (const ChunkId& c : m->chunks)
      if (c != kZeroChunk) live.insert(c);
  }
  UMBRA_ASSIGN_OR_RETURN(auto all, repo.ListChunks());
  for (const ChunkId& c : all) {
    if (live.count(c)) {
      ++rep.chunks_kept;
      continue;
    }
    UMBRA_RETURN_IF_ERROR(repo.RemoveChunk(c));
    ++rep.chunks_removed;
  }
  UMBRA_ASSIGN_OR_RETURN(rep.temporary_removed, repo.store().CleanTemporary());
  return rep;
}

std::vector<std::string> PruneSelect(const std::vector<repo::Manifest>& images,
                                     const PrunePolicy& policy) {
  std::map<std::string, std::vector<const repo::Manifest*>> by_volume;
  for (const auto& m : images)
    by_volume[m.volume_uuid.empty() ? "path:" + m.volume : m.volume_uuid].push_back(&m);
  std::vector<std::string> drop;
  enum Period { kDay, kWeek, kMonth };
  auto key = [](uint64_t ns, Period p) {
    time_t t = static_cast<time_t>(ns / 1000000000ull);
    struct tm tm;
    localtime_r(&t, &tm);
    char b[32];
    if (p == kDay)
      std::strftime(b, sizeof b, "%Y-%m-%d", &tm);
    else if (p == kWeek)
      std::strftime(b, sizeof b, "%G-W%V", &tm);
    else
      std::strftime(b, sizeof b, "%Y-%m", &tm);
    return std::string(b);
  };
  for (auto& [vol, list] : by_volume) {
    std::sort(list.begin(), list.end(), [](const repo::Manifest* a, const repo::Manifest* b) {
      return a->created_unix_ns != b->created_unix_ns ? a->created_unix_ns > b->created_unix_ns
                                                      : a->id > b->id;
    });
    std::set<const repo::Manifest*> keep;
    for (int i = 0; i < policy.keep_last && i < static_cast<int>(list.size()); ++i)
      keep.insert(list[i]);
    auto periodic = [&](int count, Period fmt) {
      std::set<std::string> seen;
      for (const auto* m : list) {
        if (static_cast<int>(seen.size()) >= count) break;
        if (seen.insert(key(m->created_unix_ns, fmt)).second) keep.insert(m);
      }
    };
    periodic(policy.keep_daily, kDay);
    periodic(policy.keep_weekly, kWeek);
    periodic(policy.keep_monthly, kMonth);
    for (const auto* m : list)
      if (!keep.count(m)) drop.push_back(m->id);
  }
  std::sort(drop.begin(), drop.end());
  return drop;
}

}  // namespace umbra::imaging
