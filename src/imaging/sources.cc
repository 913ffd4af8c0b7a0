// Sources of image bytes: an NBD export (libnbd) and a device or file.
#include <fcntl.h>
#include <libnbd.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "imaging/ext4_bitmap.h"
#include "umbra/imaging.h"

namespace umbra::imaging {
namespace {

Status NbdError(const std::string& what) {
  const char* e = nbd_get_error();
  return Status(Code::kIOError, what + ": " + (e ? e : "unknown libnbd error"), EIO);
}

struct NbdHandle {
  nbd_handle* h = nullptr;
  ~NbdHandle() {
    if (h != nullptr) {
      nbd_shutdown(h, 0);
      nbd_close(h);
    }
  }
};

Result<std::unique_ptr<NbdHandle>> Connect(const std::string& socket, const std::string& name,
                                           bool meta) {
  auto c = std::make_unique<NbdHandle>();
  c->h = nbd_create();
  if (c->h == nullptr) return NbdError("libnbd");
  if (nbd_set_export_name(c->h, name.c_str()) != 0) return NbdError("export " + name);
  if (meta && nbd_add_meta_context(c->h, "base:allocation") != 0)
    return NbdError("export " + name);
  if (nbd_connect_unix(c->h, socket.c_str()) != 0)
    return NbdError("connecting to export " + name + " at " + socket);
  return c;
}

class NbdReader final : public Reader {
 public:
  explicit NbdReader(std::unique_ptr<NbdHandle> c) : c_(std::move(c)) {}
  Status Read(uint64_t off, std::span<std::byte> buf) override {
    // The server takes requests of up to 32 MiB (docs/protocol/nbd.md).
    constexpr size_t kMax = 32u << 20;
    for (size_t done = 0; done < buf.size();) {
      size_t n = std::min(kMax, buf.size() - done);
      if (nbd_pread(c_->h, buf.data() + done, n, off + done, 0) != 0)
        return NbdError("reading at offset " + std::to_string(off + done));
      done += n;
    }
    return Status::Ok();
  }

 private:
  std::unique_ptr<NbdHandle> c_;
};

class NbdSource final : public Source {
 public:
  NbdSource(std::string socket, std::string name, std::unique_ptr<NbdHandle> c, uint64_t size)
      : socket_(std::move(socket)), name_(std::move(name)), c_(std::move(c)), size_(size) {}

  uint64_t size() const override { return size_; }

  Result<std::vector<Range>> Allocated() override {
    std::vector<Range> out;
    if (nbd_can_meta_context(c_->h, "base:allocation") != 1) {
      if (size_) out.push_back({0, size_});
      return out;
    }
    struct Ctx {
      std::vector<Range>* out;
      uint64_t next;
    } ctx{&out, 0};
    uint64_t pos = 0;
    while (pos < size_) {
      ctx.next = pos;
      nbd_extent_callback cb{};
      cb.user_data = &ctx;
      cb.callback = [](void* ud, const char* meta, uint64_t offset, uint32_t* entries, size_t n,
                       int*) -> int {
        auto* c = static_cast<Ctx*>(ud);
        if (std::strcmp(meta, "base:allocation") != 0) return 0;
        uint64_t p = offset;
        for (size_t i = 0; i + 1 < n; i += 2) {
          uint64_t len = entries[i];
          bool hole = (entries[i + 1] & LIBNBD_STATE_HOLE) != 0;
          if (!hole && len > 0) {
            if (!c->out->empty() && c->out->back().offset + c->out->back().length == p)
              c->out->back().length += len;
            else
              c->out->push_back({p, len});
          }
          p += len;
        }
        c->next = p;
        return 0;
      };
      uint64_t count = std::min<uint64_t>(size_ - pos, 1ull << 30);
      if (nbd_block_status(c_->h, count, pos, cb, 0) != 0)
        return NbdError("block status at offset " + std::to_string(pos));
      if (ctx.next <= pos) return Status(Code::kIOError, "NBD server made no progress in block status", EIO);
      pos = ctx.next;
    }
    if (!out.empty() && out.back().offset + out.back().length > size_)
      out.back().length = size_ - out.back().offset;
    return out;
  }

  Result<std::unique_ptr<Reader>> NewReader() override {
    UMBRA_ASSIGN_OR_RETURN(auto c, Connect(socket_, name_, false));
    return std::unique_ptr<Reader>(new NbdReader(std::move(c)));
  }

 private:
  std::string socket_, name_;
  std::unique_ptr<NbdHandle> c_;
  uint64_t size_;
};

class FdReader final : public Reader {
 public:
  explicit FdReader(int fd) : fd_(fd) {}
  ~FdReader() override { ::close(fd_); }
  Status Read(uint64_t off, std::span<std::byte> buf) override {
    for (size_t done = 0; done < buf.size();) {
      ssize_t n = ::pread(fd_, buf.data() + done, buf.size() - done,
                          static_cast<off_t>(off + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::FromErrno(errno, "reading at offset " + std::to_string(off + done));
      if (n == 0) {  // past the end of a file: zeros
        std::memset(buf.data() + done, 0, buf.size() - done);
        break;
      }
      done += static_cast<size_t>(n);
    }
    return Status::Ok();
  }

 private:
  int fd_;
};

class FileSource final : public Source {
 public:
  FileSource(std::string path, uint64_t size, bool regular)
      : path_(std::move(path)), size_(size), regular_(regular) {}
  uint64_t size() const override { return size_; }

  std::string allocation_note() const override { return note_; }

  Result<std::vector<Range>> Allocated() override {
    std::vector<Range> out;
    std::string why;
    if (auto ext = Ext4Allocated(path_, size_, &why)) {
      note_ = "free blocks skipped (ext4 block bitmap)";
      return *ext;
    }
    if (why.rfind("no ext2", 0) != 0) note_ = "ext4 bitmap not used: " + why + "; reading everything";
    if (!regular_) {
      if (size_) out.push_back({0, size_});
      return out;
    }
    int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Status::FromErrno(errno, "opening " + path_);
    off_t pos = 0;
    while (static_cast<uint64_t>(pos) < size_) {
      off_t data = ::lseek(fd, pos, SEEK_DATA);
      if (data < 0) break;  // ENXIO: only a hole remains
      off_t hole = ::lseek(fd, data, SEEK_HOLE);
      if (hole < 0) hole = static_cast<off_t>(size_);
      out.push_back({static_cast<uint64_t>(data), static_cast<uint64_t>(hole - data)});
      pos = hole;
    }
    ::close(fd);
    return out;
  }

  Result<std::unique_ptr<Reader>> NewReader() override {
    int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Status::FromErrno(errno, "opening " + path_);
    return std::unique_ptr<Reader>(new FdReader(fd));
  }

 private:
  std::string path_;
  uint64_t size_;
  bool regular_;
  std::string note_;
};

}  // namespace

Result<std::unique_ptr<Source>> OpenNbdSource(const std::string& socket,
                                              const std::string& export_name) {
  UMBRA_ASSIGN_OR_RETURN(auto c, Connect(socket, export_name, true));
  int64_t size = nbd_get_size(c->h);
  if (size < 0) return NbdError("size of export " + export_name);
  return std::unique_ptr<Source>(
      new NbdSource(socket, export_name, std::move(c), static_cast<uint64_t>(size)));
}

Result<std::unique_ptr<Source>> OpenFileSource(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return Status::NotFound(path + " does not exist");
    return Status::FromErrno(errno, "opening " + path);
  }
  struct stat st;
  uint64_t size = 0;
  bool regular = false;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return Status::FromErrno(err, "stat " + path);
  }
  if (S_ISBLK(st.st_mode)) {
    if (::ioctl(fd, BLKGETSIZE64, &size) != 0) {
      int err = errno;
      ::close(fd);
      return Status::FromErrno(err, "size of " + path);
    }
  } else if (S_ISREG(st.st_mode)) {
    size = static_cast<uint64_t>(st.st_size);
    regular = true;
  } else {
    ::close(fd);
    return Status::InvalidArgument(path + " is neither a block device nor a file");
  }
  ::close(fd);
  return std::unique_ptr<Source>(new FileSource(path, size, regular));
}

std::string DetectFilesystem(std::span<const std::byte> head) {
  auto at = [&](size_t off, std::string_view magic) {
    return head.size() >= off + magic.size() &&
           std::memcmp(head.data() + off, magic.data(), magic.size()) == 0;
  };
  if (head.size() >= 1082 && static_cast<uint8_t>(head[1080]) == 0x53 &&
      static_cast<uint8_t>(head[1081]) == 0xEF)
    return "ext4";  // ext2/3/4 share the magic; Umbra treats them alike
  if (at(0, "XFSB")) return "xfs";
  if (at(65536 + 64, "_BHRfS_M")) return "btrfs";
  if (at(4086, "SWAPSPACE2")) return "swap";
  if (at(82, "FAT32   ") || at(54, "FAT16   ") || at(54, "FAT12   ")) return "vfat";
  return "";
}

}  // namespace umbra::imaging
