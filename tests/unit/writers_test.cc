// The writer sequence (src/writers) with in-process writers and real hook
// scripts; the filesystem freeze itself is covered by cli_e2e_writers*.
#include "writers/writers.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <future>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "system_util.h"

namespace umbra::writers {
namespace {

using namespace std::chrono_literals;

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Records every event it gets in a shared log; can veto, fail or block at
// one event.
class FakeWriter : public Writer {
 public:
  FakeWriter(std::string name, std::vector<std::string>* log, std::mutex* mu,
             std::vector<std::string> volumes = {})
      : name_(std::move(name)), log_(log), mu_(mu), volumes_(std::move(volumes)) {}
  std::string name() const override { return name_; }
  std::string kind() const override { return "library"; }
  bool Cares(const std::vector<std::string>& vols) const override {
    if (volumes_.empty()) return true;
    for (const auto& v : vols)
      for (const auto& m : volumes_)
        if (v == m) return true;
    return false;
  }
  Status Deliver(Event e, const EventContext&, Clock::time_point deadline) override {
    {
      std::lock_guard l(*mu_);
      log_->push_back(name_ + ":" + EventName(e));
    }
    if (e == veto_at) return Status(Code::kWriterFailed, "no");
    if (e == block_at) {
      std::this_thread::sleep_until(deadline);
      return Status::TimedOut("no answer");
    }
    if (e == Event::kFreeze && hold.count() > 0) std::this_thread::sleep_for(hold);
    return Status::Ok();
  }
  std::optional<Event> veto_at, block_at;
  std::chrono::milliseconds hold{0};

 private:
  const std::string name_;
  std::vector<std::string>* log_;
  std::mutex* mu_;
  const std::vector<std::string> volumes_;
};

class WritersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    hooks_ = dir_.path() + "/hooks";
    ::mkdir(hooks_.c_str(), 0755);
  }
  void Script(const std::string& name, const std::string& body, mode_t mode = 0755) {
    const std::string p = hooks_ + "/" + name;
    std::ofstream(p) << "#!/bin/sh\n" << body << "\n";
    ::chmod(p.c_str(), mode);
  }
  std::shared_ptr<FakeWriter> Fake(const std::string& name, std::vector<std::string> vols = {}) {
    return std::make_shared<FakeWriter>(name, &log_, &mu_, std::move(vols));
  }
  Request Req(std::vector<std::string> vols = {"v"}) {
    Request r;
    r.ctx.set_id = "set-1";
    r.ctx.volumes = std::move(vols);
    return r;
  }
  Status Commit() {
    std::lock_guard l(mu_);
    log_.push_back("commit");
    return Status::Ok();
  }
  Bounds Short() {
    Bounds b;
    b.prepare = 500ms;
    b.freeze_window = 500ms;
    return b;
  }

  test_util::TempDir dir_{"umbra-writers-test"};
  std::string hooks_;
  std::vector<std::string> log_;
  std::mutex mu_;
};

TEST_F(WritersTest, SkipsTheNamesQemuGuestAgentSkips) {
  for (const char* n : {"a~", "a.bak", "a.orig", "a.rpmnew", "a.rpmorig", "a.rpmsave", "a.sample",
                        "a.dpkg-old", "a.dpkg-new", "a.dpkg-tmp", "a.dpkg-dist", "a.dpkg-bak",
                        "a.dpkg-backup", "a.dpkg-remove", ".hidden"})
    EXPECT_TRUE(HookNameSkipped(n)) << n;
  for (const char* n : {"10-postgresql", "mysql-flush.sh", "backup", "a.bak.sh"})
    EXPECT_FALSE(HookNameSkipped(n)) << n;
}

TEST_F(WritersTest, HookScriptsAreExecutableRegularFilesInNameOrder) {
  Script("20-b", "exit 0");
  Script("10-a", "exit 0");
  Script("30-not-exec", "exit 0", 0644);
  Script("40-c.dpkg-old", "exit 0");
  ::mkdir((hooks_ + "/50-dir").c_str(), 0755);
  EXPECT_EQ(HookScripts(hooks_), (std::vector<std::string>{hooks_ + "/10-a", hooks_ + "/20-b"}));
  EXPECT_TRUE(HookScripts(dir_.path() + "/missing").empty());
}

TEST_F(WritersTest, RunHookPassesTheArgumentAndTheSetAndReportsExitStatus) {
  const std::string out = dir_.path() + "/out";
  Script("ok", "echo \"$1 $UMBRA_SNAPSHOT_SET $UMBRA_VOLUMES\" > " + out);
  Script("veto", "exit 3");
  EventContext ctx{"set-9", {"a", "b"}, ""};
  ASSERT_TRUE(RunHook(hooks_ + "/ok", "freeze", ctx, Clock::now() + 5s).ok());
  EXPECT_EQ(ReadText(out), "freeze set-9 a b\n");
  Status s = RunHook(hooks_ + "/veto", "freeze", ctx, Clock::now() + 5s);
  EXPECT_EQ(s.code(), Code::kWriterFailed);
  EXPECT_EQ(s.message(), "freeze exited with status 3");
}

TEST_F(WritersTest, RunHookKillsAHangingScriptAndItsChildrenAtTheDeadline) {
  const std::string pidfile = dir_.path() + "/child.pid";
  Script("hang", "sleep 100 & echo $! > " + pidfile + "; exec sleep 100");
  const auto t0 = Clock::now();
  Status s = RunHook(hooks_ + "/hang", "freeze", EventContext{}, Clock::now() + 300ms);
  EXPECT_EQ(s.code(), Code::kTimedOut);
  EXPECT_LT(Clock::now() - t0, 3s);
  const pid_t child = std::stoi(ReadText(pidfile));
  bool gone = false;
  for (int i = 0; i < 50 && !gone; ++i) {
    std::ifstream st("/proc/" + std::to_string(child) + "/stat");
    std::string line;
    std::getline(st, line);
    gone = line.empty() || line.find(") Z") != std::string::npos;
    if (!gone) std::this_thread::sleep_for(20ms);
  }
  EXPECT_TRUE(gone) << "the hook's background child survived";
}

TEST_F(WritersTest, RunHookDoesNotWaitForABackgroundChildOfASuccessfulScript) {
  const std::string pidfile = dir_.path() + "/child.pid";
  // Like a database hook holding a lock until thaw: returns, child stays.
  Script("hold", "sleep 30 & echo $! > " + pidfile + "; exit 0");
  const auto t0 = Clock::now();
  ASSERT_TRUE(RunHook(hooks_ + "/hold", "freeze", EventContext{}, Clock::now() + 5s).ok());
  EXPECT_LT(Clock::now() - t0, 2s);
  const pid_t child = std::stoi(ReadText(pidfile));
  EXPECT_EQ(::kill(child, 0), 0) << "the held child was killed";
  ::kill(child, SIGKILL);
}

TEST_F(WritersTest, SequenceOrderWritersThenCommitThenReverseThaw) {
  const std::string hooklog = dir_.path() + "/hook.log";
  Script("10-h", "echo \"$1\" >> " + hooklog);
  Coordinator c(hooks_, Short(), "/bin/false");
  c.Add(Fake("A"));
  c.Add(Fake("B"));
  c.Add(Fake("other", {"w"}));  // not about volume v
  auto out = c.Run(Req(), [&] { return Commit(); });
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_TRUE(out->failed.empty());
  EXPECT_EQ(out->writers, (std::vector<std::string>{"A", "B", "10-h"}));
  EXPECT_EQ(log_,
            (std::vector<std::string>{"A:prepare", "B:prepare", "A:freeze", "B:freeze", "commit",
                                      "B:thaw", "A:thaw", "A:post_snapshot", "B:post_snapshot"}));
  EXPECT_EQ(ReadText(hooklog), "freeze\nthaw\n");
  for (const WriterStatus& w : c.List()) {
    if (w.name == "A") {
      EXPECT_EQ(w.state, State::kWaitingForCompletion);
    }
  }
  log_.clear();
  c.Complete("set-1");
  EXPECT_EQ(log_, (std::vector<std::string>{"A:backup_complete", "B:backup_complete"}));
  c.Complete("set-1");  // once only
  EXPECT_EQ(log_.size(), 2u);
  for (const WriterStatus& w : c.List()) EXPECT_EQ(w.state, State::kStable) << w.name;
}

TEST_F(WritersTest, AVetoAbortsEveryoneAndNothingIsCommitted) {
  Coordinator c("", Short(), "/bin/false");
  auto a = Fake("A"), b = Fake("B"), d = Fake("D");
  b->veto_at = Event::kFreeze;
  c.Add(a);
  c.Add(b);
  c.Add(d);
  auto out = c.Run(Req(), [&] { return Commit(); });
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), Code::kWriterFailed);
  EXPECT_EQ(out.status().message(), "writer 'B': no; the snapshot was not taken");
  // A (frozen) and D (prepared only) are told to abort; B is not asked again.
  EXPECT_EQ(log_, (std::vector<std::string>{"A:prepare", "B:prepare", "D:prepare", "A:freeze",
                                            "B:freeze", "A:abort", "D:abort"}));
  for (const WriterStatus& w : c.List()) {
    if (w.name == "B") {
      EXPECT_EQ(w.state, State::kFailed);
      EXPECT_EQ(w.last_error, "freeze: no");
    } else {
      EXPECT_EQ(w.state, State::kStable) << w.name;
    }
  }
}

TEST_F(WritersTest, AHungWriterTimesOutAtTheWindowBound) {
  Coordinator c("", Short(), "/bin/false");
  auto a = Fake("A");
  a->block_at = Event::kFreeze;
  c.Add(a);
  const auto t0 = Clock::now();
  auto out = c.Run(Req(), [&] { return Commit(); });
  EXPECT_EQ(out.status().code(), Code::kWriterFailed);
  EXPECT_LT(Clock::now() - t0, 2s);
  EXPECT_EQ(std::count(log_.begin(), log_.end(), "commit"), 0);
}

TEST_F(WritersTest, IgnoredFailuresCommitAndAreReported) {
  Coordinator c("", Short(), "/bin/false");
  auto a = Fake("A"), b = Fake("B");
  b->veto_at = Event::kPrepare;
  c.Add(a);
  c.Add(b);
  Request r = Req();
  r.ignore_failures = true;
  auto out = c.Run(r, [&] { return Commit(); });
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_EQ(out->failed.size(), 1u);
  EXPECT_EQ(out->failed.at("B"), "no");
  // B, failed in prepare, is left out of the rest of the sequence.
  EXPECT_EQ(log_, (std::vector<std::string>{"A:prepare", "B:prepare", "A:freeze", "commit",
                                            "A:thaw", "A:post_snapshot"}));
}

TEST_F(WritersTest, WindowPassedBeforeCommitAborts) {
  Bounds b = Short();
  b.freeze_window = 100ms;
  Coordinator c("", b, "/bin/false");
  auto a = Fake("A");
  a->hold = 300ms;  // answers, but too late for the window
  c.Add(a);
  auto out = c.Run(Req(), [&] { return Commit(); });
  EXPECT_EQ(out.status().code(), Code::kWriterFailed);
  EXPECT_NE(out.status().message().find("freeze window of 100 ms passed"), std::string::npos)
      << out.status().message();
  EXPECT_EQ(log_.back(), "A:abort");
}

TEST_F(WritersTest, OneSequencePerVolumeAtATime) {
  Bounds b;
  b.freeze_window = 5s;
  Coordinator c("", b, "/bin/false");
  auto a = Fake("A");
  a->hold = 400ms;
  c.Add(a);
  auto first =
      std::async(std::launch::async, [&] { return c.Run(Req(), [&] { return Commit(); }); });
  std::this_thread::sleep_for(100ms);
  auto second = c.Run(Req({"x", "v"}), [&] { return Commit(); });
  EXPECT_EQ(second.status().code(), Code::kBusy);
  EXPECT_NE(second.status().message().find("volume 'v'"), std::string::npos);
  EXPECT_TRUE(first.get().ok());
  EXPECT_TRUE(c.Run(Req({"x", "v"}), [&] { return Commit(); }).ok());  // free again
}

TEST_F(WritersTest, AWriterThatLeavesAfterFailingStaysListed) {
  Coordinator c("", Short(), "/bin/false");
  auto a = Fake("A"), b = Fake("B");
  b->veto_at = Event::kFreeze;
  c.Add(a);
  c.Add(b);
  ASSERT_FALSE(c.Run(Req(), [&] { return Commit(); }).ok());
  c.Remove("A", a.get());
  c.Remove("B", b.get());
  std::vector<std::string> names;
  for (const WriterStatus& w : c.List()) names.push_back(w.name + (w.connected ? "" : "-gone"));
  EXPECT_EQ(names, (std::vector<std::string>{"B-gone", "filesystem"}));
}

TEST_F(WritersTest, ThawGuardExitsWhenReleasedAndAtItsDeadline) {
  ThawGuard g;
  ASSERT_TRUE(
      g.Arm(UMBRAD_PATH, {dir_.path() + "/not-a-mount"}, std::chrono::system_clock::now() + 10s)
          .ok());
  EXPECT_TRUE(g.Alive());
  const auto t0 = Clock::now();
  g.Release();  // tells it "thawed": it exits at once
  EXPECT_LT(Clock::now() - t0, 2s);
  EXPECT_FALSE(g.Alive());

  ThawGuard g2;
  ASSERT_TRUE(
      g2.Arm(UMBRAD_PATH, {dir_.path() + "/not-a-mount"}, std::chrono::system_clock::now() + 200ms)
          .ok());
  bool exited = false;
  for (int i = 0; i < 100 && !exited; ++i) {
    exited = !g2.Alive();
    if (!exited) std::this_thread::sleep_for(20ms);
  }
  EXPECT_TRUE(exited) << "the guard did not act at its deadline";
}

}  // namespace
}  // namespace umbra::writers
