// The writer sequence around one snapshot set (docs/writers.md).
#include <algorithm>
#include <cerrno>
#include <thread>
#include <utility>

#include "writers/writers.h"

namespace umbra::writers {

const char* EventName(Event e) {
  switch (e) {
    case Event::kPrepare:
      return "prepare";
    case Event::kFreeze:
      return "freeze";
    case Event::kThaw:
      return "thaw";
    case Event::kPostSnapshot:
      return "post_snapshot";
    case Event::kBackupComplete:
      return "backup_complete";
    case Event::kAbort:
      return "abort";
  }
  return "?";
}

const char* StateName(State s) {
  switch (s) {
    case State::kStable:
      return "stable";
    case State::kWaitingForFreeze:
      return "waiting-for-freeze";
    case State::kFrozen:
      return "frozen";
    case State::kWaitingForCompletion:
      return "waiting-for-completion";
    case State::kFailed:
      return "failed";
  }
  return "?";
}

namespace {

constexpr const char* kFilesystemWriter = "filesystem";
// Thaw, abort and post-snapshot events get at least this long, even when the
// window's bound has passed (they end a sequence; they must be sent).
constexpr std::chrono::milliseconds kEndEventBound{5'000};

// One script of the hook directory as a writer: "freeze" and "thaw" only.
class HookWriter final : public Writer {
 public:
  explicit HookWriter(std::string path) : path_(std::move(path)) {}
  std::string name() const override { return path_.substr(path_.rfind('/') + 1); }
  std::string kind() const override { return "hook"; }
  bool Cares(const std::vector<std::string>&) const override { return true; }
  Status Deliver(Event e, const EventContext& ctx, Clock::time_point deadline) override {
    // qemu-ga's fsfreeze-hook calls "thaw" after a failed freeze too; so do we.
    if (e == Event::kFreeze) return RunHook(path_, "freeze", ctx, deadline);
    if (e == Event::kThaw || e == Event::kAbort) return RunHook(path_, "thaw", ctx, deadline);
    return Status::Ok();
  }

 private:
  const std::string path_;
};

// A writer's state once it has answered `e`. Hooks see no post-snapshot or
// completion: they are stable once thawed.
State StateAfter(Event e, bool hook) {
  switch (e) {
    case Event::kPrepare:
      return State::kWaitingForFreeze;
    case Event::kFreeze:
      return State::kFrozen;
    case Event::kThaw:
      return hook ? State::kStable : State::kWaitingForCompletion;
    case Event::kPostSnapshot:
      return State::kWaitingForCompletion;
    case Event::kBackupComplete:
    case Event::kAbort:
      return State::kStable;
  }
  return State::kStable;
}

WriterStatus Fresh(const std::string& name, const std::string& kind) {
  WriterStatus w;
  w.name = name;
  w.kind = kind;
  return w;
}

int64_t UnixNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

double MsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

}  // namespace

Coordinator::Coordinator(std::string hooks_dir, Bounds bounds, std::string exe)
    : hooks_dir_(std::move(hooks_dir)), bounds_(bounds), exe_(std::move(exe)) {
  status_[kFilesystemWriter] = Fresh(kFilesystemWriter, "filesystem");
}

void Coordinator::Add(std::shared_ptr<Writer> w) {
  std::lock_guard l(mu_);
  const std::string name = w->name();
  library_.erase(std::remove_if(library_.begin(), library_.end(),
                                [&](const auto& x) { return x->name() == name; }),
                 library_.end());
  library_.push_back(w);
  status_[name] = Fresh(name, w->kind());
}

void Coordinator::Remove(const std::string& name, const Writer* w) {
  std::lock_guard l(mu_);
  auto it =
      std::find_if(library_.begin(), library_.end(), [&](const auto& x) { return x.get() == w; });
  if (it == library_.end()) return;  // replaced by a newer registration
  library_.erase(it);
  auto st = status_.find(name);
  if (st == status_.end()) return;
  // A writer that leaves while stable simply goes; one that leaves in the
  // middle of a sequence (or after failing) stays listed with the failure.
  if (st->second.state == State::kStable) {
    status_.erase(st);
  } else {
    st->second.connected = false;
    if (st->second.state != State::kFailed) {
      st->second.state = State::kFailed;
      st->second.last_error = "disconnected during " + st->second.last_event;
    }
  }
}

void Coordinator::Mark(const std::string& name, const std::string& kind, State s,
                       const std::string& event, const std::string& error) {
  std::lock_guard l(mu_);
  WriterStatus& w = status_[name];
  w.name = name;
  w.kind = kind;
  w.state = s;
  if (!event.empty()) {
    w.last_event = event;
    w.last_event_time = std::chrono::system_clock::now();
  }
  if (!error.empty() || s != State::kFailed) w.last_error = error;
}

Status Coordinator::Deliver(Participant& p, Event e, const EventContext& ctx,
                            Clock::time_point deadline) {
  Status s = p.writer->Deliver(e, ctx, deadline);
  if (s.ok()) {
    Mark(p.name, p.writer->kind(), StateAfter(e, p.writer->kind() == "hook"), EventName(e), "");
  } else {
    Mark(p.name, p.writer->kind(), State::kFailed, EventName(e),
         std::string(EventName(e)) + ": " + s.message());
  }
  return s;
}

Result<Outcome> Coordinator::Run(const Request& req, const std::function<Status()>& commit) {
  std::vector<Participant> parts;
  {
    std::lock_guard l(mu_);
    for (const std::string& v : req.ctx.volumes)
      if (busy_volumes_.count(v))
        return Status::Busy("volume '" + v +
                            "' has a snapshot set in preparation; try again when it is done");
    busy_volumes_.insert(req.ctx.volumes.begin(), req.ctx.volumes.end());
    for (const auto& w : library_)
      if (w->Cares(req.ctx.volumes)) parts.push_back({w, w->name()});
  }
  struct Unbusy {
    Coordinator* c;
    const std::vector<std::string>& vols;
    ~Unbusy() {
      std::lock_guard l(c->mu_);
      for (const std::string& v : vols) c->busy_volumes_.erase(v);
    }
  } unbusy{this, req.ctx.volumes};
  const size_t n_library = parts.size();
  for (const std::string& path : HookScripts(hooks_dir_)) {
    auto w = std::make_shared<HookWriter>(path);
    parts.push_back({w, w->name()});
  }

  Outcome out;
  for (const Participant& p : parts) out.writers.push_back(p.name);
  if (!req.mounts.empty()) out.writers.push_back(kFilesystemWriter);
  const EventContext& ctx = req.ctx;
  size_t prepared = 0, freeze_sent = 0;
  std::vector<std::string> frozen_fs;
  std::set<size_t> failed_parts;  // indexes into parts
  ThawGuard guard;
  Clock::time_point window_start{}, window_end{};
  bool window_open = false;

  // Thaws what is frozen (filesystems first, then writers in reverse) and
  // aborts the writers that were prepared but not yet frozen.
  auto unwind = [&](bool committed) {
    const auto end_deadline = [&] { return Clock::now() + kEndEventBound; };
    std::string thaw_error;
    for (auto it = frozen_fs.rbegin(); it != frozen_fs.rend(); ++it) {
      Status s = ThawFilesystem(*it);
      if (!s.ok()) thaw_error = "thaw: " + s.message();
    }
    if (!frozen_fs.empty()) {
      out.fs_thawed_ns = UnixNs();
      Mark(kFilesystemWriter, "filesystem", thaw_error.empty() ? State::kStable : State::kFailed,
           "thaw", thaw_error);
    }
    frozen_fs.clear();
    guard.Release();
    // A writer that failed keeps its failure in the list. A failed hook is
    // still run with "thaw" (as qemu-ga does: it may hold something); a
    // failed library writer is not asked again (it may be hung or gone).
    // A thaw that fails after the commit does not make the snapshot
    // inconsistent: it shows in `writer list` only.
    for (size_t i = freeze_sent; i-- > 0;) {
      Participant& p = parts[i];
      const Event e = committed ? Event::kThaw : Event::kAbort;
      if (!failed_parts.count(i))
        (void)Deliver(p, e, ctx, end_deadline());
      else if (p.writer->kind() == "hook")
        (void)p.writer->Deliver(e, ctx, end_deadline());
    }
    if (window_open) {
      window_end = Clock::now();
      out.window_end_ns = UnixNs();
    }
    if (!committed) {
      // Prepared library writers that never got a freeze are told to abort;
      // hooks that were never run go back to stable.
      for (size_t i = freeze_sent; i < parts.size(); ++i) {
        if (failed_parts.count(i)) continue;
        if (i < std::min(prepared, n_library))
          (void)Deliver(parts[i], Event::kAbort, ctx, end_deadline());
        else if (i >= n_library)
          Mark(parts[i].name, "hook", State::kStable, "", "");
      }
    }
  };
  // A failure of writer `name`: with failures ignored it is recorded and the
  // sequence goes on; otherwise everything is undone.
  auto failed = [&](size_t i, const std::string& name, const Status& s) -> bool {
    failed_parts.insert(i);
    if (req.ignore_failures) {
      out.failed.emplace(name, s.message());
      return false;
    }
    unwind(false);
    return true;
  };
  auto abort_status = [&](const std::string& name, const Status& s) {
    return Status(Code::kWriterFailed,
                  "writer '" + name + "': " + s.message() + "; the snapshot was not taken");
  };

  // prepare
  const Clock::time_point prepare_deadline = Clock::now() + bounds_.prepare;
  for (size_t i = 0; i < n_library; ++i) {
    Status s = Deliver(parts[i], Event::kPrepare, ctx, prepare_deadline);
    prepared = i + 1;
    if (!s.ok() && failed(i, parts[i].name, s)) return abort_status(parts[i].name, s);
  }
  for (size_t i = n_library; i < parts.size(); ++i)
    Mark(parts[i].name, "hook", State::kWaitingForFreeze, "", "");

  // freeze: writers in order, then the filesystems, last
  window_start = Clock::now();
  out.window_start_ns = UnixNs();
  window_open = true;
  const Clock::time_point window_deadline = window_start + bounds_.freeze_window;
  const auto wall_deadline = std::chrono::system_clock::now() + bounds_.freeze_window;
  for (size_t i = 0; i < parts.size(); ++i) {
    freeze_sent = i + 1;
    if (failed_parts.count(i)) continue;  // failed in prepare (failures ignored)
    Status s = Deliver(parts[i], Event::kFreeze, ctx, window_deadline);
    if (!s.ok() && failed(i, parts[i].name, s)) return abort_status(parts[i].name, s);
  }
  if (!req.mounts.empty()) {
    Status s = guard.Arm(exe_, req.mounts, wall_deadline);
    if (!s.ok()) {
      Mark(kFilesystemWriter, "filesystem", State::kFailed, "freeze", s.message());
      unwind(false);  // without a guard a crash could leave them frozen: never freeze
      return abort_status(kFilesystemWriter, s);
    }
    for (const std::string& m : req.mounts) {
      Status f = FreezeFilesystem(m);
      // EBUSY: frozen already by someone else (an administrator's fsfreeze):
      // quiescent, and not ours to thaw.
      if (f.err() == EBUSY) continue;
      if (!f.ok()) {
        Mark(kFilesystemWriter, "filesystem", State::kFailed, "freeze", f.message());
        if (failed(parts.size(), kFilesystemWriter, f)) return abort_status(kFilesystemWriter, f);
        continue;
      }
      frozen_fs.push_back(m);
    }
    if (!frozen_fs.empty()) {
      out.fs_frozen_ns = UnixNs();
      Mark(kFilesystemWriter, "filesystem", State::kFrozen, "freeze", "");
    }
  }
  if (bounds_.test_frozen_delay.count() > 0) std::this_thread::sleep_for(bounds_.test_frozen_delay);

  // commit, inside the window
  if (Clock::now() > window_deadline) {
    Status s =
        Status::TimedOut("the freeze window of " + std::to_string(bounds_.freeze_window.count()) +
                         " ms passed before the snapshot could be taken");
    unwind(false);
    return Status(Code::kWriterFailed, s.message() + "; the snapshot was not taken");
  }
  if (!req.mounts.empty() && !guard.Alive()) {
    Status s(Code::kIOError, "the thaw guard process died");
    Mark(kFilesystemWriter, "filesystem", State::kFailed, "freeze", s.message());
    unwind(false);
    return abort_status(kFilesystemWriter, s);
  }
  Status c = commit();
  if (c.ok()) out.committed_ns = UnixNs();
  unwind(c.ok());
  out.freeze_window_ms = MsBetween(window_start, window_end);
  if (!c.ok()) return c;

  // post-snapshot, then wait for backup-complete
  std::vector<std::shared_ptr<Writer>> waiting;
  for (size_t i = 0; i < n_library; ++i) {
    if (out.failed.count(parts[i].name)) continue;
    Status s = Deliver(parts[i], Event::kPostSnapshot, ctx, Clock::now() + kEndEventBound);
    if (s.ok()) waiting.push_back(parts[i].writer);
  }
  if (!waiting.empty()) {
    std::lock_guard l(mu_);
    pending_[ctx.set_id] = {ctx, std::move(waiting)};
  }
  return out;
}

void Coordinator::Complete(const std::string& set_id) {
  std::pair<EventContext, std::vector<std::shared_ptr<Writer>>> p;
  {
    std::lock_guard l(mu_);
    auto it = pending_.find(set_id);
    if (it == pending_.end()) return;
    p = std::move(it->second);
    pending_.erase(it);
  }
  for (auto& w : p.second) {
    Participant part{w, w->name()};
    (void)Deliver(part, Event::kBackupComplete, p.first, Clock::now() + kEndEventBound);
  }
}

std::vector<WriterStatus> Coordinator::List() {
  std::vector<WriterStatus> out;
  std::set<std::string> hooks;
  for (const std::string& path : HookScripts(hooks_dir_))
    hooks.insert(path.substr(path.rfind('/') + 1));
  std::lock_guard l(mu_);
  for (const auto& [name, st] : status_) {
    // Hooks removed from the directory since they last ran are not listed.
    if (st.kind == "hook" && !hooks.count(name)) continue;
    out.push_back(st);
  }
  for (const std::string& h : hooks)
    if (!status_.count(h)) out.push_back(Fresh(h, "hook"));
  return out;
}

}  // namespace umbra::writers
