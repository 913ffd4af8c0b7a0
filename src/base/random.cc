// Rng distributions and UUID helpers.
#include "base/random.h"

#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

namespace umbra {

uint64_t Rng::Uniform(uint64_t lo, uint64_t hi) {
  if (lo > hi) std::swap(lo, hi);
  const uint64_t span = hi - lo;
  if (span == UINT64_MAX) return Next();
  const uint64_t n = span + 1;
  // Rejection sampling: 2^64 mod n values at the bottom would make the low
  // residues more likely; skip them so every value in [0, n) is equally likely.
  const uint64_t threshold = (0 - n) % n;
  uint64_t v;
  do {
    v = Next();
  } while (v < threshold);
  return lo + v % n;
}

bool Rng::Bernoulli(double p) {
  if (p <= 0) return false;
  if (p >= 1) return true;
  // 53 random bits -> a double uniformly in [0, 1).
  const double u = static_cast<double>(Next() >> 11) * (1.0 / 9007199254740992.0);
  return u < p;
}

void Rng::Fill(std::span<std::byte> out) {
  size_t i = 0;
  while (i < out.size()) {
    uint64_t v = Next();
    const size_t n = std::min<size_t>(8, out.size() - i);
    std::memcpy(out.data() + i, &v, n);
    i += n;
  }
}

namespace {

void RandomBytes(std::span<uint8_t> out) {
  size_t got = 0;
  while (got < out.size()) {
    ssize_t r = getrandom(out.data() + got, out.size() - got, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      break;
    }
    got += static_cast<size_t>(r);
  }
  if (got < out.size()) {
    std::random_device rd;
    for (; got < out.size(); ++got) out[got] = static_cast<uint8_t>(rd());
  }
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

std::string NewUuid() {
  Uuid u;
  RandomBytes(u);
  u[6] = static_cast<uint8_t>((u[6] & 0x0f) | 0x40);  // version 4
  u[8] = static_cast<uint8_t>((u[8] & 0x3f) | 0x80);  // RFC 4122 variant
  return FormatUuid(u);
}

bool ParseUuid(std::string_view text, Uuid& out) {
  if (text.size() != 36) return false;
  size_t byte = 0;
  for (size_t i = 0; i < text.size();) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (text[i] != '-') return false;
      ++i;
      continue;
    }
    const int hi = HexValue(text[i]);
    const int lo = HexValue(text[i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[byte++] = static_cast<uint8_t>(hi * 16 + lo);
    i += 2;
  }
  return byte == 16;
}

std::string FormatUuid(const Uuid& uuid) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  s.reserve(36);
  for (size_t i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s += '-';
    s += kHex[uuid[i] >> 4];
    s += kHex[uuid[i] & 0xf];
  }
  return s;
}

}  // namespace umbra
