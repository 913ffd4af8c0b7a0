// CRC-32 via zlib's crc32 (hardware-tuned; no hand-written table here).
#include "base/checksum.h"

#include <zlib.h>

#include <algorithm>
#include <climits>

namespace umbra {

uint32_t Crc32(std::span<const std::byte> data, uint32_t seed) {
  uLong crc = seed;
  const auto* p = reinterpret_cast<const Bytef*>(data.data());
  size_t left = data.size();
  // zlib takes a uInt length; feed huge spans in pieces.
  while (left > 0) {
    const size_t n = std::min<size_t>(left, UINT_MAX / 2);
    crc = crc32(crc, p, static_cast<uInt>(n));
    p += n;
    left -= n;
  }
  return static_cast<uint32_t>(crc);
}

}  // namespace umbra
