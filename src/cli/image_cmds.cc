// umbra image create|list|verify|restore|delete|prune and umbra repo init|gc|info.
//
// These run in the umbra process itself (the requester): umbrad takes and
// exports the snapshot; umbra reads it over NBD, and hashes, compresses and
// stores chunks in the repository (docs/format/repository.md).
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <termios.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <memory>
#include <sstream>

#include "base/units.h"
#include "cli/cli.h"
#include "umbra/imaging.h"
#include "umbra/repo.h"

namespace umbra::cli {
namespace {

namespace fs = std::filesystem;

struct ImageArgs {
  std::string repo;
  std::string passphrase_file;
  std::string volume;
  bool incremental = false;
  bool no_writers = false;
  bool offline = false;
  bool encrypt = false;
  int level = 3;
  int threads = 0;
  double checkpoint = 5;
  std::string chunk_size;
  std::vector<std::string> ids;
  std::string to;
  bool delta = false;
  bool dry_run = false;
  bool repair = false;
  imaging::PrunePolicy keep;
};

int FailStatus(Context& ctx, const Status& s) {
  return ctx.Fail(control::WireCode(s.code()), s.message());
}

std::string RepoDir(const ImageArgs& a) {
  if (!a.repo.empty()) return a.repo;
  const char* env = std::getenv("UMBRA_REPO");
  return env ? env : "";
}

// Reads a passphrase from the terminal without echo.
std::string Prompt(const std::string& what) {
  int fd = ::open("/dev/tty", O_RDWR | O_CLOEXEC);
  if (fd < 0) return "";
  ::write(fd, what.data(), what.size());
  termios old{}, quiet{};
  bool tty = ::tcgetattr(fd, &old) == 0;
  if (tty) {
    quiet = old;
    quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
    ::tcsetattr(fd, TCSAFLUSH, &quiet);
  }
  std::string line;
  char c;
  while (::read(fd, &c, 1) == 1 && c != '\n') line += c;
  if (tty) ::tcsetattr(fd, TCSAFLUSH, &old);
  ::write(fd, "\n", 1);
  ::close(fd);
  return line;
}

Result<std::string> Passphrase(const ImageArgs& a, bool needed, bool confirm) {
  if (!a.passphrase_file.empty()) {
    std::ifstream f(a.passphrase_file);
    if (!f) return Status::NotFound("cannot read passphrase file " + a.passphrase_file);
    std::string line;
    std::getline(f, line);
    return line;
  }
  if (const char* env = std::getenv("UMBRA_PASSPHRASE"); env != nullptr) return std::string(env);
  if (!needed || !::isatty(STDIN_FILENO)) return std::string();
  std::string p = Prompt("Repository passphrase: ");
  if (confirm && Prompt("Repeat passphrase: ") != p)
    return Status::InvalidArgument("the passphrases differ");
  return p;
}

bool IsEncrypted(const std::string& dir) {
  std::ifstream f(dir + "/umbra-repo.json");
  std::stringstream ss;
  ss << f.rdbuf();
  Json j = Json::parse(ss.str(), nullptr, false);
  return j.is_object() && j.contains("encryption") && !j["encryption"].is_null();
}

// Opens DIR's repository; with `create`, makes one if DIR is missing or empty.
Result<std::unique_ptr<repo::Repository>> OpenRepo(Context& ctx, const ImageArgs& a, bool create,
                                                   bool* created = nullptr) {
  const std::string dir = RepoDir(a);
  std::error_code ec;
  bool fresh =
      create && (!fs::exists(dir, ec) || (fs::is_directory(dir, ec) && fs::is_empty(dir, ec)));
  if (fresh) {
    repo::InitOptions io;
    if (!a.chunk_size.empty()) {
      UMBRA_ASSIGN_OR_RETURN(uint64_t cs, ParseSize(a.chunk_size));
      io.chunk_size = static_cast<uint32_t>(std::min<uint64_t>(cs, 1ull << 31));
    }
    if (a.encrypt) {
      UMBRA_ASSIGN_OR_RETURN(io.passphrase, Passphrase(a, true, true));
      if (io.passphrase.empty())
        return Status::InvalidArgument(
            "--encrypt needs a passphrase (UMBRA_PASSPHRASE, --passphrase-file or a terminal)");
    }
    UMBRA_ASSIGN_OR_RETURN(auto store, repo::OpenDirStore(dir, true));
    UMBRA_ASSIGN_OR_RETURN(auto r, repo::Repository::Init(std::move(store), io));
    if (created) *created = true;
    if (!ctx.opt.quiet)
      std::cerr << "umbra: created repository " << dir << (a.encrypt ? " (encrypted)" : "") << "\n";
    return r;
  }
  UMBRA_ASSIGN_OR_RETURN(auto store, repo::OpenDirStore(dir, false));
  UMBRA_ASSIGN_OR_RETURN(std::string pass, Passphrase(a, IsEncrypted(dir), false));
  return repo::Repository::Open(std::move(store), pass);
}

// Progress on a terminal: "  42%  1.7 GiB of 4.0 GiB  310 MiB/s".
class ProgressBar {
 public:
  ProgressBar(const Context& ctx, std::string verb)
      : on_(!ctx.opt.quiet && !ctx.opt.json && ::isatty(STDERR_FILENO)), verb_(std::move(verb)) {}
  ~ProgressBar() { Done(); }
  imaging::Progress fn() {
    if (!on_) return nullptr;
    return [this](uint64_t done, uint64_t total) { Update(done, total); };
  }
  void Done() {
    if (on_ && shown_) std::cerr << "\r\033[K" << std::flush;
    shown_ = false;
  }

 private:
  void Update(uint64_t done, uint64_t total) {
    auto now = std::chrono::steady_clock::now();
    if (shown_ && now - last_ < std::chrono::milliseconds(200) && done < total) return;
    last_ = now;
    shown_ = true;
    double secs = std::chrono::duration<double>(now - start_).count();
    uint64_t rate = secs > 0 ? static_cast<uint64_t>(done / secs) : 0;
    int pct = total ? static_cast<int>(done * 100 / total) : 100;
    std::cerr << "\r\033[K" << verb_ << " " << pct << "%  " << FormatBytes(done) << " of "
              << FormatBytes(total) << "  " << FormatBytes(rate) << "/s" << std::flush;
  }
  bool on_;
  std::string verb_;
  bool shown_ = false;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now(), last_{};
};

Json StatsJson(const repo::ImageStats& s) {
  return Json{{"read", s.read_bytes},  {"new", s.new_chunks},      {"reused", s.reused_chunks},
              {"zero", s.zero_chunks}, {"stored", s.stored_bytes}, {"seconds", s.seconds}};
}

Json ImageJson(const repo::Manifest& m) {
  Json snap = nullptr;
  if (!m.snapshot_id.empty()) snap = m.snapshot_id;
  return Json{{"id", m.id},
              {"volume", m.volume},
              {"volume_uuid", m.volume_uuid},
              {"size", m.size},
              {"chunk_size", m.chunk_size},
              {"created", m.created_unix_ns},
              {"source", m.source},
              {"snapshot", snap},
              {"writers", m.writers},
              {"filesystem", m.filesystem},
              {"base", m.base.empty() ? Json(nullptr) : Json(m.base)},
              {"stats", StatsJson(m.stats)}};
}

std::string Rate(uint64_t bytes, double secs) {
  return secs > 0 ? FormatBytes(static_cast<uint64_t>(bytes / secs)) + "/s" : "-";
}

// Mounted read-write? (`dev` is the device number of a block device.)
bool MountedReadWrite(dev_t dev) {
  std::ifstream f("/proc/self/mountinfo");
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream ss(line);
    std::string id, parent, majmin, root, point, opts;
    ss >> id >> parent >> majmin >> root >> point >> opts;
    unsigned ma = 0, mi = 0;
    if (std::sscanf(majmin.c_str(), "%u:%u", &ma, &mi) != 2 || makedev(ma, mi) != dev) continue;
    if (opts.rfind("rw", 0) == 0) return true;
  }
  return false;
}

// For --offline: refuses a source that is mounted read-write, directly or
// through a loop device backed by it.
Status CheckOffline(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return Status::NotFound(path + " does not exist");
  if (S_ISBLK(st.st_mode)) {
    if (MountedReadWrite(st.st_rdev))
      return Status::Busy(path +
                          " is mounted read-write; --offline needs it unmounted or "
                          "mounted read-only (image it live instead: umbra image create "
                          "VOLUME)");
    return Status::Ok();
  }
  std::error_code ec;
  const std::string real = fs::canonical(path, ec).string();
  for (auto& e : fs::directory_iterator("/sys/block", ec)) {
    std::ifstream bf(e.path() / "loop" / "backing_file");
    std::string backing;
    if (!std::getline(bf, backing) || backing != real) continue;
    std::ifstream df(e.path() / "dev");
    unsigned ma = 0, mi = 0;
    char colon;
    if (df >> ma >> colon >> mi && MountedReadWrite(makedev(ma, mi)))
      return Status::Busy(path + " is mounted read-write through /dev/" +
                          e.path().filename().string() + "; --offline needs it unmounted");
  }
  return Status::Ok();
}

// The newest image of `volume_uuid` that has change tracking.
Result<std::optional<repo::Manifest>> LatestTracked(repo::Repository& r,
                                                    const std::string& volume_uuid) {
  UMBRA_ASSIGN_OR_RETURN(auto ids, r.ListImages());
  for (auto it = ids.rbegin(); it != ids.rend(); ++it) {
    auto m = r.GetManifest(*it);
    if (!m.ok()) continue;  // a damaged image is no base; verify reports it
    if (m->volume_uuid == volume_uuid && !m->tracking_id.empty() && m->chunk_size == r.chunk_size())
      return std::optional<repo::Manifest>(std::move(*m));
  }
  return std::optional<repo::Manifest>();
}

// Regions of `volume` changed after tracking position (id, epoch), from
// umbrad's change map (volume.changes), appended to *out when the reply is ok.
Reply Changes(Context& ctx, const std::string& volume, const std::string& tracking_id,
              uint64_t epoch, std::vector<imaging::Range>* out) {
  Reply r = ctx.Call("volume.changes",
                     Json{{"volume", volume}, {"tracking_id", tracking_id}, {"epoch", epoch}});
  if (r.ok)
    for (const Json& e : Array(r.result, "extents"))
      out->push_back({e[0].get<uint64_t>(), e[1].get<uint64_t>()});
  return r;
}

void PrintCreated(Context& ctx, const repo::Manifest& m, const std::string& note) {
  if (ctx.opt.json) {
    Json j = ImageJson(m);
    j["repository"] = m.repository;
    if (!note.empty()) j["note"] = note;
    ctx.PrintJson(j);
    return;
  }
  if (ctx.opt.quiet) {
    std::cout << m.id << "\n";
    return;
  }
  const auto& s = m.stats;
  std::cout << "created image " << m.id << " of " << m.volume << " (" << FormatBytes(m.size)
            << (m.filesystem.empty() ? "" : ", " + m.filesystem)
            << (m.base.empty() ? "" : ", incremental from " + m.base) << ")\n"
            << "  read    " << FormatBytes(s.read_bytes) << "\n"
            << "  chunks  " << s.new_chunks << " new, " << s.reused_chunks << " reused, "
            << s.zero_chunks << " zero\n"
            << "  stored  " << FormatBytes(s.stored_bytes) << "\n"
            << "  time    " << std::fixed << std::setprecision(1) << s.seconds << " s ("
            << Rate(m.size, s.seconds) << ")\n";
  if (!note.empty()) std::cout << "  note    " << note << "\n";
}

int Create(Context& ctx, const ImageArgs& a) {
  if (RepoDir(a).empty()) return ctx.Usage("give the repository with --repo DIR or UMBRA_REPO");
  if (a.level < 1 || a.level > 19) return ctx.Usage("--compression must be 1..19");
  if (!(a.checkpoint >= 0.1 && a.checkpoint <= 3600))
    return ctx.Usage("--checkpoint-interval must be 0.1 to 3600 seconds");
  if (a.offline && a.incremental)
    return ctx.Usage("--incremental needs umbrad's change tracking; not with --offline");
  if (!a.offline) {
    if (Status s = CheckName("volume", a.volume); !s.ok()) return ctx.Usage(s.message());
  }
  repo::Manifest m;
  m.id = repo::NewImageId();
  std::string note;
  std::unique_ptr<imaging::Source> src;
  std::string snap_id;
  std::vector<imaging::Range> changed;
  std::optional<repo::Manifest> base;
  std::optional<imaging::ResumeRecord> resume;
  std::vector<imaging::Range> resume_changed;

  if (a.offline) {
    if (Status s = CheckOffline(a.volume); !s.ok()) return FailStatus(ctx, s);
    auto fsrc = imaging::OpenFileSource(a.volume);
    if (!fsrc.ok()) return FailStatus(ctx, fsrc.status());
    src = std::move(*fsrc);
    m.volume = fs::absolute(a.volume).string();
    m.source = "offline";
  } else {
    // Which volume (before touching the repository: unknown names change nothing).
    Reply vl = ctx.Call("volume.list", Json::object());
    if (!vl.ok) return ctx.Fail(vl);
    Json vol;
    for (const Json& v : Array(vl.result, "volumes"))
      if (Text(v, "name") == a.volume) vol = v;
    if (vol.is_null()) return ctx.Fail("not_found", "no volume '" + a.volume + "'");
    m.volume = a.volume;
    m.volume_uuid = Text(vol, "uuid");
  }
  bool created = false;
  auto r = OpenRepo(ctx, a, /*create=*/true, &created);
  if (!r.ok()) return FailStatus(ctx, r.status());
  repo::Repository& rp = **r;
  rp.set_compression_level(a.level);
  auto lock = rp.store().Lock(false, true);
  if (!lock.ok()) return FailStatus(ctx, lock.status());
  m.repository = rp.id();

  if (!a.offline) {
    if (a.incremental) {
      auto b = LatestTracked(rp, m.volume_uuid);
      if (!b.ok()) return FailStatus(ctx, b.status());
      base = std::move(*b);
      if (!base) note = "no earlier image of this volume with change tracking: full read";
    }
    Json sargs{{"volumes", {a.volume}},
               {"release_on_disconnect", true},
               {"name", "image-" + m.id},
               {"writers", !a.no_writers}};
    Reply sr = ctx.Call("snapshot.create", sargs);
    if (!sr.ok) return ctx.Fail(sr);
    Json snap =
        Array(sr.result, "snapshots").empty() ? Json::object() : Array(sr.result, "snapshots")[0];
    snap_id = Text(sr.result, "id");
    m.snapshot_id = snap_id;
    m.snapshot_set_id = Text(sr.result, "set_id");
    if (snap.contains("created") && snap["created"].is_number_unsigned())
      m.snapshot_created_unix_ns = snap["created"].get<uint64_t>();
    if (snap.contains("tracking") && snap["tracking"].is_object()) {
      m.tracking_id = Text(snap["tracking"], "id");
      m.tracking_epoch = snap["tracking"].value("epoch", uint64_t{0});
    }
    m.writers = a.no_writers ? "none" : Text(snap, "writers", "none");
    if (base) {
      Reply cr = Changes(ctx, a.volume, base->tracking_id, base->tracking_epoch, &changed);
      if (!cr.ok && cr.code == "not_found") {
        note = "change tracking was reset since image " + base->id + " (" + cr.message +
               "): full read";
        base.reset();
      } else if (!cr.ok) {
        return ctx.Fail(cr);
      }
    }
    // An interrupted create of this volume left a resume record: take what
    // it stored and what has not changed since (docs section 2.5).
    if (!m.tracking_id.empty()) {
      auto text = rp.GetResume(m.volume_uuid);
      std::string why;
      if (text.ok()) {
        auto rec = imaging::DecodeResume(*text);
        if (!rec.ok()) {
          why = rec.status().message();
        } else if (rec->tracking_id != m.tracking_id) {
          why = "change tracking was reset since";
        } else if (rec->chunk_size != rp.chunk_size()) {
          why = "it used another chunk size";
        } else {
          Reply cr = Changes(ctx, a.volume, rec->tracking_id, rec->tracking_epoch, &resume_changed);
          if (cr.ok) {
            resume = std::move(*rec);
          } else {
            why = cr.message;
          }
        }
      } else if (text.status().code() != Code::kNotFound) {
        why = text.status().message();
      }
      if (!why.empty())
        note = (note.empty() ? "" : note + "; ") + "an interrupted create could not be resumed (" +
               why + "): starting over";
    }
    Reply er = ctx.Call("snapshot.export", Json{{"id", snap_id}});
    if (!er.ok) return ctx.Fail(er);
    auto nsrc = imaging::OpenNbdSource(Text(er.result, "socket"), Text(er.result, "export"));
    if (!nsrc.ok()) return FailStatus(ctx, nsrc.status());
    src = std::move(*nsrc);
  }

  m.created_unix_ns = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                std::chrono::system_clock::now().time_since_epoch())
                                                .count());
  {
    auto rd = src->NewReader();
    if (!rd.ok()) return FailStatus(ctx, rd.status());
    std::vector<std::byte> head(std::min<uint64_t>(src->size(), 128 * 1024));
    if (Status s = (*rd)->Read(0, head); !s.ok()) return FailStatus(ctx, s);
    m.filesystem = imaging::DetectFilesystem(head);
  }
  imaging::CreateOptions co;
  co.threads = a.threads;
  if (base) {
    co.base = &*base;
    co.changed = std::move(changed);
  }
  if (resume) {
    co.resume = &resume->partial;
    co.resume_changed = std::move(resume_changed);
    uint64_t done = 0;
    for (bool d : resume->partial.done) done += d;
    std::string rn = "resumed an interrupted create (" + std::to_string(done) + " chunks done)";
    note = note.empty() ? rn : note + "; " + rn;
  }
  if (!m.tracking_id.empty()) {
    co.checkpoint_seconds = a.checkpoint;
    co.checkpoint = [&](const imaging::Partial& p) {
      imaging::ResumeRecord rec;
      rec.volume_uuid = m.volume_uuid;
      rec.size = src->size();
      rec.chunk_size = rp.chunk_size();
      rec.tracking_id = m.tracking_id;
      rec.tracking_epoch = m.tracking_epoch;
      rec.partial = p;
      if (Status s = rp.PutResume(m.volume_uuid, imaging::EncodeResume(rec)); !s.ok())
        ctx.Warn("could not save progress for a resume: " + s.message());
    };
  }
  ProgressBar bar(ctx, "imaging");
  co.progress = bar.fn();
  Status s = imaging::BuildImage(rp, *src, co, &m);
  bar.Done();
  if (!s.ok()) return FailStatus(ctx, s.Annotate("image create"));
  if (std::string an = src->allocation_note(); !an.empty())
    note = note.empty() ? an : note + "; " + an;
  if (Status p = rp.PutManifest(m); !p.ok()) return FailStatus(ctx, p);
  if (!m.volume_uuid.empty()) rp.RemoveResume(m.volume_uuid).IgnoreError();
  if (!snap_id.empty()) {
    Reply d = ctx.Call("snapshot.delete", Json{{"id", snap_id}});
    if (!d.ok) ctx.Warn("could not release snapshot " + snap_id + ": " + d.message);
    // The image is safe: writers may now do their post-backup work
    // (backup-complete; an umbrad without writers answers unknown op).
    ctx.Call("snapshot.complete", Json{{"set_id", m.snapshot_set_id}});
  }
  PrintCreated(ctx, m, note);
  return kExitOk;
}

Result<std::vector<repo::Manifest>> LoadAll(repo::Repository& r, std::vector<std::string>* bad) {
  UMBRA_ASSIGN_OR_RETURN(auto ids, r.ListImages());
  std::vector<repo::Manifest> out;
  for (const auto& id : ids) {
    auto m = r.GetManifest(id);
    if (m.ok())
      out.push_back(std::move(*m));
    else if (bad)
      bad->push_back(id + ": " + m.status().message());
  }
  return out;
}

int List(Context& ctx, const ImageArgs& a) {
  if (RepoDir(a).empty()) return ctx.Usage("give the repository with --repo DIR or UMBRA_REPO");
  auto r = OpenRepo(ctx, a, false);
  if (!r.ok()) return FailStatus(ctx, r.status());
  std::vector<std::string> bad;
  auto all = LoadAll(**r, &bad);
  if (!all.ok()) return FailStatus(ctx, all.status());
  for (const auto& b : bad) ctx.Warn("unreadable image " + b);
  Json list = Json::array();
  Table t({"id", "volume", "created", "size", "fs", "source", "base", "stored"});
  t.AlignRight(3);
  t.AlignRight(7);
  for (const auto& m : *all) {
    if (!a.volume.empty() && m.volume != a.volume) continue;
    list.push_back(ImageJson(m));
    t.Row({m.id, m.volume, FormatTime(m.created_unix_ns), FormatBytes(m.size),
           m.filesystem.empty() ? "-" : m.filesystem, m.source, m.base.empty() ? "-" : m.base,
           FormatBytes(m.stats.stored_bytes)});
  }
  if (ctx.opt.json) {
    ctx.PrintJson(Json{{"images", list}, {"repository", (*r)->id()}});
  } else if (t.size() == 0) {
    ctx.Note("no images");
  } else {
    std::cout << t.Render();
  }
  return kExitOk;
}

int VerifyCmd(Context& ctx, const ImageArgs& a) {
  if (RepoDir(a).empty()) return ctx.Usage("give the repository with --repo DIR or UMBRA_REPO");
  auto r = OpenRepo(ctx, a, false);
  if (!r.ok()) return FailStatus(ctx, r.status());
  auto lock = (*r)->store().Lock(false, true);
  if (!lock.ok()) return FailStatus(ctx, lock.status());
  std::vector<std::string> ids;
  for (const auto& p : a.ids) {
    auto id = (*r)->ResolveImage(p);
    if (!id.ok()) return FailStatus(ctx, id.status());
    ids.push_back(*id);
  }
  ProgressBar bar(ctx, "verifying");
  auto rep = imaging::Verify(**r, ids, a.threads, nullptr);
  bar.Done();
  if (!rep.ok()) return FailStatus(ctx, rep.status());
  Json dmg = Json::array();
  uint64_t removed = 0;
  for (const auto& d : rep->damage) {
    bool gone = false;
    // --repair: a damaged chunk object is removed, so the next image create
    // of a volume that still holds those bytes stores them again (rule 3.4
    // keeps existing objects otherwise).
    repo::ChunkId cid;
    if (a.repair && d.what.rfind("chunk ", 0) == 0 && repo::ParseChunkId(d.what.substr(6), cid) &&
        d.error.find("missing") == std::string::npos)
      gone = (*r)->RemoveChunk(cid).ok();
    removed += gone;
    dmg.push_back(
        Json{{"what", d.what}, {"error", d.error}, {"images", d.images}, {"removed", gone}});
  }
  if (ctx.opt.json) {
    ctx.PrintJson(Json{{"images", rep->images},
                       {"chunks", rep->chunks},
                       {"bytes", rep->bytes},
                       {"seconds", rep->seconds},
                       {"ok", rep->damage.empty()},
                       {"removed", removed},
                       {"damage", dmg}});
  } else {
    for (const auto& d : rep->damage) {
      std::string imgs;
      for (const auto& i : d.images) imgs += (imgs.empty() ? "" : ", ") + i;
      std::cout << "DAMAGED " << d.what << ": " << d.error << "\n  affects images: " << imgs
                << "\n";
    }
    if (removed > 0)
      std::cout << "removed " << removed
                << " damaged chunks; the next image create of a volume that still holds their "
                   "data stores them again\n";
    std::cout << (rep->damage.empty() ? "ok: " : "FAILED: ") << rep->images << " images, "
              << rep->chunks << " chunks (" << FormatBytes(rep->bytes) << ") checked"
              << (rep->damage.empty() ? "" : ", " + std::to_string(rep->damage.size()) + " damaged")
              << "\n";
  }
  return rep->damage.empty() ? kExitOk : kExitFailure;
}

int RestoreCmd(Context& ctx, const ImageArgs& a) {
  if (RepoDir(a).empty()) return ctx.Usage("give the repository with --repo DIR or UMBRA_REPO");
  auto r = OpenRepo(ctx, a, false);
  if (!r.ok()) return FailStatus(ctx, r.status());
  auto lock = (*r)->store().Lock(false, true);
  if (!lock.ok()) return FailStatus(ctx, lock.status());
  auto id = (*r)->ResolveImage(a.ids.front());
  if (!id.ok()) return FailStatus(ctx, id.status());
  auto m = (*r)->GetManifest(*id);
  if (!m.ok()) return FailStatus(ctx, m.status());
  imaging::RestoreOptions ro;
  ro.delta = a.delta;
  ro.threads = a.threads;
  ProgressBar bar(ctx, "restoring");
  ro.progress = bar.fn();
  auto st = imaging::Restore(**r, *m, a.to, ro);
  bar.Done();
  if (!st.ok()) return FailStatus(ctx, st.status());
  if (ctx.opt.json) {
    ctx.PrintJson(Json{{"image", m->id},
                       {"target", a.to},
                       {"size", m->size},
                       {"chunks", st->chunks},
                       {"written_chunks", st->written_chunks},
                       {"same_chunks", st->same_chunks},
                       {"zero_chunks", st->zero_chunks},
                       {"written_bytes", st->written_bytes},
                       {"read_bytes", st->read_bytes},
                       {"seconds", st->seconds}});
  } else {
    ctx.Note("restored image " + m->id + " to " + a.to + ": " + std::to_string(st->written_chunks) +
             " of " + std::to_string(st->chunks) + " chunks written (" +
             FormatBytes(st->written_bytes) + ")" +
             (a.delta ? ", " + std::to_string(st->same_chunks) + " already equal" : "") + " in " +
             std::to_string(static_cast<int>(st->seconds * 10) / 10.0).substr(0, 5) + " s");
  }
  return kExitOk;
}

int DeleteCmd(Context& ctx, const ImageArgs& a) {
  if (RepoDir(a).empty()) return ctx.Usage("give the repository with --repo DIR or UMBRA_REPO");
  auto r = OpenRepo(ctx, a, false);
  if (!r.ok()) return FailStatus(ctx, r.status());
  auto lock = (*r)->store().Lock(false, true);
  if (!lock.ok()) return FailStatus(ctx, lock.status());
  std::vector<std::string> ids;
  for (const auto& p : a.ids) {  // resolve all first: a bad id deletes nothing
    auto id = (*r)->ResolveImage(p);
    if (!id.ok()) return FailStatus(ctx, id.status());
    ids.push_back(*id);
  }
  for (const auto& id : ids)
    if (Status s = (*r)->DeleteImage(id); !s.ok()) return FailStatus(ctx, s);
  if (ctx.opt.json)
    ctx.PrintJson(Json{{"deleted", ids}});
  else
    for (const auto& id : ids) ctx.Note("deleted image " + id);
  ctx.Warn("space is given back by 'umbra repo gc'");
  return kExitOk;
}

int PruneCmd(Context& ctx, const ImageArgs& a) {
  if (RepoDir(a).empty()) return ctx.Usage("give the repository with --repo DIR or UMBRA_REPO");
  const auto& k = a.keep;
  if (k.keep_last < 0 || k.keep_daily < 0 || k.keep_weekly < 0 || k.keep_monthly < 0)
    return ctx.Usage("--keep-* values must not be negative");
  if (k.keep_last + k.keep_daily + k.keep_weekly + k.keep_monthly == 0)
    return ctx.Usage(
        "give at least one of --keep-last, --keep-daily, --keep-weekly, --keep-monthly");
  auto r = OpenRepo(ctx, a, false);
  if (!r.ok()) return FailStatus(ctx, r.status());
  auto lock = (*r)->store().Lock(false, true);
  if (!lock.ok()) return FailStatus(ctx, lock.status());
  std::vector<std::string> bad;
  auto all = LoadAll(**r, &bad);
  if (!all.ok()) return FailStatus(ctx, all.status());
  if (!bad.empty())
    return ctx.Fail("corruption",
                    "cannot read image " + bad.front() +
                        "; prune needs every image's date (run 'umbra image verify')");
  std::vector<repo::Manifest> sel;
  for (auto& m : *all)
    if (a.volume.empty() || m.volume == a.volume) sel.push_back(m);
  auto drop = imaging::PruneSelect(sel, k);
  if (!a.dry_run)
    for (const auto& id : drop)
      if (Status s = (*r)->DeleteImage(id); !s.ok()) return FailStatus(ctx, s);
  if (ctx.opt.json) {
    ctx.PrintJson(
        Json{{"deleted", drop}, {"kept", sel.size() - drop.size()}, {"dry_run", a.dry_run}});
  } else {
    for (const auto& id : drop)
      ctx.Note((a.dry_run ? "would delete image " : "deleted image ") + id);
    ctx.Note("kept " + std::to_string(sel.size() - drop.size()) + " images");
  }
  return kExitOk;
}

// Arguments for umbrad's image.* operations: it opens the repository itself.
Result<Json> DaemonImageArgs(const ImageArgs& a) {
  const std::string dir = RepoDir(a);
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return Status::NotFound("repository " + dir + " does not exist");
  UMBRA_ASSIGN_OR_RETURN(std::string pass, Passphrase(a, IsEncrypted(dir), false));
  Json args{{"repo", AbsolutePath(dir)}, {"id", a.ids.front()}};
  if (!pass.empty()) args["passphrase"] = pass;
  return args;
}

int MountCmd(Context& ctx, const ImageArgs& a) {
  if (RepoDir(a).empty()) return ctx.Usage("give the repository with --repo DIR or UMBRA_REPO");
  auto args = DaemonImageArgs(a);
  if (!args.ok()) return FailStatus(ctx, args.status());
  (*args)["dir"] = AbsolutePath(a.to);
  return ctx.Run("image.mount", *args, [&](const Json& r) {
    ctx.Note("mounted image " + Text(r, "image") + " (" + Text(r, "filesystem") + ", " +
             Text(r, "device") + ") read-only on " + Text(r, "dir"));
  });
}

int UnmountCmd(Context& ctx, const ImageArgs& a) {
  const std::string& what = a.ids.front();
  Json args =
      what.find('/') != std::string::npos ? Json{{"dir", AbsolutePath(what)}} : Json{{"id", what}};
  return ctx.Run("image.unmount", args, [&](const Json&) { ctx.Note("unmounted " + what); });
}

int ExportCmd(Context& ctx, const ImageArgs& a) {
  if (RepoDir(a).empty()) return ctx.Usage("give the repository with --repo DIR or UMBRA_REPO");
  auto args = DaemonImageArgs(a);
  if (!args.ok()) return FailStatus(ctx, args.status());
  return ctx.Run("image.export", *args, [&](const Json& r) {
    std::cout << Text(r, "uri") << "\n";
    if (!ctx.opt.quiet && r.contains("tcp_uri") && r["tcp_uri"].is_string())
      std::cout << Text(r, "tcp_uri") << "\n";
  });
}

int UnexportCmd(Context& ctx, const ImageArgs& a) {
  return ctx.Run("image.unexport", Json{{"id", a.ids.front()}}, [&](const Json& r) {
    ctx.Note("image " + Text(r, "image") + " no longer exported");
  });
}

int RepoInit(Context& ctx, const ImageArgs& a) {
  if (RepoDir(a).empty()) return ctx.Usage("give the repository directory (DIR or --repo)");
  std::error_code ec;
  const std::string dir = RepoDir(a);
  if (fs::exists(dir, ec) && !(fs::is_directory(dir, ec) && fs::is_empty(dir, ec))) {
    auto store = repo::OpenDirStore(dir, false);
    if (!store.ok()) return FailStatus(ctx, store.status());
    auto has = (*store)->Exists("umbra-repo.json");
    if (has.ok() && *has)
      return ctx.Fail("already_exists", dir + " is already an Umbra repository");
    return ctx.Fail("invalid_argument", dir + " is not empty and not an Umbra repository");
  }
  auto r = OpenRepo(ctx, a, true);
  if (!r.ok()) return FailStatus(ctx, r.status());
  if (ctx.opt.json)
    ctx.PrintJson(Json{{"repository", dir},
                       {"id", (*r)->id()},
                       {"chunk_size", (*r)->chunk_size()},
                       {"encrypted", (*r)->encrypted()}});
  return kExitOk;
}

int RepoGc(Context& ctx, const ImageArgs& a) {
  if (RepoDir(a).empty()) return ctx.Usage("give the repository with --repo DIR or UMBRA_REPO");
  auto r = OpenRepo(ctx, a, false);
  if (!r.ok()) return FailStatus(ctx, r.status());
  auto rep = imaging::CollectGarbage(**r);
  if (!rep.ok()) return FailStatus(ctx, rep.status());
  if (ctx.opt.json)
    ctx.PrintJson(Json{{"removed", rep->chunks_removed},
                       {"kept", rep->chunks_kept},
                       {"temporary_removed", rep->temporary_removed}});
  else
    ctx.Note("removed " + std::to_string(rep->chunks_removed) + " unreferenced chunks, kept " +
             std::to_string(rep->chunks_kept) +
             (rep->temporary_removed ? ", cleaned " + std::to_string(rep->temporary_removed) +
                                           " leftover temporary files"
                                     : ""));
  return kExitOk;
}

int RepoInfo(Context& ctx, const ImageArgs& a) {
  if (RepoDir(a).empty()) return ctx.Usage("give the repository with --repo DIR or UMBRA_REPO");
  auto r = OpenRepo(ctx, a, false);
  if (!r.ok()) return FailStatus(ctx, r.status());
  auto ids = (*r)->ListImages();
  auto chunks = (*r)->ListChunks();
  if (!ids.ok()) return FailStatus(ctx, ids.status());
  if (!chunks.ok()) return FailStatus(ctx, chunks.status());
  Json j{
      {"repository", RepoDir(a)},       {"id", (*r)->id()},      {"chunk_size", (*r)->chunk_size()},
      {"encrypted", (*r)->encrypted()}, {"images", ids->size()}, {"chunks", chunks->size()}};
  if (ctx.opt.json) {
    ctx.PrintJson(j);
  } else {
    std::cout << "repository  " << RepoDir(a) << "\nid          " << (*r)->id() << "\nchunk size  "
              << FormatBytes((*r)->chunk_size()) << "\nencrypted   "
              << ((*r)->encrypted() ? "yes" : "no") << "\nimages      " << ids->size()
              << "\nchunks      " << chunks->size() << "\n";
  }
  return kExitOk;
}

void RepoOptions(CLI::App* c, ImageArgs* a) {
  c->add_option("--repo", a->repo, "Image repository directory (default: $UMBRA_REPO)")
      ->type_name("DIR");
  c->add_option("--passphrase-file", a->passphrase_file,
                "Read an encrypted repository's passphrase from FILE (else $UMBRA_PASSPHRASE, "
                "else a prompt)")
      ->type_name("FILE");
}

}  // namespace

void AddImageCommands(CLI::App& root, Context& ctx, Registry& reg) {
  CLI::App* g = AddGroup(
      root, "image", "Take images of volumes into a repository and restore them",
      "An image is a complete copy of a volume at one instant, kept in a deduplicating,\n"
      "compressed (optionally encrypted) repository directory: identical chunks are stored\n"
      "once across all images and volumes. Format: docs/format/repository.md.");
  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c = AddCommand(
        g, "create", "Image a volume while it is in use",
        "Takes a snapshot of VOLUME (auto-released), reads its allocated chunks over umbrad's\n"
        "NBD export, and stores new chunks in the repository (created if DIR is missing or\n"
        "empty). Prints a summary: bytes read, chunks new / reused / zero, bytes stored, time.\n\n"
        "--incremental reads only the chunks umbrad's change tracking reports as changed since\n"
        "the previous image of VOLUME; every image is still complete on its own. If tracking\n"
        "was reset (e.g. after a power loss) it says so and reads everything.\n\n"
        "--offline images a device or file directly, with no snapshot (rescue systems; umbrad\n"
        "need not run); refused if it is mounted read-write.\n\n"
        "Progress is saved every --checkpoint-interval seconds; a create that is interrupted\n"
        "(killed, crashed) resumes when rerun: chunks it stored and that have not changed since\n"
        "are not read again.",
        {"umbra image create db --repo /backup/umbra",
         "umbra image create db --repo /backup/umbra --incremental",
         "umbra image create /dev/sdb1 --offline --repo /mnt/usb/repo"});
    c->add_option("VOLUME", a->volume, "Volume name (device or file with --offline)")
        ->required()
        ->type_name("");
    RepoOptions(c, a.get());
    c->add_flag("--incremental", a->incremental, "Read only chunks changed since the last image");
    c->add_flag("--no-writers", a->no_writers, "Crash-consistent snapshot: skip writers");
    c->add_flag("--offline", a->offline, "Image an unmounted device or file, no snapshot");
    c->add_flag("--encrypt", a->encrypt, "When creating the repository: encrypt it");
    c->add_option("--chunk-size", a->chunk_size,
                  "When creating the repository: chunk size (default 256K)")
        ->type_name("SIZE");
    c->add_option("--compression", a->level, "zstd level 1-19 (default 3)")->type_name("N");
    c->add_option("--threads", a->threads, "Worker threads (default: two per CPU, at least 4)")
        ->type_name("N");
    c->add_option("--checkpoint-interval", a->checkpoint,
                  "Save progress for a resume every SECONDS (default 5)")
        ->type_name("SECONDS");
    reg.Add(c, [&ctx, a] { return Create(ctx, *a); });
  }
  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c =
        AddCommand(g, "list", "List the images in a repository",
                   "Lists images, oldest first, optionally only those of VOLUME.",
                   {"umbra image list --repo /backup/umbra", "umbra --json image list db"});
    c->add_option("VOLUME", a->volume, "Only images of this volume")->type_name("");
    RepoOptions(c, a.get());
    reg.Add(c, [&ctx, a] { return List(ctx, *a); });
  }
  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c = AddCommand(
        g, "verify", "Re-read and re-hash every chunk of the images",
        "Reads every chunk the images use (all images without ID), decrypts, decompresses and\n"
        "re-hashes it. Each damaged or missing chunk is reported with the images it affects.\n"
        "Exit status 1 if anything is damaged. --repair removes damaged chunk objects, so that\n"
        "the next image create of a volume still holding their data stores them again.",
        {"umbra image verify --repo /backup/umbra",
         "umbra image verify 6740a1b2 --repo /backup/umbra"});
    c->add_option("ID", a->ids, "Image ids (or unique prefixes); default all")->type_name("");
    c->add_flag("--repair", a->repair, "Remove damaged chunk objects (see above)");
    RepoOptions(c, a.get());
    c->add_option("--threads", a->threads, "Worker threads")->type_name("N");
    reg.Add(c, [&ctx, a] { return VerifyCmd(ctx, *a); });
  }
  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c = AddCommand(
        g, "restore", "Write an image back to a device or file",
        "Writes image ID to --to: a block device (not mounted, at least the image's size) or a\n"
        "file (created if missing). With --delta, reads the target first and writes only the\n"
        "chunks that differ (fast onto a stale copy of the same volume).",
        {"umbra image restore 6740a1b2 --to /dev/vg/restore --repo /backup/umbra",
         "umbra image restore 6740a1b2 --to db.img --delta --repo /backup/umbra"});
    a->ids.resize(1);
    c->add_option("ID", a->ids[0], "Image id (or unique prefix)")->required()->type_name("");
    c->add_option("--to", a->to, "Target device or file")->required()->type_name("TARGET");
    c->add_flag("--delta", a->delta, "Write only chunks that differ from the target");
    RepoOptions(c, a.get());
    c->add_option("--threads", a->threads, "Worker threads")->type_name("N");
    reg.Add(c, [&ctx, a] { return RestoreCmd(ctx, *a); });
  }
  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c = AddCommand(
        g, "delete", "Delete images",
        "Deletes the manifests of the images; no other image changes. Chunks only they used\n"
        "are removed by 'umbra repo gc'.",
        {"umbra image delete 6740a1b2 --repo /backup/umbra"});
    c->add_option("ID", a->ids, "Image ids (or unique prefixes)")->required()->type_name("");
    RepoOptions(c, a.get());
    reg.Add(c, [&ctx, a] { return DeleteCmd(ctx, *a); });
  }
  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c = AddCommand(
        g, "prune", "Delete images a retention policy does not keep",
        "Per volume, keeps the newest --keep-last images and the newest image of each of the\n"
        "newest --keep-daily days (--keep-weekly weeks, --keep-monthly months) that have\n"
        "images, and deletes the rest. --dry-run only lists them.",
        {"umbra image prune --keep-last 3 --keep-daily 7 --keep-weekly 4 --repo /backup/umbra"});
    c->add_option("VOLUME", a->volume, "Only images of this volume")->type_name("");
    c->add_option("--keep-last", a->keep.keep_last, "Keep the N newest")->type_name("N");
    c->add_option("--keep-daily", a->keep.keep_daily, "Keep one per day for N days")
        ->type_name("N");
    c->add_option("--keep-weekly", a->keep.keep_weekly, "Keep one per week for N weeks")
        ->type_name("N");
    c->add_option("--keep-monthly", a->keep.keep_monthly, "Keep one per month for N months")
        ->type_name("N");
    c->add_flag("--dry-run", a->dry_run, "List what would be deleted; delete nothing");
    RepoOptions(c, a.get());
    reg.Add(c, [&ctx, a] { return PruneCmd(ctx, *a); });
  }

  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c = AddCommand(
        g, "mount", "Mount an image read-only for file-level restore",
        "umbrad serves image ID (chunks read from the repository on demand) as a read-only\n"
        "device and mounts its filesystem at DIR (created if missing). ext4 journals and XFS\n"
        "logs are replayed into a throwaway overlay, so crash-consistent images mount cleanly.\n"
        "Undo with 'umbra image unmount DIR'.",
        {"umbra image mount 6740a1b2 /mnt/restore --repo /backup/umbra"});
    a->ids.resize(1);
    c->add_option("ID", a->ids[0], "Image id (or unique prefix)")->required()->type_name("");
    c->add_option("DIR", a->to, "Mount point")->required()->type_name("");
    RepoOptions(c, a.get());
    reg.Add(c, [&ctx, a] { return MountCmd(ctx, *a); });
  }
  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c = AddCommand(g, "unmount", "Unmount an image mounted by 'image mount'",
                             "Unmounts the image mounted at DIR (or image ID) and releases its "
                             "device.",
                             {"umbra image unmount /mnt/restore"});
    a->ids.resize(1);
    c->add_option("DIR|ID", a->ids[0], "Mount point or image id")->required()->type_name("");
    reg.Add(c, [&ctx, a] { return UnmountCmd(ctx, *a); });
  }
  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c = AddCommand(
        g, "export", "Serve an image over NBD and print its URI",
        "umbrad serves image ID read-only over NBD (docs/protocol/nbd.md) as export\n"
        "image-ID, straight from the repository; zero chunks are holes in base:allocation.\n"
        "Prints the nbd+unix URI (and the TCP one if umbrad listens on TCP). The export stays\n"
        "until 'umbra image unexport ID' or umbrad stops.",
        {"qemu-img convert -O qcow2 $(umbra image export 6740a1b2 --repo /backup/umbra) db.qcow2"});
    a->ids.resize(1);
    c->add_option("ID", a->ids[0], "Image id (or unique prefix)")->required()->type_name("");
    RepoOptions(c, a.get());
    reg.Add(c, [&ctx, a] { return ExportCmd(ctx, *a); });
  }
  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c = AddCommand(g, "unexport", "Stop serving an image over NBD",
                             "Removes the export; connected clients keep reading until they "
                             "disconnect.",
                             {"umbra image unexport 6740a1b2"});
    a->ids.resize(1);
    c->add_option("ID", a->ids[0], "Image id (or unique prefix)")->required()->type_name("");
    reg.Add(c, [&ctx, a] { return UnexportCmd(ctx, *a); });
  }

  CLI::App* rg = AddGroup(root, "repo", "Create and maintain image repositories",
                          "An image repository is a directory (docs/format/repository.md).");
  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c = AddCommand(
        rg, "init", "Create an image repository",
        "Creates an empty repository in DIR (missing or empty). --encrypt seals every chunk and\n"
        "manifest with AES-256-GCM under a key protected by the passphrase (scrypt).",
        {"umbra repo init /backup/umbra",
         "UMBRA_PASSPHRASE=... umbra repo init /backup/secret --encrypt"});
    c->add_option("DIR", a->repo, "Repository directory")->type_name("");
    c->add_flag("--encrypt", a->encrypt, "Encrypt the repository");
    c->add_option("--chunk-size", a->chunk_size, "Chunk size, 64K to 16M (default 256K)")
        ->type_name("SIZE");
    c->add_option("--passphrase-file", a->passphrase_file, "Read the passphrase from FILE")
        ->type_name("FILE");
    reg.Add(c, [&ctx, a] { return RepoInit(ctx, *a); });
  }
  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c = AddCommand(
        rg, "gc", "Remove chunks no image uses",
        "Deletes every chunk no image references and leftovers of interrupted commands. Waits\n"
        "for running image commands and keeps new ones out meanwhile (exclusive lock), so it is\n"
        "safe next to a concurrent 'image create'. Refuses while an image cannot be read.",
        {"umbra repo gc --repo /backup/umbra"});
    RepoOptions(c, a.get());
    reg.Add(c, [&ctx, a] { return RepoGc(ctx, *a); });
  }
  {
    auto a = std::make_shared<ImageArgs>();
    CLI::App* c = AddCommand(rg, "info", "Show a repository's settings and counts",
                             "Prints the repository's id, chunk size, encryption, image and chunk "
                             "counts.",
                             {"umbra repo info --repo /backup/umbra"});
    RepoOptions(c, a.get());
    reg.Add(c, [&ctx, a] { return RepoInfo(ctx, *a); });
  }
}

}  // namespace umbra::cli
