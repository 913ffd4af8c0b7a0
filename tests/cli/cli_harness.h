// Test helpers for the umbra CLI: run the built binary as a subprocess, and a
// tiny in-test umbrad that speaks the control protocol framing
// (docs/protocol/control.md), records every request and answers each op
// with a canned result or error.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "control/protocol.h"

extern char** environ;

namespace umbra::cli_test {

using Json = control::Json;

struct CliRun {
  int status = -1;  // exit status, or 128+signal
  std::string out;
  std::string err;
};

// Runs the umbra binary with `args`; stdin is /dev/null, or `stdin_fd` if
// given. UMBRA_SOCKET is removed from the environment unless `socket_env`
// is given.
inline CliRun RunUmbra(const std::vector<std::string>& args, const std::string& socket_env = "",
                       int stdin_fd = -1) {
  std::vector<std::string> argv_s{UMBRA_CLI_PATH};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);

  std::vector<std::string> env_s;
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "UMBRA_SOCKET=", 13) != 0) env_s.emplace_back(*e);
  if (!socket_env.empty()) env_s.push_back("UMBRA_SOCKET=" + socket_env);
  std::vector<char*> envp;
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);

  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) return {};
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  if (stdin_fd >= 0) {
    posix_spawn_file_actions_adddup2(&fa, stdin_fd, 0);
  } else {
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  }
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err[1], 2);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  close(out[1]);
  close(err[1]);
  CliRun run;
  if (rc != 0) {
    close(out[0]);
    close(err[0]);
    run.err = std::string("posix_spawn failed: ") + std::strerror(rc);
    return run;
  }
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open_fds = 2;
  char buf[4096];
  while (open_fds > 0) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t n = read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? run.out : run.err).append(buf, static_cast<size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  int ws = 0;
  while (waitpid(pid, &ws, 0) < 0 && errno == EINTR) {
  }
  run.status = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
  return run;
}

// A fresh empty directory under /tmp, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/umbra-cli-XXXXXX";
    path_ = mkdtemp(tmpl) ? tmpl : "";
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A stand-in umbrad on a Unix socket. One connection at a time, requests
// strictly in turn, like the real protocol. Thread-safe accessors.
class FakeUmbrad {
 public:
  explicit FakeUmbrad(std::string path) : path_(std::move(path)) {
    listen_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path_.c_str(), sizeof addr.sun_path - 1);
    ok_ = listen_fd_ >= 0 &&
          bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
          listen(listen_fd_, 8) == 0 && pipe2(stop_, O_CLOEXEC) == 0;
    if (ok_) thread_ = std::thread([this] { Serve(); });
  }
  ~FakeUmbrad() {
    if (thread_.joinable()) {
      char c = 1;
      (void)!write(stop_[1], &c, 1);
      thread_.join();
    }
    for (int fd : {listen_fd_, stop_[0], stop_[1]})
      if (fd >= 0) close(fd);
    unlink(path_.c_str());
  }
  bool ok() const { return ok_; }
  const std::string& path() const { return path_; }

  // The result for `op` (replaces the default).
  void Answer(const std::string& op, Json result) {
    std::lock_guard<std::mutex> l(mu_);
    answers_[op] = {true, std::move(result)};
  }
  // An error response {"code", "message"} for `op`.
  void Refuse(const std::string& op, const std::string& code, const std::string& message) {
    std::lock_guard<std::mutex> l(mu_);
    answers_[op] = {false, Json{{"code", code}, {"message", message}}};
  }
  // Every request received so far, each {"op", "args"} (id dropped).
  std::vector<Json> Requests() {
    std::lock_guard<std::mutex> l(mu_);
    return requests_;
  }
  void Clear() {
    std::lock_guard<std::mutex> l(mu_);
    requests_.clear();
  }

 private:
  void Serve() {
    for (;;) {
      pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (fds[1].revents) return;
      int conn = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (conn < 0) continue;
      Handle(conn);
      close(conn);
    }
  }

  void Handle(int conn) {
    for (;;) {
      pollfd fds[2] = {{conn, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (fds[1].revents) return;
      auto req = control::ReadFrame(conn);
      if (!req.ok()) return;  // EOF or bad frame
      const Json id = req->contains("id") ? (*req)["id"] : Json();
      const std::string op = req->value("op", "");
      std::pair<bool, Json> answer;
      {
        std::lock_guard<std::mutex> l(mu_);
        requests_.push_back(
            Json{{"op", op}, {"args", req->contains("args") ? (*req)["args"] : Json()}});
        auto it = answers_.find(op);
        answer = it != answers_.end()
                     ? it->second
                     : std::pair<bool, Json>{false, Json{{"code", "protocol"},
                                                         {"message", "unknown op '" + op + "'"}}};
      }
      Json resp = answer.first ? Json{{"id", id}, {"ok", true}, {"result", answer.second}}
                               : Json{{"id", id}, {"ok", false}, {"error", answer.second}};
      if (!control::WriteFrame(conn, resp).ok()) return;
    }
  }

  std::string path_;
  int listen_fd_ = -1;
  int stop_[2] = {-1, -1};
  bool ok_ = false;
  std::thread thread_;
  std::mutex mu_;
  std::map<std::string, std::pair<bool, Json>> answers_;
  std::vector<Json> requests_;
};

}  // namespace umbra::cli_test
