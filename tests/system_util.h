// Helpers shared by the tests that drive real devices (loop, FUSE, mounts):
// running shell commands, temp directories, O_DIRECT buffers, and copying and
// comparing a block device against a reference file.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <sstream>
#include <string>
#include <vector>

namespace umbra::test_util {

inline constexpr uint64_t kMiB = 1 << 20;

// Runs `cmd` through /bin/sh; returns the exit status (128+N for a signal)
// and appends its stdout+stderr to *out.
inline int Sh(const std::string& cmd, std::string* out = nullptr) {
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  char buf[4096];
  size_t n;
  std::string text;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) text.append(buf, n);
  int st = ::pclose(p);
  if (out != nullptr) *out += text;
  if (st == -1) return -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

inline bool HaveTool(const std::string& tool) {
  return Sh("command -v " + tool + " >/dev/null || test -x /sbin/" + tool +
            " || test -x /usr/sbin/" + tool) == 0;
}

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A whole file as bytes (EXPECTs that it could be read).
inline std::vector<std::byte> ReadBytes(const std::string& path) {
  std::error_code ec;
  std::vector<std::byte> b(std::filesystem::file_size(path, ec));
  EXPECT_FALSE(ec) << path << ": " << ec.message();
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(b.data()), static_cast<std::streamsize>(b.size()));
  EXPECT_TRUE(f.good()) << path;
  return b;
}

// Replaces the file's contents with `data` (EXPECTs success).
inline void WriteBytes(const std::string& path, std::span<const std::byte> data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  EXPECT_TRUE(f.good()) << path;
}

inline void WriteBytes(const std::string& path, const std::string& text) {
  WriteBytes(path, std::span(reinterpret_cast<const std::byte*>(text.data()), text.size()));
}

// A fresh directory PARENT/PREFIX-XXXXXX (PARENT /var/tmp unless given),
// removed with everything in it.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix, const std::string& parent = "/var/tmp") {
    std::string tmpl = parent + "/" + prefix + "-XXXXXX";
    if (::mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    if (path_.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
    if (ec) std::fprintf(stderr, "removing %s: %s\n", path_.c_str(), ec.message().c_str());
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Buffer aligned for O_DIRECT.
struct AlignedBuffer {
  explicit AlignedBuffer(size_t n)
      : p(static_cast<std::byte*>(std::aligned_alloc(4096, n))), size(n) {}
  ~AlignedBuffer() { std::free(p); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  std::byte* p;
  size_t size;
};

// Copies the first `size` bytes of block device `dev` (read with O_DIRECT)
// to file `to`.
inline ::testing::AssertionResult CopyDevice(const std::string& dev, uint64_t size,
                                             const std::string& to) {
  int in = ::open(dev.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (in < 0)
    return ::testing::AssertionFailure() << "open " << dev << ": " << std::strerror(errno);
  int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (out < 0) {
    ::close(in);
    return ::testing::AssertionFailure() << "create " << to << ": " << std::strerror(errno);
  }
  AlignedBuffer buf(kMiB);
  ::testing::AssertionResult r = ::testing::AssertionSuccess();
  for (uint64_t off = 0; off < size; off += kMiB) {
    ssize_t n = ::pread(in, buf.p, kMiB, static_cast<off_t>(off));
    if (n != static_cast<ssize_t>(kMiB)) {
      r = ::testing::AssertionFailure()
          << "read " << dev << " at " << off << ": " << n << " " << std::strerror(errno);
      break;
    }
    if (::pwrite(out, buf.p, kMiB, static_cast<off_t>(off)) != static_cast<ssize_t>(kMiB)) {
      r = ::testing::AssertionFailure() << "write " << to << ": " << std::strerror(errno);
      break;
    }
  }
  ::close(in);
  ::close(out);
  return r;
}

// Compares the first `size` bytes of device `dev` (O_DIRECT) with file `ref`
// in 1 MiB blocks; the failure names the first differing byte.
inline ::testing::AssertionResult SameBytes(const std::string& dev, const std::string& ref,
                                            uint64_t size) {
  int a = ::open(dev.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  int b = ::open(ref.c_str(), O_RDONLY | O_CLOEXEC);
  if (a < 0 || b < 0) {
    if (a >= 0) ::close(a);
    if (b >= 0) ::close(b);
    return ::testing::AssertionFailure() << "open " << dev << " / " << ref;
  }
  AlignedBuffer x(kMiB), y(kMiB);
  ::testing::AssertionResult r = ::testing::AssertionSuccess();
  for (uint64_t off = 0; off < size; off += kMiB) {
    if (::pread(a, x.p, kMiB, static_cast<off_t>(off)) != static_cast<ssize_t>(kMiB) ||
        ::pread(b, y.p, kMiB, static_cast<off_t>(off)) != static_cast<ssize_t>(kMiB)) {
      r = ::testing::AssertionFailure() << "short read at " << off << ": " << std::strerror(errno);
      break;
    }
    if (std::memcmp(x.p, y.p, kMiB) != 0) {
      size_t i = 0;
      while (x.p[i] == y.p[i]) ++i;
      r = ::testing::AssertionFailure() << dev << " differs from the reference at byte " << off + i
                                        << " (1 MiB block " << off / kMiB << ")";
      break;
    }
  }
  ::close(a);
  ::close(b);
  return r;
}

}  // namespace umbra::test_util
