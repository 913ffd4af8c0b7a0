// Byte-size parsing and formatting for configuration values and messages.
//
// Header-only (inline) so it needs no entry in src/CMakeLists.txt.
// All multiples are binary: K = KiB = 1024, M = MiB = 2^20, ... E = 2^60.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "umbra/status.h"

namespace umbra {
namespace units_internal {
__extension__ typedef unsigned __int128 U128;  // __extension__: no -Wpedantic noise
}  // namespace units_internal

// Parses "4096", "64K", "64k", "64KB", "64KiB", "1G", "1.5GiB", "10M",
// "512B", "2 MiB" (one optional space before the unit). Units are
// case-insensitive: B, K/KB/KiB, M/MB/MiB, G, T, P, E (all powers of 1024).
// A fractional value must come to a whole number of bytes ("1.5K" = 1536;
// "0.1K" is rejected). Fails with kInvalidArgument on an empty string,
// garbage, a negative number, or a value that does not fit in uint64_t.
inline Result<uint64_t> ParseSize(std::string_view text) {
  auto bad = [&](const char* why) {
    return Status::InvalidArgument("invalid size \"" + std::string(text) + "\": " + why);
  };
  size_t i = 0;
  uint64_t whole = 0;
  size_t whole_digits = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
    if (__builtin_mul_overflow(whole, 10, &whole) ||
        __builtin_add_overflow(whole, static_cast<uint64_t>(text[i] - '0'), &whole)) {
      return bad("too large");
    }
    ++i;
    ++whole_digits;
  }
  uint64_t frac = 0;        // fractional digits as an integer
  uint64_t frac_scale = 1;  // 10^(number of fractional digits)
  size_t frac_digits = 0;
  if (i < text.size() && text[i] == '.') {
    ++i;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
      if (frac_digits >= 18) return bad("too many decimal places");
      frac = frac * 10 + static_cast<uint64_t>(text[i] - '0');
      frac_scale *= 10;
      ++frac_digits;
      ++i;
    }
    if (frac_digits == 0) return bad("expected digits after '.'");
  }
  if (whole_digits == 0) return bad("expected a number");
  if (i < text.size() && text[i] == ' ') ++i;

  std::string unit;
  for (; i < text.size(); ++i) {
    char c = text[i];
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    unit += c;
  }
  int shift = 0;
  if (!unit.empty()) {
    static constexpr std::string_view kPrefixes = "kmgtpe";
    std::string_view u = unit;
    if (u == "b") {
      shift = 0;
    } else {
      const size_t p = kPrefixes.find(u[0]);
      if (p == std::string_view::npos) return bad("unknown unit");
      shift = 10 * static_cast<int>(p + 1);
      u.remove_prefix(1);
      if (!(u.empty() || u == "b" || u == "ib")) return bad("unknown unit");
    }
  }
  const uint64_t mult = uint64_t{1} << shift;
  uint64_t bytes;
  if (__builtin_mul_overflow(whole, mult, &bytes)) return bad("too large");
  if (frac != 0) {
    // frac/frac_scale * mult must be a whole number of bytes. frac < 10^18
    // and mult <= 2^60, so use 128-bit arithmetic.
    const units_internal::U128 num = static_cast<units_internal::U128>(frac) * mult;
    if (num % frac_scale != 0) return bad("not a whole number of bytes");
    const units_internal::U128 extra = num / frac_scale;
    if (extra > UINT64_MAX || __builtin_add_overflow(bytes, static_cast<uint64_t>(extra), &bytes)) {
      return bad("too large");
    }
  }
  return bytes;
}

// Human-readable size with binary units and at most one decimal place:
// 0 -> "0 B", 512 -> "512 B", 1536 -> "1.5 KiB", 65536 -> "64 KiB",
// 1610612736 -> "1.5 GiB". Values are rounded to the nearest tenth.
inline std::string FormatBytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  int unit = 0;
  // Find the largest unit that leaves a value >= 1, then round to tenths;
  // if rounding reaches 1024.0, move up one unit.
  while (unit < 6 && (bytes >> (10 * (unit + 1))) > 0) ++unit;
  for (;;) {
    const int shift = 10 * unit;
    const units_internal::U128 scaled = static_cast<units_internal::U128>(bytes) * 10;
    const units_internal::U128 div = static_cast<units_internal::U128>(1) << shift;
    const uint64_t tenths = static_cast<uint64_t>((scaled + div / 2) / div);
    if (tenths >= 10240 && unit < 6) {
      ++unit;
      continue;
    }
    std::string s = std::to_string(tenths / 10);
    if (tenths % 10 != 0) {
      s += '.';
      s += static_cast<char>('0' + tenths % 10);
    }
    s += ' ';
    s += kUnits[unit];
    return s;
  }
}

}  // namespace umbra
