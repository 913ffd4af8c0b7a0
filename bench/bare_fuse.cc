// The ceiling of the FUSE path, for bench/fs_bench.sh (BARE=1): a bare
// libfuse3 file server exposing one file, /disk, whose reads and writes go to
// a backing file with pread/pwrite (page cache, like umbrad's default
// origin_cache). libfuse's multi-threaded loop, direct I/O replies, nothing
// else: no snapshot engine, no journal, no locks. The loop device and ext4 on
// top are the same as for umbrad, so UMBRA-0 against FUSE-BARE is what the
// engine and umbrad's front end cost beyond FUSE itself.
//
//   umbra-bare-fuse BACKING_FILE MOUNTPOINT [libfuse options, e.g. -f]
#define FUSE_USE_VERSION 35
#include <fcntl.h>
#include <fuse.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace {

int g_fd = -1;
off_t g_size = 0;

int GetAttr(const char* path, struct stat* st, fuse_file_info*) {
  *st = {};
  if (std::strcmp(path, "/") == 0) {
    st->st_mode = S_IFDIR | 0755;
    st->st_nlink = 2;
    return 0;
  }
  if (std::strcmp(path, "/disk") != 0) return -ENOENT;
  st->st_mode = S_IFREG | 0600;
  st->st_nlink = 1;
  st->st_size = g_size;
  return 0;
}

int Open(const char* path, fuse_file_info* fi) {
  if (std::strcmp(path, "/disk") != 0) return -ENOENT;
  fi->direct_io = 1;  // as umbrad: no page cache on the FUSE side
  return 0;
}

int Read(const char*, char* buf, size_t n, off_t off, fuse_file_info*) {
  ssize_t r = ::pread(g_fd, buf, n, off);
  return r < 0 ? -errno : static_cast<int>(r);
}

int Write(const char*, const char* buf, size_t n, off_t off, fuse_file_info*) {
  ssize_t r = ::pwrite(g_fd, buf, n, off);
  return r < 0 ? -errno : static_cast<int>(r);
}

int Fsync(const char*, int, fuse_file_info*) { return ::fdatasync(g_fd) == 0 ? 0 : -errno; }

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: umbra-bare-fuse BACKING_FILE MOUNTPOINT [libfuse options]\n");
    return 2;
  }
  g_fd = ::open(argv[1], O_RDWR | O_CLOEXEC);
  if (g_fd < 0) {
    std::fprintf(stderr, "umbra-bare-fuse: %s: %s\n", argv[1], std::strerror(errno));
    return 1;
  }
  g_size = ::lseek(g_fd, 0, SEEK_END);
  fuse_operations ops{};
  ops.getattr = GetAttr;
  ops.open = Open;
  ops.read = Read;
  ops.write = Write;
  ops.fsync = Fsync;
  argv[1] = argv[0];  // libfuse sees: program MOUNTPOINT [options]
  return fuse_main(argc - 1, argv + 1, &ops, nullptr);
}
