// umbra-example-writer: a writer built on the writer library
// (include/umbra/writer.h). It registers with umbrad, logs every event with
// its time, and can be told to misbehave at one event, which is how the
// writer tests make a writer hang, crash or veto.
//
//   umbra-example-writer --name NAME [--volume V]... [--socket PATH]
//       [--log FILE] [--ready-file FILE] [--hold-ms N]
//       [--hang-at EVENT | --crash-at EVENT | --veto-at EVENT]
//
// --log appends "EVENT UNIX_NS" per event (the time the event arrived) and
// "EVENT-done UNIX_NS" when answered. --ready-file is created once
// registered. --hold-ms sleeps that long inside "freeze" (a slow flush).
// Runs until SIGTERM or SIGINT.
#include <getopt.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>

#include "umbra/writer.h"

namespace {

const char kUsage[] =
    "usage: umbra-example-writer --name NAME [--volume V]... [--socket PATH]\n"
    "           [--log FILE] [--ready-file FILE] [--hold-ms N]\n"
    "           [--hang-at EVENT | --crash-at EVENT | --veto-at EVENT]\n"
    "EVENT: prepare, freeze, thaw, post_snapshot, backup_complete, abort\n";

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

int main(int argc, char** argv) {
  umbra::WriterOptions opt;
  std::string log_file, ready_file, hang_at, crash_at, veto_at;
  int hold_ms = 0;
  static const option kLong[] = {{"name", required_argument, nullptr, 'n'},
                                 {"volume", required_argument, nullptr, 'v'},
                                 {"socket", required_argument, nullptr, 's'},
                                 {"log", required_argument, nullptr, 'l'},
                                 {"ready-file", required_argument, nullptr, 'r'},
                                 {"hold-ms", required_argument, nullptr, 'H'},
                                 {"hang-at", required_argument, nullptr, 'h'},
                                 {"crash-at", required_argument, nullptr, 'c'},
                                 {"veto-at", required_argument, nullptr, 'x'},
                                 {"help", no_argument, nullptr, '?'},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, "", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'n':
        opt.name = optarg;
        break;
      case 'v':
        opt.volumes.emplace_back(optarg);
        break;
      case 's':
        opt.socket = optarg;
        break;
      case 'l':
        log_file = optarg;
        break;
      case 'r':
        ready_file = optarg;
        break;
      case 'H':
        hold_ms = std::atoi(optarg);
        break;
      case 'h':
        hang_at = optarg;
        break;
      case 'c':
        crash_at = optarg;
        break;
      case 'x':
        veto_at = optarg;
        break;
      default:
        std::cerr << kUsage;
        return 2;
    }
  }
  if (opt.name.empty() || optind != argc) {
    std::cerr << kUsage;
    return 2;
  }
  opt.log = [](const std::string& s) { std::cerr << "umbra-example-writer: " << s << "\n"; };

  std::mutex log_mu;
  auto record = [&](const std::string& what) {
    if (log_file.empty()) return;
    std::lock_guard l(log_mu);
    std::ofstream(log_file, std::ios::app) << what << " " << NowNs() << "\n";
  };

  umbra::WriterClient client(opt, [&](const umbra::WriterEvent& e) -> umbra::Status {
    record(e.event);
    if (e.event == crash_at) {
      std::cerr << "umbra-example-writer: crashing at " << e.event << " as asked\n";
      ::raise(SIGKILL);
    }
    if (e.event == hang_at) {
      std::cerr << "umbra-example-writer: hanging at " << e.event << " as asked\n";
      for (;;) ::pause();
    }
    if (e.event == veto_at) return umbra::Status(umbra::Code::kWriterFailed, "vetoed by request");
    if (e.event == "freeze" && hold_ms > 0)
      std::this_thread::sleep_for(std::chrono::milliseconds(hold_ms));
    record(e.event + "-done");
    return umbra::Status::Ok();
  });

  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  ::pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  client.Start();
  if (!ready_file.empty()) {
    if (!client.WaitRegistered(std::chrono::seconds(30))) {
      std::cerr << "umbra-example-writer: could not register with umbrad\n";
      return 1;
    }
    std::ofstream(ready_file) << ::getpid() << "\n";
  }
  int sig = 0;
  ::sigwait(&stop, &sig);
  client.Stop();
  return 0;
}
