// The NBD server, message by message (docs/protocol/nbd.md), on a scripted
// in-memory channel: the test writes what a client would send, runs the
// session to the end of that input, then parses every byte the server sent.
// Covers the normal path and the misbehaving-client rules: bad magic,
// oversized and out-of-range requests, writes to read-only exports, unknown
// commands, options and flags, and random garbage.
#include "frontend/nbd/nbd_server.h"

#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <random>

#include "frontend/nbd_test_util.h"

namespace umbra::nbd {
namespace {

using testing_nbd::kSize;
using testing_nbd::MemDevice;
using testing_nbd::Provider;
using testing_nbd::ScriptChannel;

// Builds what a client sends.
struct Msg {
  std::vector<std::byte> b;
  Msg& U16(uint16_t v) {
    for (int s = 8; s >= 0; s -= 8) b.push_back(std::byte(v >> s));
    return *this;
  }
  Msg& U32(uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) b.push_back(std::byte(v >> s));
    return *this;
  }
  Msg& U64(uint64_t v) {
    for (int s = 56; s >= 0; s -= 8) b.push_back(std::byte(v >> s));
    return *this;
  }
  Msg& Str(const std::string& s) {
    for (char c : s) b.push_back(std::byte(c));
    return *this;
  }
  Msg& Fill(size_t n, uint8_t v) {
    b.insert(b.end(), n, std::byte{v});
    return *this;
  }
  Msg& Opt(uint32_t opt, const Msg& data) {
    U64(0x49484156454F5054ull).U32(opt).U32(static_cast<uint32_t>(data.b.size()));
    b.insert(b.end(), data.b.begin(), data.b.end());
    return *this;
  }
  Msg& Req(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t off, uint32_t len) {
    return U32(0x25609513).U16(flags).U16(type).U64(cookie).U64(off).U32(len);
  }
};

// Parses what the server sent.
struct Reader {
  const std::vector<std::byte>& b;
  size_t pos = 0;
  bool Has(size_t n) const { return b.size() - pos >= n; }
  uint64_t N(int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v = (v << 8) | std::to_integer<uint64_t>(b.at(pos++));
    return v;
  }
  std::string S(size_t n) {
    std::string s(reinterpret_cast<const char*>(b.data() + pos), n);
    pos += n;
    return s;
  }
  struct Rep {
    uint32_t opt, type;
    std::string data;
  };
  Rep OptReply() {
    EXPECT_EQ(N(8), 0x3e889045565a9ull);
    Rep r;
    r.opt = static_cast<uint32_t>(N(4));
    r.type = static_cast<uint32_t>(N(4));
    r.data = S(N(4));
    return r;
  }
};

Msg Hello() { return Msg().U32(3); }  // C_FIXED_NEWSTYLE | C_NO_ZEROES
Msg GoData(const std::string& name, std::vector<uint16_t> infos = {}) {
  Msg m;
  m.U32(static_cast<uint32_t>(name.size())).Str(name).U16(static_cast<uint16_t>(infos.size()));
  for (auto i : infos) m.U16(i);
  return m;
}
Msg MetaData(const std::string& name, const std::vector<std::string>& queries) {
  Msg m;
  m.U32(static_cast<uint32_t>(name.size())).Str(name).U32(static_cast<uint32_t>(queries.size()));
  for (const auto& q : queries) m.U32(static_cast<uint32_t>(q.size())).Str(q);
  return m;
}

struct Outcome {
  std::string why;
  std::vector<std::byte> out;
};
Outcome Session(Provider& p, const Msg& in, Limits limits = Limits()) {
  ScriptChannel ch(in.b);
  Outcome r;
  r.why = Serve(ch, p, limits);
  r.out = std::move(ch.out);
  return r;
}

// Skips the 18-byte greeting after checking it.
void Greeting(Reader& rd) {
  EXPECT_EQ(rd.S(8), "NBDMAGIC");
  EXPECT_EQ(rd.N(8), 0x49484156454F5054ull);
  EXPECT_EQ(rd.N(2), 3u);  // FIXED_NEWSTYLE | NO_ZEROES
}

// Reads the INFO replies and the ACK of a successful GO; returns the
// transmission flags.
uint16_t GoReplies(Reader& rd) {
  uint16_t flags = 0;
  for (;;) {
    auto r = rd.OptReply();
    EXPECT_EQ(r.opt, 7u);
    if (r.type == 1) return flags;  // ACK
    EXPECT_EQ(r.type, 3u);          // INFO
    if (r.data.size() == 12 && r.data[0] == 0 && r.data[1] == 0)
      flags = static_cast<uint16_t>((uint8_t(r.data[10]) << 8) | uint8_t(r.data[11]));
  }
}

struct Simple {
  uint32_t error;
  uint64_t cookie;
};
Simple SimpleReply(Reader& rd) {
  EXPECT_EQ(rd.N(4), 0x67446698u);
  Simple s;
  s.error = static_cast<uint32_t>(rd.N(4));
  s.cookie = rd.N(8);
  return s;
}
struct Chunk {
  uint16_t flags, type;
  uint64_t cookie;
  std::string payload;
};
Chunk StructuredChunk(Reader& rd) {
  EXPECT_EQ(rd.N(4), 0x668e33efu);
  Chunk c;
  c.flags = static_cast<uint16_t>(rd.N(2));
  c.type = static_cast<uint16_t>(rd.N(2));
  c.cookie = rd.N(8);
  c.payload = rd.S(rd.N(4));
  return c;
}

TEST(NbdServerTest, NegotiateAndServeReadWriteFlushTrimBlockStatus) {
  Provider p;
  Msg in = Hello();
  in.Opt(3, Msg());                                        // LIST
  in.Opt(8, Msg());                                        // STRUCTURED_REPLY
  in.Opt(10, MetaData("rw", {"base:allocation", "x:y"}));  // SET_META_CONTEXT
  in.Opt(7, GoData("rw", {1, 2}));                         // GO + NAME + DESCRIPTION
  std::vector<std::byte> data(8192, std::byte{0x5a});
  in.Req(1, 1, 11, 4096, 8192);  // WRITE FUA
  in.b.insert(in.b.end(), data.begin(), data.end());
  in.Req(0, 0, 12, 4096, 8192);       // READ
  in.Req(0, 3, 13, 0, 0);             // FLUSH
  in.Req(0, 4, 14, 4096, 4096);       // TRIM
  in.Req(0, 0, 15, 4096, 4096);       // READ (zeros now)
  in.Req(0, 7, 16, 0, kSize);         // BLOCK_STATUS
  in.Req(8, 7, 17, 4096, kSize / 2);  // BLOCK_STATUS REQ_ONE
  in.Req(0, 2, 18, 0, 0);             // DISC
  Outcome r = Session(p, in);
  EXPECT_EQ(r.why, "client disconnected (NBD_CMD_DISC)");

  Reader rd{r.out};
  Greeting(rd);
  std::map<std::string, std::string> listed;
  for (;;) {
    auto rep = rd.OptReply();
    ASSERT_EQ(rep.opt, 3u);
    if (rep.type == 1) break;
    ASSERT_EQ(rep.type, 2u);  // SERVER
    const uint32_t n = (uint8_t(rep.data[0]) << 24) | (uint8_t(rep.data[1]) << 16) |
                       (uint8_t(rep.data[2]) << 8) | uint8_t(rep.data[3]);
    listed[rep.data.substr(4, n)] = rep.data.substr(4 + n);
  }
  EXPECT_EQ(listed, (std::map<std::string, std::string>{{"rw", "writable"}, {"ro", "read-only"}}));
  auto sr = rd.OptReply();
  EXPECT_EQ(sr.type, 1u);
  auto meta = rd.OptReply();
  EXPECT_EQ(meta.type, 4u);  // META_CONTEXT
  EXPECT_EQ(meta.data.substr(4), "base:allocation");
  EXPECT_EQ(uint8_t(meta.data[3]), 1u);  // context id 1
  EXPECT_EQ(rd.OptReply().type, 1u);     // ACK (x:y ignored)
  const uint16_t flags = GoReplies(rd);
  EXPECT_EQ(flags & 2, 0) << "rw export flagged read-only";
  EXPECT_NE(flags & (1 << 5), 0) << "no SEND_TRIM";
  EXPECT_NE(flags & (1 << 8), 0) << "no CAN_MULTI_CONN";

  Simple w = SimpleReply(rd);
  EXPECT_EQ(w.error, 0u);
  EXPECT_EQ(w.cookie, 11u);
  EXPECT_EQ(p.rw.fua_writes, 1);
  Chunk rc = StructuredChunk(rd);
  EXPECT_EQ(rc.cookie, 12u);
  EXPECT_EQ(rc.type, 1);   // OFFSET_DATA
  EXPECT_EQ(rc.flags, 1);  // DONE
  ASSERT_EQ(rc.payload.size(), 8u + 8192);
  EXPECT_EQ(rc.payload.substr(8), std::string(8192, 0x5a));
  EXPECT_EQ(SimpleReply(rd).error, 0u);  // FLUSH
  EXPECT_EQ(p.rw.flushes, 1);
  EXPECT_EQ(SimpleReply(rd).error, 0u);  // TRIM
  Chunk z = StructuredChunk(rd);
  EXPECT_EQ(z.payload.substr(8), std::string(4096, '\0'));
  Chunk bs = StructuredChunk(rd);
  EXPECT_EQ(bs.type, 5);  // BLOCK_STATUS
  ASSERT_EQ(bs.payload.size(), 4u + 16);
  std::vector<std::byte> pb(
      reinterpret_cast<const std::byte*>(bs.payload.data()),
      reinterpret_cast<const std::byte*>(bs.payload.data()) + bs.payload.size());
  Reader b2{pb};
  EXPECT_EQ(b2.N(4), 1u);
  EXPECT_EQ(b2.N(4), kSize / 2);
  EXPECT_EQ(b2.N(4), 3u);  // HOLE | ZERO
  EXPECT_EQ(b2.N(4), kSize / 2);
  EXPECT_EQ(b2.N(4), 0u);
  Chunk one = StructuredChunk(rd);
  EXPECT_EQ(one.payload.size(), 4u + 8) << "REQ_ONE returned more than one extent";
  EXPECT_EQ(rd.pos, r.out.size()) << "unexpected trailing bytes";
}

TEST(NbdServerTest, BadRequestsGetErrorsAndTheConnectionStays) {
  Provider p;
  Msg in = Hello();
  in.Opt(7, GoData("ro"));
  in.Req(0, 0, 1, kSize - 4096, 8192);  // READ past the end
  in.Req(0, 0, 2, 0, 0);                // READ zero length
  in.Req(0, 1, 3, 0, 4096);             // WRITE to read-only
  in.Fill(4096, 0xee);
  in.Req(0, 4, 4, 0, 4096);           // TRIM read-only
  in.Req(0, 42, 5, 0, 4096);          // unknown command
  in.Req(0x100, 0, 6, 0, 4096);       // unknown flag
  in.Req(4, 0, 7, 0, 4096);           // DF without structured replies
  in.Req(0, 7, 8, 0, 4096);           // BLOCK_STATUS without a meta context
  in.Req(0, 0, 9, ~0ull - 10, 4096);  // offset overflow
  in.Req(0, 0, 10, 0, 32768);         // READ larger than the maximum (16 KiB here)
  in.Req(0, 3, 11, 4096, 0);          // FLUSH with an offset
  in.Req(0, 0, 12, 0, 4096);          // a good READ still works
  in.Req(0, 2, 13, 0, 0);
  Limits limits;
  limits.max_request = 16384;
  Outcome r = Session(p, in, limits);
  EXPECT_EQ(r.why, "client disconnected (NBD_CMD_DISC)");
  Reader rd{r.out};
  Greeting(rd);
  const uint16_t flags = GoReplies(rd);
  EXPECT_NE(flags & 2, 0) << "read-only export not flagged READ_ONLY";
  const std::vector<std::pair<uint64_t, uint32_t>> want = {{1, 22}, {2, 22},  {3, 1},  {4, 1},
                                                           {5, 22}, {6, 22},  {7, 22}, {8, 22},
                                                           {9, 22}, {10, 22}, {11, 22}};
  for (auto [cookie, err] : want) {
    Simple s = SimpleReply(rd);
    EXPECT_EQ(s.cookie, cookie);
    EXPECT_EQ(s.error, err) << "cookie " << cookie;
  }
  Simple ok = SimpleReply(rd);
  EXPECT_EQ(ok.cookie, 12u);
  EXPECT_EQ(ok.error, 0u);
  EXPECT_TRUE(rd.Has(4096));
  EXPECT_EQ(p.ro.data_, std::vector<std::byte>(kSize, std::byte{0})) << "read-only export changed";
}

TEST(NbdServerTest, NegotiationErrorsKeepNegotiating) {
  Provider p;
  Msg in = Hello();
  in.Opt(7, GoData("nosuch"));                      // unknown export
  in.Opt(7, Msg().U32(100).Str("short"));           // malformed
  in.Opt(10, MetaData("rw", {"base:allocation"}));  // SET before STRUCTURED_REPLY
  in.Opt(5, Msg());                                 // STARTTLS: unsupported
  in.Opt(999, Msg().Str("junk"));                   // unknown option
  in.Opt(8, Msg().Str("x"));                        // STRUCTURED_REPLY with data
  in.Opt(3, Msg().Str("x"));                        // LIST with data
  in.Opt(6, GoData("rw"));                          // INFO does not enter transmission
  in.Opt(2, Msg());                                 // ABORT
  Outcome r = Session(p, in);
  EXPECT_EQ(r.why, "client aborted the handshake");
  Reader rd{r.out};
  Greeting(rd);
  for (uint32_t want :
       {0x80000006u, 0x80000003u, 0x80000003u, 0x80000001u, 0x80000001u, 0x80000003u, 0x80000003u})
    EXPECT_EQ(rd.OptReply().type, want);
  for (;;) {
    auto i = rd.OptReply();
    EXPECT_EQ(i.opt, 6u);
    if (i.type == 1) break;
  }
  EXPECT_EQ(rd.OptReply().type, 1u);  // ABORT acked
  EXPECT_EQ(rd.pos, r.out.size());
}

TEST(NbdServerTest, ProtocolViolationsEndTheSession) {
  Provider p;
  {
    Outcome r = Session(p, Msg().U32(0));  // no FIXED_NEWSTYLE
    EXPECT_EQ(r.why, "client does not speak fixed newstyle");
  }
  {
    Outcome r = Session(p, Msg().U32(1 | 0x80));
    EXPECT_EQ(r.why, "client sent unknown handshake flags");
  }
  {
    Msg in = Hello();
    in.U64(0x1234).U32(7).U32(0);
    EXPECT_EQ(Session(p, in).why, "bad option magic");
  }
  {
    Msg in = Hello();
    in.U64(0x49484156454F5054ull).U32(7).U32(1u << 20);  // 1 MiB of option data
    Outcome r = Session(p, in);
    EXPECT_EQ(r.why, "option data too long");
    Reader rd{r.out};
    Greeting(rd);
    EXPECT_EQ(rd.OptReply().type, 0x80000009u);  // ERR_TOO_BIG
  }
  {
    Msg in = Hello();
    in.Opt(1, Msg().Str("nosuch"));  // EXPORT_NAME of an unknown export
    EXPECT_EQ(Session(p, in).why, "unknown export 'nosuch' (NBD_OPT_EXPORT_NAME)");
  }
  {
    Msg in = Hello();
    in.Opt(7, GoData("rw"));
    in.U32(0xdeadbeef).Fill(24, 0);
    EXPECT_EQ(Session(p, in).why, "bad request magic");
  }
  {
    Msg in = Hello();
    in.Opt(7, GoData("rw"));
    in.Req(0, 1, 1, 0, 64u << 20);  // WRITE larger than the maximum
    EXPECT_EQ(Session(p, in).why, "write payload larger than the maximum");
  }
  {
    Msg in = Hello();
    in.Opt(7, GoData("rw"));
    in.Req(0, 1, 1, 0, 4096).Fill(100, 1);  // disconnects mid-payload
    EXPECT_EQ(Session(p, in).why, "client disconnected mid-write");
  }
  {
    // EXPORT_NAME without NO_ZEROES: size, flags and 124 zero bytes.
    Msg in = Msg().U32(1);
    in.Opt(1, Msg().Str("rw"));
    Outcome r = Session(p, in);
    EXPECT_EQ(r.why, "client disconnected");
    EXPECT_EQ(r.out.size(), 18u + 8 + 2 + 124);
  }
}

// Random bytes after a valid or a random prefix never crash the server
// (the fuzz target tests/fuzz/nbd_fuzz.cc explores this far more).
TEST(NbdServerTest, RandomInputNeverCrashes) {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 2000; ++i) {
    Provider p;
    Msg in;
    if (i % 2 == 0) {
      in = Hello();
      in.Opt(8, Msg());
      in.Opt(7, GoData(i % 4 == 0 ? "rw" : "ro"));
    }
    const size_t n = rng() % 512;
    for (size_t k = 0; k < n; ++k) in.b.push_back(std::byte(rng()));
    Limits small;
    small.max_request = 1 << 16;
    Outcome r = Session(p, in, small);
    EXPECT_FALSE(r.why.empty());
  }
}

}  // namespace
}  // namespace umbra::nbd
