// Writers: the coordination that makes a snapshot application-consistent
// (docs/writers.md). umbrad is the coordinator; this component holds the
// sequence and the writers that ship, and knows nothing of the engine, the
// control socket or FUSE: the daemon passes the commit step in as a function
// and its library writers in as Writer objects.
//
// Sequence (Coordinator::Run): prepare (library writers) -> freeze (writers in
// order, then every filesystem last) -> commit -> thaw (filesystems first,
// then writers in reverse order) -> post-snapshot. Bounds: prepare and the
// freeze window (first freeze to last thaw). Past a bound, or when a writer
// fails or vetoes (unless failures are ignored), everything frozen is thawed
// and the commit does not happen. A thaw guard process thaws the
// filesystems at the window's end even if this process is killed.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "umbra/status.h"

namespace umbra::writers {

using Clock = std::chrono::steady_clock;

enum class Event { kPrepare, kFreeze, kThaw, kPostSnapshot, kBackupComplete, kAbort };
const char* EventName(Event e);

// What `writer list` shows.
enum class State { kStable, kWaitingForFreeze, kFrozen, kWaitingForCompletion, kFailed };
const char* StateName(State s);

struct EventContext {
  std::string set_id;                // id of the snapshot set being made
  std::vector<std::string> volumes;  // volume names of the set
  std::string snapshot_id;           // first snapshot's id (post-snapshot, backup-complete)
};

// One writer umbrad coordinates. Deliver() must return by `deadline`; a
// writer that cannot answer in time returns kTimeout.
class Writer {
 public:
  virtual ~Writer() = default;
  virtual std::string name() const = 0;
  virtual std::string kind() const = 0;  // "library", "hook"
  // Whether the writer takes part in a set of these volumes.
  virtual bool Cares(const std::vector<std::string>& volumes) const = 0;
  virtual Status Deliver(Event e, const EventContext& ctx, Clock::time_point deadline) = 0;
};

struct Bounds {
  std::chrono::milliseconds prepare{60'000};
  std::chrono::milliseconds freeze_window{10'000};
  // For tests only (umbrad reads UMBRAD_TEST_FROZEN_DELAY_MS): a pause with
  // the filesystems frozen, before the commit, to let a test kill umbrad or
  // pass the window's bound at a known point.
  std::chrono::milliseconds test_frozen_delay{0};
};

// ---- filesystem writer ---------------------------------------------------------

// FIFREEZE / FITHAW through a read-only descriptor of the mount point.
// Thaw of a filesystem that is not frozen is success. Freezing one that is
// frozen already fails with err() EBUSY (the coordinator then leaves it as
// it is: frozen by someone else, quiescent, not its to thaw).
Status FreezeFilesystem(const std::string& mount);
Status ThawFilesystem(const std::string& mount);

// The thaw guard: a separate process (`exe --thaw-guard ...`, in its own
// session) that thaws `mounts` when the deadline passes or when this process
// dies, unless told first that they were thawed.
class ThawGuard {
 public:
  ThawGuard() = default;
  ~ThawGuard();  // Release() if still armed
  ThawGuard(const ThawGuard&) = delete;
  ThawGuard& operator=(const ThawGuard&) = delete;
  // Starts the guard process. `exe` is the umbrad binary.
  Status Arm(const std::string& exe, const std::vector<std::string>& mounts,
             std::chrono::system_clock::time_point deadline);
  // Whether the guard process is still running.
  bool Alive();
  // Tells the guard the filesystems are thawed and reaps it.
  void Release();

 private:
  pid_t pid_ = -1;
  int sock_fd_ = -1;
};

// Entry point of `umbrad --thaw-guard DEADLINE_UNIX_MS MOUNT...` (stdin is
// its end of a socket pair with umbrad). Returns the exit code.
int ThawGuardMain(int argc, char** argv);

// ---- hook-script writer --------------------------------------------------------

// The scripts of `dir` that run: executable regular files, sorted by name,
// without the names qemu-guest-agent's fsfreeze-hook skips (*~, *.bak,
// *.rpmnew, *.dpkg-old, ...). A missing directory has none.
std::vector<std::string> HookScripts(const std::string& dir);
bool HookNameSkipped(const std::string& name);

// Runs `path ARG` (ARG "freeze" or "thaw") in its own process group with
// stdin /dev/null and stdout/stderr inherited, the set in its environment
// (UMBRA_SNAPSHOT_SET, UMBRA_VOLUMES); kills the group with SIGKILL at the
// deadline. Non-zero exit, a signal or the deadline is an error.
Status RunHook(const std::string& path, const std::string& arg, const EventContext& ctx,
               Clock::time_point deadline);

// ---- coordinator ---------------------------------------------------------------

struct WriterStatus {
  std::string name;
  std::string kind;  // "filesystem", "hook", "library"
  State state = State::kStable;
  std::string last_error;
  std::string last_event;  // event name, "" if none yet
  std::chrono::system_clock::time_point last_event_time{};
  bool connected = true;  // library writers: false once the connection closed
};

struct Request {
  EventContext ctx;
  std::vector<std::string> mounts;  // filesystems to freeze, one mount point each
  bool ignore_failures = false;     // --writer-failure ignore
};

struct Outcome {
  // Writers that failed (name -> reason) when failures were ignored.
  std::map<std::string, std::string> failed;
  double freeze_window_ms = 0;       // first freeze to last thaw
  std::vector<std::string> writers;  // names of the writers that took part
  // When each step happened (Unix ns; 0 = did not happen): the window's
  // start (first writer freeze), filesystems frozen, commit done,
  // filesystems thawed, the window's end (last writer thawed).
  int64_t window_start_ns = 0, fs_frozen_ns = 0, committed_ns = 0, fs_thawed_ns = 0,
          window_end_ns = 0;
};

class Coordinator {
 public:
  // `hooks_dir`: the hook-script directory ("" = none). `exe`: the binary
  // started as the thaw guard.
  Coordinator(std::string hooks_dir, Bounds bounds, std::string exe);

  // Library writers. Add replaces a writer of the same name.
  void Add(std::shared_ptr<Writer> w);
  // The library writer's connection closed; `during_sequence` keeps it in the
  // list as failed.
  void Remove(const std::string& name, const Writer* w);

  // Runs the sequence for one snapshot set; `commit` makes the snapshots and
  // is called only while everything is frozen and inside the window. Fails
  // with kBusy if a volume of the set is already in a sequence, with the
  // writer's name and reason if one fails (unless ignored), or with the
  // commit's error. On any failure nothing stays frozen.
  Result<Outcome> Run(const Request& req, const std::function<Status()>& commit);

  // The requester is done with set `set_id`: tells its library writers
  // (backup-complete). Unknown ids are ignored.
  void Complete(const std::string& set_id);

  std::vector<WriterStatus> List();

 private:
  struct Participant {
    std::shared_ptr<Writer> writer;  // null for the filesystem writer
    std::string name;
  };
  void Mark(const std::string& name, const std::string& kind, State s, const std::string& event,
            const std::string& error);
  Status Deliver(Participant& p, Event e, const EventContext& ctx, Clock::time_point deadline);

  const std::string hooks_dir_;
  const Bounds bounds_;
  const std::string exe_;
  std::mutex mu_;
  std::vector<std::shared_ptr<Writer>> library_;  // registration order
  std::map<std::string, WriterStatus> status_;    // by name
  std::set<std::string> busy_volumes_;
  // Sets waiting for backup-complete: set id -> context and writers.
  std::map<std::string, std::pair<EventContext, std::vector<std::shared_ptr<Writer>>>> pending_;
};

}  // namespace umbra::writers
