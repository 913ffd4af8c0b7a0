// umbra volume create|adopt|attach|detach|export|list|delete.
#include <CLI/CLI.hpp>
#include <iostream>
#include <memory>

#include "base/units.h"
#include "cli/cli.h"

namespace umbra::cli {
namespace {

struct VolumeArgs {
  std::string name;
  std::string size;
  std::string backing;
  std::string chunk_size;
  std::string device;
};

std::string Describe(const Json& v) {
  std::string s = "volume '" + Text(v, "name", "?") + "': " + BytesText(v, "size", "?");
  if (v.contains("chunk_size")) s += ", chunk " + BytesText(v, "chunk_size");
  s += ", " + Text(v, "kind", "?") + " " + Text(v, "origin", "?");
  return s;
}

int Create(Context& ctx, const VolumeArgs& a) {
  if (Status s = CheckName("volume", a.name); !s.ok()) return ctx.Usage(s.message());
  auto size = ParseSizeArg("--size", a.size);
  if (!size.ok()) return ctx.Usage(size.status().message());
  Json args{{"name", a.name}, {"size", *size}};
  if (!a.backing.empty()) args["backing"] = AbsolutePath(a.backing);
  if (!a.chunk_size.empty()) {
    auto chunk = ParseSizeArg("--chunk-size", a.chunk_size);
    if (!chunk.ok()) return ctx.Usage(chunk.status().message());
    if ((*chunk & (*chunk - 1)) != 0)
      return ctx.Usage("--chunk-size: " + FormatBytes(*chunk) + " is not a power of two");
    args["chunk_size"] = *chunk;
  }
  return ctx.Run("volume.create", args, [&](const Json& v) { ctx.Note("created " + Describe(v)); });
}

int Adopt(Context& ctx, const VolumeArgs& a) {
  if (Status s = CheckName("volume", a.name); !s.ok()) return ctx.Usage(s.message());
  if (a.device.empty()) return ctx.Usage("--device: a block device path is required");
  return ctx.Run("volume.adopt", Json{{"name", a.name}, {"device", AbsolutePath(a.device)}},
                 [&](const Json& v) { ctx.Note("adopted " + Describe(v)); });
}

int Attach(Context& ctx, const VolumeArgs& a) {
  if (Status s = CheckName("volume", a.name); !s.ok()) return ctx.Usage(s.message());
  // The device path alone, so that `mount $(umbra volume attach db) /mnt` works.
  return ctx.Run("volume.attach", Json{{"name", a.name}},
                 [](const Json& r) { std::cout << Text(r, "device", "") << "\n"; });
}

int Export(Context& ctx, const VolumeArgs& a) {
  if (Status s = CheckName("volume", a.name); !s.ok()) return ctx.Usage(s.message());
  return ctx.Run("volume.export", Json{{"name", a.name}},
                 [](const Json& r) { std::cout << Text(r, "uri", "") << "\n"; });
}

int Detach(Context& ctx, const VolumeArgs& a) {
  if (Status s = CheckName("volume", a.name); !s.ok()) return ctx.Usage(s.message());
  return ctx.Run("volume.detach", Json{{"name", a.name}},
                 [&](const Json&) { ctx.Note("detached volume '" + a.name + "'"); });
}

int Delete(Context& ctx, const VolumeArgs& a) {
  if (Status s = CheckName("volume", a.name); !s.ok()) return ctx.Usage(s.message());
  return ctx.Run("volume.delete", Json{{"name", a.name}},
                 [&](const Json&) { ctx.Note("deleted volume '" + a.name + "'"); });
}

int List(Context& ctx) {
  return ctx.Run("volume.list", Json::object(), [&](const Json& r) {
    const Json& vols = Array(r, "volumes");
    if (vols.empty()) {
      ctx.Note("no volumes");
      return;
    }
    Table t({"name", "size", "kind", "device", "snapshots", "storage", "origin"});
    t.AlignRight(1);
    t.AlignRight(4);
    for (const Json& v : vols) {
      std::string storage = "-";
      if (v.contains("storage") && v["storage"].is_object())
        storage = Text(v["storage"], "location");
      t.Row({Text(v, "name"), BytesText(v, "size"), Text(v, "kind"), Text(v, "device"),
             Text(v, "snapshots", "0"), storage, Text(v, "origin")});
    }
    std::cout << t.Render();
  });
}

}  // namespace

void AddVolumeCommands(CLI::App& root, Context& ctx, Registry& reg) {
  CLI::App* g = AddGroup(
      root, "volume", "Create, attach and list protected volumes",
      "A protected volume is a block store served by umbrad: a new file (volume create) or an\n"
      "existing block device protected in place (volume adopt). Attach it to get a block device\n"
      "to put a filesystem on. Snapshots keep old data in the volume's shadow storage\n"
      "(umbra storage).");

  {
    auto a = std::make_shared<VolumeArgs>();
    CLI::App* c = AddCommand(
        g, "create", "Create a new file-backed volume",
        "Creates a volume NAME of SIZE bytes stored in a file. Without --backing, umbrad puts\n"
        "the file in its state directory. The new volume is not attached; see 'umbra storage'\n"
        "for its shadow storage.\n\n"
        "SIZE accepts 4096, 64K, 10G, 1.5GiB, ... (binary units: K = 1024).",
        {"umbra volume create db --size 10G",
         "umbra volume create scratch --size 512M --backing /srv/scratch.img --chunk-size 64K"});
    c->add_option("NAME", a->name, "Volume name: 1-64 of A-Z a-z 0-9 . _ -")
        ->required()
        ->type_name("");
    c->add_option("--size", a->size, "Volume size, e.g. 10G")->required()->type_name("SIZE");
    c->add_option("--backing", a->backing,
                  "File to store the volume in (default: in umbrad's state dir)")
        ->type_name("FILE");
    c->add_option("--chunk-size", a->chunk_size,
                  "Copy-on-write chunk size, a power of two from 4K to 4M (default 16K)")
        ->type_name("SIZE");
    reg.Add(c, [&ctx, a] { return Create(ctx, *a); });
  }
  {
    auto a = std::make_shared<VolumeArgs>();
    CLI::App* c = AddCommand(
        g, "adopt", "Protect an existing block device in place",
        "Makes the block device --device a protected volume NAME. Its data is used in place and\n"
        "never formatted. Attach the volume and use its device instead of the original from then\n"
        "on: writes to the original bypass copy-on-write.",
        {"umbra volume adopt data --device /dev/sdb1"});
    c->add_option("NAME", a->name, "Volume name: 1-64 of A-Z a-z 0-9 . _ -")
        ->required()
        ->type_name("");
    c->add_option("--device", a->device, "The block device to protect")
        ->required()
        ->type_name("DEVICE");
    reg.Add(c, [&ctx, a] { return Adopt(ctx, *a); });
  }
  {
    auto a = std::make_shared<VolumeArgs>();
    CLI::App* c = AddCommand(
        g, "attach", "Attach a volume as a block device; prints the device",
        "Serves volume NAME as a block device and prints its path (e.g. /dev/loop3) alone on\n"
        "stdout, ready for mkfs or mount.",
        {"dev=$(umbra volume attach db) && mount \"$dev\" /srv/db"});
    c->add_option("NAME", a->name, "The volume to attach")->required()->type_name("");
    reg.Add(c, [&ctx, a] { return Attach(ctx, *a); });
  }
  {
    auto a = std::make_shared<VolumeArgs>();
    CLI::App* c = AddCommand(
        g, "export", "Print the NBD URI of a volume",
        "Prints the NBD URI (nbd+unix:///NAME?socket=PATH) under which umbrad serves volume\n"
        "NAME read-write, alone on stdout. Writes through NBD are protected by copy-on-write\n"
        "like any other; do not use the volume through NBD and a mounted loop device at once.",
        {"nbdinfo \"$(umbra volume export db)\""});
    c->add_option("NAME", a->name, "The volume to export")->required()->type_name("");
    reg.Add(c, [&ctx, a] { return Export(ctx, *a); });
  }
  {
    auto a = std::make_shared<VolumeArgs>();
    CLI::App* c = AddCommand(g, "detach", "Detach a volume's block device",
                             "Removes the block device of volume NAME. Unmount it first.",
                             {"umount /srv/db && umbra volume detach db"});
    c->add_option("NAME", a->name, "The volume to detach")->required()->type_name("");
    reg.Add(c, [&ctx, a] { return Detach(ctx, *a); });
  }
  {
    CLI::App* c = AddCommand(
        g, "list", "List volumes",
        "Lists every volume: name, size, kind (file or device), attached block device,\n"
        "number of snapshots, shadow storage location and origin (backing file or device).",
        {"umbra volume list", "umbra --json volume list"});
    reg.Add(c, [&ctx] { return List(ctx); });
  }
  {
    auto a = std::make_shared<VolumeArgs>();
    CLI::App* c = AddCommand(
        g, "delete", "Stop protecting a volume",
        "Removes volume NAME from umbrad. Refused while it is attached or has snapshots. The\n"
        "origin (backing file or device) keeps its data.",
        {"umbra volume delete scratch"});
    c->add_option("NAME", a->name, "The volume to delete")->required()->type_name("");
    reg.Add(c, [&ctx, a] { return Delete(ctx, *a); });
  }
}

}  // namespace umbra::cli
