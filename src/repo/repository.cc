// Repository over a Store: config, object codec (zstd, AES-256-GCM), chunk
// ids, manifests. Byte layouts: docs/format/repository.md.
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <zstd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <nlohmann/json.hpp>

#include "base/checksum.h"
#include "base/endian.h"
#include "base/random.h"
#include "umbra/repo.h"

namespace umbra::repo {

ChunkId Sha256(std::span<const std::byte> data) {
  ChunkId out;
  unsigned int n = 0;
  EVP_Digest(data.data(), data.size(), out.data(), &n, EVP_sha256(), nullptr);
  return out;
}

namespace {

using Json = nlohmann::json;

constexpr const char* kConfigName = "umbra-repo.json";
constexpr char kObjectMagic[4] = {'U', 'M', 'B', 'O'};
constexpr size_t kObjectHeader = 20;
constexpr uint8_t kCodecRaw = 0, kCodecZstd = 1;
constexpr uint8_t kCipherNone = 0, kCipherAesGcm = 1;
constexpr size_t kNonce = 12, kTag = 16;
constexpr uint32_t kMaxPlain = 64u << 20;

std::string Hex(std::span<const uint8_t> b) {
  static const char* d = "0123456789abcdef";
  std::string s(b.size() * 2, '0');
  for (size_t i = 0; i < b.size(); ++i) {
    s[2 * i] = d[b[i] >> 4];
    s[2 * i + 1] = d[b[i] & 15];
  }
  return s;
}

bool Unhex(std::string_view h, std::span<uint8_t> out) {
  if (h.size() != out.size() * 2) return false;
  auto v = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (size_t i = 0; i < out.size(); ++i) {
    int a = v(h[2 * i]), b = v(h[2 * i + 1]);
    if (a < 0 || b < 0) return false;
    out[i] = static_cast<uint8_t>(a * 16 + b);
  }
  return true;
}

std::span<const std::byte> AsBytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}


uint64_t UnixNowNs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

// AES-256-GCM: out = nonce || ciphertext || tag.
Status Seal(const std::array<uint8_t, 32>& key, std::string_view aad,
            std::span<const std::byte> plain, std::vector<std::byte>* out) {
  out->resize(kNonce + plain.size() + kTag);
  auto* o = reinterpret_cast<unsigned char*>(out->data());
  if (RAND_bytes(o, kNonce) != 1) return Status(Code::kIOError, "no random bytes for a nonce");
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  int len = 0, fin = 0;
  bool ok = ctx && EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), nullptr, key.data(), o) == 1 &&
            EVP_EncryptUpdate(ctx, nullptr, &len, reinterpret_cast<const unsigned char*>(aad.data()),
                              static_cast<int>(aad.size())) == 1 &&
            EVP_EncryptUpdate(ctx, o + kNonce, &len,
                              reinterpret_cast<const unsigned char*>(plain.data()),
                              static_cast<int>(plain.size())) == 1 &&
            EVP_EncryptFinal_ex(ctx, o + kNonce + len, &fin) == 1 &&
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, kTag, o + kNonce + plain.size()) == 1;
  EVP_CIPHER_CTX_free(ctx);
  return ok ? Status::Ok() : Status(Code::kIOError, "encryption failed");
}

// False if the tag does not match (wrong key or damaged data).
bool Unseal(const std::array<uint8_t, 32>& key, std::string_view aad,
            std::span<const std::byte> sealed, std::vector<std::byte>* plain) {
  if (sealed.size() < kNonce + kTag) return false;
  size_t n = sealed.size() - kNonce - kTag;
  plain->resize(n);
  auto* s = reinterpret_cast<const unsigned char*>(sealed.data());
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  int len = 0, fin = 0;
  bool ok = ctx && EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), nullptr, key.data(), s) == 1 &&
            EVP_DecryptUpdate(ctx, nullptr, &len, reinterpret_cast<const unsigned char*>(aad.data()),
                              static_cast<int>(aad.size())) == 1 &&
            EVP_DecryptUpdate(ctx, reinterpret_cast<unsigned char*>(plain->data()), &len,
                              s + kNonce, static_cast<int>(n)) == 1 &&
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, kTag,
                                const_cast<unsigned char*>(s + kNonce + n)) == 1 &&
            EVP_DecryptFinal_ex(ctx, reinterpret_cast<unsigned char*>(plain->data()) + len, &fin) ==
                1;
  EVP_CIPHER_CTX_free(ctx);
  return ok;
}

struct Keys {
  std::array<uint8_t, 32> data{};
  std::array<uint8_t, 32> id{};
};

Result<std::array<uint8_t, 32>> Kek(const std::string& passphrase, std::span<const uint8_t> salt,
                                    uint64_t n, uint64_t r, uint64_t p) {
  std::array<uint8_t, 32> k{};
  if (EVP_PBE_scrypt(passphrase.data(), passphrase.size(), salt.data(), salt.size(), n, r, p,
                     1ull << 30, k.data(), k.size()) != 1)
    return Status::InvalidArgument("scrypt parameters rejected");
  return k;
}

// Manifest version 2 (docs/format/repository.md 2.3): "UMBI", version,
// header length, id length, entry count, JSON header, chunk table, SHA-256.
constexpr char kManifestMagic[4] = {'U', 'M', 'B', 'I'};
constexpr uint32_t kManifestVersion = 2;
constexpr size_t kManifestFrame = 24;
constexpr uint32_t kMaxManifestHeader = 1u << 20;

Json ManifestHeaderJson(const Manifest& m) {
  Json snapshot = nullptr;
  if (!m.snapshot_id.empty())
    snapshot = Json{{"id", m.snapshot_id},
                    {"set_id", m.snapshot_set_id},
                    {"created", m.snapshot_created_unix_ns}};
  Json tracking = nullptr;
  if (!m.tracking_id.empty()) tracking = Json{{"id", m.tracking_id}, {"epoch", m.tracking_epoch}};
  return Json{{"format", "umbra-image"},
              {"version", kManifestVersion},
              {"id", m.id},
              {"repository", m.repository},
              {"volume", m.volume},
              {"volume_uuid", m.volume_uuid},
              {"size", m.size},
              {"chunk_size", m.chunk_size},
              {"created", m.created_unix_ns},
              {"source", m.source},
              {"snapshot", snapshot},
              {"writers", m.writers},
              {"filesystem", m.filesystem},
              {"tracking", tracking},
              {"base", m.base.empty() ? Json(nullptr) : Json(m.base)},
              {"stats",
               {{"read", m.stats.read_bytes},
                {"new", m.stats.new_chunks},
                {"reused", m.stats.reused_chunks},
                {"zero", m.stats.zero_chunks},
                {"stored", m.stats.stored_bytes},
                {"seconds", m.stats.seconds}}}};
}

// The header fields of either version into *m (chunks aside); throws on a
// missing key or a wrong type, which the callers turn into corruption.
void HeaderFrom(const Json& j, Manifest* m) {
  m->id = j.at("id").get<std::string>();
  m->repository = j.at("repository").get<std::string>();
  m->volume = j.at("volume").get<std::string>();
  m->volume_uuid = j.at("volume_uuid").get<std::string>();
  m->size = j.at("size").get<uint64_t>();
  m->chunk_size = j.at("chunk_size").get<uint32_t>();
  m->created_unix_ns = j.at("created").get<uint64_t>();
  m->source = j.at("source").get<std::string>();
  if (const Json& s = j.at("snapshot"); !s.is_null()) {
    m->snapshot_id = s.at("id").get<std::string>();
    m->snapshot_set_id = s.at("set_id").get<std::string>();
    m->snapshot_created_unix_ns = s.at("created").get<uint64_t>();
  }
  m->writers = j.at("writers").get<std::string>();
  m->filesystem = j.at("filesystem").get<std::string>();
  if (const Json& t = j.at("tracking"); !t.is_null()) {
    m->tracking_id = t.at("id").get<std::string>();
    m->tracking_epoch = t.at("epoch").get<uint64_t>();
  }
  if (!j.at("base").is_null()) m->base = j.at("base").get<std::string>();
  const Json& st = j.at("stats");
  m->stats.read_bytes = st.at("read").get<uint64_t>();
  m->stats.new_chunks = st.at("new").get<uint64_t>();
  m->stats.reused_chunks = st.at("reused").get<uint64_t>();
  m->stats.zero_chunks = st.at("zero").get<uint64_t>();
  m->stats.stored_bytes = st.at("stored").get<uint64_t>();
  m->stats.seconds = st.at("seconds").get<double>();
}

std::vector<std::byte> EncodeManifest(const Manifest& m) {
  const std::string header = ManifestHeaderJson(m).dump();
  const size_t k = sizeof(ChunkId), c = m.chunks.size();
  std::vector<std::byte> out(kManifestFrame + header.size() + k * c + 32);
  std::byte* p = out.data();
  std::memcpy(p, kManifestMagic, 4);
  PutU32(p + 4, kManifestVersion);
  PutU32(p + 8, static_cast<uint32_t>(header.size()));
  PutU32(p + 12, static_cast<uint32_t>(k));
  PutU64(p + 16, c);
  std::memcpy(p + kManifestFrame, header.data(), header.size());
  if (c > 0) std::memcpy(p + kManifestFrame + header.size(), m.chunks.data(), k * c);
  const size_t body = out.size() - 32;
  ChunkId sum = Sha256(std::span<const std::byte>(p, body));
  std::memcpy(p + body, sum.data(), 32);
  return out;
}

Result<Manifest> DecodeManifest(std::span<const std::byte> b, const std::string& what) {
  auto bad = [&](const std::string& why) { return Status::Corruption(what + ": " + why); };
  if (b.size() < kManifestFrame + 32) return bad("manifest too short");
  if (std::memcmp(b.data(), kManifestMagic, 4) != 0) return bad("not an image manifest (bad magic)");
  const uint32_t version = GetU32(b.data() + 4), h = GetU32(b.data() + 8);
  const uint32_t k = GetU32(b.data() + 12);
  const uint64_t c = GetU64(b.data() + 16);
  if (h > kMaxManifestHeader || k != sizeof(ChunkId) || c > b.size() / sizeof(ChunkId) ||
      kManifestFrame + h + k * c + 32 != b.size())
    return bad("manifest lengths do not add up");
  const size_t body = b.size() - 32;
  const ChunkId sum = Sha256(b.first(body));
  if (std::memcmp(sum.data(), b.data() + body, sum.size()) != 0)
    return bad("manifest checksum mismatch");
  // Checked before the version: a damaged version is corruption, not a newer format.
  if (version != kManifestVersion)
    return Status::Unsupported(what + " is a version " + std::to_string(version) +
                               " manifest; this umbra reads versions 1 and 2");
  const char* hp = reinterpret_cast<const char*>(b.data() + kManifestFrame);
  Json j = Json::parse(hp, hp + h, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return bad("manifest header is not JSON");
  Manifest m;
  try {
    if (j.at("format") != "umbra-image" || j.at("version") != kManifestVersion)
      return bad("manifest header names another format");
    HeaderFrom(j, &m);
  } catch (const std::exception& e) {
    return bad(std::string("malformed manifest header (") + e.what() + ")");
  }
  if (m.chunk_size == 0) return bad("chunk size 0");
  if (c != m.chunk_count())
    return bad("chunk table has " + std::to_string(c) + " entries, the size needs " +
               std::to_string(m.chunk_count()));
  m.chunks.resize(c);
  if (c > 0) std::memcpy(m.chunks.data(), b.data() + kManifestFrame + h, k * c);
  return m;
}

// Version 1: the whole manifest as JSON, hex chunk ids, hex checksum of the
// JSON without "checksum" (read only; docs 2.3).
Result<Manifest> DecodeManifestV1(std::span<const std::byte> b, const std::string& what) {
  Json j = Json::parse(reinterpret_cast<const char*>(b.data()),
                       reinterpret_cast<const char*>(b.data()) + b.size(), nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return Status::Corruption(what + ": manifest is not JSON");
  Manifest m;
  try {
    // Checksum first: a damaged "format" or "version" is corruption, not a
    // manifest of another format.
    Json body = j;
    std::string sum = body.at("checksum").get<std::string>();
    body.erase("checksum");
    const std::string text = body.dump();
    if (Hex(Sha256(AsBytes(text))) != sum)
      return Status::Corruption(what + ": manifest checksum mismatch");
    if (j.at("format") != "umbra-image" || j.at("version") != 1)
      return Status::Unsupported(what + " is not a version 1 Umbra image manifest");
    HeaderFrom(j, &m);
    if (m.chunk_size == 0) return Status::Corruption(what + ": chunk size 0");
    const Json& cl = j.at("chunks");
    m.chunks.reserve(cl.size());
    for (const Json& c : cl) {
      ChunkId id{};
      if (c.is_number() && c.get<int>() == 0) {
        m.chunks.push_back(kZeroChunk);
      } else if (!c.is_string() || !ParseChunkId(c.get<std::string>(), id)) {
        return Status::Corruption(what + ": bad chunk entry");
      } else {
        m.chunks.push_back(id);
      }
    }
  } catch (const std::exception& e) {
    return Status::Corruption(what + ": malformed manifest (" + e.what() + ")");
  }
  if (m.chunks.size() != m.chunk_count())
    return Status::Corruption(what + ": chunk list has " + std::to_string(m.chunks.size()) +
                              " entries, the size needs " + std::to_string(m.chunk_count()));
  return m;
}

class RepositoryImpl final : public Repository {
 public:
  RepositoryImpl(std::unique_ptr<Store> store, std::string id, uint32_t chunk_size,
                 std::optional<Keys> keys)
      : store_(std::move(store)), id_(std::move(id)), chunk_size_(chunk_size), keys_(keys) {}

  const std::string& id() const override { return id_; }
  uint32_t chunk_size() const override { return chunk_size_; }
  bool encrypted() const override { return keys_.has_value(); }
  Store& store() override { return *store_; }
  void set_compression_level(int level) override { level_ = std::clamp(level, 1, 19); }

  ChunkId Hash(std::span<const std::byte> plain) const override {
    if (!keys_) return Sha256(plain);
    ChunkId out;
    unsigned int n = 0;
    HMAC(EVP_sha256(), keys_->id.data(), static_cast<int>(keys_->id.size()),
         reinterpret_cast<const unsigned char*>(plain.data()), plain.size(), out.data(), &n);
    return out;
  }

  Result<bool> HasChunk(const ChunkId& id) override { return store_->Exists(ChunkName(id)); }

  Result<uint64_t> PutChunk(const ChunkId& id, std::span<const std::byte> plain) override {
    const std::string name = ChunkName(id);
    UMBRA_ASSIGN_OR_RETURN(bool have, store_->Exists(name));
    if (have) return uint64_t{0};
    std::vector<std::byte> obj;
    UMBRA_RETURN_IF_ERROR(Encode(plain, "chunk:" + ChunkIdHex(id), &obj));
    UMBRA_RETURN_IF_ERROR(store_->Put(name, obj, /*sync=*/false));
    return uint64_t{obj.size()};
  }

  Status GetChunk(const ChunkId& id, std::vector<std::byte>* plain) override {
    const std::string name = ChunkName(id);
    std::vector<std::byte> obj;
    UMBRA_RETURN_IF_ERROR(store_->Get(name, &obj));
    UMBRA_RETURN_IF_ERROR(Decode(obj, "chunk:" + ChunkIdHex(id), "chunk " + ChunkIdHex(id), plain));
    if (Hash(*plain) != id)
      return Status::Corruption("chunk " + ChunkIdHex(id) + " is damaged (content hash mismatch)");
    return Status::Ok();
  }

  Result<std::vector<ChunkId>> ListChunks() override {
    UMBRA_ASSIGN_OR_RETURN(auto names, store_->List("chunks"));
    std::vector<ChunkId> out;
    out.reserve(names.size());
    for (const auto& n : names) {
      ChunkId id;
      auto slash = n.rfind('/');
      if (ParseChunkId(std::string_view(n).substr(slash + 1), id)) out.push_back(id);
    }
    return out;
  }

  Status RemoveChunk(const ChunkId& id) override { return store_->Remove(ChunkName(id)); }

  Status PutManifest(const Manifest& m) override {
    if (m.chunks.size() != m.chunk_count())
      return Status::InvalidArgument("manifest chunk list does not match its size");
    if (m.repository != id_)
      return Status::InvalidArgument("manifest names repository " + m.repository + ", not " + id_);
    if (m.chunks.size() > MaxImageChunks())
      return Status::InvalidArgument("an image lists at most " + std::to_string(MaxImageChunks()) +
                                     " chunks; this one has " + std::to_string(m.chunks.size()));
    const std::string name = "images/" + m.id;
    UMBRA_ASSIGN_OR_RETURN(bool taken, store_->Exists(name));
    if (taken) return Status::AlreadyExists("image " + m.id + " already exists");
    std::vector<std::byte> obj;
    UMBRA_RETURN_IF_ERROR(Encode(EncodeManifest(m), "image:" + m.id, &obj));
    UMBRA_RETURN_IF_ERROR(store_->SyncAll());  // rule 3.2: chunks first
    return store_->Put(name, obj, /*sync=*/true);
  }

  Result<Manifest> GetManifest(const std::string& image_id) override {
    std::vector<std::byte> obj, plain;
    Status s = store_->Get("images/" + image_id, &obj);
    if (s.code() == Code::kNotFound)
      return Status::NotFound("no image " + image_id + " in repository " + store_->location());
    UMBRA_RETURN_IF_ERROR(s);
    UMBRA_RETURN_IF_ERROR(Decode(obj, "image:" + image_id, "image " + image_id, &plain));
    const std::string what = "image " + image_id;
    auto decoded = !plain.empty() && plain[0] == std::byte{'{'} ? DecodeManifestV1(plain, what)
                                                                 : DecodeManifest(plain, what);
    UMBRA_ASSIGN_OR_RETURN(Manifest m, std::move(decoded));
    if (m.id != image_id)
      return Status::Corruption("image " + image_id + ": manifest names image " + m.id);
    if (m.repository != id_)
      return Status::Corruption("image " + image_id + " belongs to repository " + m.repository);
    return m;
  }

  Result<std::vector<std::string>> ListImages() override {
    UMBRA_ASSIGN_OR_RETURN(auto names, store_->List("images"));
    std::vector<std::string> out;
    for (const auto& n : names) {
      std::string id = n.substr(n.rfind('/') + 1);
      if (id.size() == 16 && id.find_first_not_of("0123456789abcdef") == std::string::npos)
        out.push_back(id);
    }
    std::sort(out.begin(), out.end());
    return out;
  }

  Status DeleteImage(const std::string& image_id) override {
    Status s = store_->Remove("images/" + image_id);
    if (s.code() == Code::kNotFound)
      return Status::NotFound("no image " + image_id + " in repository " + store_->location());
    return s;
  }

  Status PutResume(const std::string& volume_uuid, const std::string& record) override {
    UMBRA_RETURN_IF_ERROR(CheckKey(volume_uuid));
    if (record.size() > kMaxPlain)
      return Status::InvalidArgument("a resume record of " + std::to_string(record.size()) +
                                     " bytes is larger than an object may be (" +
                                     std::to_string(kMaxPlain) + ")");
    std::vector<std::byte> obj;
    UMBRA_RETURN_IF_ERROR(Encode(AsBytes(record), "resume:" + volume_uuid, &obj));
    UMBRA_RETURN_IF_ERROR(store_->SyncAll());  // rule 3.7: chunks first
    return store_->Put("resume/" + volume_uuid, obj, /*sync=*/true);
  }

  Result<std::string> GetResume(const std::string& volume_uuid) override {
    UMBRA_RETURN_IF_ERROR(CheckKey(volume_uuid));
    std::vector<std::byte> obj, plain;
    UMBRA_RETURN_IF_ERROR(store_->Get("resume/" + volume_uuid, &obj));
    UMBRA_RETURN_IF_ERROR(
        Decode(obj, "resume:" + volume_uuid, "resume record of " + volume_uuid, &plain));
    return std::string(reinterpret_cast<const char*>(plain.data()), plain.size());
  }

  Status RemoveResume(const std::string& volume_uuid) override {
    UMBRA_RETURN_IF_ERROR(CheckKey(volume_uuid));
    Status s = store_->Remove("resume/" + volume_uuid);
    return s.code() == Code::kNotFound ? Status::Ok() : s;
  }

  Result<std::vector<std::string>> ListResume() override {
    UMBRA_ASSIGN_OR_RETURN(auto names, store_->List("resume"));
    std::vector<std::string> out;
    for (const auto& n : names) out.push_back(n.substr(n.rfind('/') + 1));
    return out;
  }

  Result<std::string> ResolveImage(std::string_view prefix) override {
    if (prefix.size() < 4)
      return Status::InvalidArgument("image id '" + std::string(prefix) +
                                     "' is too short (give at least 4 characters)");
    UMBRA_ASSIGN_OR_RETURN(auto ids, ListImages());
    std::vector<std::string> hits;
    for (const auto& id : ids)
      if (id.rfind(prefix, 0) == 0) hits.push_back(id);
    if (hits.empty())
      return Status::NotFound("no image " + std::string(prefix) + " in repository " +
                              store_->location());
    if (hits.size() > 1)
      return Status::InvalidArgument("image id '" + std::string(prefix) + "' is ambiguous (" +
                                     std::to_string(hits.size()) + " images match)");
    return hits[0];
  }

 private:
  static Status CheckKey(const std::string& key) {
    if (key.empty() || key.size() > 64 ||
        key.find_first_not_of("0123456789abcdefABCDEF-") != std::string::npos)
      return Status::InvalidArgument("bad resume key '" + key + "'");
    return Status::Ok();
  }

  static std::string ChunkName(const ChunkId& id) {
    std::string h = ChunkIdHex(id);
    return "chunks/" + h.substr(0, 2) + "/" + h;
  }

  // Random or already compressed data (media, archives, encrypted files)
  // costs zstd a full pass to find it cannot be compressed. Three 4 KiB
  // samples at level 1 decide first: if none shrinks by 3%, store raw.
  static bool LooksIncompressible(ZSTD_CCtx* cctx, std::span<const std::byte> plain) {
    constexpr size_t kSample = 4096;
    if (plain.size() < 16 * kSample) return false;
    std::array<std::byte, ZSTD_COMPRESSBOUND(kSample)> out;
    for (size_t at : {size_t{0}, plain.size() / 2, plain.size() - kSample}) {
      size_t n = ZSTD_compressCCtx(cctx, out.data(), out.size(), plain.data() + at, kSample, 1);
      if (ZSTD_isError(n) || n < kSample * 97 / 100) return false;
    }
    return true;
  }

  Status Encode(std::span<const std::byte> plain, const std::string& aad,
                std::vector<std::byte>* obj) const {
    // One context per thread, freed with the thread.
    thread_local std::unique_ptr<ZSTD_CCtx, size_t (*)(ZSTD_CCtx*)> cctx(ZSTD_createCCtx(),
                                                                           ZSTD_freeCCtx);
    thread_local std::vector<std::byte> z;
    uint8_t codec = kCodecRaw;
    std::span<const std::byte> payload = plain;
    if (!LooksIncompressible(cctx.get(), plain)) {
      z.resize(ZSTD_compressBound(plain.size()));
      size_t zn =
          ZSTD_compressCCtx(cctx.get(), z.data(), z.size(), plain.data(), plain.size(), level_);
      if (!ZSTD_isError(zn) && zn < plain.size()) {
        codec = kCodecZstd;
        payload = std::span<const std::byte>(z.data(), zn);
      }
    }
    std::vector<std::byte> sealed;
    if (keys_) {
      UMBRA_RETURN_IF_ERROR(Seal(keys_->data, aad, payload, &sealed));
      payload = sealed;
    }
    obj->resize(kObjectHeader + payload.size());
    std::byte* h = obj->data();
    std::memcpy(h, kObjectMagic, 4);
    h[4] = std::byte{1};
    h[5] = std::byte{codec};
    h[6] = std::byte{keys_ ? kCipherAesGcm : kCipherNone};
    h[7] = std::byte{0};
    uint32_t pn = static_cast<uint32_t>(plain.size()), mn = static_cast<uint32_t>(payload.size());
    std::memcpy(h + 8, &pn, 4);
    std::memcpy(h + 12, &mn, 4);
    uint32_t crc = Crc32(std::span<const std::byte>(h, 16));
    std::memcpy(h + 16, &crc, 4);
    std::memcpy(h + kObjectHeader, payload.data(), payload.size());
    return Status::Ok();
  }

  Status Decode(std::span<const std::byte> obj, const std::string& aad, const std::string& what,
                std::vector<std::byte>* plain) const {
    auto bad = [&](const std::string& why) { return Status::Corruption(what + " is damaged (" + why + ")"); };
    if (obj.size() < kObjectHeader || std::memcmp(obj.data(), kObjectMagic, 4) != 0)
      return bad("bad header");
    uint32_t crc, pn, mn;
    std::memcpy(&pn, obj.data() + 8, 4);
    std::memcpy(&mn, obj.data() + 12, 4);
    std::memcpy(&crc, obj.data() + 16, 4);
    if (crc != Crc32(obj.first(16))) return bad("header checksum mismatch");
    uint8_t ver = static_cast<uint8_t>(obj[4]), codec = static_cast<uint8_t>(obj[5]),
            cipher = static_cast<uint8_t>(obj[6]);
    if (ver != 1 || codec > kCodecZstd || cipher > kCipherAesGcm) return bad("unknown encoding");
    if (mn != obj.size() - kObjectHeader) return bad("length mismatch");
    if (pn > kMaxPlain) return bad("absurd length");
    if ((cipher == kCipherAesGcm) != keys_.has_value())
      return bad(keys_ ? "not encrypted in an encrypted repository" : "encrypted");
    std::span<const std::byte> payload = obj.subspan(kObjectHeader);
    std::vector<std::byte> opened;
    if (keys_) {
      if (!Unseal(keys_->data, aad, payload, &opened)) return bad("authentication failed");
      payload = opened;
    }
    plain->resize(pn);
    if (codec == kCodecRaw) {
      if (payload.size() != pn) return bad("length mismatch");
      std::memcpy(plain->data(), payload.data(), pn);
      return Status::Ok();
    }
    thread_local std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> dctx(ZSTD_createDCtx(),
                                                                           ZSTD_freeDCtx);
    size_t n = ZSTD_decompressDCtx(dctx.get(), plain->data(), pn, payload.data(), payload.size());
    if (ZSTD_isError(n) || n != pn) return bad("does not decompress");
    return Status::Ok();
  }

  std::unique_ptr<Store> store_;
  std::string id_;
  uint32_t chunk_size_;
  std::optional<Keys> keys_;
  int level_ = 3;
};

}  // namespace

std::string ChunkIdHex(const ChunkId& id) { return Hex(id); }

bool ParseChunkId(std::string_view hex, ChunkId& out) { return Unhex(hex, out); }

uint64_t MaxImageChunks() {
  return (kMaxPlain - kManifestFrame - kMaxManifestHeader - 32) / sizeof(ChunkId);
}

std::string NewImageId() {
  uint64_t secs = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::seconds>(
                                            std::chrono::system_clock::now().time_since_epoch())
                                            .count());
  std::array<uint8_t, 8> b{};
  for (int i = 0; i < 4; ++i) b[i] = static_cast<uint8_t>(secs >> (8 * (3 - i)));
  RAND_bytes(b.data() + 4, 4);
  return Hex(b);
}

Result<std::unique_ptr<Repository>> Repository::Init(std::unique_ptr<Store> store,
                                                     const InitOptions& opts) {
  const std::string where = store->location();
  UMBRA_ASSIGN_OR_RETURN(bool exists, store->Exists(kConfigName));
  if (exists) return Status::AlreadyExists(where + " is already an Umbra repository");
  {
    std::error_code ec;
    for (auto& e : std::filesystem::directory_iterator(where, ec)) {
      std::string n = e.path().filename().string();
      if (n != "lock" && n != "tmp")
        return Status::InvalidArgument(where + " is not empty and not an Umbra repository");
    }
  }
  if (opts.chunk_size < (64u << 10) || opts.chunk_size > (16u << 20) ||
      (opts.chunk_size & (opts.chunk_size - 1)) != 0)
    return Status::InvalidArgument("chunk size must be a power of two from 64 KiB to 16 MiB");
  const std::string id = NewUuid();
  Json cfg{{"format", "umbra-repository"},
           {"version", 1},
           {"id", id},
           {"chunk_size", opts.chunk_size},
           {"hash", opts.passphrase.empty() ? "sha256" : "hmac-sha256"},
           {"compression", "zstd"},
           {"created", UnixNowNs()},
           {"encryption", nullptr}};
  std::optional<Keys> keys;
  if (!opts.passphrase.empty()) {
    std::array<uint8_t, 16> salt{};
    Keys k;
    if (RAND_bytes(salt.data(), salt.size()) != 1 || RAND_bytes(k.data.data(), 32) != 1 ||
        RAND_bytes(k.id.data(), 32) != 1)
      return Status(Code::kIOError, "no random bytes for the repository keys");
    UMBRA_ASSIGN_OR_RETURN(auto kek, Kek(opts.passphrase, salt, opts.scrypt_n, 8, 1));
    std::array<std::byte, 64> both;
    std::memcpy(both.data(), k.data.data(), 32);
    std::memcpy(both.data() + 32, k.id.data(), 32);
    std::vector<std::byte> sealed;
    UMBRA_RETURN_IF_ERROR(Seal(kek, "umbra-repo-keys:" + id, both, &sealed));
    cfg["encryption"] = Json{{"cipher", "aes-256-gcm"},
                             {"kdf", "scrypt"},
                             {"n", opts.scrypt_n},
                             {"r", 8},
                             {"p", 1},
                             {"salt", Hex(salt)},
                             {"keys", Hex(std::span<const uint8_t>(
                                          reinterpret_cast<const uint8_t*>(sealed.data()),
                                          sealed.size()))}};
    keys = k;
  }
  std::string text = cfg.dump(2) + "\n";
  UMBRA_RETURN_IF_ERROR(store->Put(kConfigName, AsBytes(text), /*sync=*/true));
  return std::unique_ptr<Repository>(
      new RepositoryImpl(std::move(store), id, opts.chunk_size, keys));
}

Result<std::unique_ptr<Repository>> Repository::Open(std::unique_ptr<Store> store,
                                                     const std::string& passphrase) {
  const std::string where = store->location();
  std::vector<std::byte> raw;
  Status s = store->Get(kConfigName, &raw);
  if (s.code() == Code::kNotFound)
    return Status::NotFound(where + " is not an Umbra repository (no " + kConfigName +
                            "; create one with 'umbra repo init')");
  UMBRA_RETURN_IF_ERROR(s);
  Json cfg = Json::parse(reinterpret_cast<const char*>(raw.data()),
                         reinterpret_cast<const char*>(raw.data()) + raw.size(), nullptr, false);
  if (cfg.is_discarded() || !cfg.is_object() || cfg.value("format", "") != "umbra-repository")
    return Status::Corruption(where + " is not an Umbra repository (" + kConfigName +
                              " is foreign or damaged)");
  try {
    if (cfg.at("version").get<int>() != 1)
      return Status::Unsupported(where + " has repository format version " +
                                 cfg.at("version").dump() + "; this umbra reads version 1");
    std::string id = cfg.at("id").get<std::string>();
    uint32_t chunk = cfg.at("chunk_size").get<uint32_t>();
    std::string hash = cfg.at("hash").get<std::string>();
    if (chunk < (64u << 10) || chunk > (16u << 20) || (chunk & (chunk - 1)) != 0)
      return Status::Corruption(where + ": bad chunk size in " + kConfigName);
    const Json& enc = cfg.at("encryption");
    if (enc.is_null()) {
      if (hash != "sha256") return Status::Unsupported(where + ": unknown hash " + hash);
      return std::unique_ptr<Repository>(
          new RepositoryImpl(std::move(store), id, chunk, std::nullopt));
    }
    if (hash != "hmac-sha256" || enc.at("cipher") != "aes-256-gcm" || enc.at("kdf") != "scrypt")
      return Status::Unsupported(where + ": unknown encryption scheme");
    if (passphrase.empty())
      return Status(Code::kPermissionDenied,
                    "repository " + where +
                        " is encrypted: give its passphrase (UMBRA_PASSPHRASE or --passphrase-file)");
    std::array<uint8_t, 16> salt{};
    std::string keyhex = enc.at("keys").get<std::string>();
    std::vector<uint8_t> sealed(keyhex.size() / 2);
    if (!Unhex(enc.at("salt").get<std::string>(), salt) || !Unhex(keyhex, sealed))
      return Status::Corruption(where + ": damaged encryption parameters");
    UMBRA_ASSIGN_OR_RETURN(auto kek, Kek(passphrase, salt, enc.at("n").get<uint64_t>(),
                                         enc.at("r").get<uint64_t>(), enc.at("p").get<uint64_t>()));
    std::vector<std::byte> both;
    if (!Unseal(kek, "umbra-repo-keys:" + id,
                std::span<const std::byte>(reinterpret_cast<const std::byte*>(sealed.data()),
                                           sealed.size()),
                &both) ||
        both.size() != 64)
      return Status(Code::kPermissionDenied, "wrong passphrase for repository " + where);
    Keys k;
    std::memcpy(k.data.data(), both.data(), 32);
    std::memcpy(k.id.data(), both.data() + 32, 32);
    return std::unique_ptr<Repository>(new RepositoryImpl(std::move(store), id, chunk, k));
  } catch (const std::exception& e) {
    return Status::Corruption(where + ": damaged " + kConfigName + " (" + e.what() + ")");
  }
}

}  // namespace umbra::repo
