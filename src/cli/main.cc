// umbra: the command-line tool of Umbra. Parses the command line, runs the
// one command named on it, and maps every failure to an exit status:
// 0 success, 1 the daemon failed the request (or is not running), 2 usage.
// Commands: volume_cmds.cc, storage_cmds.cc, snapshot_cmds.cc, system_cmds.cc.
#include <CLI/CLI.hpp>
#include <cctype>
#include <cstring>
#include <iostream>

#include "cli/cli.h"

#ifndef UMBRA_VERSION
#define UMBRA_VERSION "0.0.0"
#endif

namespace umbra::cli {
namespace {

// The subcommand chain the parser reached, e.g. {volume, create}.
std::vector<CLI::App*> Chain(CLI::App& root) {
  std::vector<CLI::App*> chain;
  CLI::App* app = &root;
  for (;;) {
    auto subs = app->get_subcommands();
    if (subs.empty()) break;
    app = subs.front();
    chain.push_back(app);
  }
  return chain;
}

std::string CommandNames(CLI::App* app) {
  std::string names;
  for (CLI::App* s : app->get_subcommands([](CLI::App*) { return true; })) {
    if (s->get_name().empty()) continue;
    if (!names.empty()) names += ", ";
    names += s->get_name();
  }
  return names;
}

// One clear line for a CLI11 parse error.
std::string Reword(const CLI::ParseError& e, CLI::App& root, const std::vector<CLI::App*>& chain) {
  CLI::App* at = chain.empty() ? &root : chain.back();
  const bool is_group = !at->get_subcommands([](CLI::App*) { return true; }).empty();
  std::string msg = e.what();
  // With fallthrough, what a command did not take may sit with its parent.
  std::vector<std::string> extra = at->remaining();
  for (auto it = chain.rbegin(); extra.empty() && it != chain.rend(); ++it)
    extra = (*it)->remaining();
  if (extra.empty()) extra = root.remaining();
  if (is_group && !extra.empty() && extra.front().rfind("-", 0) != 0)
    return "unknown command '" + extra.front() + "'; one of: " + CommandNames(at);
  if (dynamic_cast<const CLI::RequiredError*>(&e)) {
    if (msg.find("subcommand") != std::string::npos)
      return "missing command; one of: " + CommandNames(at);
    const std::string suffix = " is required";
    if (msg.size() > suffix.size() && msg.ends_with(suffix)) {
      const std::string what = msg.substr(0, msg.size() - suffix.size());
      return (what.rfind("-", 0) == 0 ? "missing required option " : "missing argument ") + what;
    }
  }
  if (dynamic_cast<const CLI::ExtrasError*>(&e) && !extra.empty()) {
    return (extra.front().rfind("-", 0) == 0 ? "unknown option '" : "unexpected argument '") +
           extra.front() + "'";
  }
  if (msg.size() > 1 && std::isupper(static_cast<unsigned char>(msg[0])) &&
      std::islower(static_cast<unsigned char>(msg[1])))
    msg[0] = static_cast<char>(std::tolower(static_cast<unsigned char>(msg[0])));
  return msg;
}

std::string Path(const std::vector<CLI::App*>& chain) {
  std::string p;
  for (CLI::App* a : chain) p += (p.empty() ? "" : " ") + a->get_name();
  return p;
}

int Main(int argc, char** argv) {
  Context ctx;
  // Known before parsing, so even a parse error can be reported as JSON.
  for (int i = 1; i < argc && std::strcmp(argv[i], "--") != 0; ++i)
    if (std::strcmp(argv[i], "--json") == 0) ctx.opt.json = true;

  CLI::App app(
      "umbra: manage protected volumes, shadow storage and snapshots served by umbrad.\n\n"
      "umbra talks to umbrad over its control socket: --socket, else $UMBRA_SOCKET, else\n"
      "/run/umbra/umbrad.sock. Output is human tables by default and the daemon's result\n"
      "object with --json.",
      "umbra");
  app.set_version_flag("--version", std::string("umbra " UMBRA_VERSION " (control protocol ") +
                                        std::to_string(control::kProtocolVersion) + ")");
  app.add_option("--socket", ctx.opt.socket,
                 "umbrad's control socket (default: $UMBRA_SOCKET, else /run/umbra/umbrad.sock)")
      ->type_name("PATH");
  app.add_flag("--json", ctx.opt.json, "Print results (and errors) as JSON on stdout");
  app.add_flag("-q,--quiet", ctx.opt.quiet, "Print only requested data (device paths, ids)");
  app.footer(
      "Examples:\n"
      "  umbra volume create db --size 10G\n"
      "  umbra storage add db --on /var/lib/umbra/shadow/db --max-size 20%\n"
      "  mount $(umbra volume attach db) /srv/db\n"
      "  umbra snapshot create db --persistent\n"
      "  umbra --json snapshot list db\n\n"
      "Run 'umbra COMMAND --help' (e.g. 'umbra snapshot create --help') for details.\n\n"
      "Exit status:\n"
      "  0  success\n"
      "  1  umbrad refused or failed the request, or is not running\n"
      "  2  usage error; nothing was sent to umbrad");
  app.require_subcommand(1);
  app.get_formatter()->column_width(36);

  Registry reg;
  AddVolumeCommands(app, ctx, reg);
  AddStorageCommands(app, ctx, reg);
  AddSnapshotCommands(app, ctx, reg);
  AddSystemCommands(app, ctx, reg);
  AddImageCommands(app, ctx, reg);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    const auto chain = Chain(app);
    ctx.command = Path(chain);
    return ctx.Usage(Reword(e, app, chain));
  }
  const auto chain = Chain(app);
  ctx.command = Path(chain);
  for (const auto& [cmd, run] : reg.commands())
    if (cmd->parsed()) return run();
  return ctx.Usage("missing command");
}

}  // namespace
}  // namespace umbra::cli

int main(int argc, char** argv) { return umbra::cli::Main(argc, argv); }
