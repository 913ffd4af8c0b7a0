// Daemon's NBD exports and the NBD connection handler (see nbd_exports.h).
#include "daemon/nbd_exports.h"

#include <algorithm>
#include <mutex>
#include <shared_mutex>

#include "daemon/log.h"
#include "umbra/imaging.h"

namespace umbra::daemon {

namespace {

// Runs of holes and data covering [off, off+len), from allocated extents
// sorted by offset (at most kMaxRuns; the client asks again for the rest).
constexpr size_t kMaxRuns = 1024;
void RunsFrom(const std::vector<Extent>& allocated, uint64_t off, uint64_t len,
              std::vector<nbd::AllocationRun>* out) {
  const uint64_t end = off + len;
  // First extent that ends after `off`.
  auto it = std::upper_bound(allocated.begin(), allocated.end(), off,
                             [](uint64_t o, const Extent& e) { return o < e.offset + e.length; });
  uint64_t pos = off;
  while (pos < end && out->size() < kMaxRuns) {
    if (it == allocated.end() || pos < it->offset) {
      const uint64_t stop = it == allocated.end() ? end : std::min(end, it->offset);
      out->push_back({stop - pos, true});
      pos = stop;
    } else {
      const uint64_t stop = std::min(end, it->offset + it->length);
      out->push_back({stop - pos, false});
      pos = stop;
      ++it;
    }
  }
}

}  // namespace

// The live volume, read-write through the engine (copy-on-write protects
// its snapshots). base:allocation: chunks free in the engine's free map
// (discarded, or never written on a volume umbrad created) are holes, asked
// for each request's range (the live volume changes).
class Daemon::NbdVolumeExport final : public nbd::Export {
 public:
  NbdVolumeExport(Daemon* d, std::string volume, VolumeHolder* holder,
                  std::unique_ptr<BlockDevice> dev)
      : d_(d), volume_(std::move(volume)), holder_(holder), dev_(std::move(dev)) {}
  ~NbdVolumeExport() override { d_->NbdRelease(volume_); }
  BlockDevice& device() override { return *dev_; }
  std::string description() const override { return "Umbra volume " + volume_ + " (live)"; }
  Status Allocation(uint64_t off, uint64_t len, std::vector<nbd::AllocationRun>* out) override {
    std::shared_lock l(holder_->mu);
    if (!holder_->volume) return Status(Code::kIOError, "volume is closed", EIO);
    UMBRA_ASSIGN_OR_RETURN(std::vector<Extent> allocated, holder_->volume->LiveExtents(off, len));
    RunsFrom(allocated, off, len, out);
    return Status::Ok();
  }

 private:
  Daemon* const d_;
  const std::string volume_;
  VolumeHolder* const holder_;  // outlives us: the volume cannot go while nbd_clients > 0
  const std::unique_ptr<BlockDevice> dev_;
};

// A snapshot, read-only. base:allocation comes from the snapshot's
// allocated extents (chunks not free at the instant), read at the first
// block-status request (readers that never ask, like image create's
// workers, do not pay for it) and kept: a snapshot never changes.
class Daemon::NbdSnapshotExport final : public nbd::Export {
 public:
  NbdSnapshotExport(Daemon* d, std::string volume, std::string id, VolumeHolder* holder,
                    std::unique_ptr<BlockDevice> dev)
      : d_(d), volume_(std::move(volume)), id_(std::move(id)), holder_(holder), dev_(std::move(dev)) {}
  ~NbdSnapshotExport() override { d_->NbdRelease(volume_); }
  BlockDevice& device() override { return *dev_; }
  std::string description() const override {
    return "Umbra snapshot " + id_ + " of volume " + volume_ + " (read-only)";
  }
  Status Allocation(uint64_t off, uint64_t len, std::vector<nbd::AllocationRun>* out) override {
    std::lock_guard l(mu_);
    if (!loaded_) {
      std::shared_lock h(holder_->mu);
      if (!holder_->volume) return Status(Code::kIOError, "volume is closed", EIO);
      UMBRA_ASSIGN_OR_RETURN(allocated_, holder_->volume->SnapshotExtents(id_));
      loaded_ = true;
    }
    RunsFrom(allocated_, off, len, out);
    return Status::Ok();
  }

 private:
  Daemon* const d_;
  const std::string volume_;
  const std::string id_;
  VolumeHolder* const holder_;  // outlives us: the volume cannot go while nbd_clients > 0
  const std::unique_ptr<BlockDevice> dev_;
  std::mutex mu_;
  bool loaded_ = false;
  std::vector<Extent> allocated_;
};

// An image of a repository, read-only, served straight from its chunks.
// base:allocation: zero chunks are holes.
class Daemon::NbdImageExport final : public nbd::Export {
 public:
  explicit NbdImageExport(std::shared_ptr<OpenImage> img)
      : img_(std::move(img)), dev_(imaging::ImageDevice(img_->repo, img_->manifest)) {
    for (const imaging::Range& r : imaging::ImageAllocated(img_->manifest))
      allocated_.push_back({r.offset, r.length});
  }
  BlockDevice& device() override { return *dev_; }
  std::string description() const override {
    return "Umbra image " + img_->manifest.id + " of " + img_->manifest.volume + " (read-only)";
  }
  Status Allocation(uint64_t off, uint64_t len, std::vector<nbd::AllocationRun>* out) override {
    RunsFrom(allocated_, off, len, out);
    return Status::Ok();
  }

 private:
  const std::shared_ptr<OpenImage> img_;
  const std::unique_ptr<BlockDevice> dev_;
  std::vector<Extent> allocated_;
};

std::vector<nbd::ExportProvider::Listed> Daemon::NbdList() {
  std::lock_guard l(mu_);
  std::vector<nbd::ExportProvider::Listed> out;
  for (auto& [name, v] : volumes_) {
    if (!v->holder->volume) continue;
    out.push_back({name, "Umbra volume " + name + " (live)"});
    for (const SnapshotInfo& s : v->holder->volume->ListSnapshots())
      out.push_back({kNbdSnapshotPrefix + s.id, "Umbra snapshot " + s.id + " of volume " + name +
                                                    (s.valid ? "" : " (invalidated)")});
  }
  for (auto& [id, img] : images_)
    out.push_back({kNbdImagePrefix + id,
                   "Umbra image " + id + " of " + img->manifest.volume + " (read-only)"});
  return out;
}

Result<std::unique_ptr<nbd::Export>> Daemon::NbdOpen(const std::string& name) {
  std::lock_guard l(mu_);
  if (!started_) return Status::Busy("umbrad is shutting down");
  if (name.rfind(kNbdSnapshotPrefix, 0) == 0) {
    const std::string id = name.substr(std::char_traits<char>::length(kNbdSnapshotPrefix));
    SnapshotInfo info;
    UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindSnapshot(id, &info));
    ++v->nbd_clients;
    return std::unique_ptr<nbd::Export>(std::make_unique<NbdSnapshotExport>(
        this, v->rec.name, id, v->holder.get(), SnapshotDevice(v->holder.get(), v->rec.size, id)));
  }
  if (name.rfind(kNbdImagePrefix, 0) == 0) {
    auto it = images_.find(name.substr(std::char_traits<char>::length(kNbdImagePrefix)));
    if (it == images_.end())
      return Status::NotFound("no exported image " + name +
                              " (export it first: umbra image export ID --repo DIR)");
    return std::unique_ptr<nbd::Export>(std::make_unique<NbdImageExport>(it->second));
  }
  UMBRA_ASSIGN_OR_RETURN(VolumeEntry * v, FindOpenVolume(name));
  ++v->nbd_clients;
  return std::unique_ptr<nbd::Export>(std::make_unique<NbdVolumeExport>(
      this, name, v->holder.get(), VolumeDevice(v->holder.get(), v->rec.size)));
}

void Daemon::NbdRelease(const std::string& volume) {
  std::lock_guard l(mu_);
  auto it = volumes_.find(volume);
  if (it != volumes_.end() && it->second->nbd_clients > 0) --it->second->nbd_clients;
}

Json Daemon::NbdUri(const std::string& export_name) const {
  Json j{{"export", export_name},
         {"socket", cfg_.nbd_socket},
         {"uri", "nbd+unix:///" + export_name + "?socket=" + cfg_.nbd_socket},
         {"tcp_uri", nullptr}};
  if (!cfg_.nbd_tcp.empty()) j["tcp_uri"] = "nbd://" + cfg_.nbd_tcp + "/" + export_name;
  return j;
}

namespace {

class Provider final : public nbd::ExportProvider {
 public:
  explicit Provider(Daemon* d) : d_(d) {}
  std::vector<Listed> List() override { return d_->NbdList(); }
  Result<std::unique_ptr<nbd::Export>> Open(const std::string& name) override {
    return d_->NbdOpen(name);
  }

 private:
  Daemon* const d_;
};

}  // namespace

Server::Handler NbdHandler(Daemon* daemon) {
  return [daemon](int fd, const Peer& peer) {
    const std::string who = "NBD connection " + std::to_string(peer.conn_id) + " (uid " +
                            std::to_string(peer.uid) + ")";
    if (!peer.allowed) {
      LogWarning(who + " refused: only root and admin_group may use umbrad");
      return;
    }
    Provider provider(daemon);
    nbd::FdChannel ch(fd);
    const std::string why = nbd::Serve(ch, provider);
    if (why.rfind("client disconnected", 0) != 0 && why != "client aborted the handshake")
      LogWarning(who + " closed: " + why);
  };
}

}  // namespace umbra::daemon
