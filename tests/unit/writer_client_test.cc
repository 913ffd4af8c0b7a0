// The writer library (include/umbra/writer.h and its C API) against an
// in-test server speaking the control protocol's writer messages
// (docs/protocol/control.md "Writers"): registration, events and answers,
// and reconnecting when the server goes away and comes back.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "control/protocol.h"
#include "system_util.h"
#include "umbra/writer.h"
#include "umbra/writer_c.h"

extern "C" int c_writer_run(const char* socket, umbra_writer** out);
extern "C" const char* c_writer_events(void);

namespace umbra {
namespace {

using control::Json;
using namespace std::chrono_literals;

// A listening Unix socket; Accept() waits for one connection.
class FakeUmbrad {
 public:
  explicit FakeUmbrad(std::string path) : path_(std::move(path)) { Listen(); }
  ~FakeUmbrad() { Close(); }
  void Listen() {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path_.c_str(), sizeof a.sun_path - 1);
    ::unlink(path_.c_str());
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    EXPECT_EQ(::listen(fd_, 4), 0);
  }
  void Close() {
    if (conn_ >= 0) ::close(conn_);
    if (fd_ >= 0) ::close(fd_);
    conn_ = fd_ = -1;
    ::unlink(path_.c_str());
  }
  // Accepts a connection and answers its writer.register; returns the args.
  Json AcceptRegistration() {
    conn_ = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    EXPECT_GE(conn_, 0);
    auto req = control::ReadFrame(conn_);
    EXPECT_TRUE(req.ok());
    EXPECT_EQ(req->value("op", ""), "writer.register");
    EXPECT_TRUE(
        control::WriteFrame(conn_, control::OkResponse((*req)["id"], Json{{"name", "x"}})).ok());
    return (*req)["args"];
  }
  // Sends an event and returns the writer's answer.
  Json Event(const std::string& event, int64_t seq) {
    EXPECT_TRUE(control::WriteFrame(conn_, Json{{"event", event},
                                                {"seq", seq},
                                                {"set_id", "s1"},
                                                {"volumes", {"db"}},
                                                {"snapshot_id", ""},
                                                {"deadline_ms", 1000}})
                    .ok());
    auto r = control::ReadFrame(conn_);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : Json::object();
  }
  void DropConnection() {
    ::close(conn_);
    conn_ = -1;
  }

 private:
  const std::string path_;
  int fd_ = -1, conn_ = -1;
};

TEST(WriterClientTest, RegistersAnswersEventsAndReconnects) {
  test_util::TempDir dir("umbra-writer-client");
  const std::string sock = dir.path() + "/umbrad.sock";
  FakeUmbrad server(sock);
  std::vector<std::string> seen;
  WriterOptions opt;
  opt.socket = sock;
  opt.name = "pg";
  opt.volumes = {"db", "logs"};
  WriterClient w(opt, [&](const WriterEvent& e) -> Status {
    seen.push_back(e.event + "@" + e.set_id);
    if (e.event == "freeze") return Status(Code::kWriterFailed, "replica lag");
    return Status::Ok();
  });
  w.Start();
  Json args = server.AcceptRegistration();
  EXPECT_EQ(args["name"], "pg");
  EXPECT_EQ(args["volumes"], Json({"db", "logs"}));
  ASSERT_TRUE(w.WaitRegistered(5s));

  Json a = server.Event("prepare", 1);
  EXPECT_EQ(a["seq"], 1);
  EXPECT_EQ(a["ok"], true);
  Json b = server.Event("freeze", 2);
  EXPECT_EQ(b["seq"], 2);
  EXPECT_EQ(b["ok"], false);
  EXPECT_EQ(b["error"], "replica lag");
  EXPECT_EQ(seen, (std::vector<std::string>{"prepare@s1", "freeze@s1"}));

  // umbrad restarts: the connection drops, the socket goes away and comes
  // back; the writer registers again by itself.
  server.DropConnection();
  server.Close();
  std::this_thread::sleep_for(300ms);
  server.Listen();
  server.AcceptRegistration();
  ASSERT_TRUE(w.WaitRegistered(5s));
  EXPECT_EQ(server.Event("thaw", 1)["ok"], true);
  w.Stop();
  EXPECT_FALSE(w.registered());
}

TEST(WriterClientTest, CApi) {
  test_util::TempDir dir("umbra-writer-client");
  const std::string sock = dir.path() + "/umbrad.sock";
  FakeUmbrad server(sock);
  umbra_writer* w = nullptr;
  std::thread t([&] {
    Json args = server.AcceptRegistration();
    EXPECT_EQ(args["name"], "cw");
    EXPECT_EQ(args["volumes"], Json({"db"}));
  });
  ASSERT_EQ(c_writer_run(sock.c_str(), &w), 1);
  t.join();
  Json a = server.Event("prepare", 7);
  EXPECT_EQ(a["ok"], false);
  EXPECT_EQ(a["error"], "not today");
  EXPECT_EQ(server.Event("freeze", 8)["ok"], true);
  umbra_writer_stop(w);
  EXPECT_STREQ(c_writer_events(), "prepare freeze ");
  EXPECT_EQ(umbra_writer_start(nullptr, nullptr, nullptr, 0, nullptr, nullptr), nullptr);
}

}  // namespace
}  // namespace umbra
