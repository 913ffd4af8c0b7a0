#include "daemon/devices.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>

namespace umbra::daemon {
namespace {

Status CheckRange(uint64_t size, uint64_t off, uint64_t len) {
  if (off > size || len > size - off) return Status::InvalidArgument("range beyond the device");
  return Status::Ok();
}

constexpr uint64_t kBlock = 4096;

class Overlay final : public BlockDevice {
 public:
  Overlay(std::unique_ptr<BlockDevice> base, int fd)
      : base_(std::move(base)), fd_(fd), written_((base_->size() / kBlock + 63) / 64, 0) {}
  ~Overlay() override { ::close(fd_); }

  uint64_t size() const override { return base_->size(); }
  bool read_only() const override { return false; }

  Status Read(uint64_t off, std::span<std::byte> buf) override {
    UMBRA_RETURN_IF_ERROR(CheckRange(size(), off, buf.size()));
    std::shared_lock l(mu_);
    uint64_t pos = off;
    const uint64_t end = off + buf.size();
    while (pos < end) {
      const uint64_t b = pos / kBlock;
      const bool w = Written(b);
      // The run of blocks in the same state, cut at `end`.
      uint64_t run_end = (b + 1) * kBlock;
      while (run_end < end && Written(run_end / kBlock) == w) run_end += kBlock;
      run_end = std::min(run_end, end);
      std::span<std::byte> out = buf.subspan(pos - off, run_end - pos);
      if (w) {
        UMBRA_RETURN_IF_ERROR(PreadAll(pos, out));
      } else if (pos % kBlock == 0 && run_end % kBlock == 0) {
        UMBRA_RETURN_IF_ERROR(base_->Read(pos, out));
      } else {
        // Unaligned edge: read the enclosing blocks of the base one at a time.
        for (uint64_t p = pos; p < run_end;) {
          const uint64_t blk = p / kBlock * kBlock;
          const uint64_t n = std::min(run_end, blk + kBlock) - p;
          alignas(4096) std::byte bounce[kBlock];
          UMBRA_RETURN_IF_ERROR(base_->Read(blk, std::span(bounce, kBlock)));
          std::memcpy(buf.data() + (p - off), bounce + (p - blk), n);
          p += n;
        }
      }
      pos = run_end;
    }
    return Status::Ok();
  }

  Status Write(uint64_t off, std::span<const std::byte> buf, bool) override {
    UMBRA_RETURN_IF_ERROR(CheckRange(size(), off, buf.size()));
    std::unique_lock l(mu_);
    return WriteLocked(off, buf);
  }
  Status Flush() override { return Status::Ok(); }
  Status Discard(uint64_t off, uint64_t len) override { return WriteZeroes(off, len); }
  Status WriteZeroes(uint64_t off, uint64_t len) override {
    UMBRA_RETURN_IF_ERROR(CheckRange(size(), off, len));
    static const std::byte kZeros[64 * 1024] = {};
    std::unique_lock l(mu_);
    while (len > 0) {
      const uint64_t n = std::min<uint64_t>(len, sizeof(kZeros));
      UMBRA_RETURN_IF_ERROR(WriteLocked(off, std::span(kZeros, n)));
      off += n;
      len -= n;
    }
    return Status::Ok();
  }

 private:
  bool Written(uint64_t b) const { return (written_[b / 64] >> (b % 64)) & 1; }
  void Mark(uint64_t b) { written_[b / 64] |= uint64_t{1} << (b % 64); }

  Status PreadAll(uint64_t off, std::span<std::byte> out) {
    size_t done = 0;
    while (done < out.size()) {
      ssize_t r =
          ::pread(fd_, out.data() + done, out.size() - done, static_cast<off_t>(off + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "overlay read");
      }
      if (r == 0) {  // past the end of the temp file: zeros
        std::memset(out.data() + done, 0, out.size() - done);
        break;
      }
      done += static_cast<size_t>(r);
    }
    return Status::Ok();
  }
  Status PwriteAll(uint64_t off, std::span<const std::byte> in) {
    size_t done = 0;
    while (done < in.size()) {
      ssize_t w = ::pwrite(fd_, in.data() + done, in.size() - done, static_cast<off_t>(off + done));
      if (w < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "overlay write");
      }
      done += static_cast<size_t>(w);
    }
    return Status::Ok();
  }

  Status WriteLocked(uint64_t off, std::span<const std::byte> buf) {
    const uint64_t end = off + buf.size();
    uint64_t pos = off;
    while (pos < end) {
      const uint64_t b = pos / kBlock;
      const uint64_t blk = b * kBlock;
      const uint64_t n = std::min(end, blk + kBlock) - pos;
      if (n < kBlock && !Written(b)) {
        // Partial write of a block not yet in the overlay: start from the base.
        alignas(4096) std::byte bounce[kBlock];
        UMBRA_RETURN_IF_ERROR(base_->Read(blk, std::span(bounce, kBlock)));
        std::memcpy(bounce + (pos - blk), buf.data() + (pos - off), n);
        UMBRA_RETURN_IF_ERROR(PwriteAll(blk, std::span(bounce, kBlock)));
        Mark(b);
        pos += n;
        continue;
      }
      // Whole blocks (or a block already in the overlay): write the run.
      uint64_t run_end = pos + n;
      while (run_end < end && (end - run_end >= kBlock || Written(run_end / kBlock)))
        run_end = std::min(end, run_end + kBlock);
      UMBRA_RETURN_IF_ERROR(PwriteAll(pos, buf.subspan(pos - off, run_end - pos)));
      for (uint64_t x = b; x * kBlock < run_end; ++x) Mark(x);
      pos = run_end;
    }
    return Status::Ok();
  }

  std::unique_ptr<BlockDevice> base_;
  const int fd_;
  std::shared_mutex mu_;
  std::vector<uint64_t> written_;  // guarded by mu_
};

}  // namespace

Result<std::unique_ptr<BlockDevice>> MakeOverlayDevice(std::unique_ptr<BlockDevice> base,
                                                       const std::string& tmp_dir) {
  if (base->size() % kBlock != 0)
    return Status::InvalidArgument("overlay needs a device size that is a multiple of 4096");
  int fd = ::open(tmp_dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) return Status::FromErrno(errno, "create overlay file in " + tmp_dir);
  return std::unique_ptr<BlockDevice>(std::make_unique<Overlay>(std::move(base), fd));
}

}  // namespace umbra::daemon
