// MemEnv implementation (see mem_env.h for the model).
#include "io/mem_env.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <string_view>

#include "base/random.h"

namespace umbra {
namespace {

using Page = std::array<std::byte, MemEnv::kPageSize>;
constexpr uint64_t kPage = MemEnv::kPageSize;

// A sparse byte array: only pages that were written are allocated.
// Invariant: no page lies entirely at or beyond `size`, and bytes of the last
// partial page beyond `size` are zero (so growing the file reads zeros).
struct Contents {
  std::map<uint64_t, std::unique_ptr<Page>> pages;  // page index -> data
  uint64_t size = 0;

  Contents Clone() const {
    Contents c;
    c.size = size;
    for (const auto& [idx, page] : pages) c.pages.emplace(idx, std::make_unique<Page>(*page));
    return c;
  }

  uint64_t allocated() const { return pages.size() * kPage; }

  void Write(uint64_t off, const std::byte* data, uint64_t len) {
    if (len == 0) return;
    uint64_t pos = off;
    const uint64_t end = off + len;
    while (pos < end) {
      const uint64_t idx = pos / kPage;
      const uint64_t in_page = pos % kPage;
      const uint64_t n = std::min(kPage - in_page, end - pos);
      auto& page = pages[idx];
      if (!page) page = std::make_unique<Page>(Page{});
      std::memcpy(page->data() + in_page, data + (pos - off), n);
      pos += n;
    }
    size = std::max(size, end);
  }

  void Read(uint64_t off, std::byte* out, uint64_t len) const {
    if (len == 0) return;  // `out` may be null for an empty span
    std::memset(out, 0, len);
    if (off >= size) return;
    const uint64_t end = std::min(off + len, size);
    for (auto it = pages.lower_bound(off / kPage); it != pages.end(); ++it) {
      const uint64_t page_start = it->first * kPage;
      if (page_start >= end) break;
      const uint64_t from = std::max(off, page_start);
      const uint64_t to = std::min(end, page_start + kPage);
      std::memcpy(out + (from - off), it->second->data() + (from - page_start), to - from);
    }
  }

  // Zeroes [off, off+len); pages wholly inside the range are deallocated.
  void Punch(uint64_t off, uint64_t len) {
    if (len == 0) return;
    const uint64_t end = off + len < off ? UINT64_MAX : off + len;
    auto it = pages.lower_bound(off / kPage);
    while (it != pages.end()) {
      const uint64_t page_start = it->first * kPage;
      if (page_start >= end) break;
      const uint64_t from = std::max(off, page_start);
      const uint64_t to = std::min(end, page_start + kPage);
      if (from == page_start && to == page_start + kPage) {
        it = pages.erase(it);
        continue;
      }
      std::memset(it->second->data() + (from - page_start), 0, to - from);
      ++it;
    }
  }

  void Truncate(uint64_t new_size) {
    if (new_size < size) {
      const uint64_t first_dead = (new_size + kPage - 1) / kPage;
      pages.erase(pages.lower_bound(first_dead), pages.end());
      if (new_size % kPage != 0) {
        if (auto it = pages.find(new_size / kPage); it != pages.end()) {
          const uint64_t in_page = new_size % kPage;
          std::memset(it->second->data() + in_page, 0, kPage - in_page);
        }
      }
    }
    size = new_size;
  }
};

struct FileOp {
  enum Kind { kWrite, kPunch, kTruncate } kind;
  uint64_t off = 0;  // kTruncate: the new size
  uint64_t len = 0;
  std::vector<std::byte> data;  // kWrite only

  void ApplyTo(Contents& c) const {
    switch (kind) {
      case kWrite:
        c.Write(off, data.data(), data.size());
        break;
      case kPunch:
        c.Punch(off, len);
        break;
      case kTruncate:
        c.Truncate(off);
        break;
    }
  }
};

// Strips trailing slashes, keeping "/" itself.
std::string Normalize(const std::string& p) {
  std::string s = p;
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

// The parent directory: the part before the last '/' ("/" for "/x", "" for
// a name without slashes).
std::string Parent(const std::string& p) {
  const size_t pos = p.rfind('/');
  if (pos == std::string::npos) return "";
  if (pos == 0) return "/";
  return p.substr(0, pos);
}

bool IsRoot(const std::string& d) { return d.empty() || d == "/"; }

bool IsUnder(const std::string& path, const std::string& dir) {
  if (path == dir) return true;
  if (dir == "/") return !path.empty() && path[0] == '/';
  return path.size() > dir.size() && path.compare(0, dir.size(), dir) == 0 &&
         path[dir.size()] == '/';
}

}  // namespace

struct MemEnv::Inode {
  Contents current;
  Contents durable;
  std::vector<FileOp> pending;  // since the last Sync, oldest first
};

struct MemEnv::NsOp {
  enum Kind { kLink, kUnlink, kRename } kind;
  std::string from;  // kUnlink, kRename
  std::string to;    // kLink, kRename
  std::shared_ptr<Inode> inode;

  void ApplyTo(std::map<std::string, std::shared_ptr<Inode>>& ns) const {
    switch (kind) {
      case kLink:
        ns[to] = inode;
        break;
      case kUnlink:
        ns.erase(from);
        break;
      case kRename:
        ns.erase(from);
        ns[to] = inode;
        break;
    }
  }
};

class MemEnv::MemFile final : public File {
 public:
  MemFile(MemEnv* env, std::shared_ptr<Inode> inode, std::string path, bool writable, bool direct,
          uint64_t generation)
      : env_(env),
        inode_(std::move(inode)),
        path_(std::move(path)),
        writable_(writable),
        direct_(direct),
        generation_(generation) {}

  Status ReadAt(uint64_t off, std::span<std::byte> buf) override {
    std::lock_guard<std::mutex> l(env_->mu_);
    UMBRA_RETURN_IF_ERROR(CheckLocked(off, buf.size(), buf.data(), "read"));
    inode_->current.Read(off, buf.data(), buf.size());
    return Status::Ok();
  }

  Status WriteAt(uint64_t off, std::span<const std::byte> buf) override {
    std::lock_guard<std::mutex> l(env_->mu_);
    UMBRA_RETURN_IF_ERROR(CheckLocked(off, buf.size(), buf.data(), "write"));
    UMBRA_RETURN_IF_ERROR(CheckWritable("write"));
    if (off + buf.size() < off)
      return Status::InvalidArgument("write " + path_ + ": offset overflow");
    if (buf.empty()) return Status::Ok();
    FileOp op{FileOp::kWrite, off, buf.size(), std::vector<std::byte>(buf.begin(), buf.end())};
    op.ApplyTo(inode_->current);
    inode_->pending.push_back(std::move(op));
    return Status::Ok();
  }

  Status Sync() override {
    std::lock_guard<std::mutex> l(env_->mu_);
    UMBRA_RETURN_IF_ERROR(env_->CheckAlive(generation_).Annotate(path_));
    for (const FileOp& op : inode_->pending) op.ApplyTo(inode_->durable);
    inode_->pending.clear();
    env_->sync_count_.fetch_add(1);
    return Status::Ok();
  }

  Status PunchHole(uint64_t off, uint64_t len) override {
    std::lock_guard<std::mutex> l(env_->mu_);
    UMBRA_RETURN_IF_ERROR(env_->CheckAlive(generation_).Annotate(path_));
    UMBRA_RETURN_IF_ERROR(CheckWritable("punch hole"));
    if (len == 0) return Status::Ok();
    FileOp op{FileOp::kPunch, off, len, {}};
    op.ApplyTo(inode_->current);
    inode_->pending.push_back(std::move(op));
    return Status::Ok();
  }

  Status Truncate(uint64_t size) override {
    std::lock_guard<std::mutex> l(env_->mu_);
    UMBRA_RETURN_IF_ERROR(env_->CheckAlive(generation_).Annotate(path_));
    UMBRA_RETURN_IF_ERROR(CheckWritable("truncate"));
    FileOp op{FileOp::kTruncate, size, 0, {}};
    op.ApplyTo(inode_->current);
    inode_->pending.push_back(std::move(op));
    return Status::Ok();
  }

  Result<uint64_t> Size() override {
    std::lock_guard<std::mutex> l(env_->mu_);
    UMBRA_RETURN_IF_ERROR(env_->CheckAlive(generation_).Annotate(path_));
    return inode_->current.size;
  }

  Result<uint64_t> AllocatedBytes() override {
    std::lock_guard<std::mutex> l(env_->mu_);
    UMBRA_RETURN_IF_ERROR(env_->CheckAlive(generation_).Annotate(path_));
    return inode_->current.allocated();
  }

  const std::string& path() const override { return path_; }

 private:
  Status CheckLocked(uint64_t off, uint64_t len, const void* addr, const char* what) const {
    UMBRA_RETURN_IF_ERROR(env_->CheckAlive(generation_).Annotate(path_));
    if (direct_ && (off % kSectorSize != 0 || len % kSectorSize != 0 ||
                    reinterpret_cast<uintptr_t>(addr) % kSectorSize != 0)) {
      return Status(Code::kInvalidArgument,
                    std::string(what) + " " + path_ +
                        ": O_DIRECT needs 512-aligned offset, length and buffer",
                    EINVAL);
    }
    return Status::Ok();
  }

  Status CheckWritable(const char* what) const {
    if (!writable_) {
      return Status::FromErrno(EBADF, std::string(what) + " " + path_ + " (opened read-only)");
    }
    return Status::Ok();
  }

  MemEnv* const env_;
  const std::shared_ptr<Inode> inode_;
  const std::string path_;
  const bool writable_;
  const bool direct_;
  const uint64_t generation_;
};

MemEnv::MemEnv() = default;
MemEnv::~MemEnv() = default;

Status MemEnv::CheckAlive(uint64_t generation) const {
  if (generation != generation_) {
    return Status(Code::kIOError, "file handle from before crash", EIO);
  }
  return Status::Ok();
}

bool MemEnv::DirExistsLocked(const std::string& dir) const {
  return IsRoot(dir) || dirs_.count(dir) > 0;
}

Status MemEnv::CheckFileParentLocked(const std::string& path) const {
  const std::string parent = Parent(path);
  if (!DirExistsLocked(parent)) {
    if (files_.count(parent) > 0) return Status::FromErrno(ENOTDIR, path);
    return Status::FromErrno(ENOENT, path + " (parent directory missing)");
  }
  return Status::Ok();
}

void MemEnv::AddNsOpLocked(const std::string& dir, NsOp op) {
  pending_ns_[dir].push_back(std::move(op));
}

Result<std::unique_ptr<File>> MemEnv::Open(const std::string& raw_path, OpenMode mode,
                                           bool direct) {
  const std::string path = Normalize(raw_path);
  std::lock_guard<std::mutex> l(mu_);
  if (path.empty() || DirExistsLocked(path)) return Status::FromErrno(EISDIR, "open " + path);
  std::shared_ptr<Inode> inode;
  if (auto it = files_.find(path); it != files_.end()) {
    if (mode == OpenMode::kCreateNew) return Status::FromErrno(EEXIST, "open " + path);
    inode = it->second;
  } else {
    if (mode == OpenMode::kReadOnly || mode == OpenMode::kReadWrite) {
      return Status::FromErrno(ENOENT, "open " + path);
    }
    UMBRA_RETURN_IF_ERROR(CheckFileParentLocked(path).Annotate("open"));
    inode = std::make_shared<Inode>();
    files_[path] = inode;
    AddNsOpLocked(Parent(path), NsOp{NsOp::kLink, "", path, inode});
  }
  return std::unique_ptr<File>(std::make_unique<MemFile>(
      this, std::move(inode), path, mode != OpenMode::kReadOnly, direct, generation_));
}

Result<bool> MemEnv::Exists(const std::string& raw_path) {
  const std::string path = Normalize(raw_path);
  std::lock_guard<std::mutex> l(mu_);
  return files_.count(path) > 0 || DirExistsLocked(path);
}

Status MemEnv::CreateDir(const std::string& raw_path) {
  const std::string path = Normalize(raw_path);
  std::lock_guard<std::mutex> l(mu_);
  if (IsRoot(path)) return Status::Ok();
  if (files_.count(path) > 0) {
    return Status::AlreadyExists("mkdir " + path + ": exists and is not a directory");
  }
  // Create missing ancestors first ("mkdir -p").
  std::vector<std::string> chain;
  for (std::string d = path; !IsRoot(d); d = Parent(d)) chain.push_back(d);
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
    if (files_.count(*it) > 0) return Status::FromErrno(ENOTDIR, "mkdir " + path);
    dirs_.insert(*it);
  }
  return Status::Ok();
}

Status MemEnv::Remove(const std::string& raw_path) {
  const std::string path = Normalize(raw_path);
  std::lock_guard<std::mutex> l(mu_);
  if (auto it = files_.find(path); it != files_.end()) {
    files_.erase(it);
    AddNsOpLocked(Parent(path), NsOp{NsOp::kUnlink, path, "", nullptr});
    return Status::Ok();
  }
  if (IsRoot(path)) return Status::FromErrno(EBUSY, "rmdir " + path);
  if (dirs_.count(path) == 0) return Status::FromErrno(ENOENT, "remove " + path);
  for (const auto& [p, inode] : files_) {
    if (Parent(p) == path) return Status::FromErrno(ENOTEMPTY, "rmdir " + path);
  }
  for (const auto& d : dirs_) {
    if (d != path && Parent(d) == path) return Status::FromErrno(ENOTEMPTY, "rmdir " + path);
  }
  // Removing a directory is immediately durable; so are the removals of the
  // entries it once held.
  dirs_.erase(path);
  pending_ns_.erase(path);
  for (auto it = durable_files_.begin(); it != durable_files_.end();) {
    it = Parent(it->first) == path ? durable_files_.erase(it) : std::next(it);
  }
  return Status::Ok();
}

Status MemEnv::Rename(const std::string& raw_from, const std::string& raw_to) {
  const std::string from = Normalize(raw_from);
  const std::string to = Normalize(raw_to);
  std::lock_guard<std::mutex> l(mu_);
  const std::string what = "rename " + from + " -> " + to;
  auto it = files_.find(from);
  if (it == files_.end()) {
    if (dirs_.count(from) > 0)
      return Status::Unsupported(what + ": MemEnv cannot rename directories");
    return Status::FromErrno(ENOENT, what);
  }
  if (DirExistsLocked(to)) return Status::FromErrno(EISDIR, what);
  UMBRA_RETURN_IF_ERROR(CheckFileParentLocked(to).Annotate("rename"));
  if (from == to) return Status::Ok();
  std::shared_ptr<Inode> inode = it->second;
  files_.erase(it);
  files_[to] = inode;
  const std::string from_dir = Parent(from);
  const std::string to_dir = Parent(to);
  if (from_dir == to_dir) {
    AddNsOpLocked(from_dir, NsOp{NsOp::kRename, from, to, inode});
  } else {
    AddNsOpLocked(to_dir, NsOp{NsOp::kLink, "", to, inode});
    AddNsOpLocked(from_dir, NsOp{NsOp::kUnlink, from, "", nullptr});
  }
  return Status::Ok();
}

Status MemEnv::SyncDir(const std::string& raw_dir) {
  const std::string dir = Normalize(raw_dir);
  std::lock_guard<std::mutex> l(mu_);
  if (!DirExistsLocked(dir)) return Status::FromErrno(ENOENT, "sync dir " + dir);
  if (auto it = pending_ns_.find(dir); it != pending_ns_.end()) {
    for (const NsOp& op : it->second) op.ApplyTo(durable_files_);
    pending_ns_.erase(it);
  }
  sync_count_.fetch_add(1);
  return Status::Ok();
}

Result<std::vector<std::string>> MemEnv::ListDir(const std::string& raw_dir) {
  const std::string dir = Normalize(raw_dir);
  std::lock_guard<std::mutex> l(mu_);
  if (!DirExistsLocked(dir)) {
    return Status::FromErrno(files_.count(dir) > 0 ? ENOTDIR : ENOENT, "list " + dir);
  }
  std::vector<std::string> names;
  auto add = [&](const std::string& p) {
    if (p != dir && Parent(p) == dir) {
      names.push_back(p.substr(p.rfind('/') == std::string::npos ? 0 : p.rfind('/') + 1));
    }
  };
  for (const auto& [p, inode] : files_) add(p);
  for (const auto& d : dirs_) add(d);
  std::sort(names.begin(), names.end());
  return names;
}

Result<FsStats> MemEnv::StatFs(const std::string& /*path*/) {
  std::lock_guard<std::mutex> l(mu_);
  if (fs_stats_) return *fs_stats_;
  FsStats s;
  s.total_bytes = uint64_t{1} << 40;
  std::set<const Inode*> seen;
  uint64_t used = 0;
  for (const auto& [p, inode] : files_) {
    if (seen.insert(inode.get()).second) used += inode->current.allocated();
  }
  s.free_bytes = used >= s.total_bytes ? 0 : s.total_bytes - used;
  return s;
}

Result<bool> MemEnv::IsOnVolume(const std::string& raw_dir, const std::string& volume_path) {
  const std::string dir = Normalize(raw_dir);
  std::lock_guard<std::mutex> l(mu_);
  for (const auto& [d, v] : volume_dirs_) {
    if (v == volume_path && IsUnder(dir, d)) return true;
  }
  return false;
}

Result<bool> MemEnv::SameFilesystem(const std::string& raw_a, const std::string& raw_b) {
  const std::string a = Normalize(raw_a);
  const std::string b = Normalize(raw_b);
  std::lock_guard<std::mutex> l(mu_);
  for (const std::string& p : {a, b})
    if (!IsRoot(p) && !files_.count(p) && !dirs_.count(p))
      return Status::NotFound("no such file or directory: " + p);
  // The innermost separate tree holding a path names its filesystem.
  auto fs_of = [&](const std::string& p) {
    std::string best;
    for (const auto& d : separate_fs_)
      if (IsUnder(p, d) && d.size() > best.size()) best = d;
    return best;
  };
  return fs_of(a) == fs_of(b);
}

uint64_t MemEnv::NowNanos() { return clock_.load(); }
void MemEnv::SleepNanos(uint64_t ns) { clock_.fetch_add(ns); }
void MemEnv::AdvanceClock(uint64_t ns) { clock_.fetch_add(ns); }

uint64_t MemEnv::sync_count() const { return sync_count_.load(); }

void MemEnv::SetFsStats(FsStats stats) {
  std::lock_guard<std::mutex> l(mu_);
  fs_stats_ = stats;
}

void MemEnv::SetVolumeDir(const std::string& dir, const std::string& volume_path) {
  std::lock_guard<std::mutex> l(mu_);
  volume_dirs_.emplace(Normalize(dir), volume_path);
}

void MemEnv::SetSeparateFilesystem(const std::string& dir) {
  std::lock_guard<std::mutex> l(mu_);
  separate_fs_.insert(Normalize(dir));
}

Result<std::vector<std::byte>> MemEnv::ReadWholeFile(const std::string& raw_path) {
  const std::string path = Normalize(raw_path);
  std::lock_guard<std::mutex> l(mu_);
  auto it = files_.find(path);
  if (it == files_.end()) return Status::FromErrno(ENOENT, "read " + path);
  const Contents& c = it->second->current;
  std::vector<std::byte> out(c.size);
  c.Read(0, out.data(), out.size());
  return out;
}

void MemEnv::Crash(CrashMode mode, uint64_t seed) {
  std::lock_guard<std::mutex> l(mu_);
  Rng rng(seed);

  // 1. The namespace: durable, plus a random prefix of each directory's
  //    pending operations (directories visited in sorted order).
  std::map<std::string, std::shared_ptr<Inode>> ns = durable_files_;
  for (const auto& [dir, ops] : pending_ns_) {
    const uint64_t keep = mode == CrashMode::kDropUnsynced ? 0 : rng.Uniform(0, ops.size());
    for (uint64_t i = 0; i < keep; ++i) ops[i].ApplyTo(ns);
  }
  pending_ns_.clear();

  // 2. Every inode still reachable: durable contents plus surviving pending
  //    operations, in their original order. Visited in path order so the
  //    outcome depends only on the seed and the history.
  std::set<Inode*> done;
  for (const auto& [path, inode] : ns) {
    if (!done.insert(inode.get()).second) continue;
    Contents c = std::move(inode->durable);
    for (const FileOp& op : inode->pending) {
      if (mode == CrashMode::kDropUnsynced) break;
      if (mode == CrashMode::kTornSectors && op.kind == FileOp::kWrite) {
        // Each sector-aligned piece of the write survives on its own.
        uint64_t pos = op.off;
        const uint64_t end = op.off + op.data.size();
        while (pos < end) {
          const uint64_t next = std::min(end, (pos / kSectorSize + 1) * kSectorSize);
          if (rng.Bernoulli(0.5)) c.Write(pos, op.data.data() + (pos - op.off), next - pos);
          pos = next;
        }
        continue;
      }
      if (rng.Bernoulli(0.5)) op.ApplyTo(c);
    }
    inode->pending.clear();
    inode->current = c.Clone();
    inode->durable = std::move(c);
  }

  files_ = ns;
  durable_files_ = std::move(ns);
  ++generation_;
}

}  // namespace umbra
