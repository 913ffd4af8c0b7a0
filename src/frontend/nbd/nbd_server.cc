// NBD session: see nbd_server.h and docs/protocol/nbd.md (every constant
// below is from the protocol document).
#include "frontend/nbd/nbd_server.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace umbra::nbd {
namespace {

constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;  // "NBDMAGIC"
constexpr uint64_t kOptMagic = 0x49484156454F5054ull;  // "IHAVEOPT"
constexpr uint64_t kRepMagic = 0x3e889045565a9ull;
constexpr uint32_t kRequestMagic = 0x25609513;
constexpr uint32_t kSimpleReplyMagic = 0x67446698;
constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;

// Handshake flags (server) and client flags.
constexpr uint16_t kFlagFixedNewstyle = 1 << 0;
constexpr uint16_t kFlagNoZeroes = 1 << 1;
constexpr uint32_t kClientFixedNewstyle = 1 << 0;
constexpr uint32_t kClientNoZeroes = 1 << 1;

// Transmission flags.
constexpr uint16_t kHasFlags = 1 << 0;
constexpr uint16_t kReadOnly = 1 << 1;
constexpr uint16_t kSendFlush = 1 << 2;
constexpr uint16_t kSendFua = 1 << 3;
constexpr uint16_t kSendTrim = 1 << 5;
constexpr uint16_t kSendWriteZeroes = 1 << 6;
constexpr uint16_t kSendDf = 1 << 7;
constexpr uint16_t kCanMultiConn = 1 << 8;

// Options.
constexpr uint32_t kOptExportName = 1;
constexpr uint32_t kOptAbort = 2;
constexpr uint32_t kOptList = 3;
constexpr uint32_t kOptInfo = 6;
constexpr uint32_t kOptGo = 7;
constexpr uint32_t kOptStructuredReply = 8;
constexpr uint32_t kOptListMetaContext = 9;
constexpr uint32_t kOptSetMetaContext = 10;

// Option replies.
constexpr uint32_t kRepAck = 1;
constexpr uint32_t kRepServer = 2;
constexpr uint32_t kRepInfo = 3;
constexpr uint32_t kRepMetaContext = 4;
constexpr uint32_t kRepErrUnsup = 0x80000001;
constexpr uint32_t kRepErrInvalid = 0x80000003;
constexpr uint32_t kRepErrUnknown = 0x80000006;
constexpr uint32_t kRepErrTooBig = 0x80000009;

constexpr uint16_t kInfoExport = 0;
constexpr uint16_t kInfoName = 1;
constexpr uint16_t kInfoDescription = 2;
constexpr uint16_t kInfoBlockSize = 3;

// Commands and command flags.
constexpr uint16_t kCmdRead = 0;
constexpr uint16_t kCmdWrite = 1;
constexpr uint16_t kCmdDisc = 2;
constexpr uint16_t kCmdFlush = 3;
constexpr uint16_t kCmdTrim = 4;
constexpr uint16_t kCmdWriteZeroes = 6;
constexpr uint16_t kCmdBlockStatus = 7;
constexpr uint16_t kCmdFlagFua = 1 << 0;
constexpr uint16_t kCmdFlagNoHole = 1 << 1;
constexpr uint16_t kCmdFlagDf = 1 << 2;
constexpr uint16_t kCmdFlagReqOne = 1 << 3;
constexpr uint16_t kCmdFlagFastZero = 1 << 4;
constexpr uint16_t kKnownCmdFlags =
    kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf | kCmdFlagReqOne | kCmdFlagFastZero;

// Structured reply chunk types.
constexpr uint16_t kReplyFlagDone = 1 << 0;
constexpr uint16_t kReplyOffsetData = 1;
constexpr uint16_t kReplyBlockStatus = 5;
constexpr uint16_t kReplyError = 0x8001;

// Protocol error values.
constexpr uint32_t kEPERM = 1;
constexpr uint32_t kEIO = 5;
constexpr uint32_t kENOMEM = 12;
constexpr uint32_t kEINVAL = 22;
constexpr uint32_t kENOSPC = 28;
constexpr uint32_t kEOVERFLOW = 75;
constexpr uint32_t kENOTSUP = 95;
constexpr uint32_t kESHUTDOWN = 108;

constexpr uint32_t kAllocationContextId = 1;
constexpr const char* kAllocationContext = "base:allocation";

void Put16(std::vector<std::byte>& b, uint16_t v) {
  for (int s = 8; s >= 0; s -= 8) b.push_back(static_cast<std::byte>(v >> s));
}
void Put32(std::vector<std::byte>& b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<std::byte>(v >> s));
}
void Put64(std::vector<std::byte>& b, uint64_t v) {
  for (int s = 56; s >= 0; s -= 8) b.push_back(static_cast<std::byte>(v >> s));
}
void PutStr(std::vector<std::byte>& b, const std::string& s) {
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  b.insert(b.end(), p, p + s.size());
}
uint16_t Get16(const std::byte* p) {
  return static_cast<uint16_t>((std::to_integer<uint16_t>(p[0]) << 8) |
                               std::to_integer<uint16_t>(p[1]));
}
uint32_t Get32(const std::byte* p) { return (uint32_t{Get16(p)} << 16) | Get16(p + 2); }
uint64_t Get64(const std::byte* p) { return (uint64_t{Get32(p)} << 32) | Get32(p + 4); }

uint32_t WireError(const Status& s) {
  switch (s.ToErrno()) {
    case EPERM:
    case EROFS:
    case EACCES:
      return kEPERM;
    case ENOMEM:
      return kENOMEM;
    case EINVAL:
      return kEINVAL;
    case ENOSPC:
      return kENOSPC;
    case EOVERFLOW:
      return kEOVERFLOW;
    case ENOTSUP:
      return kENOTSUP;
    case ESHUTDOWN:
      return kESHUTDOWN;
    default:
      return kEIO;
  }
}

// Bounds-checked reader over an option's data.
class Parser {
 public:
  explicit Parser(const std::vector<std::byte>& d) : d_(d) {}
  bool U16(uint16_t* v) {
    if (left() < 2) return false;
    *v = Get16(d_.data() + pos_);
    pos_ += 2;
    return true;
  }
  bool U32(uint32_t* v) {
    if (left() < 4) return false;
    *v = Get32(d_.data() + pos_);
    pos_ += 4;
    return true;
  }
  bool Str(uint32_t n, std::string* s) {
    if (left() < n) return false;
    s->assign(reinterpret_cast<const char*>(d_.data() + pos_), n);
    pos_ += n;
    return true;
  }
  size_t left() const { return d_.size() - pos_; }

 private:
  const std::vector<std::byte>& d_;
  size_t pos_ = 0;
};

class Session {
 public:
  Session(Channel& ch, ExportProvider& provider, const Limits& limits)
      : ch_(ch), provider_(provider), limits_(limits) {}

  std::string Run();

 private:
  // Handshake. Returns "" to enter transmission (export_ set), or why the
  // session ended.
  std::string Negotiate();
  bool SendRep(uint32_t opt, uint32_t type, const std::vector<std::byte>& data = {});
  bool SendRepErr(uint32_t opt, uint32_t type, const std::string& msg) {
    std::vector<std::byte> d;
    PutStr(d, msg);
    return SendRep(opt, type, d);
  }
  uint16_t TransmissionFlags(bool read_only) const;
  // INFO and GO. Sets *go_on when GO succeeded. Returns false if the
  // channel broke.
  bool InfoOrGo(uint32_t opt, const std::vector<std::byte>& data, bool* go_on);
  bool MetaContext(uint32_t opt, const std::vector<std::byte>& data);

  std::string Transmit();
  bool SimpleReply(uint64_t cookie, uint32_t error);
  bool ErrorReply(uint64_t cookie, uint32_t error, bool structured_chunk);

  Channel& ch_;
  ExportProvider& provider_;
  const Limits limits_;
  bool no_zeroes_ = false;
  bool structured_ = false;
  bool allocation_ = false;  // base:allocation selected
  std::unique_ptr<Export> export_;
  uint64_t size_ = 0;
  bool read_only_ = false;
  // A request's or reply's payload, after room for the reply header.
  std::byte* Payload(size_t len) {
    if (buf_.size() < kHeaderRoom + len) buf_.resize(kHeaderRoom + len);
    return buf_.data() + kHeaderRoom;
  }
  static constexpr size_t kHeaderRoom = 32;
  std::vector<std::byte> buf_;  // see Payload()
};

std::string Session::Run() {
  std::string why = Negotiate();
  if (!why.empty()) return why;
  return Transmit();
}

bool Session::SendRep(uint32_t opt, uint32_t type, const std::vector<std::byte>& data) {
  std::vector<std::byte> m;
  m.reserve(20 + data.size());
  Put64(m, kRepMagic);
  Put32(m, opt);
  Put32(m, type);
  Put32(m, static_cast<uint32_t>(data.size()));
  m.insert(m.end(), data.begin(), data.end());
  return ch_.Write(m.data(), m.size());
}

uint16_t Session::TransmissionFlags(bool read_only) const {
  uint16_t f = kHasFlags | kSendFlush | kSendFua | kCanMultiConn;
  f |= read_only ? kReadOnly : (kSendTrim | kSendWriteZeroes);
  if (structured_) f |= kSendDf;
  return f;
}

std::string Session::Negotiate() {
  std::vector<std::byte> greet;
  Put64(greet, kNbdMagic);
  Put64(greet, kOptMagic);
  Put16(greet, kFlagFixedNewstyle | kFlagNoZeroes);
  if (!ch_.Write(greet.data(), greet.size())) return "client went away before the greeting";
  std::byte cf[4];
  if (!ch_.Read(cf, 4)) return "client disconnected during the handshake";
  const uint32_t client_flags = Get32(cf);
  if ((client_flags & kClientFixedNewstyle) == 0) return "client does not speak fixed newstyle";
  if ((client_flags & ~(kClientFixedNewstyle | kClientNoZeroes)) != 0)
    return "client sent unknown handshake flags";
  no_zeroes_ = (client_flags & kClientNoZeroes) != 0;

  std::vector<std::byte> data;
  for (;;) {
    std::byte h[16];
    if (!ch_.Read(h, sizeof(h))) return "client disconnected during the handshake";
    if (Get64(h) != kOptMagic) return "bad option magic";
    const uint32_t opt = Get32(h + 8);
    const uint32_t len = Get32(h + 12);
    if (len > limits_.max_option) {
      SendRepErr(opt, kRepErrTooBig, "option data too long");
      return "option data too long";
    }
    data.resize(len);
    if (len > 0 && !ch_.Read(data.data(), len)) return "client disconnected during the handshake";

    switch (opt) {
      case kOptExportName: {
        const std::string name(reinterpret_cast<const char*>(data.data()), data.size());
        auto e = provider_.Open(name);
        if (!e.ok()) return "unknown export '" + name + "' (NBD_OPT_EXPORT_NAME)";
        export_ = std::move(*e);
        size_ = export_->device().size();
        read_only_ = export_->device().read_only();
        std::vector<std::byte> r;
        Put64(r, size_);
        Put16(r, TransmissionFlags(read_only_));
        if (!no_zeroes_) r.resize(r.size() + 124, std::byte{0});
        if (!ch_.Write(r.data(), r.size())) return "client went away";
        return "";
      }
      case kOptAbort:
        SendRep(opt, kRepAck);
        return "client aborted the handshake";
      case kOptList: {
        if (len != 0) {
          if (!SendRepErr(opt, kRepErrInvalid, "NBD_OPT_LIST takes no data"))
            return "client went away";
          break;
        }
        for (const auto& x : provider_.List()) {
          std::vector<std::byte> d;
          Put32(d, static_cast<uint32_t>(x.name.size()));
          PutStr(d, x.name);
          PutStr(d, x.description);
          if (!SendRep(opt, kRepServer, d)) return "client went away";
        }
        if (!SendRep(opt, kRepAck)) return "client went away";
        break;
      }
      case kOptInfo:
      case kOptGo: {
        bool go = false;
        if (!InfoOrGo(opt, data, &go)) return "client went away";
        if (go) return "";
        break;
      }
      case kOptStructuredReply:
        if (len != 0 || structured_) {
          if (!SendRepErr(opt, kRepErrInvalid,
                          len != 0 ? "NBD_OPT_STRUCTURED_REPLY takes no data"
                                   : "structured replies are already on"))
            return "client went away";
          break;
        }
        structured_ = true;
        if (!SendRep(opt, kRepAck)) return "client went away";
        break;
      case kOptListMetaContext:
      case kOptSetMetaContext:
        if (!MetaContext(opt, data)) return "client went away";
        break;
      default:
        if (!SendRepErr(opt, kRepErrUnsup, "option not supported")) return "client went away";
        break;
    }
  }
}

bool Session::InfoOrGo(uint32_t opt, const std::vector<std::byte>& data, bool* go_on) {
  Parser p(data);
  uint32_t name_len = 0;
  std::string name;
  uint16_t n = 0;
  std::vector<uint16_t> infos;
  bool ok = p.U32(&name_len) && p.Str(name_len, &name) && p.U16(&n);
  for (uint16_t i = 0; ok && i < n; ++i) {
    uint16_t t = 0;
    ok = p.U16(&t);
    infos.push_back(t);
  }
  if (!ok || p.left() != 0) return SendRepErr(opt, kRepErrInvalid, "malformed NBD_OPT_INFO/GO");
  auto e = provider_.Open(name);
  if (!e.ok()) return SendRepErr(opt, kRepErrUnknown, "no export named '" + name + "'");
  std::unique_ptr<Export> ex = std::move(*e);
  const uint64_t size = ex->device().size();
  const bool ro = ex->device().read_only();
  const uint16_t flags = TransmissionFlags(ro);
  std::vector<std::byte> d;
  Put16(d, kInfoExport);
  Put64(d, size);
  Put16(d, flags);
  if (!SendRep(opt, kRepInfo, d)) return false;
  for (uint16_t t : infos) {
    d.clear();
    if (t == kInfoName) {
      Put16(d, kInfoName);
      PutStr(d, name);
    } else if (t == kInfoDescription) {
      Put16(d, kInfoDescription);
      PutStr(d, ex->description());
    } else {
      continue;  // kInfoExport was sent; block size below; others ignored
    }
    if (!SendRep(opt, kRepInfo, d)) return false;
  }
  d.clear();
  Put16(d, kInfoBlockSize);
  Put32(d, 1);
  Put32(d, 4096);
  Put32(d, limits_.max_request);
  if (!SendRep(opt, kRepInfo, d)) return false;
  if (!SendRep(opt, kRepAck)) return false;
  if (opt == kOptGo) {
    export_ = std::move(ex);
    size_ = size;
    read_only_ = ro;
    *go_on = true;
  }
  return true;
}

bool Session::MetaContext(uint32_t opt, const std::vector<std::byte>& data) {
  Parser p(data);
  uint32_t name_len = 0, count = 0;
  std::string name;
  std::vector<std::string> queries;
  bool ok = p.U32(&name_len) && p.Str(name_len, &name) && p.U32(&count);
  // Each query takes at least 4 bytes: a count beyond that is malformed.
  if (ok && count > p.left() / 4) ok = false;
  for (uint32_t i = 0; ok && i < count; ++i) {
    uint32_t ql = 0;
    std::string q;
    ok = p.U32(&ql) && p.Str(ql, &q);
    queries.push_back(std::move(q));
  }
  if (!ok || p.left() != 0) return SendRepErr(opt, kRepErrInvalid, "malformed meta context option");
  if (opt == kOptSetMetaContext && !structured_)
    return SendRepErr(opt, kRepErrInvalid, "meta contexts need structured replies first");
  if (!provider_.Open(name).ok())
    return SendRepErr(opt, kRepErrUnknown, "no export named '" + name + "'");
  bool match = false;
  if (opt == kOptListMetaContext && queries.empty()) match = true;
  for (const auto& q : queries)
    if (q == kAllocationContext || (opt == kOptListMetaContext && q == "base:")) match = true;
  if (opt == kOptSetMetaContext) allocation_ = match;
  if (match) {
    std::vector<std::byte> d;
    Put32(d, opt == kOptSetMetaContext ? kAllocationContextId : 0);
    PutStr(d, kAllocationContext);
    if (!SendRep(opt, kRepMetaContext, d)) return false;
  }
  return SendRep(opt, kRepAck);
}

bool Session::SimpleReply(uint64_t cookie, uint32_t error) {
  std::vector<std::byte> r;
  Put32(r, kSimpleReplyMagic);
  Put32(r, error);
  Put64(r, cookie);
  return ch_.Write(r.data(), r.size());
}

bool Session::ErrorReply(uint64_t cookie, uint32_t error, bool structured_chunk) {
  if (!structured_ || !structured_chunk) return SimpleReply(cookie, error);
  std::vector<std::byte> r;
  Put32(r, kStructuredReplyMagic);
  Put16(r, kReplyFlagDone);
  Put16(r, kReplyError);
  Put64(r, cookie);
  Put32(r, 6);
  Put32(r, error);
  Put16(r, 0);  // no message
  return ch_.Write(r.data(), r.size());
}

std::string Session::Transmit() {
  BlockDevice& dev = export_->device();
  for (;;) {
    std::byte h[28];
    if (!ch_.Read(h, sizeof(h))) return "client disconnected";
    if (Get32(h) != kRequestMagic) return "bad request magic";
    const uint16_t flags = Get16(h + 4);
    const uint16_t type = Get16(h + 6);
    const uint64_t cookie = Get64(h + 8);
    const uint64_t off = Get64(h + 16);
    const uint32_t len = Get32(h + 24);

    if (type == kCmdWrite) {
      // The payload follows the header whatever we think of the request.
      if (len > limits_.max_request) return "write payload larger than the maximum";
      if (len > 0 && !ch_.Read(Payload(len), len)) return "client disconnected mid-write";
    }
    if (type == kCmdDisc) return "client disconnected (NBD_CMD_DISC)";

    const bool chunked = type == kCmdRead || type == kCmdBlockStatus;
    auto fail = [&](uint32_t e) { return ErrorReply(cookie, e, chunked); };
    const bool ranged = type == kCmdRead || type == kCmdWrite || type == kCmdTrim ||
                        type == kCmdWriteZeroes || type == kCmdBlockStatus;
    bool sent;
    if ((flags & ~kKnownCmdFlags) != 0 || ((flags & kCmdFlagDf) != 0 && !structured_)) {
      sent = fail(kEINVAL);
    } else if (ranged && (len == 0 || off > size_ || len > size_ - off)) {
      const bool writing = type == kCmdWrite || type == kCmdTrim || type == kCmdWriteZeroes;
      sent = fail(len != 0 && writing && off <= size_ ? kENOSPC : kEINVAL);
    } else if (read_only_ && (type == kCmdWrite || type == kCmdTrim || type == kCmdWriteZeroes)) {
      sent = fail(kEPERM);
    } else {
      switch (type) {
        case kCmdRead: {
          if (len > limits_.max_request) {
            sent = fail(kEINVAL);
            break;
          }
          std::byte* data = Payload(len);
          Status s = dev.Read(off, std::span(data, len));
          if (!s.ok()) {
            sent = fail(WireError(s));
            break;
          }
          std::vector<std::byte> hdr;
          if (structured_) {
            Put32(hdr, kStructuredReplyMagic);
            Put16(hdr, kReplyFlagDone);
            Put16(hdr, kReplyOffsetData);
            Put64(hdr, cookie);
            Put32(hdr, 8 + len);
            Put64(hdr, off);
          } else {
            Put32(hdr, kSimpleReplyMagic);
            Put32(hdr, 0);
            Put64(hdr, cookie);
          }
          std::byte* start = data - hdr.size();
          std::memcpy(start, hdr.data(), hdr.size());
          sent = ch_.Write(start, hdr.size() + len);
          break;
        }
        case kCmdWrite: {
          Status s = dev.Write(off, std::span<const std::byte>(Payload(len), len),
                               (flags & kCmdFlagFua) != 0);
          sent = s.ok() ? SimpleReply(cookie, 0) : fail(WireError(s));
          break;
        }
        case kCmdFlush: {
          if (off != 0 || len != 0) {
            sent = fail(kEINVAL);
            break;
          }
          Status s = dev.Flush();
          sent = s.ok() ? SimpleReply(cookie, 0) : fail(WireError(s));
          break;
        }
        case kCmdTrim:
        case kCmdWriteZeroes: {
          Status s = type == kCmdTrim ? dev.Discard(off, len) : dev.WriteZeroes(off, len);
          if (s.ok() && (flags & kCmdFlagFua) != 0) s = dev.Flush();
          sent = s.ok() ? SimpleReply(cookie, 0) : fail(WireError(s));
          break;
        }
        case kCmdBlockStatus: {
          if (!allocation_) {
            sent = fail(kEINVAL);
            break;
          }
          std::vector<AllocationRun> runs;
          Status s = export_->Allocation(off, len, &runs);
          if (!s.ok() || runs.empty()) {
            sent = fail(s.ok() ? kEIO : WireError(s));
            break;
          }
          if ((flags & kCmdFlagReqOne) != 0) runs.resize(1);
          // Descriptors first (clipped to the request), then the header
          // that carries their length.
          std::vector<std::byte> desc;
          uint64_t total = 0;
          for (const auto& run : runs) {
            if (total >= len) break;
            const uint64_t l = std::min<uint64_t>(run.length, uint64_t{len} - total);
            Put32(desc, static_cast<uint32_t>(l));
            Put32(desc, run.hole ? 3u : 0u);  // NBD_STATE_HOLE | NBD_STATE_ZERO
            total += l;
          }
          std::vector<std::byte> r;
          Put32(r, kStructuredReplyMagic);
          Put16(r, kReplyFlagDone);
          Put16(r, kReplyBlockStatus);
          Put64(r, cookie);
          Put32(r, static_cast<uint32_t>(4 + desc.size()));
          Put32(r, kAllocationContextId);
          r.insert(r.end(), desc.begin(), desc.end());
          sent = ch_.Write(r.data(), r.size());
          break;
        }
        default:
          sent = fail(kEINVAL);
          break;
      }
    }
    if (!sent) return "client went away";
  }
}

}  // namespace

bool FdChannel::Read(void* p, size_t n) {
  auto* b = static_cast<char*>(p);
  while (n > 0) {
    ssize_t r = ::read(fd_, b, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    b += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool FdChannel::Write(const void* p, size_t n) {
  const auto* b = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t r = ::send(fd_, b, n, MSG_NOSIGNAL);
    if (r < 0 && errno == ENOTSOCK) r = ::write(fd_, b, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    b += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

std::string Serve(Channel& ch, ExportProvider& provider, const Limits& limits) {
  Session s(ch, provider, limits);
  return s.Run();
}

}  // namespace umbra::nbd
