// CRC-32 (the zlib / IEEE 802.3 polynomial) over byte spans.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace umbra {

// Returns the zlib crc32 of `data`, continuing from `seed` (pass a previous
// result to checksum data in pieces; 0 starts fresh). Crc32("123456789") is
// 0xCBF43926. Thread-safe; never fails.
uint32_t Crc32(std::span<const std::byte> data, uint32_t seed = 0);

}  // namespace umbra
