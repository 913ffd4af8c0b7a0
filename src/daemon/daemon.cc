#include "daemon/daemon.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "base/random.h"
#include "base/units.h"
#include "daemon/log.h"
#include "daemon/system.h"
#include "umbra/imaging.h"

namespace umbra::daemon {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr const char* kVersionString = "umbrad 0.1.0";
constexpr uint64_t kDefaultStoragePercent = 10;
constexpr auto kRemoveGrace = 5s;

// ---- argument helpers: each failure names the argument ----------------------

Result<std::string> ArgString(const Json& args, const char* key) {
  auto it = args.find(key);
  if (it == args.end() || it->is_null())
    return Status::InvalidArgument(std::string("missing argument '") + key + "'");
  if (!it->is_string())
    return Status::InvalidArgument(std::string("argument '") + key + "' must be a string");
  return it->get<std::string>();
}

// The error for an operation on snapshot `id` that was invalidated.
Status InvalidatedError(const std::string& id, const SnapshotInfo& info,
                        const std::string& tail = "") {
  return Status::SnapshotInvalid("snapshot " + id + " was invalidated (" +
                                 std::string(InvalidCauseName(info.cause)) + ")" + tail);
}

Result<std::string> ArgOptString(const Json& args, const char* key) {
  auto it = args.find(key);
  if (it == args.end() || it->is_null()) return std::string();
  if (!it->is_string())
    return Status::InvalidArgument(std::string("argument '") + key + "' must be a string");
  return it->get<std::string>();
}

Result<bool> ArgBool(const Json& args, const char* key, bool dflt) {
  auto it = args.find(key);
  if (it == args.end() || it->is_null()) return dflt;
  if (!it->is_boolean())
    return Status::InvalidArgument(std::string("argument '") + key + "' must be true or false");
  return it->get<bool>();
}

// A size: an integer number of bytes or a string such as "64M". 0 if absent.
Result<uint64_t> ArgSize(const Json& args, const char* key) {
  auto it = args.find(key);
  if (it == args.end() || it->is_null()) return uint64_t{0};
  if (it->is_number_unsigned()) return it->get<uint64_t>();
  if (it->is_number_integer() || it->is_number_float())
    return Status::InvalidArgument(std::string("argument '") + key +
                                   "' must be a positive whole number of bytes, got " + it->dump());
  if (it->is_string()) {
    auto r = ParseSize(it->get<std::string>());
    if (!r.ok())
      return Status::InvalidArgument(std::string("argument '") + key +
                                     "': " + r.status().message());
    return *r;
  }
  return Status::InvalidArgument(std::string("argument '") + key + "' must be a size");
}

Result<std::optional<MaxSize>> ArgMaxSize(const Json& args, const char* key) {
  auto it = args.find(key);
  if (it == args.end() || it->is_null()) return std::optional<MaxSize>();
  if (it->is_number_unsigned()) {
    if (it->get<uint64_t>() == 0)
      return Status::InvalidArgument("maximum size must be greater than zero");
    return std::optional<MaxSize>(MaxSize::Bytes(it->get<uint64_t>()));
  }
  if (!it->is_string())
    return Status::InvalidArgument(std::string("argument '") + key +
                                   "' must be a size, a percentage or \"unbounded\"");
  auto m = MaxSize::Parse(it->get<std::string>());
  if (!m.ok()) return m.status();
  return std::optional<MaxSize>(*m);
}

Status CheckName(const std::string& name) {
  if (name.empty() || name.size() > 64)
    return Status::InvalidArgument("volume name must be 1 to 64 characters long");
  if (name[0] == '.' || name[0] == '-')
    return Status::InvalidArgument("volume name '" + name + "' must not start with '.' or '-'");
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'))
      return Status::InvalidArgument("volume name '" + name +
                                     "' may contain only letters, digits, '-', '_' and '.'");
  }
  return Status::Ok();
}

Status CheckAbsolute(const std::string& path, const char* what) {
  if (path.empty() || path[0] != '/')
    return Status::InvalidArgument(std::string(what) + " '" + path + "' must be an absolute path");
  return Status::Ok();
}

Status MkdirP(const std::string& dir, mode_t mode) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Status(Code::kIOError, "cannot create directory " + dir + ": " + ec.message());
  ::chmod(dir.c_str(), mode);
  return Status::Ok();
}

void RemoveAll(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) LogWarning("cannot remove " + path + ": " + ec.message());
}

struct AlignedFree {
  void operator()(std::byte* p) const { std::free(p); }
};

}  // namespace

namespace {
std::string SelfExe() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : "/proc/self/exe";
}
}  // namespace

Daemon::Daemon(Config cfg) : cfg_(std::move(cfg)) {
  writers::Bounds b;
  b.prepare = std::chrono::milliseconds(cfg_.prepare_timeout_ms);
  b.freeze_window = std::chrono::milliseconds(cfg_.freeze_window_ms);
  if (const char* d = std::getenv("UMBRAD_TEST_FROZEN_DELAY_MS")) {
    b.test_frozen_delay = std::chrono::milliseconds(std::atoll(d));
    LogWarning("UMBRAD_TEST_FROZEN_DELAY_MS is set: filesystems stay frozen " + std::string(d) +
               " ms before each commit (for tests)");
  }
  writers_ = std::make_unique<writers::Coordinator>(cfg_.writers_dir, b, SelfExe());
}

Daemon::~Daemon() { Stop(); }

std::string Daemon::DefaultStorage(const std::string& uuid) const {
  return cfg_.state_dir + "/shadow/" + uuid;
}

namespace {

// The running kernel's boot id: lets a volume's change map survive a killed
// umbrad (docs/format/shadow-storage.md section 6).
std::string BootId() {
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(f, id);
  return id;
}

}  // namespace

VolumeConfig Daemon::EngineConfig(const VolumeRecord& rec) const {
  VolumeConfig c;
  c.boot_id = BootId();
  c.origin_path = rec.origin;
  c.shadow_dir = rec.storage;
  c.uuid = rec.uuid;
  c.chunk_size = rec.chunk_size;
  c.max_size = MaxSize::Percent(kDefaultStoragePercent);
  c.copy_timeout_ms = cfg_.copy_timeout_ms;
  c.direct_io = cfg_.origin_cache == "direct" && rec.size % 4096 == 0;
  return c;
}

// The engine restores settings from its journal; the configured copy
// timeout wins (an edited umbrad.toml applies to existing volumes).
Result<std::unique_ptr<Volume>> Daemon::OpenEngine(const VolumeRecord& rec) const {
  auto v = Volume::Open(DefaultEnv(), EngineConfig(rec));
  if (!v.ok()) return v;
  if (std::string why = (*v)->ChangeMapResetReason(); !why.empty())
    LogWarning("volume '" + rec.name + "': change tracking was reset (" + why +
               "); the next incremental image reads the whole volume");
  if (Status s = (*v)->SetCopyTimeout(cfg_.copy_timeout_ms); !s.ok())
    LogWarning("volume '" + rec.name + "': applying copy_timeout_ms: " + s.message());
  return v;
}

// ---- start-up and shut-down --------------------------------------------------

void Daemon::Reconcile() {
  const std::string prefix = cfg_.fuse_dir + "/";
  const auto mounts = ListMounts();
  for (const LoopInfo& loop : ListLoops()) {
    if (loop.backing_file.rfind(prefix, 0) != 0) continue;
    const std::string file = loop.backing_file.substr(prefix.size());
    for (const MountEntry& m : mounts) {
      if (m.source != loop.device) continue;
      if (file.rfind("mnt-", 0) == 0) {
        // A snapshot mount umbrad made before it died: its device is dead.
        if (::umount2(m.target.c_str(), MNT_DETACH) == 0)
          LogInfo("unmounted stale snapshot mount " + m.target + " (" + loop.device + ")");
        else
          LogWarning("cannot unmount stale snapshot mount " + m.target + ": " +
                     std::strerror(errno));
      } else {
        LogWarning(loop.device + " (" + loop.backing_file + ") is still mounted on " + m.target +
                   " from before a crash; it returns I/O errors until unmounted, and is detached "
                   "when unmounted");
      }
    }
    Status s = ClearLoop(loop.device);
    if (s.ok())
      LogInfo("detached stale loop device " + loop.device + " (" + loop.backing_file + ")");
    else
      LogWarning("cannot detach stale loop device " + loop.device + ": " + s.message());
  }
  for (const MountEntry& m : ListMounts()) {
    if (m.target != cfg_.fuse_dir) continue;
    if (::umount2(cfg_.fuse_dir.c_str(), MNT_DETACH) == 0)
      LogInfo("unmounted stale FUSE mount " + cfg_.fuse_dir + " (" + m.fstype + ")");
    else
      LogWarning("cannot unmount stale mount " + cfg_.fuse_dir + ": " + std::strerror(errno));
  }
  // Mount points umbrad created for snapshot mounts.
  const std::string record = cfg_.state_dir + "/mountpoints.json";
  std::ifstream in(record);
  if (in) {
    std::stringstream ss;
    ss << in.rdbuf();
    Json j = Json::parse(ss.str(), nullptr, false);
    if (j.is_array()) {
      for (const Json& d : j) {
        if (!d.is_string()) continue;
        const std::string dir = d.get<std::string>();
        if (IsMountPoint(dir)) continue;
        if (::rmdir(dir.c_str()) == 0) LogInfo("removed stale mount point " + dir);
      }
    }
    ::unlink(record.c_str());
  }
}

Status Daemon::Start() {
  std::lock_guard l(mu_);
  if (started_) return Status::Ok();
  UMBRA_RETURN_IF_ERROR(MkdirP(cfg_.state_dir, 0700));
  UMBRA_RETURN_IF_ERROR(MkdirP(cfg_.state_dir + "/shadow", 0700));
  UMBRA_RETURN_IF_ERROR(MkdirP(cfg_.state_dir + "/volumes", 0700));
  UMBRA_RETURN_IF_ERROR(MkdirP(cfg_.state_dir + "/tmp", 0700));
  const std::string lock = cfg_.state_dir + "/umbrad.lock";
  lock_fd_ = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock_fd_ < 0) return Status::FromErrno(errno, "open " + lock);
  if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    ::close(lock_fd_);
    lock_fd_ = -1;
    return Status::Busy("another umbrad is already using state directory " + cfg_.state_dir);
  }

  Reconcile();

  auto recs = LoadRegistry(cfg_.state_dir + "/volumes.json");
  if (!recs.ok()) return recs.status();
  std::vector<Volume*> open;
  for (VolumeRecord& rec : *recs) {
    auto e = std::make_unique<VolumeEntry>();
    e->rec = rec;
    auto v = OpenEngine(rec);
    if (v.ok()) {
      e->holder->volume = std::move(*v);
      open.push_back(e->holder->volume.get());
      LogInfo("opened volume '" + rec.name + "' (" + rec.origin + ", " +
              std::to_string(e->holder->volume->ListSnapshots().size()) + " snapshots)");
    } else {
      e->unavailable = v.status().message();
      LogError("volume '" + rec.name + "' is unavailable: " + v.status().message());
    }
    volumes_[rec.name] = std::move(e);
  }
  LoadWriterRecordsLocked();
  if (!open.empty()) {
    auto n = ReconcileSnapshotSets(open);
    if (!n.ok())
      LogError("reconciling snapshot sets failed: " + n.status().message());
    else if (*n > 0)
      LogInfo("deleted " + std::to_string(*n) + " snapshots of incomplete sets");
  }

  UMBRA_RETURN_IF_ERROR(MkdirP(cfg_.fuse_dir, 0700));
  FuseExport::Options opts;
  opts.fsname = "umbra";
  auto ex = FuseExport::Mount(cfg_.fuse_dir, opts);
  if (!ex.ok()) return ex.status().Annotate("mounting the FUSE export on " + cfg_.fuse_dir);
  export_ = std::move(*ex);

  bool flusher = false;
  std::thread([&] { flusher = ::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0; }).join();
  if (!flusher)
    LogWarning(
        "PR_SET_IO_FLUSHER is not permitted (needs CAP_SYS_RESOURCE): threads serving attached "
        "volumes are not marked as I/O flushers");
  started_ = true;
  return Status::Ok();
}

void Daemon::Stop() {
  std::lock_guard l(mu_);
  if (!started_) {
    if (lock_fd_ >= 0) ::close(lock_fd_);
    lock_fd_ = -1;
    return;
  }
  started_ = false;
  // Filesystems still mounted on attached volumes are about to lose their
  // device: write their dirty data while it is still served, and say so.
  for (const MountEntry& m : ListMounts()) {
    for (auto& [name, v] : volumes_) {
      if (!v->live_loop.attached() || m.source != v->live_loop.path()) continue;
      LogWarning("volume '" + name + "' is still mounted on " + m.target + " (" + m.source +
                 "); syncing it before its device goes away; it returns I/O errors from now "
                 "on, and its loop device is detached when it is unmounted");
      int fd = ::open(m.target.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (fd >= 0) {
        if (::syncfs(fd) != 0) LogWarning("syncfs " + m.target + ": " + std::strerror(errno));
        ::close(fd);
      }
    }
  }
  std::vector<std::string> ids;
  for (auto& [id, m] : snap_mounts_) ids.push_back(id);
  for (const auto& id : ids) UnmountSnapshotLocked(id, /*lazy=*/true).IgnoreError();
  ids.clear();
  for (auto& [id, a] : snap_attach_) ids.push_back(id);
  for (const auto& id : ids) {
    Status s = DetachSnapshotLocked(id, /*force=*/true);
    if (!s.ok()) LogWarning(s.message());
  }
  for (auto& [name, v] : volumes_) {
    if (v->live_dev) {
      Status s = DetachVolumeLocked(*v, /*force=*/true);
      if (!s.ok()) LogWarning(s.message());
    }
  }
  if (export_) {
    Status s = export_->Unmount();
    if (!s.ok()) LogWarning("FUSE export: " + s.message());
    export_.reset();
  }
  for (auto& [name, v] : volumes_) {
    v->live_dev.reset();
    if (!v->holder->volume) continue;
    Status s = v->holder->volume->Close();
    if (!s.ok()) LogError("closing volume '" + name + "': " + s.message());
    v->holder->volume.reset();
  }
  volumes_.clear();
  SaveMountPoints().IgnoreError();
  if (lock_fd_ >= 0) ::close(lock_fd_);
  lock_fd_ = -1;
  LogInfo("stopped");
}

// ---- dispatch ----------------------------------------------------------------

Json Daemon::Handle(const Json& request, const Peer& peer) {
  Json id = nullptr;
  auto proto = [&](const std::string& msg) {
    return Json{{"id", id}, {"ok", false}, {"error", {{"code", "protocol"}, {"message", msg}}}};
  };
  try {
    if (request.contains("id")) id = request["id"];
    auto op_it = request.find("op");
    if (op_it == request.end() || !op_it->is_string()) return proto("request has no \"op\" string");
    const std::string op = op_it->get<std::string>();
    Json args = Json::object();
    if (auto a = request.find("args"); a != request.end() && !a->is_null()) {
      if (!a->is_object())
        return control::ErrorResponse(
            id, Status::InvalidArgument("\"args\" of " + op + " must be a JSON object"));
      args = *a;
    }
    if (op != "daemon.hello" && !peer.allowed) {
      std::string who =
          cfg_.admin_group.empty() ? "root" : "root or members of group " + cfg_.admin_group;
      return control::ErrorResponse(
          id, Status(Code::kPermissionDenied, "uid " + std::to_string(peer.uid) +
                                                  " may not use umbrad; only " + who + " may"));
    }
    auto r = Dispatch(op, args, peer);
    if (!r.ok() && r.status().code() == Code::kUnsupported &&
        r.status().message() == "unknown operation")
      return proto("unknown operation \"" + op + "\"");
    if (!r.ok()) {
      if (op != "daemon.hello" && op.find(".list") == std::string::npos)
        LogInfo(op + " from uid " + std::to_string(peer.uid) + " failed: " + r.status().message());
      return control::ErrorResponse(id, r.status());
    }
    return control::OkResponse(id, std::move(*r));
  } catch (const Json::exception& e) {
    return control::ErrorResponse(id,
                                  Status::InvalidArgument(std::string("bad request: ") + e.what()));
  } catch (const std::exception& e) {
    LogError(std::string("internal error: ") + e.what());
    return control::ErrorResponse(
        id, Status(Code::kIOError, std::string("internal error: ") + e.what()));
  }
}

Result<Json> Daemon::Dispatch(const std::string& op, const Json& args, const Peer& peer) {
  static const std::map<std::string, Handler> kOps = {
      {"daemon.hello", &Daemon::OpHello},
      {"daemon.status", &Daemon::OpStatus},
      {"volume.create", &Daemon::OpVolumeCreate},
      {"volume.adopt", &Daemon::OpVolumeAdopt},
      {"volume.attach", &Daemon::OpVolumeAttach},
      {"volume.detach", &Daemon::OpVolumeDetach},
      {"volume.list", &Daemon::OpVolumeList},
      {"volume.delete", &Daemon::OpVolumeDelete},
      {"volume.changes", &Daemon::OpVolumeChanges},
      {"storage.add", &Daemon::OpStorageAdd},
      {"storage.resize", &Daemon::OpStorageResize},
      {"storage.delete", &Daemon::OpStorageDelete},
      {"storage.list", &Daemon::OpStorageList},
      {"snapshot.create", &Daemon::OpSnapshotCreate},
      {"snapshot.list", &Daemon::OpSnapshotList},
      {"snapshot.delete", &Daemon::OpSnapshotDelete},
      {"snapshot.attach", &Daemon::OpSnapshotAttach},
      {"snapshot.detach", &Daemon::OpSnapshotDetach},
      {"snapshot.mount", &Daemon::OpSnapshotMount},
      {"snapshot.unmount", &Daemon::OpSnapshotUnmount},
      {"snapshot.revert", &Daemon::OpSnapshotRevert},
      {"provider.list", &Daemon::OpProviderList},
      {"volume.export", &Daemon::OpVolumeExport},
      {"snapshot.export", &Daemon::OpSnapshotExport},
      {"image.export", &Daemon::OpImageExport},
      {"image.unexport", &Daemon::OpImageUnexport},
      {"image.mount", &Daemon::OpImageMount},
      {"image.unmount", &Daemon::OpImageUnmount},
      {"snapshot.complete", &Daemon::OpSnapshotComplete},
      {"writer.list", &Daemon::OpWriterList},
  };
  // These take mu_ themselves: a snapshot with writers may wait for them for
  // up to the prepare bound plus the freeze window, and must not block every
  // other request meanwhile.
  static const std::set<std::string> kSelfLocking = {"snapshot.create", "snapshot.complete",
                                                     "writer.list"};
  auto it = kOps.find(op);
  if (it == kOps.end()) return Status::Unsupported("unknown operation");
  if (kSelfLocking.count(op)) return (this->*(it->second))(args, peer);
  std::lock_guard l(mu_);
  if (!started_) return Status(Code::kBusy, "umbrad is shutting down");
  return (this->*(it->second))(args, peer);
}

// ---- lookups and objects -----------------------------------------------------

Result<Daemon::VolumeEntry*> Daemon::FindVolume(const std::string& name) {
  auto it = volumes_.find(name);
  if (it == volumes_.end()) return Status::NotFound("no volume '" + name + "'");
  return it->second.get();
}

Result<Daemon::VolumeEntry*> Daemon::FindOpenVolume(const std::string& name) {
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindVolume(name));
  if (!v->holder->volume)
    return Status(Code::kIOError, "volume '" + name + "' is unavailable: " + v->unavailable);
  return v;
}

Result<Daemon::VolumeEntry*> Daemon::FindSnapshot(const std::string& id, SnapshotInfo* info) {
  Uuid u;
  if (!ParseUuid(id, u)) return Status::InvalidArgument("'" + id + "' is not a snapshot id");
  for (auto& [name, v] : volumes_) {
    if (!v->holder->volume) continue;
    auto s = v->holder->volume->GetSnapshot(id);
    if (s.ok()) {
      if (info != nullptr) *info = *s;
      return v.get();
    }
  }
  return Status::NotFound("no snapshot " + id);
}

Json Daemon::StorageObject(VolumeEntry& v) {
  StorageUsage u = v.holder->volume->GetStorageUsage();
  Json max = nullptr, percent = nullptr, warning = nullptr;
  if (u.max_bytes != UINT64_MAX) {
    max = u.max_bytes;
    double p = u.max_bytes == 0
                   ? 100.0
                   : static_cast<double>(u.used_bytes) * 100.0 / static_cast<double>(u.max_bytes);
    percent = p;
    if (p >= 90.0)
      warning = "90%";
    else if (p >= 80.0)
      warning = "80%";
  }
  return Json{{"volume", v.rec.name}, {"location", v.rec.storage},
              {"used", u.used_bytes}, {"allocated", u.allocated_bytes},
              {"max", max},           {"max_size", u.max_size.ToString()},
              {"percent", percent},   {"warning", warning},
              {"copies", u.copies},   {"zero_copies", u.zero_copies},
              {"copy_mode", u.copies_inline ? "inline" : "copier"}};
}

Json Daemon::VolumeObject(VolumeEntry& v) {
  const bool open = v.holder->volume != nullptr;
  Json device = nullptr;
  if (v.live_loop.attached()) device = v.live_loop.path();
  return Json{{"name", v.rec.name},
              {"uuid", v.rec.uuid},
              {"size", v.rec.size},
              {"chunk_size", v.rec.chunk_size},
              {"origin", v.rec.origin},
              {"kind", v.rec.kind},
              {"attached", v.live_loop.attached()},
              {"device", device},
              {"storage", open ? StorageObject(v) : Json(nullptr)},
              {"snapshots", open ? v.holder->volume->ListSnapshots().size() : 0},
              {"available", open},
              {"error", open ? Json(nullptr) : Json(v.unavailable)}};
}

Json Daemon::SnapshotObject(const VolumeEntry& v, const SnapshotInfo& s) {
  Json attached = nullptr, mount = nullptr;
  if (auto it = snap_attach_.find(s.id); it != snap_attach_.end())
    attached = it->second->loop.path();
  if (auto it = snap_mounts_.find(s.id); it != snap_mounts_.end()) mount = it->second->dir;
  bool release = false;
  for (const auto& [conn, ids] : release_)
    if (ids.count(s.id)) release = true;
  std::string consistency = "none";
  Json failed = Json::object();
  if (auto it = writer_records_.find(s.id); it != writer_records_.end()) {
    consistency = it->second.consistency;
    for (const auto& [w, why] : it->second.failed) failed[w] = why;
  }
  Json tracking = nullptr;
  if (!s.tracking_id.empty()) tracking = Json{{"id", s.tracking_id}, {"epoch", s.change_epoch}};
  return Json{{"id", s.id},
              {"volume", v.rec.name},
              {"seq", s.seq},
              {"tracking", tracking},
              {"name", s.name},
              {"persistent", s.persistent},
              {"created", s.created_unix_ns},
              {"set_id", s.set_id},
              {"set_size", s.set_size},
              {"valid", s.valid},
              {"cause", s.valid ? Json(nullptr) : Json(std::string(InvalidCauseName(s.cause)))},
              {"message", s.invalid_message.empty() ? Json(nullptr) : Json(s.invalid_message)},
              {"own_bytes", s.exclusive_bytes},
              {"attached_device", attached},
              {"mount", mount},
              {"release_on_disconnect", release},
              {"writers", consistency},
              {"writers_failed", failed}};
}

Status Daemon::SaveRegistryLocked() {
  std::vector<VolumeRecord> recs;
  for (auto& [name, v] : volumes_) recs.push_back(v->rec);
  return SaveRegistry(cfg_.state_dir + "/volumes.json", recs);
}

Status Daemon::SaveMountPoints() {
  Json dirs = Json::array();
  for (auto& [id, m] : snap_mounts_)
    if (m->created_dir) dirs.push_back(m->dir);
  const std::string record = cfg_.state_dir + "/mountpoints.json";
  if (dirs.empty()) {
    ::unlink(record.c_str());
    return Status::Ok();
  }
  return WriteFileAtomic(record, dirs.dump() + "\n");
}

// ---- daemon.*, provider.* -----------------------------------------------------

Result<Json> Daemon::OpHello(const Json&, const Peer& peer) {
  return Json{{"version", control::kProtocolVersion},
              {"daemon", kVersionString},
              {"uid", peer.uid},
              {"allowed", peer.allowed}};
}

Result<Json> Daemon::OpStatus(const Json&, const Peer&) {
  size_t snaps = 0, unavailable = 0;
  for (auto& [name, v] : volumes_) {
    if (v->holder->volume)
      snaps += v->holder->volume->ListSnapshots().size();
    else
      ++unavailable;
  }
  return Json{{"volumes", volumes_.size()},
              {"snapshots", snaps},
              {"unavailable_volumes", unavailable},
              {"fuse_mount", cfg_.fuse_dir},
              {"state_dir", cfg_.state_dir},
              {"socket", cfg_.socket},
              {"daemon", kVersionString}};
}

Result<Json> Daemon::OpProviderList(const Json&, const Peer&) {
  return Json{{"providers", Json::array({Json{{"name", "cow"},
                                              {"persistent", true},
                                              {"writers", false},
                                              {"discard", true},
                                              {"revert", true},
                                              {"mount", true},
                                              {"available", true}}})}};
}

// ---- volume.* ----------------------------------------------------------------

Result<Json> Daemon::AddVolume(VolumeRecord rec, const std::string& created_file) {
  VolumeConfig vc = EngineConfig(rec);
  auto cleanup = [&] {
    RemoveAll(rec.storage);
    if (!created_file.empty()) ::unlink(created_file.c_str());
  };
  auto v = Volume::Create(DefaultEnv(), vc);
  if (!v.ok()) {
    cleanup();
    return v.status();
  }
  if (!created_file.empty()) {
    // A backing file umbrad just created is sparse: every chunk reads as
    // zeros, so the engine may know it is free (snapshots then copy nothing
    // for it and NBD reports it as a hole) until it is written.
    Status d = (*v)->Discard(0, (*v)->size());
    if (!d.ok()) {
      (*v)->Close().IgnoreError();
      cleanup();
      return d.Annotate("marking the new volume free");
    }
  }
  rec.chunk_size = (*v)->config().chunk_size;
  rec.size = (*v)->size();
  auto e = std::make_unique<VolumeEntry>();
  e->rec = rec;
  e->holder->volume = std::move(*v);
  VolumeEntry* entry = e.get();
  volumes_[rec.name] = std::move(e);
  Status s = SaveRegistryLocked();
  if (!s.ok()) {
    entry->holder->volume->Close().IgnoreError();
    volumes_.erase(rec.name);
    cleanup();
    return s.Annotate("saving the volume registry");
  }
  LogInfo("created volume '" + rec.name + "' (" + rec.kind + " " + rec.origin + ", " +
          FormatBytes(rec.size) + ", shadow storage " + rec.storage + ")");
  return VolumeObject(*entry);
}

Result<Json> Daemon::OpVolumeCreate(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgString(args, "name"));
  UMBRA_RETURN_IF_ERROR(CheckName(name));
  if (volumes_.count(name)) return Status::AlreadyExists("volume '" + name + "' already exists");
  UMBRA_ASSIGN_OR_RETURN(uint64_t size, ArgSize(args, "size"));
  UMBRA_ASSIGN_OR_RETURN(uint64_t chunk, ArgSize(args, "chunk_size"));
  UMBRA_ASSIGN_OR_RETURN(std::string backing, ArgOptString(args, "backing"));
  if (chunk != 0 && (chunk < 4096 || chunk > (4u << 20) || (chunk & (chunk - 1)) != 0))
    return Status::InvalidArgument("chunk size must be a power of two from 4 KiB to 4 MiB, got " +
                                   std::to_string(chunk));
  const uint32_t chunk_size = chunk != 0 ? static_cast<uint32_t>(chunk) : 16 * 1024;
  const bool explicit_backing = !backing.empty();
  if (!explicit_backing) backing = cfg_.state_dir + "/volumes/" + name + ".img";
  UMBRA_RETURN_IF_ERROR(CheckAbsolute(backing, "backing file"));
  for (auto& [n, v] : volumes_)
    if (v->rec.origin == backing)
      return Status::AlreadyExists("volume '" + n + "' already uses " + backing);

  struct stat st;
  const bool exists = ::stat(backing.c_str(), &st) == 0;
  if (exists && !explicit_backing)
    return Status::AlreadyExists("backing file " + backing + " already exists");
  if (exists) {
    if (!S_ISREG(st.st_mode))
      return Status::InvalidArgument("backing file " + backing + " is not a regular file");
    const uint64_t fsize = static_cast<uint64_t>(st.st_size);
    if (size != 0 && size != fsize)
      return Status::InvalidArgument("backing file " + backing + " is " + std::to_string(fsize) +
                                     " bytes, not the requested " + std::to_string(size));
    if (fsize % 4096 != 0)
      return Status::InvalidArgument("backing file " + backing + " is " + std::to_string(fsize) +
                                     " bytes, which is not a multiple of 4096");
    size = fsize;
  } else {
    if (args.find("size") == args.end() || args["size"].is_null())
      return Status::InvalidArgument("missing argument 'size' (the size of the new volume)");
    if (size == 0) return Status::InvalidArgument("volume size must be greater than zero");
    if (size > (uint64_t{1} << 50))
      return Status::InvalidArgument("volume size " + FormatBytes(size) + " is too large");
    size = (size + 4095) / 4096 * 4096;  // direct I/O and 4 KiB sectors need whole blocks
    if (size < chunk_size)
      return Status::InvalidArgument("volume size " + FormatBytes(size) +
                                     " is smaller than one chunk (" + FormatBytes(chunk_size) +
                                     ")");
  }

  std::string created;
  if (!exists) {
    int fd = ::open(backing.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return Status::FromErrno(errno, "create backing file " + backing);
    int rc = ::ftruncate(fd, static_cast<off_t>(size));
    int e = errno;
    ::close(fd);
    if (rc != 0) {
      ::unlink(backing.c_str());
      return Status::FromErrno(e, "set the size of " + backing);
    }
    created = backing;
  }
  VolumeRecord rec;
  rec.name = name;
  rec.uuid = NewUuid();
  rec.origin = backing;
  rec.kind = "file";
  rec.size = size;
  rec.chunk_size = chunk_size;
  rec.storage = DefaultStorage(rec.uuid);
  rec.created_backing = !exists;
  return AddVolume(std::move(rec), created);
}

Result<Json> Daemon::OpVolumeAdopt(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgString(args, "name"));
  UMBRA_RETURN_IF_ERROR(CheckName(name));
  if (volumes_.count(name)) return Status::AlreadyExists("volume '" + name + "' already exists");
  UMBRA_ASSIGN_OR_RETURN(std::string device, ArgString(args, "device"));
  UMBRA_RETURN_IF_ERROR(CheckAbsolute(device, "device"));
  struct stat st;
  if (::stat(device.c_str(), &st) != 0) return Status::FromErrno(errno, "device " + device);
  if (!S_ISBLK(st.st_mode)) return Status::InvalidArgument(device + " is not a block device");
  for (auto& [n, v] : volumes_)
    if (v->rec.origin == device)
      return Status::AlreadyExists("volume '" + n + "' already uses " + device);
  if (BlockDeviceInUse(device))
    return Status::Busy("device " + device +
                        " is in use (mounted?); unmount it before adopting it, and from then on "
                        "use it only through umbrad");
  int fd = ::open(device.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + device);
  uint64_t size = 0;
  int rc = ::ioctl(fd, BLKGETSIZE64, &size);
  int e = errno;
  ::close(fd);
  if (rc != 0) return Status::FromErrno(e, "size of " + device);
  if (size % 4096 != 0)
    return Status::InvalidArgument("device " + device + " is " + std::to_string(size) +
                                   " bytes, which is not a multiple of 4096");
  UMBRA_ASSIGN_OR_RETURN(uint64_t chunk, ArgSize(args, "chunk_size"));
  VolumeRecord rec;
  rec.name = name;
  rec.uuid = NewUuid();
  rec.origin = device;
  rec.kind = "device";
  rec.size = size;
  rec.chunk_size =
      chunk != 0 ? static_cast<uint32_t>(std::min<uint64_t>(chunk, 1u << 31)) : 16 * 1024;
  rec.storage = DefaultStorage(rec.uuid);
  rec.created_backing = false;
  return AddVolume(std::move(rec), "");
}

Result<Json> Daemon::OpVolumeAttach(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgString(args, "name"));
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindOpenVolume(name));
  if (v->live_loop.attached())
    return Status::AlreadyExists("volume '" + name + "' is already attached at " +
                                 v->live_loop.path());
  const std::string file = "vol-" + name;
  if (!v->live_dev) {
    auto dev = VolumeDevice(v->holder.get(), v->rec.size);
    UMBRA_RETURN_IF_ERROR(export_->Add(file, dev.get(), 0600));
    v->live_dev = std::move(dev);
  }
  auto loop = LoopDevice::Attach(export_->PathOf(file), /*read_only=*/false, /*direct_io=*/true,
                                 4096, LoopDevice::Hold::kReleased);
  if (!loop.ok()) {
    if (export_->Remove(file, kRemoveGrace).ok()) v->live_dev.reset();
    return loop.status().Annotate("attaching a loop device to volume '" + name + "'");
  }
  v->live_loop = std::move(*loop);
  if (!v->live_loop.direct_io())
    LogWarning(v->live_loop.path() + " fell back to buffered I/O (no direct I/O)");
  LogInfo("attached volume '" + name + "' at " + v->live_loop.path());
  return Json{{"device", v->live_loop.path()}};
}

Status Daemon::DetachVolumeLocked(VolumeEntry& v, bool force) {
  const std::string file = "vol-" + v.rec.name;
  bool held = false;
  if (v.live_loop.attached()) {
    const std::string dev = v.live_loop.path();
    if (!force && BlockDeviceInUse(dev))
      return Status::Busy("volume '" + v.rec.name + "' is in use: " + dev +
                          " is mounted or held open; unmount it first");
    Status s = v.live_loop.Detach();
    if (!s.ok()) {
      LogWarning("detaching " + dev + ": " + s.message());
      held = true;
    }
    LogInfo("detached volume '" + v.rec.name + "' from " + dev);
  }
  if (v.live_dev) {
    // At shutdown, a loop device still held by a mount keeps the file open
    // for good: do not wait for it.
    Status s = export_->Remove(file, force && held ? std::chrono::milliseconds(0)
                                                   : std::chrono::milliseconds(kRemoveGrace));
    if (!s.ok() && s.code() != Code::kNotFound) {
      if (!force)
        return Status::Busy("volume '" + v.rec.name + "' was detached but its export file " +
                            export_->PathOf(file) + " is still open elsewhere; retry later");
      LogWarning("export file " + file + " still open at shutdown: " + s.message());
      return s;
    }
    v.live_dev.reset();
  }
  return Status::Ok();
}

Result<Json> Daemon::OpVolumeDetach(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgString(args, "name"));
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindVolume(name));
  if (!v->live_loop.attached() && !v->live_dev)
    return Status::InvalidArgument("volume '" + name + "' is not attached");
  UMBRA_RETURN_IF_ERROR(DetachVolumeLocked(*v, /*force=*/false));
  return Json::object();
}

Result<Json> Daemon::OpVolumeChanges(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgString(args, "volume"));
  UMBRA_ASSIGN_OR_RETURN(std::string tracking, ArgString(args, "tracking_id"));
  auto e = args.find("epoch");
  if (e == args.end() || !e->is_number_unsigned())
    return Status::InvalidArgument("argument 'epoch' must be a non-negative integer");
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindOpenVolume(name));
  UMBRA_ASSIGN_OR_RETURN(auto extents,
                         v->holder->volume->ChangedSince(tracking, e->get<uint64_t>()));
  Json list = Json::array();
  uint64_t bytes = 0;
  for (const Extent& x : extents) {
    list.push_back(Json::array({x.offset, x.length}));
    bytes += x.length;
  }
  return Json{{"extents", list}, {"bytes", bytes}};
}

Result<Json> Daemon::OpVolumeList(const Json&, const Peer&) {
  Json out = Json::array();
  for (auto& [name, v] : volumes_) out.push_back(VolumeObject(*v));
  return Json{{"volumes", out}};
}

Result<Json> Daemon::OpVolumeDelete(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgString(args, "name"));
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindVolume(name));
  if (v->live_loop.attached() || v->live_dev)
    return Status::Busy("volume '" + name + "' is attached" +
                        (v->live_loop.attached() ? " at " + v->live_loop.path() : "") +
                        "; detach it first");
  if (v->nbd_clients > 0)
    return Status::Busy("volume '" + name + "' is in use by " + std::to_string(v->nbd_clients) +
                        " NBD client(s)");
  if (v->holder->volume) {
    size_t n = v->holder->volume->ListSnapshots().size();
    if (n > 0)
      return Status::Busy("volume '" + name + "' has " + std::to_string(n) +
                          " snapshot(s); delete them first");
  }
  std::unique_ptr<VolumeEntry> entry = std::move(volumes_[name]);
  volumes_.erase(name);
  Status s = SaveRegistryLocked();
  if (!s.ok()) {
    volumes_[name] = std::move(entry);
    return s.Annotate("saving the volume registry");
  }
  if (entry->holder->volume) {
    Status c = entry->holder->volume->Close();
    if (!c.ok()) LogWarning("closing volume '" + name + "': " + c.message());
    entry->holder->volume.reset();
  }
  RemoveAll(entry->rec.storage);
  if (entry->rec.created_backing && ::unlink(entry->rec.origin.c_str()) != 0)
    LogWarning("cannot remove " + entry->rec.origin + ": " + std::strerror(errno));
  LogInfo("deleted volume '" + name + "'" +
          (entry->rec.created_backing ? " and its backing file " + entry->rec.origin : ""));
  return Json::object();
}

// ---- storage.* ---------------------------------------------------------------

Status Daemon::MoveStorage(VolumeEntry& v, const std::string& dir, const MaxSize& max) {
  std::unique_lock hl(v.holder->mu);  // block I/O waits for the instant of the swap
  VolumeConfig nc = EngineConfig(v.rec);
  nc.shadow_dir = dir;
  nc.max_size = max;
  std::error_code ec;
  const bool existed = fs::exists(dir, ec);
  Status cs = v.holder->volume->Close();
  v.holder->volume.reset();
  Status result = cs;
  if (cs.ok()) {
    auto nv = Volume::Create(DefaultEnv(), nc);
    if (nv.ok()) {
      v.holder->volume = std::move(*nv);
      const std::string old = v.rec.storage;
      v.rec.storage = dir;
      Status s = SaveRegistryLocked();
      if (!s.ok()) {
        // Keep the registry and the store consistent: go back to the old one.
        v.rec.storage = old;
        v.holder->volume->Close().IgnoreError();
        v.holder->volume.reset();
        if (!existed) RemoveAll(dir);
        result = s.Annotate("saving the volume registry");
      } else {
        RemoveAll(old);
        LogInfo("moved shadow storage of volume '" + v.rec.name + "' from " + old + " to " + dir +
                " (maximum " + max.ToString() + ")");
        return Status::Ok();
      }
    } else {
      if (!existed) RemoveAll(dir);
      result = nv.status();
    }
  }
  // Reopen the old store (it has no snapshots; nothing is lost either way).
  auto ov = OpenEngine(v.rec);
  if (ov.ok()) {
    v.holder->volume = std::move(*ov);
  } else {
    v.unavailable = ov.status().message();
    LogError("volume '" + v.rec.name +
             "' could not be reopened after a failed storage move: " + ov.status().message());
  }
  return result;
}

Result<Json> Daemon::OpStorageAdd(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgString(args, "volume"));
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindOpenVolume(name));
  UMBRA_ASSIGN_OR_RETURN(std::string on, ArgString(args, "on"));
  UMBRA_RETURN_IF_ERROR(CheckAbsolute(on, "storage location"));
  UMBRA_ASSIGN_OR_RETURN(std::optional<MaxSize> max, ArgMaxSize(args, "max_size"));
  while (on.size() > 1 && on.back() == '/') on.pop_back();
  struct stat st;
  if (::stat(on.c_str(), &st) != 0) return Status::FromErrno(errno, "storage location " + on);
  if (!S_ISDIR(st.st_mode))
    return Status::InvalidArgument("storage location " + on + " is not a directory");
  // The engine recognises a directory on the origin itself; through the FUSE
  // export the filesystem sits on a loop device over our own file, which
  // only the daemon can recognise.
  const std::string backing = LoopBackingFileOf(st.st_dev);
  if (on.rfind(cfg_.fuse_dir + "/", 0) == 0 || on == cfg_.fuse_dir ||
      (!backing.empty() && backing == export_->PathOf("vol-" + name)))
    return Status::InvalidArgument("shadow storage location " + on + " is on the volume itself (" +
                                   v->rec.origin + "); choose a directory on another filesystem");
  const size_t snaps = v->holder->volume->ListSnapshots().size();
  if (snaps > 0)
    return Status::Busy("volume '" + name + "' has " + std::to_string(snaps) +
                        " snapshot(s); shadow storage can move only while it has none");
  const std::string dir = on + "/umbra-shadow-" + v->rec.uuid;
  const MaxSize m = max ? *max : v->holder->volume->GetStorageUsage().max_size;
  if (dir == v->rec.storage) {
    if (max) UMBRA_RETURN_IF_ERROR(v->holder->volume->SetMaxSize(*max));
    return StorageObject(*v);
  }
  UMBRA_RETURN_IF_ERROR(MoveStorage(*v, dir, m));
  return StorageObject(*v);
}

Result<Json> Daemon::OpStorageResize(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgString(args, "volume"));
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindOpenVolume(name));
  UMBRA_ASSIGN_OR_RETURN(std::optional<MaxSize> max, ArgMaxSize(args, "max_size"));
  if (!max) return Status::InvalidArgument("missing argument 'max_size'");
  UMBRA_RETURN_IF_ERROR(v->holder->volume->SetMaxSize(*max));
  LogInfo("shadow storage of volume '" + name + "' limited to " + max->ToString());
  return StorageObject(*v);
}

Result<Json> Daemon::OpStorageDelete(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgString(args, "volume"));
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindOpenVolume(name));
  const size_t snaps = v->holder->volume->ListSnapshots().size();
  if (snaps > 0)
    return Status::Busy("volume '" + name + "' has " + std::to_string(snaps) +
                        " snapshot(s); its shadow storage can be deleted only while it has none");
  const std::string dflt = DefaultStorage(v->rec.uuid);
  if (v->rec.storage == dflt) return Json::object();  // already the default
  UMBRA_RETURN_IF_ERROR(MoveStorage(*v, dflt, MaxSize::Percent(kDefaultStoragePercent)));
  return Json::object();
}

Result<Json> Daemon::OpStorageList(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgOptString(args, "volume"));
  Json out = Json::array();
  if (!name.empty()) {
    UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindOpenVolume(name));
    out.push_back(StorageObject(*v));
  } else {
    for (auto& [n, v] : volumes_)
      if (v->holder->volume) out.push_back(StorageObject(*v));
  }
  return Json{{"storage", out}};
}

// ---- snapshot.* --------------------------------------------------------------

Result<Json> Daemon::OpSnapshotCreate(const Json& args, const Peer& peer) {
  auto it = args.find("volumes");
  if (it == args.end() || !it->is_array() || it->empty())
    return Status::InvalidArgument("argument 'volumes' must be a non-empty list of volume names");
  UMBRA_ASSIGN_OR_RETURN(bool persistent, ArgBool(args, "persistent", false));
  UMBRA_ASSIGN_OR_RETURN(bool release, ArgBool(args, "release_on_disconnect", false));
  UMBRA_ASSIGN_OR_RETURN(std::string sname, ArgOptString(args, "name"));
  UMBRA_ASSIGN_OR_RETURN(bool use_writers, ArgBool(args, "writers", true));
  UMBRA_ASSIGN_OR_RETURN(std::string failure, ArgOptString(args, "writer_failure"));
  if (failure.empty()) failure = "abort";
  if (failure != "abort" && failure != "ignore")
    return Status::InvalidArgument("argument 'writer_failure' must be \"abort\" or \"ignore\"");
  if (persistent && release)
    return Status::InvalidArgument(
        "a persistent snapshot cannot be released on disconnect; choose one");
  std::vector<std::string> names;
  std::set<std::string> seen;
  for (const Json& n : *it) {
    if (!n.is_string())
      return Status::InvalidArgument("argument 'volumes' must contain volume names");
    names.push_back(n.get<std::string>());
    if (!seen.insert(names.back()).second)
      return Status::InvalidArgument("volume '" + names.back() + "' is named twice");
  }
  SnapshotOptions opts;
  opts.persistent = persistent;
  opts.name = sname;
  opts.set_id = NewUuid();

  writers::Request wreq;
  wreq.ctx.set_id = opts.set_id;
  wreq.ctx.volumes = names;
  wreq.ignore_failures = failure == "ignore";
  {
    std::lock_guard l(mu_);
    if (!started_) return Status(Code::kBusy, "umbrad is shutting down");
    std::set<dev_t> devs;
    for (const std::string& name : names) {
      UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindOpenVolume(name));
      struct stat st;
      if (v->live_loop.attached() && ::stat(v->live_loop.path().c_str(), &st) == 0)
        devs.insert(st.st_rdev);
    }
    // One mount point per filesystem on the set's devices (a bind mount
    // shares its filesystem's freeze).
    std::set<dev_t> taken;
    if (use_writers)
      for (const MountEntry& m : ListMounts())
        if (devs.count(m.dev) && taken.insert(m.dev).second) wreq.mounts.push_back(m.target);
  }

  Json result;
  auto commit = [&]() -> Status {
    std::lock_guard l(mu_);
    if (!started_) return Status(Code::kBusy, "umbrad is shutting down");
    auto r = CreateSetLocked(names, opts, release, peer);
    if (!r.ok()) return r.status();
    result = std::move(*r);
    return Status::Ok();
  };
  if (!use_writers) {
    UMBRA_RETURN_IF_ERROR(commit());
    std::lock_guard l(mu_);
    for (Json& s : result["snapshots"]) {
      writer_records_[s["id"].get<std::string>()] = WriterRecord{"none", {}};
      s["writers"] = "none";
    }
    Status saved = SaveWriterRecordsLocked();
    if (!saved.ok()) LogWarning("saving writer records: " + saved.message());
    result["writers"] = "none";
    result["writers_failed"] = Json::object();
    result["freeze_window_ms"] = 0;
    return result;
  }
  UMBRA_ASSIGN_OR_RETURN(writers::Outcome out, writers_->Run(wreq, commit));
  const std::string consistency = out.failed.empty() ? "consistent" : "inconsistent";
  Json failed = Json::object();
  for (const auto& [w, why] : out.failed) failed[w] = why;
  std::lock_guard l(mu_);
  for (Json& s : result["snapshots"]) {
    writer_records_[s["id"].get<std::string>()] = WriterRecord{consistency, out.failed};
    s["writers"] = consistency;
    s["writers_failed"] = failed;
  }
  Status saved = SaveWriterRecordsLocked();
  if (!saved.ok()) LogWarning("saving writer records: " + saved.message());
  complete_[peer.conn_id].insert(opts.set_id);
  result["writers"] = consistency;
  result["writers_failed"] = failed;
  result["writer_names"] = out.writers;
  result["freeze_window_ms"] = out.freeze_window_ms;
  result["writer_timeline"] = Json{{"window_start", out.window_start_ns},
                                   {"fs_frozen", out.fs_frozen_ns},
                                   {"committed", out.committed_ns},
                                   {"fs_thawed", out.fs_thawed_ns},
                                   {"window_end", out.window_end_ns}};
  if (!out.failed.empty()) {
    std::string list;
    for (const auto& [w, why] : out.failed)
      list += (list.empty() ? "" : ", ") + w + " (" + why + ")";
    LogWarning("snapshot set " + opts.set_id + " is not consistent for writers: " + list);
  }
  return result;
}

Result<Json> Daemon::CreateSetLocked(const std::vector<std::string>& names,
                                     const SnapshotOptions& opts, bool release, const Peer& peer) {
  std::vector<Volume*> vols;
  std::vector<VolumeEntry*> entries;
  for (const std::string& name : names) {
    UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindOpenVolume(name));
    vols.push_back(v->holder->volume.get());
    entries.push_back(v);
  }
  auto snaps = CreateSnapshotSet(vols, opts);
  if (!snaps.ok()) return snaps.status();
  Json list = Json::array();
  if (release)
    for (const SnapshotInfo& s : *snaps) release_[peer.conn_id].insert(s.id);
  std::string vnames;
  for (size_t i = 0; i < snaps->size(); ++i) {
    list.push_back(SnapshotObject(*entries[i], (*snaps)[i]));
    vnames += (i ? ", '" : "'") + entries[i]->rec.name + "'";
  }
  LogInfo("created " + std::string(opts.persistent ? "persistent " : "") + "snapshot set " +
          (*snaps)[0].set_id + " of " + vnames + (release ? " (released on disconnect)" : ""));
  return Json{{"id", (*snaps)[0].id}, {"set_id", (*snaps)[0].set_id}, {"snapshots", list}};
}

Result<Json> Daemon::OpSnapshotList(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgOptString(args, "volume"));
  Json out = Json::array();
  for (auto& [n, v] : volumes_) {
    if (!name.empty() && n != name) continue;
    if (!v->holder->volume) {
      if (!name.empty())
        return Status(Code::kIOError, "volume '" + n + "' is unavailable: " + v->unavailable);
      continue;
    }
    auto snaps = v->holder->volume->ListSnapshots();
    std::sort(snaps.begin(), snaps.end(),
              [](const SnapshotInfo& a, const SnapshotInfo& b) { return a.seq < b.seq; });
    for (const SnapshotInfo& s : snaps) out.push_back(SnapshotObject(*v, s));
  }
  if (!name.empty() && !volumes_.count(name)) return Status::NotFound("no volume '" + name + "'");
  return Json{{"snapshots", out}};
}

Status Daemon::DeleteSnapshotLocked(VolumeEntry& v, const std::string& id) {
  if (auto it = snap_attach_.find(id); it != snap_attach_.end())
    return Status::Busy("snapshot " + id + " is attached at " + it->second->loop.path() +
                        "; detach it first");
  if (auto it = snap_mounts_.find(id); it != snap_mounts_.end())
    return Status::Busy("snapshot " + id + " is mounted on " + it->second->dir +
                        "; unmount it first");
  UMBRA_RETURN_IF_ERROR(v.holder->volume->DeleteSnapshot(id));
  if (writer_records_.erase(id)) SaveWriterRecordsLocked().IgnoreError();
  for (auto& [conn, ids] : release_) ids.erase(id);
  LogInfo("deleted snapshot " + id + " of volume '" + v.rec.name + "'");
  return Status::Ok();
}

Result<Json> Daemon::OpSnapshotDelete(const Json& args, const Peer&) {
  Json deleted = Json::array();
  if (args.contains("id")) {
    UMBRA_ASSIGN_OR_RETURN(std::string id, ArgString(args, "id"));
    SnapshotInfo info;
    UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindSnapshot(id, &info));
    UMBRA_RETURN_IF_ERROR(DeleteSnapshotLocked(*v, id));
    deleted.push_back(id);
    return Json{{"deleted", deleted}};
  }
  UMBRA_ASSIGN_OR_RETURN(bool oldest, ArgBool(args, "oldest", false));
  UMBRA_ASSIGN_OR_RETURN(bool all, ArgBool(args, "all", false));
  if (oldest == all)
    return Status::InvalidArgument(
        "snapshot.delete needs 'id', or 'volume' with exactly one of 'oldest' or 'all'");
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgString(args, "volume"));
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindOpenVolume(name));
  auto snaps = v->holder->volume->ListSnapshots();
  std::sort(snaps.begin(), snaps.end(),
            [](const SnapshotInfo& a, const SnapshotInfo& b) { return a.seq < b.seq; });
  if (oldest) {
    if (snaps.empty()) return Status::NotFound("volume '" + name + "' has no snapshots");
    snaps.resize(1);
  }
  for (const SnapshotInfo& s : snaps) {  // refuse before changing anything
    if (snap_attach_.count(s.id) || snap_mounts_.count(s.id))
      return Status::Busy("snapshot " + s.id + " of volume '" + name +
                          "' is attached or mounted; detach or unmount it first");
  }
  for (const SnapshotInfo& s : snaps) {
    UMBRA_RETURN_IF_ERROR(DeleteSnapshotLocked(*v, s.id));
    deleted.push_back(s.id);
  }
  return Json{{"deleted", deleted}};
}

Result<Json> Daemon::OpSnapshotAttach(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string id, ArgString(args, "id"));
  SnapshotInfo info;
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindSnapshot(id, &info));
  if (auto it = snap_attach_.find(id); it != snap_attach_.end())
    return Status::AlreadyExists("snapshot " + id + " is already attached at " +
                                 it->second->loop.path());
  if (!info.valid) return InvalidatedError(id, info);
  auto a = std::make_unique<SnapshotAttachment>();
  a->volume = v->rec.name;
  a->file = "snap-" + id;
  a->dev = SnapshotDevice(v->holder.get(), v->rec.size, id);
  UMBRA_RETURN_IF_ERROR(export_->Add(a->file, a->dev.get(), 0400));
  auto loop = LoopDevice::Attach(export_->PathOf(a->file), /*read_only=*/true,
                                 /*direct_io=*/true, 4096, LoopDevice::Hold::kReleased);
  if (!loop.ok()) {
    if (!export_->Remove(a->file, kRemoveGrace).ok()) a.release();  // still open: keep device
    return loop.status().Annotate("attaching a loop device to snapshot " + id);
  }
  a->loop = std::move(*loop);
  const std::string path = a->loop.path();
  snap_attach_[id] = std::move(a);
  LogInfo("attached snapshot " + id + " of volume '" + v->rec.name + "' at " + path);
  return Json{{"device", path}};
}

Status Daemon::DetachSnapshotLocked(const std::string& id, bool force) {
  auto it = snap_attach_.find(id);
  if (it == snap_attach_.end())
    return Status::InvalidArgument("snapshot " + id + " is not attached");
  SnapshotAttachment& a = *it->second;
  if (a.loop.attached()) {
    const std::string dev = a.loop.path();
    if (!force && BlockDeviceInUse(dev))
      return Status::Busy("snapshot " + id + " is in use: " + dev +
                          " is mounted or held open; unmount it first");
    Status s = a.loop.Detach();
    if (!s.ok()) LogWarning("detaching " + dev + ": " + s.message());
    LogInfo("detached snapshot " + id + " from " + dev);
  }
  Status s = export_->Remove(a.file, kRemoveGrace);
  if (!s.ok() && s.code() != Code::kNotFound) {
    if (force) {
      // Shutting down: the FUSE unmount aborts whoever still has it open;
      // keep the device alive until then.
      it->second.release();
      snap_attach_.erase(it);
      return Status::Busy("export file " + a.file + " still open at shutdown");
    }
    return Status::Busy("snapshot " + id + " was detached but its export file is still open " +
                        "elsewhere; retry later");
  }
  snap_attach_.erase(it);
  return Status::Ok();
}

Result<Json> Daemon::OpSnapshotDetach(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string id, ArgString(args, "id"));
  UMBRA_RETURN_IF_ERROR(DetachSnapshotLocked(id, /*force=*/false));
  return Json::object();
}

Result<Json> Daemon::OpSnapshotMount(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string id, ArgString(args, "id"));
  UMBRA_ASSIGN_OR_RETURN(std::string dir, ArgString(args, "dir"));
  SnapshotInfo info;
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindSnapshot(id, &info));
  if (!info.valid) return InvalidatedError(id, info);
  return MountReadOnlyLocked(id, "snapshot " + id, v->rec.name,
                             SnapshotDevice(v->holder.get(), v->rec.size, id), dir);
}

// Mounts `base` read-only at `dir` through a throwaway overlay (journal
// replay writes go there), a FUSE file and a loop device. `key` names the
// mount in snap_mounts_ (a snapshot id, or "image-ID").
Result<Json> Daemon::MountReadOnlyLocked(const std::string& key, const std::string& what,
                                         const std::string& volume,
                                         std::unique_ptr<BlockDevice> base, std::string dir) {
  UMBRA_RETURN_IF_ERROR(CheckAbsolute(dir, "mount point"));
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  if (auto it = snap_mounts_.find(key); it != snap_mounts_.end())
    return Status::AlreadyExists(what + " is already mounted on " + it->second->dir);
  for (auto& [sid, m] : snap_mounts_)
    if (m->dir == dir) return Status::Busy(dir + " already has " + sid + " mounted");
  if (IsMountPoint(dir)) return Status::Busy(dir + " is already a mount point");

  auto m = std::make_unique<SnapshotMount>();
  m->volume = volume;
  m->dir = dir;
  m->file = "mnt-" + key;
  struct stat st;
  if (::stat(dir.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) return Status::InvalidArgument(dir + " is not a directory");
  } else {
    if (errno != ENOENT) return Status::FromErrno(errno, "mount point " + dir);
    if (::mkdir(dir.c_str(), 0755) != 0) return Status::FromErrno(errno, "create " + dir);
    m->created_dir = true;
  }
  auto undo_dir = [&] {
    if (m->created_dir) ::rmdir(dir.c_str());
  };
  auto overlay = MakeOverlayDevice(std::move(base), cfg_.state_dir + "/tmp");
  if (!overlay.ok()) {
    undo_dir();
    return overlay.status();
  }
  m->dev = std::move(*overlay);
  m->fstype = DetectFilesystem(m->dev.get(), "");
  if (m->fstype.empty()) {
    undo_dir();
    return Status::Unsupported(what + " holds no filesystem umbrad can mount (ext4, XFS or btrfs)");
  }
  if (Status s = export_->Add(m->file, m->dev.get(), 0600); !s.ok()) {
    undo_dir();
    return s;
  }
  auto loop = LoopDevice::Attach(export_->PathOf(m->file), /*read_only=*/false,
                                 /*direct_io=*/true, 4096, LoopDevice::Hold::kReleased);
  if (!loop.ok()) {
    if (!export_->Remove(m->file, kRemoveGrace).ok()) m.release();
    undo_dir();
    return loop.status().Annotate("attaching a loop device to " + what);
  }
  m->loop = std::move(*loop);
  // Read-only mount on a writable device: ext4 replays its journal and XFS
  // its log into the overlay; "nouuid" because the snapshot's XFS has the
  // same UUID as the live filesystem.
  const std::string data = m->fstype == "xfs" ? "nouuid" : "";
  if (::mount(m->loop.path().c_str(), dir.c_str(), m->fstype.c_str(),
              MS_RDONLY | MS_NODEV | MS_NOSUID, data.empty() ? nullptr : data.c_str()) != 0) {
    int e = errno;
    m->loop.Detach().IgnoreError();
    if (!export_->Remove(m->file, kRemoveGrace).ok()) m.release();
    undo_dir();
    return Status(e == EINVAL ? Code::kCorruption : Code::kIOError,
                  "mounting " + what + " (" + m->fstype + ") on " + dir +
                      " failed: " + std::strerror(e) + " (the kernel log says why)",
                  e);
  }
  const std::string dev = m->loop.path();
  const std::string fstype = m->fstype;
  snap_mounts_[key] = std::move(m);
  SaveMountPoints().IgnoreError();
  LogInfo("mounted " + what + (volume.empty() ? "" : " of volume '" + volume + "'") + " (" +
          fstype + ", " + dev + ") read-only on " + dir);
  return Json{{"dir", dir}, {"device", dev}, {"filesystem", fstype}};
}

Status Daemon::UnmountSnapshotLocked(const std::string& id, bool lazy) {
  auto it = snap_mounts_.find(id);
  if (it == snap_mounts_.end())
    return Status::NotFound((id.rfind(kImageMountPrefix, 0) == 0 ? "" : "snapshot ") + id +
                            " is not mounted");
  SnapshotMount& m = *it->second;
  bool done = false;
  for (int i = 0; i < 10 && !done; ++i) {
    if (::umount2(m.dir.c_str(), 0) == 0 || errno == EINVAL || errno == ENOENT) {
      done = true;
      break;
    }
    if (errno != EBUSY) break;
    std::this_thread::sleep_for(100ms);
  }
  if (!done) {
    if (!lazy) return Status::Busy(m.dir + " is busy (a process is using it); close it and retry");
    ::umount2(m.dir.c_str(), MNT_DETACH);
    LogWarning(m.dir + " was busy; unmounted it lazily");
  }
  Status s = m.loop.Detach();
  if (!s.ok()) LogWarning("detaching " + m.loop.path() + ": " + s.message());
  if (Status r = export_->Remove(m.file, kRemoveGrace); !r.ok() && r.code() != Code::kNotFound) {
    LogWarning("export file " + m.file + " still open: " + r.message());
    it->second.release();  // the FUSE mount may still read it; never free it under a reader
  }
  if (it->second && it->second->created_dir) ::rmdir(it->second->dir.c_str());
  LogInfo("unmounted " + id + " from " + (it->second ? it->second->dir : ""));
  snap_mounts_.erase(it);
  SaveMountPoints().IgnoreError();
  return Status::Ok();
}

Result<Json> Daemon::OpSnapshotUnmount(const Json& args, const Peer&) {
  std::string id;
  if (args.contains("id")) {
    UMBRA_ASSIGN_OR_RETURN(id, ArgString(args, "id"));
  } else {
    UMBRA_ASSIGN_OR_RETURN(std::string dir, ArgString(args, "dir"));
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    for (auto& [sid, m] : snap_mounts_)
      if (m->dir == dir) id = sid;
    if (id.empty()) return Status::NotFound("no snapshot is mounted on " + dir);
  }
  UMBRA_RETURN_IF_ERROR(UnmountSnapshotLocked(id, /*lazy=*/false));
  return Json::object();
}

Result<Json> Daemon::OpVolumeExport(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string name, ArgString(args, "name"));
  UMBRA_RETURN_IF_ERROR(FindOpenVolume(name).status());
  return NbdUri(name);
}

Result<Json> Daemon::OpSnapshotExport(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string id, ArgString(args, "id"));
  SnapshotInfo info;
  UMBRA_RETURN_IF_ERROR(FindSnapshot(id, &info).status());
  if (!info.valid) return InvalidatedError(id, info);
  return NbdUri(kNbdSnapshotPrefix + id);
}

Result<Json> Daemon::OpSnapshotRevert(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string id, ArgString(args, "id"));
  SnapshotInfo info;
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindSnapshot(id, &info));
  if (v->live_loop.attached() || v->live_dev)
    return Status::Busy("volume '" + v->rec.name + "' is attached" +
                        (v->live_loop.attached() ? " at " + v->live_loop.path() : "") +
                        "; unmount and detach it before reverting");
  if (v->nbd_clients > 0)
    return Status::Busy("volume '" + v->rec.name + "' is in use by " +
                        std::to_string(v->nbd_clients) + " NBD client(s); disconnect them first");
  if (!info.valid) return InvalidatedError(id, info, "; it cannot be reverted to");
  Volume* vol = v->holder->volume.get();
  UMBRA_ASSIGN_OR_RETURN(std::vector<Extent> extents, vol->SnapshotExtents(id));
  const uint64_t size = vol->size();
  constexpr size_t kBuf = 1 << 20;
  std::unique_ptr<std::byte, AlignedFree> buf(
      static_cast<std::byte*>(std::aligned_alloc(4096, kBuf)));
  if (!buf) return Status::NoSpace("out of memory for the revert buffer");
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t pos = 0, copied = 0;
  auto fail = [&](const Status& s) {
    LogError("revert of volume '" + v->rec.name + "' to snapshot " + id +
             " stopped part-way: " + s.message());
    return s.Annotate("revert stopped part-way (the volume is partly reverted; retry it)");
  };
  for (const Extent& e : extents) {
    const uint64_t start = std::min(e.offset, size);
    const uint64_t end = std::min(e.offset + e.length, size);
    if (start > pos) {
      Status s = vol->Discard(pos, start - pos);
      if (!s.ok()) return fail(s);
    }
    for (uint64_t off = start; off < end; off += kBuf) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(kBuf, end - off));
      std::span<std::byte> b(buf.get(), n);
      Status s = vol->ReadSnapshot(id, off, b);
      if (s.ok()) s = vol->Write(off, b);
      if (!s.ok()) return fail(s);
      copied += n;
    }
    pos = std::max(pos, end);
  }
  if (pos < size) {
    Status s = vol->Discard(pos, size - pos);
    if (!s.ok()) return fail(s);
  }
  if (Status s = vol->Flush(); !s.ok()) return fail(s);
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)
          .count();
  LogInfo("reverted volume '" + v->rec.name + "' to snapshot " + id + " (" + FormatBytes(copied) +
          " written in " + std::to_string(ms) + " ms)");
  return Json::object();
}

void Daemon::OnDisconnect(uint64_t conn_id) {
  // Backup-complete for the sets this requester made (outside mu_: it waits
  // for the library writers' answers).
  std::set<std::string> sets;
  {
    std::lock_guard l(mu_);
    if (auto c = complete_.find(conn_id); c != complete_.end()) {
      sets = std::move(c->second);
      complete_.erase(c);
    }
  }
  for (const std::string& set : sets) writers_->Complete(set);
  std::lock_guard l(mu_);
  auto it = release_.find(conn_id);
  if (it == release_.end()) return;
  std::set<std::string> ids = std::move(it->second);
  release_.erase(it);
  if (!started_) return;  // shutting down: Close() drops non-persistent snapshots
  for (const std::string& id : ids) {
    auto v = FindSnapshot(id, nullptr);
    if (!v.ok()) continue;  // deleted already
    if (snap_mounts_.count(id)) UnmountSnapshotLocked(id, /*lazy=*/true).IgnoreError();
    if (snap_attach_.count(id)) {
      Status s = DetachSnapshotLocked(id, /*force=*/true);
      if (!s.ok()) LogWarning(s.message());
    }
    Status s = DeleteSnapshotLocked(**v, id);
    if (!s.ok())
      LogWarning("releasing snapshot " + id + " on disconnect: " + s.message());
    else
      LogInfo("released snapshot " + id + " (its requester disconnected)");
  }
}

// ---- image.* (images of a repository, docs/format/repository.md) ------------

Result<std::shared_ptr<Daemon::OpenImage>> Daemon::OpenImageArgs(const Json& args) {
  UMBRA_ASSIGN_OR_RETURN(std::string dir, ArgString(args, "repo"));
  UMBRA_ASSIGN_OR_RETURN(std::string id, ArgString(args, "id"));
  UMBRA_ASSIGN_OR_RETURN(std::string pass, ArgOptString(args, "passphrase"));
  UMBRA_RETURN_IF_ERROR(CheckAbsolute(dir, "repository"));
  UMBRA_ASSIGN_OR_RETURN(auto store, repo::OpenDirStore(dir, false));
  UMBRA_ASSIGN_OR_RETURN(auto r, repo::Repository::Open(std::move(store), pass));
  UMBRA_ASSIGN_OR_RETURN(std::string full, r->ResolveImage(id));
  UMBRA_ASSIGN_OR_RETURN(repo::Manifest m, r->GetManifest(full));
  auto img = std::make_shared<OpenImage>();
  img->repo_dir = dir;
  img->repo = std::move(r);
  img->manifest = std::move(m);
  return img;
}

Result<Json> Daemon::OpImageExport(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(auto img, OpenImageArgs(args));
  const std::string id = img->manifest.id;
  images_[id] = img;
  LogInfo("exporting image " + id + " of " + img->manifest.volume + " from " + img->repo_dir +
          " over NBD");
  Json j = NbdUri(kNbdImagePrefix + id);
  j["image"] = id;
  return j;
}

Result<Json> Daemon::OpImageUnexport(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string id, ArgString(args, "id"));
  std::string full;
  for (auto& [iid, img] : images_)
    if (iid.rfind(id, 0) == 0) full = iid;
  if (full.empty()) return Status::NotFound("image " + id + " is not exported");
  images_.erase(full);  // open NBD connections keep their image until they close
  return Json{{"image", full}};
}

Result<Json> Daemon::OpImageMount(const Json& args, const Peer&) {
  UMBRA_ASSIGN_OR_RETURN(std::string dir, ArgString(args, "dir"));
  UMBRA_ASSIGN_OR_RETURN(auto img, OpenImageArgs(args));
  const std::string id = img->manifest.id;
  auto r = MountReadOnlyLocked(kImageMountPrefix + id, "image " + id, "",
                               imaging::ImageDevice(img->repo, img->manifest), dir);
  if (r.ok()) (*r)["image"] = id;
  return r;
}

Result<Json> Daemon::OpImageUnmount(const Json& args, const Peer&) {
  std::string key;
  if (args.contains("id")) {
    UMBRA_ASSIGN_OR_RETURN(std::string id, ArgString(args, "id"));
    for (auto& [k, m] : snap_mounts_)
      if (k.rfind(kImageMountPrefix + id, 0) == 0) key = k;
    if (key.empty()) return Status::NotFound("image " + id + " is not mounted");
  } else {
    UMBRA_ASSIGN_OR_RETURN(std::string dir, ArgString(args, "dir"));
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    for (auto& [k, m] : snap_mounts_)
      if (m->dir == dir && k.rfind(kImageMountPrefix, 0) == 0) key = k;
    if (key.empty()) return Status::NotFound("no image is mounted on " + dir);
  }
  UMBRA_RETURN_IF_ERROR(UnmountSnapshotLocked(key, /*lazy=*/false));
  return Json::object();
}

}  // namespace umbra::daemon
