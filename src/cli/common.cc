// Shared pieces of the umbra commands: the request path, error reporting,
// validation and table output. See cli.h.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <ctime>
#include <filesystem>
#include <iostream>

#include "base/units.h"
#include "cli/cli.h"
#include "umbra/engine.h"

namespace umbra::cli {

Reply Context::Call(const std::string& op, const Json& args) {
  Reply r;
  if (!client_) {
    const std::string path = control::SocketPath(opt.socket);
    auto c = control::Client::Connect(path);
    if (!c.ok()) {
      r.code = c.status().code() == Code::kNotFound ? kCodeNotRunning : "io_error";
      r.message = c.status().message();
      if (c.status().err() == EACCES || c.status().err() == EPERM) {
        r.code = "permission_denied";
        r.message += " (umbra needs root or membership in umbrad's admin group)";
      }
      return r;
    }
    client_.emplace(std::move(*c));
  }
  const uint64_t id = next_id_++;
  Status w = control::WriteFrame(client_->fd(), Json{{"id", id}, {"op", op}, {"args", args}});
  if (!w.ok()) {
    r.code = "io_error";
    r.message = "sending the request to umbrad: " + w.message();
    return r;
  }
  auto resp = control::ReadFrame(client_->fd());
  if (!resp.ok()) {
    r.code = resp.status().code() == Code::kNotFound ? "io_error" : "protocol";
    r.message = resp.status().code() == Code::kNotFound
                    ? "umbrad closed the connection before answering"
                    : "bad response from umbrad: " + resp.status().message();
    return r;
  }
  const Json& j = *resp;
  if (!j.contains("id") || j["id"] != id) {
    r.code = "protocol";
    r.message = "protocol error: umbrad answered another request";
    return r;
  }
  if (j.value("ok", false)) {
    r.ok = true;
    r.result = j.contains("result") && !j["result"].is_null() ? j["result"] : Json::object();
    return r;
  }
  const Json e = j.contains("error") && j["error"].is_object() ? j["error"] : Json::object();
  r.code = e.contains("code") && e["code"].is_string() ? e["code"].get<std::string>() : "io_error";
  r.message = e.contains("message") && e["message"].is_string() ? e["message"].get<std::string>()
                                                                : "umbrad reported an error";
  return r;
}

int Context::Run(const std::string& op, const Json& args,
                 const std::function<void(const Json&)>& human) {
  Reply r = Call(op, args);
  if (!r.ok) return Fail(r);
  if (opt.json) {
    PrintJson(r.result);
  } else {
    human(r.result);
  }
  return kExitOk;
}

int Context::Fail(const std::string& code, const std::string& message) {
  std::cerr << "umbra: " << message << "\n";
  if (opt.json) PrintJson(Json{{"error", {{"code", code}, {"message", message}}}});
  return kExitFailure;
}

int Context::Usage(const std::string& message) {
  const std::string help = command.empty() ? "umbra --help" : "umbra " + command + " --help";
  std::cerr << "umbra: " << message << " (see '" << help << "')\n";
  if (opt.json) PrintJson(Json{{"error", {{"code", kCodeUsage}, {"message", message}}}});
  return kExitUsage;
}

void Context::PrintJson(const Json& j) const {
  std::cout << j.dump(2, ' ', false, Json::error_handler_t::replace) << "\n";
}

void Context::Note(const std::string& line) const {
  if (!opt.quiet) std::cout << line << "\n";
}

void Context::Warn(const std::string& line) const {
  if (!opt.quiet) std::cerr << "umbra: warning: " << line << "\n";
}

// ---- help ----

namespace {

constexpr const char* kExitStatusText =
    "Global options (before or after the command): --socket PATH, --json, -q/--quiet;\n"
    "see 'umbra --help'.\n\n"
    "Exit status:\n"
    "  0  success\n"
    "  1  umbrad refused or failed the request, or is not running (message on stderr;\n"
    "     with --json also {\"error\": {\"code\", \"message\"}} on stdout)\n"
    "  2  usage error (bad or missing argument); nothing was sent to umbrad";

std::string Indent(const std::string& text) {
  std::string out = "  ";
  for (char c : text) {
    out += c;
    if (c == '\n') out += "  ";
  }
  // No indentation on blank lines.
  for (size_t p; (p = out.find("\n  \n")) != std::string::npos;) out.replace(p, 4, "\n\n");
  return out;
}

}  // namespace

CLI::App* AddCommand(CLI::App* group, const std::string& name, const std::string& summary,
                     const std::string& description, const std::vector<std::string>& examples) {
  // --help: summary, usage, arguments, options, then the description,
  // examples and exit status (the footer). The group lists the summary.
  CLI::App* cmd = group->add_subcommand(name, summary);
  std::string footer = "Description:\n" + Indent(description) + "\n\nExamples:\n";
  for (const auto& e : examples) footer += "  " + e + "\n";
  footer += "\n";
  footer += kExitStatusText;
  cmd->footer(footer);
  cmd->fallthrough();  // global options (--json, --socket, --quiet) work after the command too
  return cmd;
}

CLI::App* AddGroup(CLI::App& root, const std::string& name, const std::string& summary,
                   const std::string& description) {
  CLI::App* g = root.add_subcommand(name, summary);
  g->footer("Description:\n" + Indent(description) + "\n\nRun 'umbra " + name +
            " COMMAND --help' for a command's arguments and examples.\n\n" + kExitStatusText);
  g->require_subcommand(1);
  g->fallthrough();
  return g;
}

// ---- validation ----

Status CheckName(const std::string& what, const std::string& name) {
  const bool good =
      !name.empty() && name.size() <= 64 && std::all_of(name.begin(), name.end(), [](char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               c == '.' || c == '_' || c == '-';
      });
  if (good) return Status::Ok();
  return Status::InvalidArgument("invalid " + what + " name '" + name +
                                 "': use 1 to 64 of the characters A-Z a-z 0-9 . _ -");
}

Result<uint64_t> ParseSizeArg(const std::string& flag, const std::string& text) {
  auto b = ParseSize(text);
  if (!b.ok()) return Status::InvalidArgument(flag + ": " + b.status().message());
  if (*b == 0) return Status::InvalidArgument(flag + ": size must be greater than zero");
  return *b;
}

Status CheckMaxSize(const std::string& text) {
  auto m = MaxSize::Parse(text);
  if (!m.ok()) return Status::InvalidArgument("--max-size: " + m.status().message());
  return Status::Ok();
}

std::string AbsolutePath(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(path, ec), ec);
  if (ec) p = fs::absolute(path, ec).lexically_normal();
  std::string s = p.string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s.empty() ? path : s;
}

// ---- output ----

std::string Table::Render() const {
  std::vector<size_t> width(headers_.size(), 0);
  for (size_t c = 0; c < headers_.size(); ++c) width[c] = headers_[c].size();
  for (const auto& row : rows_)
    for (size_t c = 0; c < row.size() && c < width.size(); ++c)
      width[c] = std::max(width[c], row[c].size());
  auto line = [&](const std::vector<std::string>& cells, bool header) {
    std::string out;
    for (size_t c = 0; c < width.size(); ++c) {
      std::string cell = c < cells.size() ? cells[c] : "";
      if (header) std::transform(cell.begin(), cell.end(), cell.begin(), ::toupper);
      const size_t pad = width[c] - std::min(width[c], cell.size());
      const bool right = std::find(right_.begin(), right_.end(), c) != right_.end();
      if (c > 0) out += "  ";
      if (right) out += std::string(pad, ' ');
      out += cell;
      if (!right) out += std::string(pad, ' ');
    }
    while (!out.empty() && out.back() == ' ') out.pop_back();
    return out + "\n";
  };
  std::string out = line(headers_, true);
  for (const auto& row : rows_) out += line(row, false);
  return out;
}

std::string FormatTime(uint64_t unix_ns) {
  const time_t secs = static_cast<time_t>(unix_ns / 1'000'000'000ull);
  tm local{};
  if (!localtime_r(&secs, &local)) return std::to_string(unix_ns);
  char buf[64];
  if (std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S%z", &local) == 0)
    return std::to_string(unix_ns);
  std::string s = buf;  // ...+0100 -> ...+01:00
  if (s.size() >= 5) s.insert(s.size() - 2, ":");
  return s;
}

std::string Text(const Json& obj, const char* key, const std::string& missing) {
  if (!obj.is_object() || !obj.contains(key)) return missing;
  const Json& v = obj[key];
  if (v.is_null()) return missing;
  if (v.is_string()) return v.get<std::string>().empty() ? missing : v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "yes" : "no";
  return v.dump();
}

std::string BytesText(const Json& obj, const char* key, const std::string& missing) {
  if (!obj.is_object() || !obj.contains(key)) return missing;
  const Json& v = obj[key];
  if (v.is_number_unsigned()) return FormatBytes(v.get<uint64_t>());
  if (v.is_number_integer() && v.get<int64_t>() >= 0)
    return FormatBytes(static_cast<uint64_t>(v.get<int64_t>()));
  return Text(obj, key, missing);
}

const Json& Array(const Json& obj, const char* key) {
  static const Json kEmpty = Json::array();
  if (obj.is_object() && obj.contains(key) && obj[key].is_array()) return obj[key];
  return kEmpty;
}

}  // namespace umbra::cli
