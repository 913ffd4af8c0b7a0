// FuseExport: BlockDevices served as regular files on an in-process FUSE
// mount, for `losetup --direct-io=on` to turn into block devices.
//
// Why FUSE inside the daemon (docs: shared DESIGN.md section 5): this kernel
// has no NBD, ublk or device-mapper, but FUSE + loop works, and an extra
// process hop (nbdfuse) costs 30-40 us of CPU per I/O on these machines.
//
// What maps to what (libfuse 3 low-level API, FUSE_USE_VERSION 3.12):
//   mount              one flat root directory (inode 1, 0755, root-owned);
//                      every file is a BlockDevice added with Add().
//   lookup/getattr     S_IFREG | mode, uid/gid 0, st_size = device size.
//                      entry_timeout 0 (Add/Remove are seen at once), attr
//                      timeout 1 s (sizes never change).
//   open               only uid 0 (the request's uid is checked; the mount
//                      has no allow_other, so the kernel already refuses other
//                      users; default_permissions makes the kernel apply the
//                      mode). A write open of a read-only device -> EROFS.
//                      Replies FOPEN_DIRECT_IO: no page cache in umbrad, and
//                      O_DIRECT opens work (losetup --direct-io=on uses
//                      them); FOPEN_PARALLEL_DIRECT_WRITES (ReplyOpen).
//                      O_TRUNC/size changes -> EPERM.
//   read               BlockDevice::Read into a per-thread 4 KiB-aligned
//                      buffer (allocated once per serving thread), then
//                      fuse_reply_buf. Clamped at the end: short read / EOF.
//   write_buf          BlockDevice::WriteAsync straight from libfuse's
//                      receive buffer; only a spliced (fd) buffer is first
//                      copied into the per-thread buffer. The reply is sent
//                      from `done`: at once on this thread, or later from the
//                      engine's I/O thread when the write must preserve old
//                      chunks (the engine copies the data then), so this
//                      thread goes back to serve the next request.
//                      fua = the open/iocb flags carry O_DSYNC (O_SYNC or
//                      RWF_DSYNC/RWF_SYNC: the kernel folds IOCB_DSYNC into
//                      the FUSE_WRITE flags). Past the end -> ENOSPC; a write
//                      crossing the end is cut short.
//   fsync (either)     BlockDevice::Flush. (FUSE "flush" is close(), not a
//                      cache flush: replies 0.)
//   fallocate          PUNCH_HOLE|KEEP_SIZE -> Discard;
//                      ZERO_RANGE|KEEP_SIZE (or ZERO_RANGE inside the file,
//                      which is the same thing) -> WriteZeroes;
//                      anything else -> EOPNOTSUPP. The loop driver sends
//                      discards as PUNCH_HOLE and write-zeroes as ZERO_RANGE
//                      (or PUNCH_HOLE when unmapping is allowed).
//   errors             Status::ToErrno().
//
// Threading: Mount() starts Options::max_threads serving threads (default
// 32, with max_background 128 so that the kernel does not cap the loop
// driver's queue at its default of 12); each reads /dev/fuse and handles
// what it read (Serve), and none is started or stopped while mounted, so
// there is no thread churn and no shared bookkeeping on the I/O path. Every
// serving thread sets PR_SET_IO_FLUSHER before its first read; a kernel or
// capability that refuses it is logged once. I/O
// handlers take no lock: the file handle points at the export entry, which
// Remove() will not drop while it is open. Add/Remove/lookup share one mutex.
// Unmount: umount2(dir) -> the kernel aborts the connection, the workers'
// reads return ENODEV and they end; with files still open it detaches
// lazily (MNT_DETACH) and aborts the connection through fusectl, so no mount
// outlives the object.
//
// Allocation: libfuse still allocates a small request struct per request
// (unavoidable through its API); everything Umbra adds on the read/write path
// is preallocated per thread.
#define FUSE_USE_VERSION FUSE_MAKE_VERSION(3, 12)
#include "frontend/fuse/fuse_export.h"

#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/falloc.h>
#include <linux/fuse.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

namespace umbra {
namespace {

constexpr double kAttrTimeout = 1.0;
constexpr double kEntryTimeout = 0.0;
constexpr size_t kBufferAlign = 4096;
constexpr size_t kInitialBuffer = 1 << 20;  // libfuse's default max_write/max_read

void Log(const std::string& msg) { std::fprintf(stderr, "umbra: fuse: %s\n", msg.c_str()); }

// Marks the calling thread as an I/O flusher (PF_MEMALLOC_NOIO |
// PF_LOCAL_THROTTLE): its allocations cannot recurse into I/O on the device
// it serves, and it is not throttled for dirty pages it is cleaning. Each
// serving thread calls it once, before its first read (Serve).
void MarkIoFlusher() {
  if (::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0) {
    static std::atomic<bool> logged{false};
    if (!logged.exchange(true)) {
      int e = errno;
      Log(std::string("PR_SET_IO_FLUSHER failed (") + std::strerror(e) +
          (e == EPERM ? ", needs CAP_SYS_RESOURCE" : "") +
          "); serving threads are not marked as I/O flushers, so memory reclaim could "
          "deadlock against them");
    }
  }
}

// A per-thread, 4 KiB-aligned scratch buffer that only ever grows.
class ThreadBuffer {
 public:
  ~ThreadBuffer() { std::free(p_); }
  std::byte* Get(size_t n) {
    if (n > cap_) {
      size_t cap = std::max(n, kInitialBuffer);
      cap = (cap + kBufferAlign - 1) / kBufferAlign * kBufferAlign;
      void* p = std::aligned_alloc(kBufferAlign, cap);
      if (p == nullptr) return nullptr;
      std::free(p_);
      p_ = static_cast<std::byte*>(p);
      cap_ = cap;
    }
    return p_;
  }

 private:
  std::byte* p_ = nullptr;
  size_t cap_ = 0;
};

std::byte* ScratchBuffer(size_t n) {
  thread_local ThreadBuffer buf;
  return buf.Get(n);
}

// Replies to OPEN with FOPEN_DIRECT_IO (no page cache in umbrad, O_DIRECT
// opens work), FOPEN_NOFLUSH (close() needs no FUSE_FLUSH round trip) and
// FOPEN_PARALLEL_DIRECT_WRITES: without it the kernel takes the FUSE file's
// inode lock exclusively around every direct write it forwards, so the loop
// driver's writes to one device are submitted one at a time. libfuse 3.14's
// fuse_file_info has no bit for that flag, so the reply is built here from
// the kernel's struct fuse_open_out (<linux/fuse.h>) and sent as raw payload.
int ReplyOpen(fuse_req_t req, uint64_t fh) {
  fuse_open_out out{};
  out.fh = fh;
  out.open_flags = FOPEN_DIRECT_IO | FOPEN_NOFLUSH | FOPEN_PARALLEL_DIRECT_WRITES;
  iovec iov{&out, sizeof(out)};
  return fuse_reply_iov(req, &iov, 1);
}

struct Entry {
  std::string name;
  fuse_ino_t ino = 0;
  BlockDevice* dev = nullptr;
  mode_t mode = 0;
  uint64_t size = 0;
  bool read_only = false;
  int opens = 0;  // guarded by Impl::mu_
  struct timespec created {};
};

class Impl final : public FuseExport {
 public:
  Impl(std::string dir, Options opts) : dir_(std::move(dir)), opts_(std::move(opts)) {
    ::clock_gettime(CLOCK_REALTIME, &mounted_at_);
  }
  ~Impl() override {
    Status s = Unmount();
    if (!s.ok()) Log(s.ToString());
  }

  Status Start();

  Status Add(const std::string& name, BlockDevice* device, mode_t mode) override;
  Status Remove(const std::string& name, std::chrono::milliseconds grace) override;
  Status Unmount() override;
  const std::string& mountpoint() const override { return dir_; }

 private:
  static Impl* Self(fuse_req_t req) { return static_cast<Impl*>(fuse_req_userdata(req)); }
  static Entry* EntryOf(const fuse_file_info* fi) {
    return reinterpret_cast<Entry*>(static_cast<uintptr_t>(fi->fh));
  }
  static void FillAttr(const Entry& e, struct stat* st);
  void FillRootAttr(struct stat* st) const;
  std::shared_ptr<Entry> FindIno(fuse_ino_t ino);
  Status AbortConnection();

  static void OnInit(void* userdata, fuse_conn_info* conn);
  static void OnLookup(fuse_req_t req, fuse_ino_t parent, const char* name);
  static void OnForget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup);
  static void OnForgetMulti(fuse_req_t req, size_t count, fuse_forget_data* forgets);
  static void OnGetattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  static void OnSetattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set,
                        fuse_file_info* fi);
  static void OnReaddir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi);
  static void OnOpen(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  static void OnRelease(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  static void OnRead(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi);
  static void OnWriteBuf(fuse_req_t req, fuse_ino_t ino, fuse_bufvec* bufv, off_t off,
                         fuse_file_info* fi);
  static void OnFlush(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  static void OnFsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info* fi);
  static void OnFallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                          fuse_file_info* fi);
  static void OnStatfs(fuse_req_t req, fuse_ino_t ino);
  void Serve();

  const std::string dir_;
  const Options opts_;
  struct timespec mounted_at_ {};
  fuse_session* se_ = nullptr;
  std::vector<std::thread> workers_;  // serving threads (Serve)
  // Writes given to BlockDevice::WriteAsync and not replied to yet.
  std::atomic<uint32_t> writes_in_flight_{0};
  bool mounted_ = false;
  unsigned long conn_id_ = 0;  // name of the connection in /sys/fs/fuse/connections
  std::mutex admin_mu_;        // serialises Unmount

  std::mutex mu_;
  std::condition_variable closed_;  // an open count dropped
  std::map<std::string, std::shared_ptr<Entry>> by_name_;
  std::unordered_map<fuse_ino_t, std::shared_ptr<Entry>> by_ino_;
  fuse_ino_t next_ino_ = FUSE_ROOT_ID + 1;
};

// ---- admin side ------------------------------------------------------------

Status Impl::Start() {
  struct stat st;
  if (::stat(dir_.c_str(), &st) != 0) return Status::FromErrno(errno, "mount point " + dir_);
  if (!S_ISDIR(st.st_mode))
    return Status::InvalidArgument("mount point " + dir_ + " is not a directory");
  if (::access("/dev/fuse", R_OK | W_OK) != 0) return Status::FromErrno(errno, "/dev/fuse");
  const dev_t parent_dev = st.st_dev;

  fuse_lowlevel_ops ops{};
  ops.init = OnInit;
  ops.lookup = OnLookup;
  ops.forget = OnForget;
  ops.forget_multi = OnForgetMulti;
  ops.getattr = OnGetattr;
  ops.setattr = OnSetattr;
  ops.readdir = OnReaddir;
  ops.open = OnOpen;
  ops.release = OnRelease;
  ops.read = OnRead;
  ops.write_buf = OnWriteBuf;
  ops.flush = OnFlush;
  ops.fsync = OnFsync;
  ops.fallocate = OnFallocate;
  ops.statfs = OnStatfs;

  std::string mount_opts = "default_permissions,fsname=" + opts_.fsname + ",subtype=umbra";
  std::vector<std::string> argv_s = {"umbra", "-o", mount_opts};
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  se_ = fuse_session_new(&args, &ops, sizeof(ops), this);
  fuse_opt_free_args(&args);
  if (se_ == nullptr) return Status(Code::kIOError, "fuse_session_new failed (see stderr)");
  if (fuse_session_mount(se_, dir_.c_str()) != 0) {
    fuse_session_destroy(se_);
    se_ = nullptr;
    return Status(Code::kIOError, "mounting FUSE on " + dir_ + " failed (see stderr)");
  }
  mounted_ = true;

  for (unsigned i = 0; i < std::max(1u, opts_.max_threads); ++i)
    workers_.emplace_back([this] { Serve(); });

  // Served by the workers: proves the mount answers, and names the connection.
  struct stat mst;
  if (::stat(dir_.c_str(), &mst) != 0 || mst.st_dev == parent_dev) {
    Status s = Status::FromErrno(errno ? errno : EIO, "FUSE mount on " + dir_ + " does not answer");
    Unmount().IgnoreError();
    return s;
  }
  conn_id_ = (static_cast<unsigned long>(major(mst.st_dev)) << 20) | minor(mst.st_dev);
  return Status::Ok();
}

Status Impl::Add(const std::string& name, BlockDevice* device, mode_t mode) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
      name.size() > 255)
    return Status::InvalidArgument("invalid export file name \"" + name + "\"");
  if (device == nullptr) return Status::InvalidArgument("no device for " + name);
  if ((mode & ~static_cast<mode_t>(07777)) != 0)
    return Status::InvalidArgument("mode must be permission bits only");
  if (device->read_only() && (mode & 0222) != 0)
    return Status::InvalidArgument(name + ": a read-only device cannot have a writable mode");
  auto e = std::make_shared<Entry>();
  e->name = name;
  e->dev = device;
  e->mode = mode;
  e->size = device->size();
  e->read_only = device->read_only();
  ::clock_gettime(CLOCK_REALTIME, &e->created);
  std::lock_guard l(mu_);
  if (!mounted_) return Status::InvalidArgument(dir_ + " is not mounted");
  if (by_name_.count(name) != 0) return Status::AlreadyExists(PathOf(name) + " already exists");
  e->ino = next_ino_++;
  by_name_[name] = e;
  by_ino_[e->ino] = e;
  return Status::Ok();
}

Status Impl::Remove(const std::string& name, std::chrono::milliseconds grace) {
  std::unique_lock l(mu_);
  auto it = by_name_.find(name);
  if (it == by_name_.end()) return Status::NotFound(PathOf(name) + " does not exist");
  std::shared_ptr<Entry> e = it->second;
  if (!closed_.wait_for(l, grace, [&] { return e->opens == 0; }))
    return Status::Busy(PathOf(name) + " is open (" + std::to_string(e->opens) +
                        " handles, e.g. an attached loop device)");
  by_name_.erase(name);
  by_ino_.erase(e->ino);
  return Status::Ok();
}

Status Impl::AbortConnection() {
  const std::string ctl = "/sys/fs/fuse/connections";
  const std::string abort_path = ctl + "/" + std::to_string(conn_id_) + "/abort";
  bool mounted_ctl = false;
  if (::access(abort_path.c_str(), W_OK) != 0) {
    if (::mount("fusectl", ctl.c_str(), "fusectl", 0, nullptr) != 0)
      return Status::FromErrno(errno, "mounting fusectl on " + ctl);
    mounted_ctl = true;
  }
  Status s;
  int fd = ::open(abort_path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0 || ::write(fd, "1", 1) != 1) s = Status::FromErrno(errno, "aborting " + abort_path);
  if (fd >= 0) ::close(fd);
  if (mounted_ctl) ::umount2(ctl.c_str(), MNT_DETACH);
  return s;
}

Status Impl::Unmount() {
  std::lock_guard admin(admin_mu_);
  if (se_ == nullptr) return Status::Ok();
  Status result;
  if (mounted_) {
    {
      std::lock_guard l(mu_);
      mounted_ = false;  // no more Add()
    }
    if (::umount2(dir_.c_str(), UMOUNT_NOFOLLOW) != 0) {
      const int e = errno;
      int opens = 0;
      {
        std::lock_guard l(mu_);
        for (auto& [n, ent] : by_name_) opens += ent->opens;
      }
      // Still open (EBUSY), or something odd: never leave the mount behind.
      ::umount2(dir_.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW);
      Status a = AbortConnection();
      result = Status(Code::kBusy,
                      "unmounted " + dir_ + " lazily (umount: " + std::strerror(e) + ", " +
                          std::to_string(opens) + " open handles) and aborted the FUSE connection" +
                          (a.ok() ? "" : "; abort failed: " + a.message()),
                      EBUSY);
      if (!a.ok())
        Log(dir_ + ": waiting for the last user of the lazily unmounted export to close it");
    }
  }
  // The kernel has torn the connection down (or will when the last user
  // closes it): the serving threads' reads return ENODEV and they end.
  for (auto& t : workers_) t.join();
  workers_.clear();
  // Writes the engine finishes on its own thread reply through the session:
  // wait for them before it goes (replies to a dead connection just fail).
  for (uint32_t v; (v = writes_in_flight_.load(std::memory_order_acquire)) != 0;)
    writes_in_flight_.wait(v);
  fuse_session_unmount(se_);  // closes /dev/fuse; no umount left to do
  fuse_session_destroy(se_);
  se_ = nullptr;
  return result;
}

// One serving thread: reads a request from /dev/fuse into its own buffer
// (allocated by libfuse on the first read, kept until the thread ends) and
// handles it, until the connection goes away. All threads read the same
// descriptor; the kernel hands each request to one of them. This is
// fuse_session_loop_mt without its per-request bookkeeping (a mutex shared
// by all workers, taken twice per request, to count idle threads and start
// new ones): the threads here are started once and never change.
void Impl::Serve() {
  MarkIoFlusher();
  fuse_buf buf{};
  while (!fuse_session_exited(se_)) {
    int n = fuse_session_receive_buf(se_, &buf);
    if (n == -EINTR || n == -EAGAIN) continue;
    if (n < 0) {
      Log(std::string("reading /dev/fuse: ") + std::strerror(-n) + "; serving thread stops");
      break;
    }
    if (n == 0) break;  // unmounted or aborted: libfuse marked the session exited
    fuse_session_process_buf(se_, &buf);
  }
  std::free(buf.mem);
}

// ---- request handlers (serving threads) ------------------------------------

void Impl::FillAttr(const Entry& e, struct stat* st) {
  *st = {};
  st->st_ino = e.ino;
  st->st_mode = S_IFREG | e.mode;
  st->st_nlink = 1;
  st->st_uid = 0;
  st->st_gid = 0;
  st->st_size = static_cast<off_t>(e.size);
  st->st_blksize = 4096;
  st->st_blocks = static_cast<blkcnt_t>((e.size + 511) / 512);
  st->st_atim = st->st_mtim = st->st_ctim = e.created;
}

void Impl::FillRootAttr(struct stat* st) const {
  *st = {};
  st->st_ino = FUSE_ROOT_ID;
  st->st_mode = S_IFDIR | 0755;
  st->st_nlink = 2;
  st->st_blksize = 4096;
  st->st_atim = st->st_mtim = st->st_ctim = mounted_at_;
}

std::shared_ptr<Entry> Impl::FindIno(fuse_ino_t ino) {
  std::lock_guard l(mu_);
  auto it = by_ino_.find(ino);
  return it == by_ino_.end() ? nullptr : it->second;
}

void Impl::OnInit(void* userdata, fuse_conn_info* conn) {
  const Options& opts = static_cast<Impl*>(userdata)->opts_;
  // Direct I/O from the loop driver arrives as async requests in parallel.
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  // Async requests count as "background": let a whole queue be in flight.
  conn->max_background = std::max(1u, std::min(opts.max_background, 65535u));
  conn->congestion_threshold = std::max(1u, conn->max_background * 3 / 4);
  // Splice would hand write data in a pipe that must be copied out anyway.
  conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
}

void Impl::OnLookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Impl* self = Self(req);
  if (parent != FUSE_ROOT_ID) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  fuse_entry_param ep{};
  {
    std::lock_guard l(self->mu_);
    auto it = self->by_name_.find(name);
    if (it == self->by_name_.end()) {
      fuse_reply_err(req, ENOENT);
      return;
    }
    ep.ino = it->second->ino;
    FillAttr(*it->second, &ep.attr);
  }
  ep.generation = 1;
  ep.attr_timeout = kAttrTimeout;
  ep.entry_timeout = kEntryTimeout;
  fuse_reply_entry(req, &ep);
}

void Impl::OnForget(fuse_req_t req, fuse_ino_t, uint64_t) { fuse_reply_none(req); }
void Impl::OnForgetMulti(fuse_req_t req, size_t, fuse_forget_data*) { fuse_reply_none(req); }

void Impl::OnGetattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  Impl* self = Self(req);
  struct stat st;
  if (ino == FUSE_ROOT_ID) {
    self->FillRootAttr(&st);
  } else {
    auto e = self->FindIno(ino);
    if (!e) {
      fuse_reply_err(req, ENOENT);
      return;
    }
    FillAttr(*e, &st);
  }
  fuse_reply_attr(req, &st, kAttrTimeout);
}

void Impl::OnSetattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set,
                     fuse_file_info* fi) {
  if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
    fuse_reply_err(req, EPERM);
    return;
  }
  Impl* self = Self(req);
  struct stat st;
  if (ino == FUSE_ROOT_ID) {
    if (to_set & FUSE_SET_ATTR_SIZE) {
      fuse_reply_err(req, EISDIR);
      return;
    }
    self->FillRootAttr(&st);
  } else {
    auto e = self->FindIno(ino);
    if (!e) {
      fuse_reply_err(req, ENOENT);
      return;
    }
    // The file is a device of fixed size: truncation (and O_TRUNC) is refused.
    if ((to_set & FUSE_SET_ATTR_SIZE) && static_cast<uint64_t>(attr->st_size) != e->size) {
      fuse_reply_err(req, e->read_only ? EROFS : EPERM);
      return;
    }
    FillAttr(*e, &st);  // times are not stored: setting them is a no-op
  }
  (void)fi;
  fuse_reply_attr(req, &st, kAttrTimeout);
}

void Impl::OnReaddir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  if (ino != FUSE_ROOT_ID) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  Impl* self = Self(req);
  std::vector<std::pair<std::string, struct stat>> names;
  {
    struct stat st {};
    st.st_ino = FUSE_ROOT_ID;
    st.st_mode = S_IFDIR;
    names.emplace_back(".", st);
    names.emplace_back("..", st);
    std::lock_guard l(self->mu_);
    for (auto& [n, e] : self->by_name_) {
      st.st_ino = e->ino;
      st.st_mode = S_IFREG;
      names.emplace_back(n, st);
    }
  }
  std::vector<char> buf(size);
  size_t used = 0;
  for (size_t i = static_cast<size_t>(std::max<off_t>(off, 0)); i < names.size(); ++i) {
    size_t n = fuse_add_direntry(req, buf.data() + used, size - used, names[i].first.c_str(),
                                 &names[i].second, static_cast<off_t>(i + 1));
    if (n > size - used) break;
    used += n;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void Impl::OnOpen(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Impl* self = Self(req);
  if (ino == FUSE_ROOT_ID) {
    fuse_reply_err(req, EISDIR);
    return;
  }
  if (fuse_req_ctx(req)->uid != 0) {
    fuse_reply_err(req, EACCES);
    return;
  }
  Entry* entry = nullptr;
  {
    std::lock_guard l(self->mu_);
    auto it = self->by_ino_.find(ino);
    if (it == self->by_ino_.end()) {
      fuse_reply_err(req, ENOENT);
      return;
    }
    entry = it->second.get();
    if (entry->read_only && (fi->flags & O_ACCMODE) != O_RDONLY) {
      fuse_reply_err(req, EROFS);
      return;
    }
    if ((fi->flags & O_TRUNC) && (fi->flags & O_ACCMODE) != O_RDONLY && entry->size != 0) {
      fuse_reply_err(req, EPERM);
      return;
    }
    ++entry->opens;
  }
  if (ReplyOpen(req, reinterpret_cast<uintptr_t>(entry)) != 0) {
    // The opener went away (interrupted): the kernel will send no RELEASE.
    std::lock_guard l(self->mu_);
    --entry->opens;
    self->closed_.notify_all();
  }
}

void Impl::OnRelease(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  Impl* self = Self(req);
  Entry* e = EntryOf(fi);
  {
    std::lock_guard l(self->mu_);
    --e->opens;
  }
  self->closed_.notify_all();
  fuse_reply_err(req, 0);
}

void Impl::OnRead(fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi) {
  Entry* e = EntryOf(fi);
  if (off < 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  const uint64_t uoff = static_cast<uint64_t>(off);
  if (uoff >= e->size || size == 0) {
    fuse_reply_buf(req, nullptr, 0);  // EOF
    return;
  }
  const size_t n = static_cast<size_t>(std::min<uint64_t>(size, e->size - uoff));
  std::byte* buf = ScratchBuffer(n);
  if (buf == nullptr) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  Status s = e->dev->Read(uoff, std::span(buf, n));
  if (!s.ok()) {
    fuse_reply_err(req, s.ToErrno());
    return;
  }
  fuse_reply_buf(req, reinterpret_cast<const char*>(buf), n);
}

void Impl::OnWriteBuf(fuse_req_t req, fuse_ino_t, fuse_bufvec* bufv, off_t off,
                      fuse_file_info* fi) {
  Entry* e = EntryOf(fi);
  if (e->read_only) {
    fuse_reply_err(req, EROFS);
    return;
  }
  if (off < 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  const uint64_t uoff = static_cast<uint64_t>(off);
  const size_t size = fuse_buf_size(bufv);
  if (size == 0) {
    fuse_reply_write(req, 0);
    return;
  }
  if (uoff >= e->size) {
    fuse_reply_err(req, ENOSPC);  // like writing past the end of a disk
    return;
  }
  const size_t n = static_cast<size_t>(std::min<uint64_t>(size, e->size - uoff));
  const std::byte* data = nullptr;
  const fuse_buf& first = bufv->buf[bufv->idx];
  if (bufv->idx + 1 == bufv->count && !(first.flags & FUSE_BUF_IS_FD) && first.mem != nullptr) {
    // The usual case: the data sits in libfuse's per-thread receive buffer.
    data = static_cast<const std::byte*>(first.mem) + bufv->off;
  } else {
    std::byte* tmp = ScratchBuffer(n);
    if (tmp == nullptr) {
      fuse_reply_err(req, ENOMEM);
      return;
    }
    fuse_bufvec dst = FUSE_BUFVEC_INIT(n);
    dst.buf[0].mem = tmp;
    ssize_t got = fuse_buf_copy(&dst, bufv, FUSE_BUF_NO_SPLICE);
    if (got < 0) {
      fuse_reply_err(req, static_cast<int>(-got));
      return;
    }
    if (static_cast<size_t>(got) != n) {
      fuse_reply_err(req, EIO);
      return;
    }
    data = tmp;
  }
  const bool fua = (fi->flags & O_DSYNC) != 0;  // O_SYNC includes the O_DSYNC bit
  // Two words of capture: std::function keeps them without allocating.
  Self(req)->writes_in_flight_.fetch_add(1, std::memory_order_relaxed);
  e->dev->WriteAsync(uoff, std::span(data, n), fua, [req, n](Status s) {
    Impl* self = Self(req);  // req is gone once replied to
    if (!s.ok()) {
      fuse_reply_err(req, s.ToErrno());
    } else {
      fuse_reply_write(req, n);
    }
    if (self->writes_in_flight_.fetch_sub(1, std::memory_order_release) == 1)
      self->writes_in_flight_.notify_all();
  });
}

void Impl::OnFlush(fuse_req_t req, fuse_ino_t, fuse_file_info*) {
  // FUSE_FLUSH is sent on close(); it is not a cache flush.
  fuse_reply_err(req, 0);
}

void Impl::OnFsync(fuse_req_t req, fuse_ino_t, int, fuse_file_info* fi) {
  Status s = EntryOf(fi)->dev->Flush();
  fuse_reply_err(req, s.ok() ? 0 : s.ToErrno());
}

void Impl::OnFallocate(fuse_req_t req, fuse_ino_t, int mode, off_t off, off_t len,
                       fuse_file_info* fi) {
  Entry* e = EntryOf(fi);
  constexpr int kPunch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
  constexpr int kZero = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
  if (off < 0 || len <= 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  const uint64_t uoff = static_cast<uint64_t>(off);
  const uint64_t ulen = static_cast<uint64_t>(len);
  const bool zero_inside =
      mode == FALLOC_FL_ZERO_RANGE && uoff <= e->size && ulen <= e->size - uoff;
  if (mode != kPunch && mode != kZero && !zero_inside) {
    fuse_reply_err(req, EOPNOTSUPP);
    return;
  }
  if (e->read_only) {
    fuse_reply_err(req, EROFS);
    return;
  }
  // KEEP_SIZE: nothing past the end exists to discard or zero.
  if (uoff >= e->size) {
    fuse_reply_err(req, 0);
    return;
  }
  const uint64_t n = std::min<uint64_t>(ulen, e->size - uoff);
  Status s = mode == kPunch ? e->dev->Discard(uoff, n) : e->dev->WriteZeroes(uoff, n);
  fuse_reply_err(req, s.ok() ? 0 : s.ToErrno());
}

void Impl::OnStatfs(fuse_req_t req, fuse_ino_t) {
  Impl* self = Self(req);
  struct statvfs sv {};
  uint64_t bytes = 0;
  uint64_t files = 0;
  {
    std::lock_guard l(self->mu_);
    for (auto& [n, e] : self->by_name_) bytes += e->size;
    files = self->by_name_.size();
  }
  sv.f_bsize = 4096;
  sv.f_frsize = 4096;
  sv.f_blocks = bytes / 4096;
  sv.f_files = files;
  sv.f_namemax = 255;
  fuse_reply_statfs(req, &sv);
}

}  // namespace

Result<std::unique_ptr<FuseExport>> FuseExport::Mount(const std::string& dir, Options options) {
  auto impl = std::make_unique<Impl>(dir, std::move(options));
  UMBRA_RETURN_IF_ERROR(impl->Start());
  return std::unique_ptr<FuseExport>(std::move(impl));
}

}  // namespace umbra
