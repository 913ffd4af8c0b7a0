// umbra, the command-line tool: shared pieces of every command group.
//
// Design notes:
//  * Each command group (volume, storage, snapshot, system) lives in its own
//    file and registers its CLI11 subcommands with a Registry, pairing each
//    subcommand with the function that runs it. main.cc parses, then runs the
//    one command that was parsed.
//  * Everything that can be checked without the daemon (names, sizes,
//    required arguments) is checked before connecting; such usage errors exit
//    with kExitUsage and one line on stderr.
//  * One request per command over one connection (docs/protocol/control.md).
//    The daemon's wire error code is kept as text so `--json` can report it and
//    callers can tell "unsupported"/"protocol" apart.
//  * `--json` prints the daemon's result object as is (pretty, keys sorted);
//    human output is aligned tables or one-line confirmations.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "control/protocol.h"
#include "umbra/status.h"

namespace CLI {
class App;
}  // namespace CLI

namespace umbra::cli {

using Json = control::Json;

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // the daemon refused or failed, or is not running
inline constexpr int kExitUsage = 2;    // bad command line; nothing was sent

// Client-side error codes in the `--json` error object, besides the
// daemon's wire codes.
inline constexpr const char* kCodeNotRunning = "not_running";
inline constexpr const char* kCodeUsage = "usage";

struct GlobalOptions {
  std::string socket;  // --socket; empty: $UMBRA_SOCKET, else the default
  bool json = false;
  bool quiet = false;
};

// One request's outcome: the result, or an error with its wire code.
struct Reply {
  bool ok = false;
  Json result;
  std::string code;
  std::string message;
};

class Context {
 public:
  GlobalOptions opt;
  std::string command;  // e.g. "volume create"; set before the command runs

  // Sends one request, connecting on first use. A missing daemon gives code
  // kCodeNotRunning and "umbrad is not running (no daemon listening at PATH)".
  Reply Call(const std::string& op, const Json& args);

  // Runs one request: on failure prints the error and returns kExitFailure;
  // on success prints the result as JSON with --json, else calls `human`.
  int Run(const std::string& op, const Json& args, const std::function<void(const Json&)>& human);

  // Prints "umbra: MESSAGE" on stderr (and with --json the error object on
  // stdout); returns kExitFailure.
  int Fail(const std::string& code, const std::string& message);
  int Fail(const Reply& r) { return Fail(r.code, r.message); }
  // A usage error: one line on stderr naming the command's --help; with
  // --json also the error object (code "usage"). Returns kExitUsage.
  int Usage(const std::string& message);

  void PrintJson(const Json& j) const;
  // A confirmation line on stdout; suppressed by --quiet.
  void Note(const std::string& line) const;
  // "umbra: warning: LINE" on stderr; suppressed by --quiet.
  void Warn(const std::string& line) const;

 private:
  std::optional<control::Client> client_;
  uint64_t next_id_ = 1;
};

// Subcommands paired with what runs them.
class Registry {
 public:
  void Add(CLI::App* cmd, std::function<int()> run) { commands_.emplace_back(cmd, std::move(run)); }
  const std::vector<std::pair<CLI::App*, std::function<int()>>>& commands() const {
    return commands_;
  }

 private:
  std::vector<std::pair<CLI::App*, std::function<int()>>> commands_;
};

// Creates a command under `group` with man-page style help: `summary` is the
// one-line text in the group's list, `description` the paragraphs shown by
// --help, `examples` one example per line (each "command  # comment").
CLI::App* AddCommand(CLI::App* group, const std::string& name, const std::string& summary,
                     const std::string& description, const std::vector<std::string>& examples);
CLI::App* AddGroup(CLI::App& root, const std::string& name, const std::string& summary,
                   const std::string& description);

// Command groups (one file each).
void AddVolumeCommands(CLI::App& root, Context& ctx, Registry& reg);
void AddStorageCommands(CLI::App& root, Context& ctx, Registry& reg);
void AddSnapshotCommands(CLI::App& root, Context& ctx, Registry& reg);
void AddSystemCommands(CLI::App& root, Context& ctx, Registry& reg);  // writer, provider, daemon
void AddImageCommands(CLI::App& root, Context& ctx, Registry& reg);   // image, repo

// ---- client-side validation (before connecting) ----

// Volume and snapshot names: 1-64 of [A-Za-z0-9._-].
Status CheckName(const std::string& what, const std::string& name);
// A size in bytes (ParseSize syntax), greater than zero.
Result<uint64_t> ParseSizeArg(const std::string& flag, const std::string& text);
// "10G", "20%", "unbounded" (MaxSize::Parse).
Status CheckMaxSize(const std::string& text);
// The path made absolute (the daemon has another working directory).
std::string AbsolutePath(const std::string& path);

// ---- human output ----

class Table {
 public:
  explicit Table(std::vector<std::string> headers) : headers_(std::move(headers)) {}
  // Columns to right-align (numbers, sizes).
  void AlignRight(size_t col) { right_.push_back(col); }
  void Row(std::vector<std::string> cells) { rows_.push_back(std::move(cells)); }
  size_t size() const { return rows_.size(); }
  // Headers upper-cased, columns two spaces apart, no trailing spaces.
  std::string Render() const;

 private:
  std::vector<std::string> headers_;
  std::vector<std::vector<std::string>> rows_;
  std::vector<size_t> right_;
};

// Unix nanoseconds as local ISO-8601 with offset: 2026-11-25T23:07:34+01:00.
std::string FormatTime(uint64_t unix_ns);
// Field as text: strings as is, numbers in decimal, bools "yes"/"no",
// null or missing as `missing`.
std::string Text(const Json& obj, const char* key, const std::string& missing = "-");
// A byte count field with FormatBytes; null or missing as `missing`.
std::string BytesText(const Json& obj, const char* key, const std::string& missing = "-");
// An array field, or an empty array when missing.
const Json& Array(const Json& obj, const char* key);

}  // namespace umbra::cli
