// Writers in umbrad: library writers on control connections, writer.list,
// snapshot.complete and the per-snapshot writer records (docs/writers.md,
// docs/protocol/control.md "Writers").
#include <sys/socket.h>

#include <condition_variable>
#include <fstream>
#include <sstream>

#include "daemon/daemon.h"
#include "daemon/log.h"

namespace umbra::daemon {

// A writer registered over a control connection. The connection's thread
// reads its answers (ServeWriter); Deliver() runs on the requester's thread,
// sends the event and waits for the answer with the same sequence number.
class Daemon::LibraryWriter final : public writers::Writer {
 public:
  LibraryWriter(int fd, std::string name, std::vector<std::string> volumes)
      : fd_(fd), name_(std::move(name)), volumes_(std::move(volumes)) {}

  std::string name() const override { return name_; }
  std::string kind() const override { return "library"; }
  bool Cares(const std::vector<std::string>& vols) const override {
    if (volumes_.empty()) return true;
    for (const std::string& v : vols)
      for (const std::string& mine : volumes_)
        if (v == mine) return true;
    return false;
  }

  Status Deliver(writers::Event e, const writers::EventContext& ctx,
                 writers::Clock::time_point deadline) override {
    const char* event = writers::EventName(e);
    std::unique_lock l(mu_);
    if (!connected_) return Status(Code::kIOError, "it disconnected");
    const int64_t seq = ++seq_;
    replies_.clear();  // late answers to earlier events
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - writers::Clock::now());
    Json vols = Json::array();
    for (const std::string& v : ctx.volumes) vols.push_back(v);
    Json msg = {{"event", event},
                {"seq", seq},
                {"set_id", ctx.set_id},
                {"volumes", vols},
                {"snapshot_id", ctx.snapshot_id},
                {"deadline_ms", std::max<int64_t>(0, left.count())}};
    Status w = control::WriteFrame(fd_, msg);
    if (!w.ok())
      return Status(Code::kIOError, std::string("sending ") + event + ": " + w.message());
    const bool answered =
        cv_.wait_until(l, deadline, [&] { return replies_.count(seq) || !connected_; });
    if (!answered)
      return Status::TimedOut(std::string("no answer to ") + event + " within " +
                              std::to_string(left.count()) + " ms");
    auto r = replies_.find(seq);
    if (r == replies_.end())
      return Status(Code::kIOError, std::string("disconnected during ") + event);
    const Json reply = r->second;
    replies_.erase(r);
    if (reply.value("ok", false)) return Status::Ok();
    std::string why = reply.value("error", "");
    return Status(Code::kWriterFailed, why.empty() ? std::string("vetoed ") + event : why);
  }

  void OnMessage(const Json& m) {
    std::lock_guard l(mu_);
    auto seq = m.find("seq");
    if (seq == m.end() || !seq->is_number_integer()) return;
    replies_[seq->get<int64_t>()] = m;
    cv_.notify_all();
  }
  void OnClose() {
    std::lock_guard l(mu_);
    connected_ = false;
    cv_.notify_all();
  }

 private:
  const int fd_;
  const std::string name_;
  const std::vector<std::string> volumes_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool connected_ = true;
  int64_t seq_ = 0;
  std::map<int64_t, Json> replies_;
};

namespace {

bool ValidWriterName(const std::string& n) {
  if (n.empty() || n.size() > 64) return false;
  for (char c : n)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'))
      return false;
  return true;
}

}  // namespace

void Daemon::ServeWriter(int fd, const Json& request, const Peer& peer) {
  const Json id = request.value("id", Json(nullptr));
  auto refuse = [&](const Status& s) {
    control::WriteFrame(fd, control::ErrorResponse(id, s)).IgnoreError();
  };
  if (!peer.allowed) {
    refuse(Status(Code::kPermissionDenied,
                  "uid " + std::to_string(peer.uid) + " may not register a writer"));
    return;
  }
  const Json args = request.value("args", Json::object());
  const std::string name = args.is_object() ? args.value("name", "") : "";
  if (!ValidWriterName(name) || name == "filesystem") {
    refuse(Status::InvalidArgument(
        "writer name '" + name +
        "' is not valid: use 1-64 letters, digits, '-', '_' or '.', and not \"filesystem\""));
    return;
  }
  std::vector<std::string> volumes;
  if (auto v = args.find("volumes"); v != args.end()) {
    if (!v->is_array()) {
      refuse(Status::InvalidArgument("argument 'volumes' must be a list of volume names"));
      return;
    }
    for (const Json& x : *v) {
      if (!x.is_string()) {
        refuse(Status::InvalidArgument("argument 'volumes' must contain volume names"));
        return;
      }
      volumes.push_back(x.get<std::string>());
    }
  }
  auto w = std::make_shared<LibraryWriter>(fd, name, volumes);
  {
    std::lock_guard l(lib_mu_);
    if (lib_writers_.count(name)) {
      refuse(Status::AlreadyExists("a writer named '" + name + "' is already registered"));
      return;
    }
    lib_writers_[name] = w;
  }
  if (!control::WriteFrame(fd, control::OkResponse(id, Json{{"name", name}})).ok()) {
    std::lock_guard l(lib_mu_);
    lib_writers_.erase(name);
    return;
  }
  writers_->Add(w);
  LogInfo("writer '" + name + "' registered (uid " + std::to_string(peer.uid) + ")");
  for (;;) {
    auto m = control::ReadFrame(fd);
    if (!m.ok()) break;
    w->OnMessage(*m);
  }
  w->OnClose();
  writers_->Remove(name, w.get());
  {
    std::lock_guard l(lib_mu_);
    lib_writers_.erase(name);
  }
  LogInfo("writer '" + name + "' disconnected");
}

Result<Json> Daemon::OpWriterList(const Json&, const Peer&) {
  Json out = Json::array();
  for (const writers::WriterStatus& w : writers_->List()) {
    Json t = nullptr;
    if (!w.last_event.empty() || w.last_event_time.time_since_epoch().count() != 0)
      t = std::chrono::duration_cast<std::chrono::nanoseconds>(w.last_event_time.time_since_epoch())
              .count();
    out.push_back(Json{{"name", w.name},
                       {"kind", w.kind},
                       {"state", writers::StateName(w.state)},
                       {"last_error", w.last_error},
                       {"last_event", w.last_event},
                       {"last_event_time", t},
                       {"connected", w.connected}});
  }
  return Json{{"writers", out}, {"writers_dir", cfg_.writers_dir}};
}

Result<Json> Daemon::OpSnapshotComplete(const Json& args, const Peer& peer) {
  auto id = args.find("set_id");
  if (id == args.end() || !id->is_string())
    return Status::InvalidArgument("argument 'set_id' must be a snapshot set id");
  const std::string set = id->get<std::string>();
  {
    std::lock_guard l(mu_);
    if (auto c = complete_.find(peer.conn_id); c != complete_.end()) c->second.erase(set);
  }
  writers_->Complete(set);
  return Json::object();
}

void Daemon::LoadWriterRecordsLocked() {
  const std::string path = cfg_.state_dir + "/writers.json";
  std::ifstream in(path);
  if (!in) return;
  std::stringstream ss;
  ss << in.rdbuf();
  Json j = Json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("snapshots") ||
      !j["snapshots"].is_object()) {
    LogWarning(path + " is not valid; the writer status of existing snapshots is lost");
    return;
  }
  for (const auto& [sid, rec] : j["snapshots"].items()) {
    if (!rec.is_object()) continue;
    WriterRecord r;
    r.consistency = rec.value("writers", "none");
    if (auto f = rec.find("failed"); f != rec.end() && f->is_object())
      for (const auto& [w, why] : f->items())
        if (why.is_string()) r.failed[w] = why.get<std::string>();
    writer_records_[sid] = r;
  }
}

Status Daemon::SaveWriterRecordsLocked() {
  // Only records of snapshots that still exist (others were dropped by a
  // restart: auto-release snapshots do not survive one).
  std::set<std::string> live;
  for (auto& [n, v] : volumes_)
    if (v->holder->volume)
      for (const SnapshotInfo& s : v->holder->volume->ListSnapshots()) live.insert(s.id);
  Json snaps = Json::object();
  for (auto it = writer_records_.begin(); it != writer_records_.end();) {
    if (!live.count(it->first)) {
      it = writer_records_.erase(it);
      continue;
    }
    Json failed = Json::object();
    for (const auto& [w, why] : it->second.failed) failed[w] = why;
    snaps[it->first] = Json{{"writers", it->second.consistency}, {"failed", failed}};
    ++it;
  }
  return WriteFileAtomic(cfg_.state_dir + "/writers.json",
                         Json{{"version", 1}, {"snapshots", snaps}}.dump(1) + "\n");
}

}  // namespace umbra::daemon
