// The writer library (include/umbra/writer.h) over the control protocol.
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "control/protocol.h"
#include "umbra/writer.h"

namespace umbra {

using control::Json;

struct WriterClient::Impl {
  WriterOptions opt;
  Handler handler;
  std::thread thread;
  std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;  // guarded by mu
  bool registered = false;
  bool was_registered = false;  // the last session got as far as registering
  int fd = -1;                  // the current connection, guarded by mu

  void Log(const std::string& s) {
    if (opt.log) opt.log(s);
  }

  // One connection: register, then answer events until it ends.
  Status Session() {
    auto c = control::Client::Connect(control::SocketPath(opt.socket));
    if (!c.ok()) return c.status();
    control::Client client = std::move(*c);
    {
      std::lock_guard l(mu);
      if (stopping) return Status::Ok();
      fd = client.fd();
    }
    Json vols = Json::array();
    for (const std::string& v : opt.volumes) vols.push_back(v);
    auto r = client.Call("writer.register", Json{{"name", opt.name}, {"volumes", vols}});
    if (!r.ok()) {
      std::lock_guard l(mu);
      fd = -1;
      return r.status();
    }
    {
      std::lock_guard l(mu);
      registered = true;
      was_registered = true;
    }
    cv.notify_all();
    Log("writer '" + opt.name + "' registered with umbrad");
    Status end;
    for (;;) {
      auto msg = control::ReadFrame(client.fd());
      if (!msg.ok()) {
        end = msg.status().code() == Code::kNotFound
                  ? Status(Code::kIOError, "umbrad closed the connection")
                  : msg.status();
        break;
      }
      WriterEvent e;
      e.event = msg->value("event", "");
      e.set_id = msg->value("set_id", "");
      e.snapshot_id = msg->value("snapshot_id", "");
      e.deadline_ms = msg->value("deadline_ms", int64_t{0});
      if (auto v = msg->find("volumes"); v != msg->end() && v->is_array())
        for (const Json& x : *v)
          if (x.is_string()) e.volumes.push_back(x.get<std::string>());
      Status s;
      try {
        s = handler(e);
      } catch (const std::exception& ex) {
        s = Status(Code::kIOError, std::string("handler threw: ") + ex.what());
      }
      Json reply = {{"seq", msg->value("seq", int64_t{0})}, {"ok", s.ok()}};
      if (!s.ok()) reply["error"] = s.message();
      Status w = control::WriteFrame(client.fd(), reply);
      if (!w.ok()) {
        end = w;
        break;
      }
    }
    std::lock_guard l(mu);
    registered = false;
    fd = -1;
    return end;
  }

  void Run() {
    auto backoff = std::chrono::milliseconds(100);
    for (;;) {
      {
        std::lock_guard l(mu);
        if (stopping) return;
      }
      Status s = Session();
      std::unique_lock l(mu);
      if (stopping) return;
      // A session that was registered starts the backoff over: umbrad
      // restarting should be followed quickly.
      if (was_registered) backoff = std::chrono::milliseconds(100);
      was_registered = false;
      Log("writer '" + opt.name + "': " + (s.ok() ? "connection ended" : s.message()) +
          "; retrying in " + std::to_string(backoff.count()) + " ms");
      cv.wait_for(l, backoff, [&] { return stopping; });
      backoff = std::min(backoff * 2, std::max(opt.max_backoff, std::chrono::milliseconds(100)));
    }
  }
};

WriterClient::WriterClient(WriterOptions options, Handler handler) : impl_(new Impl) {
  impl_->opt = std::move(options);
  impl_->handler = std::move(handler);
}

WriterClient::~WriterClient() { Stop(); }

void WriterClient::Start() {
  if (impl_->thread.joinable()) return;
  impl_->thread = std::thread([this] { impl_->Run(); });
}

void WriterClient::Stop() {
  {
    std::lock_guard l(impl_->mu);
    impl_->stopping = true;
    if (impl_->fd >= 0) ::shutdown(impl_->fd, SHUT_RDWR);
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
}

bool WriterClient::WaitRegistered(std::chrono::milliseconds timeout) {
  std::unique_lock l(impl_->mu);
  return impl_->cv.wait_for(l, timeout, [&] { return impl_->registered; });
}

bool WriterClient::registered() const {
  std::lock_guard l(impl_->mu);
  return impl_->registered;
}

}  // namespace umbra
