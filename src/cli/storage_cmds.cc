// umbra storage add|resize|delete|list: shadow storage per volume.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <memory>

#include "cli/cli.h"

namespace umbra::cli {
namespace {

struct StorageArgs {
  std::string volume;
  std::string on;
  std::string max_size;
};

std::string Percent(const Json& s) {
  if (!s.contains("percent") || !s["percent"].is_number()) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f%%", s["percent"].get<double>());
  return buf;
}

std::string Maximum(const Json& s) {
  if (!s.contains("max") || !s["max"].is_number()) return Text(s, "max_size", "unbounded");
  std::string out = BytesText(s, "max");
  const std::string spec = Text(s, "max_size", "");
  if (!spec.empty() && spec.back() == '%') out += " (" + spec + ")";
  return out;
}

// The warning threshold a storage object has reached: the daemon's
// "warning" field, else computed from "percent".
std::string WarningLevel(const Json& s) {
  if (s.contains("warning") && s["warning"].is_string()) return s["warning"].get<std::string>();
  if (s.contains("percent") && s["percent"].is_number()) {
    const double p = s["percent"].get<double>();
    if (p >= 90) return "90%";
    if (p >= 80) return "80%";
  }
  return "";
}

void WarnIfFull(const Context& ctx, const Json& s) {
  const std::string level = WarningLevel(s);
  if (level.empty()) return;
  ctx.Warn("shadow storage of volume '" + Text(s, "volume", "?") + "' is " + Percent(s) +
           " full (warning level " + level + ", maximum " + BytesText(s, "max", "unbounded") +
           "); when it is full the oldest snapshots are deleted");
}

void PrintStorage(const Context& ctx, const Json& list) {
  Table t({"volume", "location", "used", "allocated", "maximum", "percent"});
  for (size_t c = 2; c < 6; ++c) t.AlignRight(c);
  for (const Json& s : list)
    t.Row({Text(s, "volume"), Text(s, "location"), BytesText(s, "used"), BytesText(s, "allocated"),
           Maximum(s), Percent(s)});
  std::cout << t.Render();
  for (const Json& s : list) WarnIfFull(ctx, s);
}

int Add(Context& ctx, const StorageArgs& a) {
  if (Status s = CheckName("volume", a.volume); !s.ok()) return ctx.Usage(s.message());
  Json args{{"volume", a.volume}, {"on", AbsolutePath(a.on)}};
  if (!a.max_size.empty()) {
    if (Status s = CheckMaxSize(a.max_size); !s.ok()) return ctx.Usage(s.message());
    args["max_size"] = a.max_size;
  }
  return ctx.Run("storage.add", args, [&](const Json& s) {
    ctx.Note("added shadow storage for volume '" + Text(s, "volume", a.volume) + "' at " +
             Text(s, "location") + ", maximum " + Maximum(s));
    WarnIfFull(ctx, s);
  });
}

int Resize(Context& ctx, const StorageArgs& a) {
  if (Status s = CheckName("volume", a.volume); !s.ok()) return ctx.Usage(s.message());
  if (Status s = CheckMaxSize(a.max_size); !s.ok()) return ctx.Usage(s.message());
  return ctx.Run("storage.resize", Json{{"volume", a.volume}, {"max_size", a.max_size}},
                 [&](const Json& s) {
                   ctx.Note("shadow storage of volume '" + Text(s, "volume", a.volume) +
                            "': maximum " + Maximum(s));
                   WarnIfFull(ctx, s);
                 });
}

int Delete(Context& ctx, const StorageArgs& a) {
  if (Status s = CheckName("volume", a.volume); !s.ok()) return ctx.Usage(s.message());
  return ctx.Run("storage.delete", Json{{"volume", a.volume}}, [&](const Json&) {
    ctx.Note("deleted shadow storage of volume '" + a.volume + "'");
  });
}

int List(Context& ctx, const StorageArgs& a) {
  Json args = Json::object();
  if (!a.volume.empty()) {
    if (Status s = CheckName("volume", a.volume); !s.ok()) return ctx.Usage(s.message());
    args["volume"] = a.volume;
  }
  Reply r = ctx.Call("storage.list", args);
  if (!r.ok) return ctx.Fail(r);
  const Json& list = Array(r.result, "storage");
  if (ctx.opt.json) {
    ctx.PrintJson(r.result);
    for (const Json& s : list) WarnIfFull(ctx, s);
  } else if (list.empty()) {
    ctx.Note("no shadow storage");
  } else {
    PrintStorage(ctx, list);
  }
  return kExitOk;
}

constexpr const char* kMaxSizeHelp =
    "Maximum size: bytes (10G), percent of the filesystem holding DIR (20%), or unbounded";

}  // namespace

void AddStorageCommands(CLI::App& root, Context& ctx, Registry& reg) {
  CLI::App* g = AddGroup(
      root, "storage", "Manage shadow storage (where snapshots keep old data)",
      "Shadow storage holds the old contents of chunks overwritten since a snapshot. Each\n"
      "volume has at most one location, never on the volume itself. When it would exceed its\n"
      "maximum size, the oldest snapshots of the volume are deleted to make room.");
  {
    auto a = std::make_shared<StorageArgs>();
    CLI::App* c = AddCommand(
        g, "add", "Give a volume shadow storage",
        "Puts VOLUME's shadow storage in DIR, an existing directory that is not on the volume\n"
        "itself. If the volume already has shadow storage (umbrad may give new volumes a default\n"
        "location), it moves to DIR; that is refused while the volume has snapshots.\n"
        "--max-size defaults to umbrad's choice.",
        {"umbra storage add db --on /var/lib/umbra/shadow/db --max-size 20%",
         "umbra storage add scratch --on /srv/shadow --max-size 10G"});
    c->add_option("VOLUME", a->volume, "The volume")->required()->type_name("");
    c->add_option("--on", a->on, "Existing directory to keep shadow storage in")
        ->required()
        ->type_name("DIR");
    c->add_option("--max-size", a->max_size, kMaxSizeHelp)->type_name("SIZE|PCT%|unbounded");
    reg.Add(c, [&ctx, a] { return Add(ctx, *a); });
  }
  {
    auto a = std::make_shared<StorageArgs>();
    CLI::App* c = AddCommand(
        g, "resize", "Change the maximum size of a volume's shadow storage",
        "Sets a new maximum for VOLUME's shadow storage. Shrinking below what is in use deletes\n"
        "the oldest snapshots until it fits.",
        {"umbra storage resize db --max-size 50G", "umbra storage resize db --max-size unbounded"});
    c->add_option("VOLUME", a->volume, "The volume")->required()->type_name("");
    c->add_option("--max-size", a->max_size, kMaxSizeHelp)
        ->required()
        ->type_name("SIZE|PCT%|unbounded");
    reg.Add(c, [&ctx, a] { return Resize(ctx, *a); });
  }
  {
    auto a = std::make_shared<StorageArgs>();
    CLI::App* c = AddCommand(g, "delete", "Remove a volume's shadow storage",
                             "Deletes VOLUME's shadow storage. Refused while the volume has "
                             "snapshots (delete them first).",
                             {"umbra snapshot delete --all db && umbra storage delete db"});
    c->add_option("VOLUME", a->volume, "The volume")->required()->type_name("");
    reg.Add(c, [&ctx, a] { return Delete(ctx, *a); });
  }
  {
    auto a = std::make_shared<StorageArgs>();
    CLI::App* c = AddCommand(
        g, "list", "Show shadow storage use",
        "Lists shadow storage of every volume (or of VOLUME): location, bytes used by snapshot\n"
        "data, bytes allocated on disk, maximum and percent of the maximum in use. A volume at\n"
        "or over 80% (or 90%) of its maximum gets a warning line on stderr. With --json, each\n"
        "entry also has copy_mode: \"inline\" when the storage is on the volume's own filesystem\n"
        "(writers copy old chunks themselves), \"copier\" when it is elsewhere (a stalled disk\n"
        "there invalidates snapshots after copy_timeout_ms instead of holding the volume).",
        {"umbra storage list", "umbra storage list db", "umbra --json storage list"});
    c->add_option("VOLUME", a->volume, "Only this volume")->type_name("");
    reg.Add(c, [&ctx, a] { return List(ctx, *a); });
  }
}

}  // namespace umbra::cli
