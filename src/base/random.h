// Deterministic pseudo-random numbers for tests/simulations (Rng) and random
// identifiers from the kernel's entropy pool (UUIDs).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <string_view>

namespace umbra {

// A seeded std::mt19937_64. The same seed always yields the same sequence on
// every platform (distributions are implemented here, not by the standard
// library, whose distributions are implementation-defined).
// Not thread-safe: use one Rng per thread or guard it externally.
class Rng {
 public:
  explicit Rng(uint64_t seed) : gen_(seed) {}

  // A uniformly distributed 64-bit value.
  uint64_t Next() { return gen_(); }
  // Uniform in the closed range [lo, hi]. Requires lo <= hi (if not, the
  // bounds are swapped).
  uint64_t Uniform(uint64_t lo, uint64_t hi);
  // True with probability p (p <= 0 never, p >= 1 always).
  bool Bernoulli(double p);
  // Fills `out` with pseudo-random bytes.
  void Fill(std::span<std::byte> out);

 private:
  std::mt19937_64 gen_;
};

using Uuid = std::array<uint8_t, 16>;

// A random (version 4, RFC 4122 variant) UUID as 36 lower-case characters,
// e.g. "3f2a9c1e-8b7d-4e2f-a1b0-0123456789ab". Uses getrandom(); if that
// fails (it should not on Linux >= 3.17) falls back to std::random_device.
// Thread-safe.
std::string NewUuid();
// Parses the canonical 8-4-4-4-12 hex form (either case). Returns false and
// leaves `out` unspecified on anything else.
bool ParseUuid(std::string_view text, Uuid& out);
// The canonical lower-case 36-character form.
std::string FormatUuid(const Uuid& uuid);

}  // namespace umbra
