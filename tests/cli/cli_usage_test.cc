// The umbra binary without a daemon: --help for every command, usage errors
// (exit 2, one line on stderr, nothing sent), and "umbrad is not running".
#include <gtest/gtest.h>

#include <algorithm>

#include "cli/cli_harness.h"

namespace umbra::cli_test {
namespace {

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(' ', i);
    if (j == std::string::npos) j = s.size();
    if (j > i) out.push_back(s.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

size_t Lines(const std::string& s) {
  return static_cast<size_t>(std::count(s.begin(), s.end(), '\n'));
}

struct HelpCase {
  std::string command;
  std::vector<std::string> mentions;  // arguments and options the help must name
};

TEST(CliHelp, EveryCommandHasHelp) {
  const std::vector<HelpCase> cases = {
      {"",
       {"volume", "storage", "snapshot", "writer", "provider", "daemon", "--socket", "--json",
        "--quiet", "Exit status"}},
      {"volume", {"create", "adopt", "attach", "detach", "list", "delete"}},
      {"volume create", {"NAME", "--size", "--backing", "--chunk-size"}},
      {"volume adopt", {"NAME", "--device"}},
      {"volume attach", {"NAME"}},
      {"volume detach", {"NAME"}},
      {"volume list", {}},
      {"volume delete", {"NAME"}},
      {"storage", {"add", "resize", "delete", "list"}},
      {"storage add", {"VOLUME", "--on", "--max-size", "unbounded", "%"}},
      {"storage resize", {"VOLUME", "--max-size"}},
      {"storage delete", {"VOLUME"}},
      {"storage list", {"VOLUME", "80%"}},
      {"snapshot", {"create", "list", "delete", "attach", "detach", "mount", "unmount", "revert"}},
      {"snapshot create",
       {"VOLUME", "--persistent", "--name", "--no-writers", "--writer-failure", "abort", "ignore"}},
      {"snapshot list", {"VOLUME"}},
      {"snapshot delete", {"ID", "--oldest", "--all"}},
      {"snapshot attach", {"ID"}},
      {"snapshot detach", {"ID"}},
      {"snapshot mount", {"ID", "DIR"}},
      {"snapshot unmount", {"ID|DIR"}},
      {"snapshot revert", {"ID", "--yes"}},
      {"writer", {"list"}},
      {"writer list", {}},
      {"provider", {"list"}},
      {"provider list", {}},
      {"daemon", {"status"}},
      {"daemon status", {}},
  };
  for (const auto& c : cases) {
    auto args = Split(c.command);
    args.push_back("--help");
    CliRun r = RunUmbra(args);
    SCOPED_TRACE("umbra " + c.command + " --help");
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_TRUE(r.err.empty()) << r.err;
    EXPECT_NE(r.out.find("Usage: umbra" + (c.command.empty() ? "" : " " + c.command)),
              std::string::npos)
        << r.out;
    EXPECT_NE(r.out.find("Exit status:"), std::string::npos) << r.out;
    if (Split(c.command).size() == 2) {
      EXPECT_NE(r.out.find("Description:"), std::string::npos) << r.out;
      EXPECT_NE(r.out.find("Examples:\n  "), std::string::npos) << r.out;
    }
    for (const auto& m : c.mentions)
      EXPECT_NE(r.out.find(m), std::string::npos) << m << "\n" << r.out;
  }
}

TEST(CliHelp, Version) {
  CliRun r = RunUmbra({"--version"});
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(r.out.rfind("umbra ", 0), 0u) << r.out;
  EXPECT_EQ(Lines(r.out), 1u);
}

struct UsageCase {
  std::string args;
  std::string message;  // a piece of the one stderr line
};

TEST(CliUsage, ErrorsExitTwoWithOneLine) {
  TempDir dir;  // a socket path where nothing listens: usage errors must not get that far
  const std::string sock = dir.path() + "/umbrad.sock";
  const std::vector<UsageCase> cases = {
      {"", "missing command"},
      {"frob", "unknown command 'frob'"},
      {"volume", "missing command"},
      {"volume frob", "unknown command 'frob'"},
      {"volume create", "missing argument NAME"},
      {"volume create db", "missing required option --size"},
      {"volume create db --size 12Q", "invalid size \"12Q\""},
      {"volume create db --size 0", "greater than zero"},
      {"volume create db --size 1G --chunk-size 12K", "not a power of two"},
      {"volume create a/b --size 1G", "invalid volume name 'a/b'"},
      {"volume create db --size 1G --bogus", "unknown option '--bogus'"},
      {"volume adopt db", "--device"},
      {"volume attach", "missing argument NAME"},
      {"volume delete a/b", "invalid volume name"},
      {"storage add db", "--on"},
      {"storage add db --on /tmp --max-size 120%", "120%"},
      {"storage add db --on /tmp --max-size 12Q", "invalid size \"12Q\""},
      {"storage resize db", "--max-size"},
      {"storage resize db --max-size 0%", "1%..100%"},
      {"storage list a/b", "invalid volume name"},
      {"snapshot create", "missing argument VOLUME"},
      {"snapshot create db a/b", "invalid volume name 'a/b'"},
      {"snapshot create db --name a/b", "invalid snapshot name"},
      {"snapshot create db --writer-failure maybe", "--writer-failure"},
      {"snapshot delete", "exactly one"},
      {"snapshot delete 3f2a --all db", "exactly one"},
      {"snapshot delete --oldest a/b", "invalid volume name"},
      {"snapshot attach", "missing argument ID"},
      {"snapshot attach not/an/id", "invalid snapshot id"},
      {"snapshot mount 3f2a", "missing argument DIR"},
      {"snapshot revert", "missing argument ID"},
      {"writer frob", "unknown command 'frob'"},
      {"daemon status extra", "unexpected argument 'extra'"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE("umbra " + c.args);
    auto args = Split(c.args);
    args.insert(args.begin(), {"--socket", sock});
    CliRun r = RunUmbra(args);
    EXPECT_EQ(r.status, 2);
    EXPECT_EQ(Lines(r.err), 1u) << r.err;
    EXPECT_EQ(r.err.rfind("umbra: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find("not running"), std::string::npos) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
  }
}

TEST(CliUsage, JsonUsageErrorIsAnObject) {
  CliRun r = RunUmbra({"--json", "volume", "create", "db", "--size", "12Q"});
  EXPECT_EQ(r.status, 2);
  Json j = Json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["error"]["code"], "usage");
  EXPECT_NE(j["error"]["message"].get<std::string>().find("12Q"), std::string::npos);
}

TEST(CliNotRunning, ExitsOneWithClearMessage) {
  TempDir dir;
  const std::string sock = dir.path() + "/umbrad.sock";
  const std::string want = "umbra: umbrad is not running (no daemon listening at " + sock + ")\n";
  for (const std::string cmd : {"volume list", "daemon status", "snapshot create db --persistent",
                                "storage add db --on /tmp", "snapshot list"}) {
    SCOPED_TRACE(cmd);
    auto args = Split(cmd);
    args.insert(args.begin(), {"--socket", sock});
    CliRun r = RunUmbra(args);
    EXPECT_EQ(r.status, 1);
    EXPECT_EQ(r.err, want);
    EXPECT_TRUE(r.out.empty()) << r.out;

    args.insert(args.begin(), "--json");
    r = RunUmbra(args);
    EXPECT_EQ(r.status, 1);
    EXPECT_EQ(r.err, want);
    Json j = Json::parse(r.out, nullptr, false);
    ASSERT_TRUE(j.is_object()) << r.out;
    EXPECT_EQ(j["error"]["code"], "not_running");
    EXPECT_EQ(j["error"]["message"], "umbrad is not running (no daemon listening at " + sock + ")");
  }
}

TEST(CliNotRunning, SocketFromEnvironment) {
  TempDir dir;
  const std::string sock = dir.path() + "/env.sock";
  CliRun r = RunUmbra({"volume", "list"}, sock);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find(sock), std::string::npos) << r.err;
  // --socket wins over the environment.
  r = RunUmbra({"--socket", dir.path() + "/flag.sock", "volume", "list"}, sock);
  EXPECT_NE(r.err.find(dir.path() + "/flag.sock"), std::string::npos) << r.err;
}

TEST(CliNotRunning, JsonAfterTheCommand) {
  TempDir dir;
  CliRun r = RunUmbra({"volume", "list", "--json", "--socket", dir.path() + "/s"});
  EXPECT_EQ(r.status, 1);
  Json j = Json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["error"]["code"], "not_running");
}

}  // namespace
}  // namespace umbra::cli_test
