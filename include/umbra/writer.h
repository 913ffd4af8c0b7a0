// The writer library: an application registers a named writer with umbrad
// and is told when a snapshot of its volumes is coming, so that its files are
// consistent at the snapshot's instant (docs/writers.md; wire messages in
// docs/protocol/control.md, "Writers").
//
//   umbra::WriterClient w({.name = "mydb", .volumes = {"db"}},
//                         [&](const umbra::WriterEvent& e) -> umbra::Status {
//                           if (e.event == "freeze") return db.FlushAndHoldWrites();
//                           if (e.event == "thaw" || e.event == "abort") db.ResumeWrites();
//                           return umbra::Status::Ok();
//                         });
//   w.Start();
//
// Events, in order: "prepare" (flush what can be flushed without blocking
// clients), "freeze" (hold writes; answer quickly: the freeze window is
// bounded), "thaw" (resume), "post_snapshot" (snapshot_id is set),
// "backup_complete" (the requester is done with the snapshot). "abort" may
// come after "prepare" or "freeze" instead of "thaw": resume and forget.
// The handler's Status is the answer; an error vetoes the snapshot (its
// message is shown to the requester). The handler runs on the client's own
// thread, one event at a time, and must return before `deadline_ms` passes.
//
// The client reconnects (with backoff up to max_backoff) whenever the
// connection to umbrad is lost, e.g. when umbrad restarts.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "umbra/status.h"

namespace umbra {

struct WriterEvent {
  std::string event;                 // "prepare", "freeze", "thaw", ...
  std::string set_id;                // the snapshot set
  std::vector<std::string> volumes;  // its volumes
  std::string snapshot_id;           // post_snapshot and backup_complete
  int64_t deadline_ms = 0;           // time left to answer, in milliseconds
};

struct WriterOptions {
  std::string socket;                // "" = $UMBRA_SOCKET or /run/umbra/umbrad.sock
  std::string name;                  // unique among the writers of one umbrad
  std::vector<std::string> volumes;  // volumes the writer cares about; empty = all
  std::chrono::milliseconds max_backoff{5'000};
  // Called with one line when the connection is made, lost or refused.
  std::function<void(const std::string&)> log;
};

class WriterClient {
 public:
  using Handler = std::function<Status(const WriterEvent&)>;
  WriterClient(WriterOptions options, Handler handler);
  ~WriterClient();  // Stop()
  WriterClient(const WriterClient&) = delete;
  WriterClient& operator=(const WriterClient&) = delete;

  // Starts the client thread (connect, register, serve events).
  void Start();
  // Closes the connection and joins the thread. Idempotent.
  void Stop();
  // Waits until registered with umbrad; false on timeout.
  bool WaitRegistered(std::chrono::milliseconds timeout);
  bool registered() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace umbra
