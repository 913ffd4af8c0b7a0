// libFuzzer target over the NBD server: handshake and request parser
// (docs/protocol/nbd.md). The first input byte picks a mode: even = the rest
// is the raw client stream from the first byte of the handshake; odd = a
// valid handshake (structured replies, base:allocation, GO on the export the
// second byte picks) is prepended, so the fuzzer spends its time on the
// transmission phase. Every input must end the session without a crash, a
// sanitizer report or a hang; the server must never write to "ro".
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "frontend/nbd_test_util.h"

namespace {

using umbra::nbd::testing_nbd::kSize;
using umbra::nbd::testing_nbd::Provider;
using umbra::nbd::testing_nbd::ScriptChannel;

void Put(std::vector<std::byte>& b, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) b.push_back(static_cast<std::byte>(v >> (8 * i)));
}
void Opt(std::vector<std::byte>& b, uint32_t opt, const std::vector<std::byte>& data) {
  Put(b, 0x49484156454F5054ull, 8);
  Put(b, opt, 4);
  Put(b, data.size(), 4);
  b.insert(b.end(), data.begin(), data.end());
}
std::vector<std::byte> Name(const char* n, bool meta) {
  std::vector<std::byte> d;
  const size_t len = __builtin_strlen(n);
  Put(d, len, 4);
  for (size_t i = 0; i < len; ++i) d.push_back(static_cast<std::byte>(n[i]));
  if (meta) {
    Put(d, 1, 4);
    Put(d, 15, 4);
    for (char c : std::string("base:allocation")) d.push_back(static_cast<std::byte>(c));
  } else {
    Put(d, 0, 2);
  }
  return d;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::vector<std::byte> in;
  size_t start = 1;
  if (data[0] & 1) {
    const char* name = size > 1 && (data[1] & 1) ? "ro" : "rw";
    start = 2;
    Put(in, 3, 4);  // C_FIXED_NEWSTYLE | C_NO_ZEROES
    Opt(in, 8, {});
    Opt(in, 10, Name(name, true));
    Opt(in, 7, Name(name, false));
  }
  for (size_t i = start; i < size; ++i) in.push_back(static_cast<std::byte>(data[i]));
  Provider p;
  ScriptChannel ch(std::move(in));
  umbra::nbd::Limits limits;
  limits.max_request = 1 << 20;
  umbra::nbd::Serve(ch, p, limits);
  for (std::byte b : p.ro.data_)
    if (b != std::byte{0}) std::abort();  // a read-only export was written
  (void)kSize;
  return 0;
}
