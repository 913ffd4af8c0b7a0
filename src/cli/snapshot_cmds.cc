// umbra snapshot create|list|delete|attach|detach|export|mount|unmount|revert.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>

#include "cli/cli.h"

namespace umbra::cli {
namespace {

struct SnapshotArgs {
  std::vector<std::string> volumes;
  bool persistent = false;
  std::string name;
  bool no_writers = false;
  std::string writer_failure = "abort";
  std::string id;  // ID, or ID|DIR for unmount
  std::string dir;
  std::string oldest;  // delete --oldest VOLUME
  std::string all;     // delete --all VOLUME
  std::string volume;  // list [VOLUME]
  bool yes = false;
};

// Snapshot ids are UUIDs; accept any 1-128 of [A-Za-z0-9-] and let umbrad decide.
Status CheckId(const std::string& id) {
  const bool good =
      !id.empty() && id.size() <= 128 && std::all_of(id.begin(), id.end(), [](char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               c == '-';
      });
  if (good) return Status::Ok();
  return Status::InvalidArgument("invalid snapshot id '" + id + "': expected a UUID");
}

std::string State(const Json& s) {
  if (!s.contains("valid") || !s["valid"].is_boolean() || s["valid"].get<bool>()) return "valid";
  return "invalid: " + Text(s, "cause", "unknown cause");
}

std::string Created(const Json& s) {
  if (s.contains("created") && s["created"].is_number_unsigned())
    return FormatTime(s["created"].get<uint64_t>());
  return Text(s, "created");
}

int Create(Context& ctx, const SnapshotArgs& a) {
  for (const auto& v : a.volumes)
    if (Status s = CheckName("volume", v); !s.ok()) return ctx.Usage(s.message());
  Json args{{"volumes", a.volumes},
            {"persistent", a.persistent},
            {"writers", !a.no_writers},
            {"writer_failure", a.writer_failure}};
  if (!a.name.empty()) {
    if (Status s = CheckName("snapshot", a.name); !s.ok()) return ctx.Usage(s.message());
    args["name"] = a.name;
  }
  return ctx.Run("snapshot.create", args, [&](const Json& r) {
    Json snaps = Array(r, "snapshots");
    if (snaps.empty() && r.contains("id"))
      snaps.push_back(Json{{"id", r["id"]}, {"volume", a.volumes.front()}});
    for (const Json& s : snaps) {
      if (ctx.opt.quiet) {
        std::cout << Text(s, "id") << "\n";
      } else {
        std::cout << "created " << (a.persistent ? "persistent " : "") << "snapshot "
                  << Text(s, "id") << " of volume " << Text(s, "volume") << "\n";
      }
    }
    if (ctx.opt.quiet) return;
    const std::string w = Text(r, "writers", "none");
    if (w == "consistent" && r.contains("writer_names") && r["writer_names"].is_array()) {
      std::string names;
      for (const Json& n : r["writer_names"])
        if (n.is_string()) names += (names.empty() ? "" : ", ") + n.get<std::string>();
      char window[32];
      std::snprintf(window, sizeof window, "%.1f", r.value("freeze_window_ms", 0.0));
      std::cout << "writers: consistent (" << (names.empty() ? "none registered" : names)
                << "; frozen for " << window << " ms)\n";
    } else if (w == "inconsistent" && r.contains("writers_failed") &&
               r["writers_failed"].is_object()) {
      for (const auto& [name, why] : r["writers_failed"].items())
        ctx.Warn("the snapshot is not consistent for writer '" + name +
                 "': " + (why.is_string() ? why.get<std::string>() : std::string("failed")));
    }
  });
}

int List(Context& ctx, const SnapshotArgs& a) {
  Json args = Json::object();
  if (!a.volume.empty()) {
    if (Status s = CheckName("volume", a.volume); !s.ok()) return ctx.Usage(s.message());
    args["volume"] = a.volume;
  }
  return ctx.Run("snapshot.list", args, [&](const Json& r) {
    const Json& snaps = Array(r, "snapshots");
    if (snaps.empty()) {
      ctx.Note("no snapshots");
      return;
    }
    Table t({"id", "volume", "seq", "name", "created", "type", "state", "writers", "own", "device",
             "mount"});
    t.AlignRight(2);
    t.AlignRight(8);
    for (const Json& s : snaps) {
      const bool persistent =
          s.contains("persistent") && s["persistent"].is_boolean() && s["persistent"].get<bool>();
      t.Row({Text(s, "id"), Text(s, "volume"), Text(s, "seq"), Text(s, "name"), Created(s),
             persistent ? "persistent" : "auto-release", State(s), Text(s, "writers", "none"),
             BytesText(s, "own_bytes"), Text(s, "attached_device"), Text(s, "mount")});
    }
    std::cout << t.Render();
    for (const Json& s : snaps)
      if (State(s) != "valid" && s.contains("message") && s["message"].is_string())
        ctx.Warn(s["message"].get<std::string>());
  });
}

int Delete(Context& ctx, const SnapshotArgs& a) {
  const int given = !a.id.empty() + !a.oldest.empty() + !a.all.empty();
  if (given != 1) return ctx.Usage("give exactly one of ID, --oldest VOLUME, --all VOLUME");
  Json args;
  if (!a.id.empty()) {
    if (Status s = CheckId(a.id); !s.ok()) return ctx.Usage(s.message());
    args = Json{{"id", a.id}};
  } else {
    const std::string& vol = a.oldest.empty() ? a.all : a.oldest;
    if (Status s = CheckName("volume", vol); !s.ok()) return ctx.Usage(s.message());
    args = Json{{"volume", vol}, {a.oldest.empty() ? "all" : "oldest", true}};
  }
  return ctx.Run("snapshot.delete", args, [&](const Json& r) {
    const Json& ids = Array(r, "deleted");
    if (ids.empty()) ctx.Note("no snapshots deleted");
    for (const Json& id : ids)
      ctx.Note("deleted snapshot " + (id.is_string() ? id.get<std::string>() : id.dump()));
  });
}

int Attach(Context& ctx, const SnapshotArgs& a) {
  if (Status s = CheckId(a.id); !s.ok()) return ctx.Usage(s.message());
  return ctx.Run("snapshot.attach", Json{{"id", a.id}},
                 [](const Json& r) { std::cout << Text(r, "device", "") << "\n"; });
}

int Export(Context& ctx, const SnapshotArgs& a) {
  if (Status s = CheckId(a.id); !s.ok()) return ctx.Usage(s.message());
  return ctx.Run("snapshot.export", Json{{"id", a.id}},
                 [](const Json& r) { std::cout << Text(r, "uri", "") << "\n"; });
}

int Detach(Context& ctx, const SnapshotArgs& a) {
  if (Status s = CheckId(a.id); !s.ok()) return ctx.Usage(s.message());
  return ctx.Run("snapshot.detach", Json{{"id", a.id}},
                 [&](const Json&) { ctx.Note("detached snapshot " + a.id); });
}

int Mount(Context& ctx, const SnapshotArgs& a) {
  if (Status s = CheckId(a.id); !s.ok()) return ctx.Usage(s.message());
  return ctx.Run("snapshot.mount", Json{{"id", a.id}, {"dir", AbsolutePath(a.dir)}},
                 [&](const Json& r) {
                   ctx.Note("mounted snapshot " + a.id + " read-only at " + Text(r, "dir") +
                            " (device " + Text(r, "device") + ")");
                 });
}

int Unmount(Context& ctx, const SnapshotArgs& a) {
  // A path (has a '/', or names an existing directory) is a mount point;
  // anything else is a snapshot id.
  std::error_code ec;
  const bool is_dir =
      a.id.find('/') != std::string::npos || std::filesystem::is_directory(a.id, ec);
  Json args;
  if (is_dir) {
    args = Json{{"dir", AbsolutePath(a.id)}};
  } else {
    if (Status s = CheckId(a.id); !s.ok()) return ctx.Usage(s.message());
    args = Json{{"id", a.id}};
  }
  return ctx.Run("snapshot.unmount", args, [&](const Json&) { ctx.Note("unmounted " + a.id); });
}

int Revert(Context& ctx, const SnapshotArgs& a) {
  if (Status s = CheckId(a.id); !s.ok()) return ctx.Usage(s.message());
  if (!a.yes && ::isatty(STDIN_FILENO)) {
    std::cerr << "Revert rolls the volume back to snapshot " << a.id
              << ": everything written since the snapshot is lost.\n"
              << "Type 'yes' to revert: " << std::flush;
    std::string answer;
    if (!std::getline(std::cin, answer) || answer != "yes")
      return ctx.Fail("cancelled", "revert cancelled; nothing was changed");
  }
  return ctx.Run("snapshot.revert", Json{{"id", a.id}},
                 [&](const Json&) { ctx.Note("reverted to snapshot " + a.id); });
}

}  // namespace

void AddSnapshotCommands(CLI::App& root, Context& ctx, Registry& reg) {
  CLI::App* g = AddGroup(
      root, "snapshot", "Take, list, attach, mount and revert snapshots",
      "A snapshot is a read-only, point-in-time view of a volume. Persistent snapshots survive\n"
      "daemon restarts, crashes and power loss; other snapshots last until deleted or until\n"
      "umbrad stops. Snapshot data lives in the volume's shadow storage (umbra storage).");
  {
    auto a = std::make_shared<SnapshotArgs>();
    CLI::App* c = AddCommand(
        g, "create", "Take a snapshot of one or more volumes",
        "Takes one snapshot of each VOLUME at the same instant (one snapshot set). Writers (the\n"
        "filesystem freeze, hook scripts, applications) are asked to make their data consistent\n"
        "first unless --no-writers. Prints one line per snapshot with its id and volume; with\n"
        "--quiet only the ids; with --json the result object (its \"id\" is the first snapshot).",
        {"umbra snapshot create db --persistent --name before-upgrade",
         "umbra snapshot create db logs --writer-failure ignore",
         "id=$(umbra --quiet snapshot create db)"});
    c->add_option("VOLUME", a->volumes, "Volumes to snapshot together")->required()->type_name("");
    c->add_flag("--persistent", a->persistent,
                "Keep the snapshot across daemon restarts, crashes and power loss");
    c->add_option("--name", a->name, "A name for the snapshot: 1-64 of A-Z a-z 0-9 . _ -")
        ->type_name("NAME");
    c->add_flag("--no-writers", a->no_writers, "Do not ask writers to quiesce (crash-consistent)");
    c->add_option("--writer-failure", a->writer_failure,
                  "When a writer fails: abort (default, no snapshot) or ignore")
        ->type_name("abort|ignore")
        ->check(CLI::IsMember({"abort", "ignore"}));
    reg.Add(c, [&ctx, a] { return Create(ctx, *a); });
  }
  {
    auto a = std::make_shared<SnapshotArgs>();
    CLI::App* c = AddCommand(
        g, "list", "List snapshots",
        "Lists snapshots of every volume (or of VOLUME): id, volume, sequence number, name,\n"
        "creation time, type (persistent or auto-release), state (valid, or invalid with the\n"
        "cause), bytes only this snapshot holds, attached device and mount point.",
        {"umbra snapshot list", "umbra snapshot list db", "umbra --json snapshot list db"});
    c->add_option("VOLUME", a->volume, "Only this volume's snapshots")->type_name("");
    reg.Add(c, [&ctx, a] { return List(ctx, *a); });
  }
  {
    auto a = std::make_shared<SnapshotArgs>();
    CLI::App* c = AddCommand(
        g, "delete", "Delete snapshots",
        "Deletes snapshot ID, or the oldest snapshot of a volume (--oldest VOLUME), or every\n"
        "snapshot of a volume (--all VOLUME). Give exactly one. Prints the deleted ids.",
        {"umbra snapshot delete 3f2a5c1e-8d4b-4c0e-9a7f-1b2c3d4e5f60",
         "umbra snapshot delete --oldest db", "umbra snapshot delete --all db"});
    c->add_option("ID", a->id, "The snapshot to delete")->type_name("");
    c->add_option("--oldest", a->oldest, "Delete the oldest snapshot of VOLUME")
        ->type_name("VOLUME");
    c->add_option("--all", a->all, "Delete every snapshot of VOLUME")->type_name("VOLUME");
    reg.Add(c, [&ctx, a] { return Delete(ctx, *a); });
  }
  {
    auto a = std::make_shared<SnapshotArgs>();
    CLI::App* c = AddCommand(
        g, "attach", "Attach a snapshot as a read-only block device",
        "Serves snapshot ID as a read-only block device and prints its path alone on stdout,\n"
        "e.g. to image it with dd or qemu-img.",
        {"dev=$(umbra snapshot attach 3f2a5c1e-8d4b-4c0e-9a7f-1b2c3d4e5f60) && dd if=$dev "
         "of=db.img"});
    c->add_option("ID", a->id, "The snapshot to attach")->required()->type_name("");
    reg.Add(c, [&ctx, a] { return Attach(ctx, *a); });
  }
  {
    auto a = std::make_shared<SnapshotArgs>();
    CLI::App* c = AddCommand(
        g, "export", "Print the NBD URI of a snapshot",
        "Prints the NBD URI (nbd+unix:///snap-ID?socket=PATH) under which umbrad serves\n"
        "snapshot ID read-only, alone on stdout, for nbdcopy, nbdinfo, qemu-img or QEMU.\n"
        "The export exists as long as the snapshot; nothing is set up or torn down.",
        {"nbdcopy \"$(umbra snapshot export 3f2a5c1e-8d4b-4c0e-9a7f-1b2c3d4e5f60)\" db.img",
         "qemu-img convert -O qcow2 \"$(umbra snapshot export ID)\" db.qcow2"});
    c->add_option("ID", a->id, "The snapshot to export")->required()->type_name("");
    reg.Add(c, [&ctx, a] { return Export(ctx, *a); });
  }
  {
    auto a = std::make_shared<SnapshotArgs>();
    CLI::App* c = AddCommand(g, "detach", "Detach a snapshot's block device",
                             "Removes the read-only block device of snapshot ID.",
                             {"umbra snapshot detach 3f2a5c1e-8d4b-4c0e-9a7f-1b2c3d4e5f60"});
    c->add_option("ID", a->id, "The snapshot to detach")->required()->type_name("");
    reg.Add(c, [&ctx, a] { return Detach(ctx, *a); });
  }
  {
    auto a = std::make_shared<SnapshotArgs>();
    CLI::App* c = AddCommand(
        g, "mount", "Mount a snapshot read-only",
        "Attaches snapshot ID and mounts its filesystem read-only at DIR: the \"previous\n"
        "versions\" view for copying files back.",
        {"umbra snapshot mount 3f2a5c1e-8d4b-4c0e-9a7f-1b2c3d4e5f60 /mnt/yesterday"});
    c->add_option("ID", a->id, "The snapshot to mount")->required()->type_name("");
    c->add_option("DIR", a->dir, "An existing directory to mount on")->required()->type_name("");
    reg.Add(c, [&ctx, a] { return Mount(ctx, *a); });
  }
  {
    auto a = std::make_shared<SnapshotArgs>();
    CLI::App* c = AddCommand(
        g, "unmount", "Unmount a mounted snapshot",
        "Unmounts a snapshot mounted with 'umbra snapshot mount' and detaches its device. Give\n"
        "the snapshot ID or the mount directory (a path with a '/', or an existing directory).",
        {"umbra snapshot unmount /mnt/yesterday",
         "umbra snapshot unmount 3f2a5c1e-8d4b-4c0e-9a7f-1b2c3d4e5f60"});
    c->add_option("ID|DIR", a->id, "The snapshot id or its mount directory")
        ->required()
        ->type_name("");
    reg.Add(c, [&ctx, a] { return Unmount(ctx, *a); });
  }
  {
    auto a = std::make_shared<SnapshotArgs>();
    CLI::App* c = AddCommand(
        g, "revert", "Roll a volume back to a snapshot",
        "Makes the volume's contents equal to snapshot ID again; everything written since is\n"
        "lost. The volume must be detached (unmount it first). On a terminal, asks you to type\n"
        "'yes' unless --yes; when stdin is not a terminal it does not ask.",
        {"umbra snapshot revert 3f2a5c1e-8d4b-4c0e-9a7f-1b2c3d4e5f60",
         "umbra snapshot revert --yes 3f2a5c1e-8d4b-4c0e-9a7f-1b2c3d4e5f60"});
    c->add_option("ID", a->id, "The snapshot to revert to")->required()->type_name("");
    c->add_flag("-y,--yes", a->yes, "Do not ask for confirmation");
    reg.Add(c, [&ctx, a] { return Revert(ctx, *a); });
  }
}

}  // namespace umbra::cli
