// Daemon: the state umbrad serves (volumes, snapshots, attachments, mounts)
// and the handlers of every control-protocol operation
// (docs/protocol/control.md).
//
// Threading: connection threads call Handle() concurrently; every operation
// runs under one admin mutex (operations are rare and short; the slow ones,
// revert and mount, block other admin operations but never block I/O). Block
// I/O never takes that mutex: FUSE serving threads go straight to the
// devices, which take only their VolumeHolder's shared_mutex.
//
// Ownership: for each attachment the daemon owns the BlockDevice, the FUSE
// file that serves it and the loop device on that file; they are torn down
// in the reverse order (loop, file, device).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "control/protocol.h"
#include "daemon/config.h"
#include "daemon/devices.h"
#include "daemon/registry.h"
#include "frontend/fuse/fuse_export.h"
#include "frontend/loop_device.h"
#include "frontend/nbd/nbd_server.h"
#include "umbra/repo.h"
#include "writers/writers.h"

namespace umbra::daemon {

using control::Json;

// NBD export names of snapshots are this prefix + the snapshot id.
inline constexpr const char* kNbdSnapshotPrefix = "snap-";
// NBD export names of images, and the keys of image mounts: prefix + image id.
inline constexpr const char* kImageMountPrefix = "image-";
inline constexpr const char* kNbdImagePrefix = "image-";

// Who is on the other end of a connection.
struct Peer {
  uint64_t conn_id = 0;
  uid_t uid = 0;
  bool allowed = false;  // root or a member of admin_group
};

class Daemon {
 public:
  explicit Daemon(Config cfg);
  ~Daemon();
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Creates the state directories, cleans up after a crash (dead FUSE
  // mount, loop devices and snapshot mounts it left), opens every registered
  // volume, reconciles snapshot sets and mounts the FUSE export.
  Status Start();
  // Unmounts the snapshot mounts it made, detaches its loop devices,
  // unmounts FUSE and closes every volume. Idempotent.
  void Stop();

  // Answers one request (a parsed frame). Never throws.
  Json Handle(const Json& request, const Peer& peer);
  // The connection `conn_id` closed: deletes its release_on_disconnect
  // snapshots.
  void OnDisconnect(uint64_t conn_id);
  // The connection `fd` sent writer.register: answers it and serves the
  // connection as a library writer until it closes (daemon/writer_ops.cc).
  void ServeWriter(int fd, const Json& request, const Peer& peer);

  const Config& config() const { return cfg_; }

  // NBD exports (daemon/nbd_exports.cc, docs/protocol/nbd.md): every open
  // volume by name (read-write) and every snapshot as "snap-ID" (read-only).
  // An open export keeps its volume from being deleted or reverted.
  std::vector<nbd::ExportProvider::Listed> NbdList();
  Result<std::unique_ptr<nbd::Export>> NbdOpen(const std::string& name);

 private:
  struct VolumeEntry {
    VolumeRecord rec;
    std::unique_ptr<VolumeHolder> holder = std::make_unique<VolumeHolder>();
    std::string unavailable;  // why the volume could not be opened ("" if open)
    std::unique_ptr<BlockDevice> live_dev;
    LoopDevice live_loop;  // attached when live_loop.attached()
    int nbd_clients = 0;   // open NBD exports of this volume or its snapshots
  };
  struct SnapshotAttachment {
    std::string volume;
    std::string file;  // name on the FUSE mount
    std::unique_ptr<BlockDevice> dev;
    LoopDevice loop;
  };
  struct SnapshotMount {
    std::string volume;
    std::string dir;
    bool created_dir = false;
    std::string file;
    std::string fstype;
    std::unique_ptr<BlockDevice> dev;  // overlay over the snapshot
    LoopDevice loop;
  };

  Result<Json> MountReadOnlyLocked(const std::string& key, const std::string& what,
                                   const std::string& volume, std::unique_ptr<BlockDevice> base,
                                   std::string dir);

  using Handler = Result<Json> (Daemon::*)(const Json& args, const Peer& peer);
  Result<Json> Dispatch(const std::string& op, const Json& args, const Peer& peer);

  Result<Json> OpHello(const Json& args, const Peer& peer);
  Result<Json> OpStatus(const Json& args, const Peer& peer);
  Result<Json> OpVolumeCreate(const Json& args, const Peer& peer);
  Result<Json> OpVolumeAdopt(const Json& args, const Peer& peer);
  Result<Json> OpVolumeAttach(const Json& args, const Peer& peer);
  Result<Json> OpVolumeDetach(const Json& args, const Peer& peer);
  Result<Json> OpVolumeList(const Json& args, const Peer& peer);
  Result<Json> OpVolumeDelete(const Json& args, const Peer& peer);
  Result<Json> OpVolumeChanges(const Json& args, const Peer& peer);
  Result<Json> OpStorageAdd(const Json& args, const Peer& peer);
  Result<Json> OpStorageResize(const Json& args, const Peer& peer);
  Result<Json> OpStorageDelete(const Json& args, const Peer& peer);
  Result<Json> OpStorageList(const Json& args, const Peer& peer);
  Result<Json> OpSnapshotCreate(const Json& args, const Peer& peer);
  Result<Json> OpSnapshotList(const Json& args, const Peer& peer);
  Result<Json> OpSnapshotDelete(const Json& args, const Peer& peer);
  Result<Json> OpSnapshotAttach(const Json& args, const Peer& peer);
  Result<Json> OpSnapshotDetach(const Json& args, const Peer& peer);
  Result<Json> OpSnapshotMount(const Json& args, const Peer& peer);
  Result<Json> OpSnapshotUnmount(const Json& args, const Peer& peer);
  Result<Json> OpSnapshotRevert(const Json& args, const Peer& peer);
  Result<Json> OpProviderList(const Json& args, const Peer& peer);
  Result<Json> OpVolumeExport(const Json& args, const Peer& peer);
  Result<Json> OpSnapshotExport(const Json& args, const Peer& peer);
  Result<Json> OpImageExport(const Json& args, const Peer& peer);
  Result<Json> OpImageUnexport(const Json& args, const Peer& peer);
  Result<Json> OpImageMount(const Json& args, const Peer& peer);
  Result<Json> OpImageUnmount(const Json& args, const Peer& peer);
  // These three take mu_ themselves (the writer sequence runs without it).
  Result<Json> OpSnapshotComplete(const Json& args, const Peer& peer);
  Result<Json> OpWriterList(const Json& args, const Peer& peer);
  // The commit step of snapshot.create (mu_ held): makes the set.
  Result<Json> CreateSetLocked(const std::vector<std::string>& names, const SnapshotOptions& opts,
                               bool release, const Peer& peer);
  Json NbdUri(const std::string& export_name) const;
  void NbdRelease(const std::string& volume);
  class NbdVolumeExport;
  class NbdSnapshotExport;

  // Helpers; all need mu_.
  Result<VolumeEntry*> FindVolume(const std::string& name);
  Result<VolumeEntry*> FindOpenVolume(const std::string& name);
  // The volume holding snapshot `id`.
  Result<VolumeEntry*> FindSnapshot(const std::string& id, SnapshotInfo* info);
  Json VolumeObject(VolumeEntry& v);
  Json StorageObject(VolumeEntry& v);
  Json SnapshotObject(const VolumeEntry& v, const SnapshotInfo& s);
  Status SaveRegistryLocked();
  VolumeConfig EngineConfig(const VolumeRecord& rec) const;
  Result<std::unique_ptr<Volume>> OpenEngine(const VolumeRecord& rec) const;
  Result<Json> AddVolume(VolumeRecord rec, const std::string& created_file);
  // Moves shadow storage of `v` to `dir` (no snapshots allowed).
  Status MoveStorage(VolumeEntry& v, const std::string& dir, const MaxSize& max);
  Status DeleteSnapshotLocked(VolumeEntry& v, const std::string& id);
  Status DetachSnapshotLocked(const std::string& id, bool force);
  Status UnmountSnapshotLocked(const std::string& id, bool lazy);
  Status DetachVolumeLocked(VolumeEntry& v, bool force);
  Status SaveMountPoints();
  void Reconcile();
  std::string DefaultStorage(const std::string& uuid) const;

  const Config cfg_;
  std::mutex mu_;
  bool started_ = false;
  std::map<std::string, std::unique_ptr<VolumeEntry>> volumes_;             // by name
  std::map<std::string, std::unique_ptr<SnapshotAttachment>> snap_attach_;  // by id
  // An image of a repository, opened for export or mount.
  struct OpenImage {
    std::string repo_dir;
    std::shared_ptr<repo::Repository> repo;
    repo::Manifest manifest;
  };
  Result<std::shared_ptr<OpenImage>> OpenImageArgs(const Json& args);
  std::map<std::string, std::shared_ptr<OpenImage>> images_;  // exported, by image id
  class NbdImageExport;
  std::map<std::string, std::unique_ptr<SnapshotMount>> snap_mounts_;  // by id
  std::map<uint64_t, std::set<std::string>> release_;                  // conn -> snapshot ids
  std::unique_ptr<FuseExport> export_;

  // Writers (docs/writers.md). The coordinator and the library writers have
  // their own locks; a snapshot.create with writers holds mu_ only to look
  // up its volumes and to commit.
  std::unique_ptr<writers::Coordinator> writers_;
  class LibraryWriter;
  std::mutex lib_mu_;
  std::map<std::string, std::shared_ptr<LibraryWriter>> lib_writers_;  // guarded by lib_mu_
  // Per snapshot id: "consistent" or "inconsistent" and the writers that
  // failed, kept in STATE_DIR/writers.json. Guarded by mu_.
  struct WriterRecord {
    std::string consistency;
    std::map<std::string, std::string> failed;
  };
  std::map<std::string, WriterRecord> writer_records_;
  void LoadWriterRecordsLocked();
  Status SaveWriterRecordsLocked();
  std::map<uint64_t, std::set<std::string>> complete_;  // conn -> set ids; guarded by mu_
  int lock_fd_ = -1;
};

}  // namespace umbra::daemon
