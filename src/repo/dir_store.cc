// The directory store: docs/format/repository.md section 2. Every file is
// written under tmp/ and renamed into place (rule 3.1).
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <system_error>

#include "base/random.h"
#include "umbra/repo.h"

namespace umbra::repo {
namespace {

namespace fs = std::filesystem;

class FdLock final : public StoreLock {
 public:
  explicit FdLock(int fd) : fd_(fd) {}
  ~FdLock() override { ::close(fd_); }

 private:
  int fd_;
};

Status WriteAll(int fd, std::span<const std::byte> data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "write");
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status SyncPath(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "opening " + path);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  return rc == 0 ? Status::Ok() : Status::FromErrno(err, "syncing " + path);
}

class DirStore final : public Store {
 public:
  explicit DirStore(std::string dir) : dir_(std::move(dir)) {}

  Result<bool> Exists(const std::string& name) override {
    struct stat st;
    if (::stat(Path(name).c_str(), &st) == 0) return true;
    if (errno == ENOENT) return false;
    return Status::FromErrno(errno, "stat " + Path(name));
  }

  Status Get(const std::string& name, std::vector<std::byte>* out) override {
    const std::string p = Path(name);
    int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      if (errno == ENOENT) return Status::NotFound(p + " is missing");
      return Status::FromErrno(errno, "opening " + p);
    }
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      int err = errno;
      ::close(fd);
      return Status::FromErrno(err, "stat " + p);
    }
    out->resize(static_cast<size_t>(st.st_size));
    size_t done = 0;
    while (done < out->size()) {
      ssize_t n = ::pread(fd, out->data() + done, out->size() - done, static_cast<off_t>(done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        int err = n < 0 ? errno : EIO;
        ::close(fd);
        return Status::FromErrno(err, "reading " + p);
      }
      done += static_cast<size_t>(n);
    }
    ::close(fd);
    return Status::Ok();
  }

  Status Put(const std::string& name, std::span<const std::byte> data, bool sync) override {
    const std::string final_path = Path(name);
    const std::string parent = fs::path(final_path).parent_path();
    std::error_code ec;
    fs::create_directories(parent, ec);
    if (ec) return Status::FromErrno(ec.value(), "creating " + parent);
    fs::create_directories(dir_ + "/tmp", ec);
    if (ec) return Status::FromErrno(ec.value(), "creating " + dir_ + "/tmp");
    const std::string tmp = dir_ + "/tmp/" + NewUuid();
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return Status::FromErrno(errno, "creating " + tmp);
    Status s = WriteAll(fd, data);
    if (s.ok() && sync && ::fsync(fd) != 0) s = Status::FromErrno(errno, "syncing " + tmp);
    // Not synced now: start writeback at once so the SyncAll() before the
    // manifest (rule 3.2) waits only for the last few objects.
    if (s.ok() && !sync) ::sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
    ::close(fd);
    if (s.ok() && ::rename(tmp.c_str(), final_path.c_str()) != 0)
      s = Status::FromErrno(errno, "renaming into " + final_path);
    if (!s.ok()) {
      ::unlink(tmp.c_str());
      return s.Annotate("writing " + name);
    }
    if (sync) UMBRA_RETURN_IF_ERROR(SyncPath(parent));
    return Status::Ok();
  }

  Status Remove(const std::string& name) override {
    if (::unlink(Path(name).c_str()) != 0) {
      if (errno == ENOENT) return Status::NotFound(Path(name) + " is missing");
      return Status::FromErrno(errno, "removing " + Path(name));
    }
    return Status::Ok();
  }

  Result<std::vector<std::string>> List(const std::string& dir) override {
    std::vector<std::string> out;
    const std::string root = Path(dir);
    std::error_code ec;
    if (!fs::exists(root, ec)) return out;
    for (auto it = fs::recursive_directory_iterator(root, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (it->is_regular_file(ec))
        out.push_back(dir + "/" + fs::relative(it->path(), root, ec).string());
    }
    if (ec) return Status::FromErrno(ec.value(), "listing " + root);
    return out;
  }

  Status SyncAll() override {
    int fd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return Status::FromErrno(errno, "opening " + dir_);
    int rc = ::syncfs(fd);
    int err = errno;
    ::close(fd);
    return rc == 0 ? Status::Ok() : Status::FromErrno(err, "syncing " + dir_);
  }

  Result<std::unique_ptr<StoreLock>> Lock(bool exclusive, bool wait) override {
    const std::string p = dir_ + "/lock";
    int fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0 && (errno == EACCES || errno == EROFS))
      fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Status::FromErrno(errno, "opening " + p);
    int op = (exclusive ? LOCK_EX : LOCK_SH) | (wait ? 0 : LOCK_NB);
    while (::flock(fd, op) != 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      if (err == EWOULDBLOCK)
        return Status::Busy("repository " + dir_ + " is in use by another command");
      return Status::FromErrno(err, "locking " + p);
    }
    return std::unique_ptr<StoreLock>(new FdLock(fd));
  }

  Result<uint64_t> CleanTemporary() override {
    uint64_t n = 0;
    std::error_code ec;
    const std::string tmp = dir_ + "/tmp";
    if (!fs::exists(tmp, ec)) return n;
    for (auto& e : fs::directory_iterator(tmp, ec)) {
      if (fs::remove(e.path(), ec)) ++n;
    }
    if (ec) return Status::FromErrno(ec.value(), "cleaning " + tmp);
    return n;
  }

  const std::string& location() const override { return dir_; }

 private:
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

}  // namespace

Result<std::unique_ptr<Store>> OpenDirStore(const std::string& dir, bool create) {
  std::error_code ec;
  if (create) {
    fs::create_directories(dir, ec);
    if (ec) return Status::FromErrno(ec.value(), "creating repository directory " + dir);
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::NotFound("repository " + dir + " does not exist");
    return Status::FromErrno(errno, "repository " + dir);
  }
  if (!S_ISDIR(st.st_mode))
    return Status::InvalidArgument("repository " + dir + " is not a directory");
  std::string abs = fs::absolute(dir, ec).lexically_normal().string();
  if (abs.size() > 1 && abs.back() == '/') abs.pop_back();
  return std::unique_ptr<Store>(new DirStore(ec ? dir : abs));
}

}  // namespace umbra::repo
