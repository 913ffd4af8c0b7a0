// umbra writer list, provider list, daemon status.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <iostream>
#include <set>

#include "cli/cli.h"

namespace umbra::cli {
namespace {

int WriterList(Context& ctx) {
  Reply r = ctx.Call("writer.list", Json::object());
  if (!r.ok && (r.code == "unsupported" || r.code == "protocol")) {
    // An umbrad without writer support answers the unknown op this way.
    if (ctx.opt.json) {
      ctx.PrintJson(Json{{"writers", Json::array()}, {"supported", false}});
    } else {
      std::cout << "no writers (writer support is not available in this umbrad)\n";
    }
    return kExitOk;
  }
  if (!r.ok) return ctx.Fail(r);
  if (ctx.opt.json) {
    ctx.PrintJson(r.result);
    return kExitOk;
  }
  const Json& writers = Array(r.result, "writers");
  if (writers.empty()) {
    std::cout << "no writers\n";
    return kExitOk;
  }
  Table t({"name", "kind", "state", "last event", "last error"});
  for (const Json& w : writers) {
    std::string when = "-";
    if (auto it = w.find("last_event_time");
        it != w.end() && it->is_number_integer() && it->get<int64_t>() > 0)
      when = Text(w, "last_event") + " " + FormatTime(static_cast<uint64_t>(it->get<int64_t>()));
    std::string err = Text(w, "last_error");
    if (!w.value("connected", true)) err = err.empty() ? "disconnected" : err + " (disconnected)";
    t.Row({Text(w, "name"), Text(w, "kind"), Text(w, "state"), when, err});
  }
  std::cout << t.Render();
  return kExitOk;
}

int ProviderList(Context& ctx) {
  return ctx.Run("provider.list", Json::object(), [&](const Json& r) {
    const Json& providers = Array(r, "providers");
    if (providers.empty()) {
      ctx.Note("no providers");
      return;
    }
    // Name first, then every capability any provider reports, sorted.
    std::set<std::string> keys;
    for (const Json& p : providers)
      if (p.is_object())
        for (auto it = p.begin(); it != p.end(); ++it)
          if (it.key() != "name") keys.insert(it.key());
    std::vector<std::string> headers{"name"};
    headers.insert(headers.end(), keys.begin(), keys.end());
    Table t(headers);
    for (const Json& p : providers) {
      std::vector<std::string> row{Text(p, "name")};
      for (const auto& k : keys) row.push_back(Text(p, k.c_str()));
      t.Row(row);
    }
    std::cout << t.Render();
  });
}

int DaemonStatus(Context& ctx) {
  return ctx.Run("daemon.status", Json::object(), [&](const Json& r) {
    std::vector<std::string> order{"volumes", "snapshots", "fuse_mount", "state_dir"};
    for (auto it = r.begin(); it != r.end(); ++it)
      if (std::find(order.begin(), order.end(), it.key()) == order.end()) order.push_back(it.key());
    std::string out;
    size_t width = 0;
    for (const auto& k : order) width = std::max(width, k.size());
    for (const auto& k : order) {
      if (!r.contains(k)) continue;
      std::string label = k;
      std::replace(label.begin(), label.end(), '_', ' ');
      out += label + ":" + std::string(width + 2 - k.size(), ' ') + Text(r, k.c_str()) + "\n";
    }
    std::cout << out;
  });
}

}  // namespace

void AddSystemCommands(CLI::App& root, Context& ctx, Registry& reg) {
  {
    CLI::App* g = AddGroup(root, "writer", "Show writers (applications quiesced for snapshots)",
                           "Writers make their on-disk state consistent around the snapshot\n"
                           "instant: the filesystem freeze, hook scripts, and programs using the\n"
                           "writer library.");
    CLI::App* c = AddCommand(
        g, "list", "List writers",
        "Lists the writers umbrad knows: the filesystem writer, every hook script of its\n"
        "writers directory and every library writer registered now (or that failed before it\n"
        "went away), with kind, state (stable, waiting-for-freeze, frozen,\n"
        "waiting-for-completion, failed), last event and its time, and last error.",
        {"umbra writer list", "umbra --json writer list"});
    reg.Add(c, [&ctx] { return WriterList(ctx); });
  }
  {
    CLI::App* g = AddGroup(root, "provider", "Show snapshot providers",
                           "A provider implements snapshots for a kind of volume; 'cow' is\n"
                           "umbrad's own copy-on-write engine.");
    CLI::App* c = AddCommand(
        g, "list", "List snapshot providers and what they support",
        "Lists each provider with its capabilities (persistent snapshots, writers, discard, ...).",
        {"umbra provider list", "umbra --json provider list"});
    reg.Add(c, [&ctx] { return ProviderList(ctx); });
  }
  {
    CLI::App* g = AddGroup(root, "daemon", "Ask umbrad about itself", "Questions about umbrad.");
    CLI::App* c = AddCommand(g, "status", "Show umbrad's status",
                             "Prints the number of volumes and snapshots, the FUSE mount that\n"
                             "serves block devices, and umbrad's state directory. Exits 1 with\n"
                             "\"umbrad is not running\" when no daemon listens on the socket.",
                             {"umbra daemon status", "umbra --socket /tmp/u.sock daemon status"});
    reg.Add(c, [&ctx] { return DaemonStatus(ctx); });
  }
}

}  // namespace umbra::cli
