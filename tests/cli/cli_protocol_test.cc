// The umbra binary against an in-test server speaking the control protocol
// (docs/protocol/control.md): each command must send exactly the documented
// op and args, and print the documented output for well-formed results.
// This checks the CLI's encoding against the doc, not umbrad itself.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "cli/cli_harness.h"

namespace umbra::cli_test {
namespace {

const char* kId1 = "3f2a5c1e-8d4b-4c0e-9a7f-1b2c3d4e5f60";
const char* kId2 = "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";
const char* kSet = "0c1d2e3f-4a5b-4c6d-8e7f-8091a2b3c4d5";

Json StorageObject(double percent, const Json& warning) {
  return Json{{"volume", "db"},     {"location", "/var/lib/umbra/shadow/db"},
              {"used", 8ull << 30}, {"allocated", 9ull << 30},
              {"max", 10ull << 30}, {"max_size", "10 GiB"},
              {"percent", percent}, {"warning", warning}};
}

Json VolumeObject() {
  return Json{{"name", "db"},
              {"uuid", "5d6e7f80-1a2b-4c3d-8e4f-506172839405"},
              {"size", 10ull << 30},
              {"chunk_size", 16384},
              {"origin", "/var/lib/umbra/volumes/db.img"},
              {"kind", "file"},
              {"attached", true},
              {"device", "/dev/loop7"},
              {"storage", StorageObject(12.5, nullptr)},
              {"snapshots", 2}};
}

Json SnapshotObject(const char* id, const char* volume, uint64_t seq) {
  return Json{{"id", id},
              {"volume", volume},
              {"seq", seq},
              {"name", "before-upgrade"},
              {"persistent", true},
              {"created", 1764072000000000000ull},
              {"set_id", kSet},
              {"set_size", 2},
              {"valid", true},
              {"cause", nullptr},
              {"message", nullptr},
              {"own_bytes", 1048576},
              {"attached_device", nullptr},
              {"mount", nullptr}};
}

class CliProtocol : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = std::make_unique<FakeUmbrad>(dir_.path() + "/umbrad.sock");
    ASSERT_TRUE(server_->ok());
    server_->Answer("daemon.status", Json{{"volumes", 1},
                                          {"snapshots", 2},
                                          {"fuse_mount", "/run/umbra/fuse"},
                                          {"state_dir", "/var/lib/umbra"}});
    server_->Answer("volume.create", VolumeObject());
    server_->Answer("volume.adopt", VolumeObject());
    server_->Answer("volume.attach", Json{{"device", "/dev/loop7"}});
    server_->Answer("volume.detach", Json::object());
    server_->Answer("volume.list", Json{{"volumes", Json::array({VolumeObject()})}});
    server_->Answer("volume.delete", Json::object());
    server_->Answer("storage.add", StorageObject(0, nullptr));
    server_->Answer("storage.resize", StorageObject(0, nullptr));
    server_->Answer("storage.delete", Json::object());
    server_->Answer("storage.list", Json{{"storage", Json::array({StorageObject(12.5, nullptr)})}});
    server_->Answer("snapshot.create",
                    Json{{"id", kId1},
                         {"set_id", kSet},
                         {"snapshots", Json::array({SnapshotObject(kId1, "db", 3),
                                                    SnapshotObject(kId2, "logs", 1)})}});
    server_->Answer("snapshot.list",
                    Json{{"snapshots", Json::array({SnapshotObject(kId1, "db", 3)})}});
    server_->Answer("snapshot.delete", Json{{"deleted", Json::array({kId1})}});
    server_->Answer("snapshot.attach", Json{{"device", "/dev/loop9"}});
    server_->Answer("snapshot.detach", Json::object());
    server_->Answer("snapshot.mount", Json{{"dir", "/mnt/snap"}, {"device", "/dev/loop9"}});
    server_->Answer("snapshot.unmount", Json::object());
    server_->Answer("snapshot.revert", Json::object());
    server_->Answer(
        "provider.list",
        Json{{"providers",
              Json::array({Json{
                  {"name", "cow"}, {"persistent", true}, {"writers", true}, {"discard", true}}})}});
    // writer.list: unknown to this server (protocol error), like an umbrad
    // without writer support.
  }

  CliRun Run(std::vector<std::string> args, int stdin_fd = -1) {
    args.insert(args.begin(), {"--socket", server_->path()});
    return RunUmbra(args, "", stdin_fd);
  }

  // Runs the command and checks it sent exactly one request {op, args}.
  CliRun Expect(const std::vector<std::string>& args, const std::string& op, const Json& want) {
    server_->Clear();
    CliRun r = Run(args);
    std::string cmd;
    for (const auto& a : args) cmd += " " + a;
    EXPECT_EQ(r.status, 0) << "umbra" << cmd << "\nstderr: " << r.err;
    const auto reqs = server_->Requests();
    EXPECT_EQ(reqs.size(), 1u) << "umbra" << cmd;
    if (!reqs.empty()) {
      EXPECT_EQ(reqs[0]["op"], op) << "umbra" << cmd;
      EXPECT_EQ(reqs[0]["args"], want) << "umbra" << cmd << "\nsent: " << reqs[0]["args"].dump();
    }
    return r;
  }

  TempDir dir_;
  std::unique_ptr<FakeUmbrad> server_;
};

TEST_F(CliProtocol, VolumeCommandsSendDocumentedRequests) {
  const std::string backing = dir_.path() + "/db.img";
  Expect({"volume", "create", "db", "--size", "10G"}, "volume.create",
         Json{{"name", "db"}, {"size", 10ull << 30}});
  Expect({"volume", "create", "db", "--size", "1.5G", "--backing", backing, "--chunk-size", "64K"},
         "volume.create",
         Json{{"name", "db"}, {"size", 3ull << 29}, {"backing", backing}, {"chunk_size", 65536}});
  Expect({"volume", "adopt", "data", "--device", "/dev/null"}, "volume.adopt",
         Json{{"name", "data"}, {"device", "/dev/null"}});
  Expect({"volume", "detach", "db"}, "volume.detach", Json{{"name", "db"}});
  Expect({"volume", "delete", "db"}, "volume.delete", Json{{"name", "db"}});
  CliRun r = Expect({"volume", "list"}, "volume.list", Json::object());
  EXPECT_EQ(r.out.rfind("NAME ", 0), 0u) << r.out;
  EXPECT_NE(r.out.find("10 GiB"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("/dev/loop7"), std::string::npos) << r.out;
}

TEST_F(CliProtocol, VolumeAttachPrintsOnlyTheDevice) {
  CliRun r = Expect({"volume", "attach", "db"}, "volume.attach", Json{{"name", "db"}});
  EXPECT_EQ(r.out, "/dev/loop7\n");
  EXPECT_TRUE(r.err.empty()) << r.err;
  r = Expect({"snapshot", "attach", kId1}, "snapshot.attach", Json{{"id", kId1}});
  EXPECT_EQ(r.out, "/dev/loop9\n");
}

TEST_F(CliProtocol, StorageCommandsSendDocumentedRequests) {
  const std::string on = dir_.path() + "/shadow";
  Expect({"storage", "add", "db", "--on", on}, "storage.add", Json{{"volume", "db"}, {"on", on}});
  Expect({"storage", "add", "db", "--on", on, "--max-size", "20%"}, "storage.add",
         Json{{"volume", "db"}, {"on", on}, {"max_size", "20%"}});
  Expect({"storage", "resize", "db", "--max-size", "10G"}, "storage.resize",
         Json{{"volume", "db"}, {"max_size", "10G"}});
  Expect({"storage", "resize", "db", "--max-size", "unbounded"}, "storage.resize",
         Json{{"volume", "db"}, {"max_size", "unbounded"}});
  Expect({"storage", "delete", "db"}, "storage.delete", Json{{"volume", "db"}});
  Expect({"storage", "list", "db"}, "storage.list", Json{{"volume", "db"}});
  CliRun r = Expect({"storage", "list"}, "storage.list", Json::object());
  for (const char* col : {"VOLUME", "LOCATION", "USED", "ALLOCATED", "MAXIMUM", "PERCENT"})
    EXPECT_NE(r.out.find(col), std::string::npos) << col << "\n" << r.out;
  EXPECT_NE(r.out.find("12.5%"), std::string::npos) << r.out;
  EXPECT_TRUE(r.err.empty()) << r.err;  // below 80%: no warning
}

TEST_F(CliProtocol, StorageListWarnsAt80And90Percent) {
  server_->Answer("storage.list", Json{{"storage", Json::array({StorageObject(85.0, "80%")})}});
  CliRun r = Run({"storage", "list"});
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.err.find("warning"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("80%"), std::string::npos) << r.err;
  // Computed from percent when the daemon leaves "warning" out.
  Json s = StorageObject(93.0, nullptr);
  s.erase("warning");
  server_->Answer("storage.list", Json{{"storage", Json::array({s})}});
  r = Run({"storage", "list"});
  EXPECT_NE(r.err.find("90%"), std::string::npos) << r.err;
  r = Run({"--quiet", "storage", "list"});
  EXPECT_TRUE(r.err.empty()) << r.err;
}

TEST_F(CliProtocol, SnapshotCreate) {
  Expect({"snapshot", "create", "db"}, "snapshot.create",
         Json{{"volumes", {"db"}},
              {"persistent", false},
              {"writers", true},
              {"writer_failure", "abort"}});
  CliRun r = Expect({"snapshot", "create", "db", "logs", "--persistent", "--name", "before-upgrade",
                     "--no-writers", "--writer-failure", "ignore"},
                    "snapshot.create",
                    Json{{"volumes", {"db", "logs"}},
                         {"persistent", true},
                         {"name", "before-upgrade"},
                         {"writers", false},
                         {"writer_failure", "ignore"}});
  // One line per snapshot, with its id and volume.
  ASSERT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 2) << r.out;
  const std::string line1 = r.out.substr(0, r.out.find('\n'));
  const std::string line2 = r.out.substr(r.out.find('\n') + 1);
  EXPECT_NE(line1.find(kId1), std::string::npos) << r.out;
  EXPECT_NE(line1.find("db"), std::string::npos) << r.out;
  EXPECT_NE(line2.find(kId2), std::string::npos) << r.out;
  EXPECT_NE(line2.find("logs"), std::string::npos) << r.out;

  r = Run({"--quiet", "snapshot", "create", "db"});
  EXPECT_EQ(r.out, std::string(kId1) + "\n" + kId2 + "\n");
}

TEST_F(CliProtocol, SnapshotCreateJsonHasId) {
  CliRun r = Expect({"--json", "snapshot", "create", "db"}, "snapshot.create",
                    Json{{"volumes", {"db"}},
                         {"persistent", false},
                         {"writers", true},
                         {"writer_failure", "abort"}});
  Json j = Json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["id"], kId1);
  EXPECT_EQ(j["snapshots"].size(), 2u);
}

TEST_F(CliProtocol, SnapshotCommandsSendDocumentedRequests) {
  Expect({"snapshot", "list"}, "snapshot.list", Json::object());
  CliRun r = Expect({"snapshot", "list", "db"}, "snapshot.list", Json{{"volume", "db"}});
  EXPECT_EQ(r.out.rfind("ID ", 0), 0u) << r.out;
  EXPECT_NE(r.out.find(kId1), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("persistent"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("2025-11-25T"), std::string::npos) << r.out;  // local ISO-8601

  r = Expect({"snapshot", "delete", kId1}, "snapshot.delete", Json{{"id", kId1}});
  EXPECT_NE(r.out.find(kId1), std::string::npos) << r.out;
  Expect({"snapshot", "delete", "--oldest", "db"}, "snapshot.delete",
         Json{{"volume", "db"}, {"oldest", true}});
  Expect({"snapshot", "delete", "--all", "db"}, "snapshot.delete",
         Json{{"volume", "db"}, {"all", true}});
  Expect({"snapshot", "detach", kId1}, "snapshot.detach", Json{{"id", kId1}});

  const std::string mnt = dir_.path() + "/mnt";
  std::filesystem::create_directory(mnt);
  Expect({"snapshot", "mount", kId1, mnt}, "snapshot.mount", Json{{"id", kId1}, {"dir", mnt}});
  Expect({"snapshot", "unmount", mnt}, "snapshot.unmount", Json{{"dir", mnt}});
  Expect({"snapshot", "unmount", kId1}, "snapshot.unmount", Json{{"id", kId1}});
  // stdin is not a terminal: no confirmation asked.
  Expect({"snapshot", "revert", kId1}, "snapshot.revert", Json{{"id", kId1}});
}

// A pseudo-terminal for stdin with `typed` already waiting to be read.
class Terminal {
 public:
  explicit Terminal(const std::string& typed) {
    master_ = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master_ < 0 || grantpt(master_) != 0 || unlockpt(master_) != 0) return;
    slave_ = open(ptsname(master_), O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (!typed.empty()) (void)!write(master_, typed.data(), typed.size());
  }
  ~Terminal() {
    for (int fd : {slave_, master_})
      if (fd >= 0) close(fd);
  }
  int fd() const { return slave_; }

 private:
  int master_ = -1;
  int slave_ = -1;
};

TEST_F(CliProtocol, RevertOnATerminalAsksFirst) {
  {
    Terminal tty("no\n");
    ASSERT_GE(tty.fd(), 0);
    server_->Clear();
    CliRun r = Run({"snapshot", "revert", kId1}, tty.fd());
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.err.find("Type 'yes'"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("umbra: revert cancelled"), std::string::npos) << r.err;
    EXPECT_TRUE(server_->Requests().empty());
  }
  {
    Terminal tty("yes\n");
    server_->Clear();
    CliRun r = Run({"snapshot", "revert", kId1}, tty.fd());
    EXPECT_EQ(r.status, 0) << r.err;
    ASSERT_EQ(server_->Requests().size(), 1u);
    EXPECT_EQ(server_->Requests()[0]["args"], Json({{"id", kId1}}));
  }
  {
    Terminal tty("");
    server_->Clear();
    CliRun r = Run({"snapshot", "revert", "--yes", kId1}, tty.fd());
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.err.find("Type 'yes'"), std::string::npos) << r.err;
    EXPECT_EQ(server_->Requests().size(), 1u);
  }
}

TEST_F(CliProtocol, RelativePathsAreMadeAbsolute) {
  const std::string cwd = std::filesystem::current_path().string();
  Expect({"snapshot", "mount", kId1, "some/dir"}, "snapshot.mount",
         Json{{"id", kId1}, {"dir", cwd + "/some/dir"}});
  Expect({"volume", "create", "db", "--size", "1M", "--backing", "db.img"}, "volume.create",
         Json{{"name", "db"}, {"size", 1u << 20}, {"backing", cwd + "/db.img"}});
}

TEST_F(CliProtocol, SystemCommandsSendDocumentedRequests) {
  CliRun r = Expect({"provider", "list"}, "provider.list", Json::object());
  EXPECT_EQ(r.out.rfind("NAME ", 0), 0u) << r.out;
  EXPECT_NE(r.out.find("cow"), std::string::npos) << r.out;
  r = Expect({"daemon", "status"}, "daemon.status", Json::object());
  EXPECT_NE(r.out.find("/var/lib/umbra"), std::string::npos) << r.out;
  r = Expect({"writer", "list"}, "writer.list", Json::object());
  EXPECT_EQ(r.out, "no writers (writer support is not available in this umbrad)\n");

  server_->Refuse("writer.list", "unsupported", "writers are not supported");
  r = Run({"writer", "list"});
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(r.out, "no writers (writer support is not available in this umbrad)\n");

  server_->Answer(
      "writer.list",
      Json{{"writers", Json::array({Json{
                           {"name", "fsfreeze"}, {"state", "stable"}, {"last_error", nullptr}}})}});
  r = Run({"writer", "list"});
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.out.find("fsfreeze"), std::string::npos) << r.out;
}

TEST_F(CliProtocol, JsonPrintsTheResultAsIs) {
  CliRun r = Run({"--json", "volume", "list"});
  EXPECT_EQ(r.status, 0);
  Json j = Json::parse(r.out, nullptr, false);
  EXPECT_EQ(j, Json({{"volumes", Json::array({VolumeObject()})}}));
  r = Run({"volume", "attach", "db", "--json"});
  EXPECT_EQ(Json::parse(r.out, nullptr, false), Json({{"device", "/dev/loop7"}}));
}

TEST_F(CliProtocol, DaemonErrorsExitOne) {
  server_->Refuse("volume.delete", "busy", "volume 'db' is attached");
  CliRun r = Run({"volume", "delete", "db"});
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(r.err, "umbra: volume 'db' is attached\n");
  EXPECT_TRUE(r.out.empty()) << r.out;

  r = Run({"--json", "volume", "delete", "db"});
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(r.err, "umbra: volume 'db' is attached\n");
  Json j = Json::parse(r.out, nullptr, false);
  EXPECT_EQ(j, Json({{"error", {{"code", "busy"}, {"message", "volume 'db' is attached"}}}}));
}

TEST_F(CliProtocol, UsageErrorsSendNothing) {
  server_->Clear();
  for (std::vector<std::string> args :
       {std::vector<std::string>{"volume", "create", "db", "--size", "12Q"},
        {"storage", "add", "db", "--on", "/tmp", "--max-size", "120%"},
        {"volume", "attach", "a/b"},
        {"snapshot", "delete"}}) {
    CliRun r = Run(args);
    EXPECT_EQ(r.status, 2) << r.err;
  }
  EXPECT_TRUE(server_->Requests().empty());
}

}  // namespace
}  // namespace umbra::cli_test
