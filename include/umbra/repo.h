// The image repository: content-addressed, deduplicated, compressed (zstd)
// and optionally encrypted (AES-256-GCM, scrypt) chunks, plus one manifest
// per image. Format and write ordering: docs/format/repository.md.
//
// Knows nothing of volumes, snapshots or the daemon: src/imaging/ turns a
// source of bytes into chunks and manifests; this layer stores them.
//
// Threading: Repository methods may be called from many threads at once
// (image create hashes, compresses and stores chunks in parallel).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "umbra/status.h"

namespace umbra::repo {

// ---- the back end --------------------------------------------------------

// Held for as long as it lives; released by destruction (or process death).
class StoreLock {
 public:
  virtual ~StoreLock() = default;
};

// A place that keeps named blobs: a directory today, object storage later.
// Names are relative, '/'-separated: "umbra-repo.json", "chunks/ab/<id>",
// "images/<id>".
class Store {
 public:
  virtual ~Store() = default;
  virtual Result<bool> Exists(const std::string& name) = 0;
  // kNotFound if absent.
  virtual Status Get(const std::string& name, std::vector<std::byte>* out) = 0;
  // Creates or replaces `name` atomically (readers see all or nothing). With
  // `sync`, durable on return; otherwise durable after the next SyncAll().
  virtual Status Put(const std::string& name, std::span<const std::byte> data, bool sync) = 0;
  virtual Status Remove(const std::string& name) = 0;
  // Names (relative to the store) of every blob under `dir` ("chunks", "images"), any depth.
  virtual Result<std::vector<std::string>> List(const std::string& dir) = 0;
  // Every earlier Put durable (rule 3.2).
  virtual Status SyncAll() = 0;
  // Shared or exclusive repository lock (docs section 4). With `wait` false,
  // kBusy if it cannot be had now.
  virtual Result<std::unique_ptr<StoreLock>> Lock(bool exclusive, bool wait) = 0;
  // Removes leftovers of interrupted writes (call under the exclusive lock).
  virtual Result<uint64_t> CleanTemporary() = 0;
  // "DIR" for messages.
  virtual const std::string& location() const = 0;
};

// The directory store. `create`: make the directory (and parents) if needed.
Result<std::unique_ptr<Store>> OpenDirStore(const std::string& dir, bool create);

// ---- chunks and manifests ------------------------------------------------

using ChunkId = std::array<uint8_t, 32>;
inline constexpr ChunkId kZeroChunk{};  // manifest entry of an all-zero chunk
std::string ChunkIdHex(const ChunkId& id);
// SHA-256; also the checksum of manifests and resume records.
ChunkId Sha256(std::span<const std::byte> data);
bool ParseChunkId(std::string_view hex, ChunkId& out);

struct ImageStats {
  uint64_t read_bytes = 0;     // bytes read from the source
  uint64_t new_chunks = 0;     // stored by this image
  uint64_t reused_chunks = 0;  // already in the repository (or unchanged since the base)
  uint64_t zero_chunks = 0;    // free or all zero: nothing stored
  uint64_t stored_bytes = 0;   // bytes of new objects (after compression)
  double seconds = 0;
};

struct Manifest {
  std::string id;
  std::string repository;   // repository UUID
  std::string volume;       // volume name, or device path (offline)
  std::string volume_uuid;  // "" for offline images of a plain device or file
  uint64_t size = 0;
  uint32_t chunk_size = 0;
  uint64_t created_unix_ns = 0;
  std::string source = "snapshot";  // or "offline"
  std::string snapshot_id;          // "" for offline
  std::string snapshot_set_id;
  uint64_t snapshot_created_unix_ns = 0;
  std::string writers = "none";
  std::string filesystem;
  std::string tracking_id;  // "" when the source had no change tracking
  uint64_t tracking_epoch = 0;
  std::string base;  // image whose chunk list unchanged chunks came from, "" if none
  ImageStats stats;
  std::vector<ChunkId> chunks;  // ceil(size / chunk_size) entries; kZeroChunk for zeros

  uint64_t chunk_count() const { return chunk_size ? (size + chunk_size - 1) / chunk_size : 0; }
};

struct InitOptions {
  uint32_t chunk_size = 256u << 10;  // measured choice: docs/benchmarks.md
  std::string passphrase;  // non-empty: encrypt chunks and manifests
  // scrypt cost (N); tests lower it, the default is the documented one.
  uint64_t scrypt_n = 32768;
};

class Repository {
 public:
  virtual ~Repository() = default;

  // Writes a new repository's config. kAlreadyExists if there is one;
  // kInvalidArgument if the store already holds other files.
  static Result<std::unique_ptr<Repository>> Init(std::unique_ptr<Store> store,
                                                  const InitOptions& opts);
  // Opens an existing repository. kNotFound: not a repository; kCorruption
  // or kUnsupported: foreign or newer format; kPermissionDenied: wrong or
  // missing passphrase for an encrypted one.
  static Result<std::unique_ptr<Repository>> Open(std::unique_ptr<Store> store,
                                                  const std::string& passphrase);

  virtual const std::string& id() const = 0;
  virtual uint32_t chunk_size() const = 0;
  virtual bool encrypted() const = 0;
  virtual Store& store() = 0;
  // zstd level for new objects (1..19; default 3).
  virtual void set_compression_level(int level) = 0;

  // The id of a chunk with these plain bytes (SHA-256, or HMAC-SHA-256
  // with the repository's id key when encrypted).
  virtual ChunkId Hash(std::span<const std::byte> plain) const = 0;
  virtual Result<bool> HasChunk(const ChunkId& id) = 0;
  // Stores the chunk unless present. Returns the bytes written (0 if it was
  // there already). Not durable until store().SyncAll().
  virtual Result<uint64_t> PutChunk(const ChunkId& id, std::span<const std::byte> plain) = 0;
  // Reads, decrypts, decompresses and re-hashes: kCorruption naming the
  // chunk if anything is wrong, kNotFound if it is missing.
  virtual Status GetChunk(const ChunkId& id, std::vector<std::byte>* plain) = 0;
  // Every stored chunk id (for gc and verify).
  virtual Result<std::vector<ChunkId>> ListChunks() = 0;
  virtual Status RemoveChunk(const ChunkId& id) = 0;

  // Makes every stored chunk durable, then writes the manifest durably
  // (rules 3.2 and 3.3). kAlreadyExists if the id is taken.
  virtual Status PutManifest(const Manifest& m) = 0;
  virtual Result<Manifest> GetManifest(const std::string& image_id) = 0;
  virtual Result<std::vector<std::string>> ListImages() = 0;  // sorted = by creation time
  virtual Status DeleteImage(const std::string& image_id) = 0;
  // Resume records (docs section 2.5): opaque bytes per volume (encoded by
  // imaging::EncodeResume), sealed like manifests. PutResume makes every
  // stored chunk durable first (rule 3.7) and refuses a record larger than
  // an object may be. GetResume: kNotFound if there is none.
  virtual Status PutResume(const std::string& volume_uuid, const std::string& record) = 0;
  virtual Result<std::string> GetResume(const std::string& volume_uuid) = 0;
  virtual Status RemoveResume(const std::string& volume_uuid) = 0;
  virtual Result<std::vector<std::string>> ListResume() = 0;  // volume uuids

  // A full id from a unique prefix (≥ 4 characters).
  virtual Result<std::string> ResolveImage(std::string_view prefix) = 0;
};

// A new image id: 8 hex digits of Unix seconds, 8 random (sorts by time).
std::string NewImageId();

// The most chunks one image can list: its manifest is an object of at most
// 64 MiB (docs/format/repository.md 2.3), 32 bytes per chunk. About 2 million:
// 512 GiB at 256 KiB chunks, 8 TiB at 4 MiB.
uint64_t MaxImageChunks();

}  // namespace umbra::repo
