// Atomic snapshot sets across volumes, and their reconciliation after a crash.
#include <algorithm>
#include <map>

#include "base/random.h"
#include "engine/volume_impl.h"

namespace umbra {

using engine::VolumeImpl;

Result<std::vector<SnapshotInfo>> CreateSnapshotSet(std::span<Volume* const> volumes,
                                                    const SnapshotOptions& opts) {
  if (volumes.empty()) return Status::InvalidArgument("a snapshot set needs at least one volume");
  std::vector<VolumeImpl*> vols;
  for (Volume* v : volumes) {
    auto* impl = dynamic_cast<VolumeImpl*>(v);
    if (impl == nullptr) return Status::InvalidArgument("not an engine volume");
    vols.push_back(impl);
  }
  // Lock in a global order (address) so concurrent sets cannot deadlock.
  std::vector<VolumeImpl*> order = vols;
  std::sort(order.begin(), order.end());
  if (std::adjacent_find(order.begin(), order.end()) != order.end())
    return Status::InvalidArgument("a volume appears twice in the snapshot set");

  Uuid set_uuid{};
  if (!ParseUuid(opts.set_id.empty() ? NewUuid() : opts.set_id, set_uuid))
    return Status::InvalidArgument("snapshot set id '" + opts.set_id + "' is not a UUID");
  std::vector<std::unique_lock<std::mutex>> admin;
  for (auto* v : order) admin.emplace_back(v->admin_mu());
  for (auto* v : order) UMBRA_RETURN_IF_ERROR(v->PrepareInstant(opts.persistent));

  std::vector<SnapshotInfo> infos(vols.size());
  std::vector<uint64_t> lsns(vols.size(), 0);
  Status failed;
  size_t created = 0;
  {
    // The instant: writes to every member are held off together.
    std::vector<std::unique_lock<RwLock>> gates;
    for (auto* v : order) gates.emplace_back(v->gate());
    for (size_t i = 0; i < vols.size(); ++i) {
      auto r = vols[i]->AddSnapshotLocked(opts, set_uuid, static_cast<uint32_t>(vols.size()),
                                          &lsns[i]);
      if (!r.ok()) {
        failed = r.status();
        break;
      }
      infos[i] = std::move(r).value();
      ++created;
    }
  }
  if (failed.ok() && opts.persistent) {
    for (size_t i = 0; i < vols.size() && failed.ok(); ++i) {
      Status s = vols[i]->SyncJournal(lsns[i]);
      if (!s.ok()) failed = s.Annotate("recording the snapshot in shadow storage");
    }
  }
  if (!failed.ok()) {
    for (size_t i = 0; i < created; ++i) vols[i]->DeleteSnapshotLocked(infos[i].id).IgnoreError();
    return failed;
  }
  return infos;
}

Result<uint32_t> ReconcileSnapshotSets(std::span<Volume* const> volumes) {
  struct Member {
    Volume* vol;
    std::string id;
    uint32_t set_size;
  };
  std::map<std::string, std::vector<Member>> sets;
  for (Volume* v : volumes)
    for (const auto& s : v->ListSnapshots()) sets[s.set_id].push_back({v, s.id, s.set_size});
  uint32_t deleted = 0;
  for (auto& [set_id, members] : sets) {
    if (members.size() >= members.front().set_size) continue;
    for (auto& m : members) {
      UMBRA_RETURN_IF_ERROR(m.vol->DeleteSnapshot(m.id));
      ++deleted;
    }
  }
  return deleted;
}

}  // namespace umbra
