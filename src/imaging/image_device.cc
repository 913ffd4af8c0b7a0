// An image as a read-only block device (image mount, image export).
#include <cstring>
#include <list>
#include <mutex>
#include <unordered_map>

#include "umbra/imaging.h"

namespace umbra::imaging {
namespace {

class ImageDeviceImpl final : public BlockDevice {
 public:
  ImageDeviceImpl(std::shared_ptr<repo::Repository> repo, repo::Manifest m)
      : repo_(std::move(repo)), m_(std::move(m)) {}

  uint64_t size() const override { return m_.size; }
  bool read_only() const override { return true; }

  Status Read(uint64_t off, std::span<std::byte> buf) override {
    if (off > m_.size || buf.size() > m_.size - off)
      return Status::InvalidArgument("read beyond the end of image " + m_.id);
    const uint64_t cs = m_.chunk_size;
    uint64_t pos = off;
    while (pos < off + buf.size()) {
      const uint64_t c = pos / cs;
      const uint64_t in = pos - c * cs;
      const uint64_t n = std::min<uint64_t>(cs - in, off + buf.size() - pos);
      std::byte* dst = buf.data() + (pos - off);
      if (m_.chunks[c] == repo::kZeroChunk) {
        std::memset(dst, 0, n);
      } else {
        UMBRA_ASSIGN_OR_RETURN(auto data, Chunk(c));
        if (in + n > data->size())
          return Status::Corruption("image " + m_.id + ": chunk " + std::to_string(c) +
                                    " is shorter than the image says");
        std::memcpy(dst, data->data() + in, n);
      }
      pos += n;
    }
    return Status::Ok();
  }
  Status Write(uint64_t, std::span<const std::byte>, bool) override { return ReadOnly(); }
  Status Flush() override { return Status::Ok(); }
  Status Discard(uint64_t, uint64_t) override { return ReadOnly(); }
  Status WriteZeroes(uint64_t, uint64_t) override { return ReadOnly(); }

 private:
  // BlockDevice contract: ToErrno() is EROFS (kPermissionDenied would map to EACCES).
  static Status ReadOnly() { return Status::FromErrno(EROFS, "images are read-only"); }

  // Decoded chunks, most recently used first; a few dozen at most.
  Result<std::shared_ptr<const std::vector<std::byte>>> Chunk(uint64_t c) {
    {
      std::lock_guard l(mu_);
      if (auto it = index_.find(c); it != index_.end()) {
        lru_.splice(lru_.begin(), lru_, it->second);
        return it->second->second;
      }
    }
    auto data = std::make_shared<std::vector<std::byte>>();
    UMBRA_RETURN_IF_ERROR(repo_->GetChunk(m_.chunks[c], data.get()));
    std::lock_guard l(mu_);
    if (index_.count(c) == 0) {
      lru_.emplace_front(c, data);
      index_[c] = lru_.begin();
      while (lru_.size() > kCached) {
        index_.erase(lru_.back().first);
        lru_.pop_back();
      }
    }
    return std::shared_ptr<const std::vector<std::byte>>(data);
  }

  static constexpr size_t kCached = 32;
  const std::shared_ptr<repo::Repository> repo_;
  const repo::Manifest m_;
  std::mutex mu_;
  using Entry = std::pair<uint64_t, std::shared_ptr<const std::vector<std::byte>>>;
  std::list<Entry> lru_;
  std::unordered_map<uint64_t, std::list<Entry>::iterator> index_;
};

}  // namespace

std::unique_ptr<BlockDevice> ImageDevice(std::shared_ptr<repo::Repository> repo,
                                         repo::Manifest m) {
  return std::make_unique<ImageDeviceImpl>(std::move(repo), std::move(m));
}

std::vector<Range> ImageAllocated(const repo::Manifest& m) {
  std::vector<Range> out;
  for (uint64_t c = 0; c < m.chunks.size(); ++c) {
    if (m.chunks[c] == repo::kZeroChunk) continue;
    uint64_t off = c * m.chunk_size, len = std::min<uint64_t>(m.chunk_size, m.size - off);
    if (!out.empty() && out.back().offset + out.back().length == off)
      out.back().length += len;
    else
      out.push_back({off, len});
  }
  return out;
}

}  // namespace umbra::imaging
