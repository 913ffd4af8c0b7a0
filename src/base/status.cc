// Status helpers: code names, errno mapping and message formatting.
#include "umbra/status.h"

#include <cstring>
#include <string>
#include <type_traits>

namespace umbra {

std::string_view CodeName(Code c) {
  switch (c) {
    case Code::kOk:
      return "OK";
    case Code::kInvalidArgument:
      return "InvalidArgument";
    case Code::kNotFound:
      return "NotFound";
    case Code::kAlreadyExists:
      return "AlreadyExists";
    case Code::kCorruption:
      return "Corruption";
    case Code::kIOError:
      return "IOError";
    case Code::kNoSpace:
      return "NoSpace";
    case Code::kSnapshotInvalid:
      return "SnapshotInvalid";
    case Code::kTimedOut:
      return "TimedOut";
    case Code::kBusy:
      return "Busy";
    case Code::kPermissionDenied:
      return "PermissionDenied";
    case Code::kUnsupported:
      return "Unsupported";
    case Code::kWriterFailed:
      return "WriterFailed";
  }
  return "Unknown";
}

namespace {

// Thread-safe strerror (GNU strerror_r returns a char* that may or may not
// point into `buf`; the XSI variant returns int — handle both).
std::string ErrnoText(int err) {
  char buf[256];
  buf[0] = '\0';
  auto r = strerror_r(err, buf, sizeof(buf));
  if constexpr (std::is_same_v<decltype(r), char*>) {
    return std::string(r);
  } else {
    if (r != 0) return "errno " + std::to_string(err);
    return std::string(buf);
  }
}

Code CodeForErrno(int err) {
  switch (err) {
    case ENOSPC:
    case EDQUOT:
      return Code::kNoSpace;
    case ENOENT:
      return Code::kNotFound;
    case EEXIST:
      return Code::kAlreadyExists;
    case EACCES:
    case EPERM:
      return Code::kPermissionDenied;
    case ETIMEDOUT:
      return Code::kTimedOut;
    default:
      return Code::kIOError;
  }
}

}  // namespace

Status Status::FromErrno(int err, std::string_view what) {
  std::string msg(what);
  msg += ": ";
  msg += ErrnoText(err);
  return Status(CodeForErrno(err), std::move(msg), err);
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s(CodeName(code_));
  s += ": ";
  s += msg_;
  return s;
}

Status Status::Annotate(std::string_view context) const {
  if (ok()) return *this;
  std::string m(context);
  if (!msg_.empty()) {
    m += ": ";
    m += msg_;
  }
  return Status(code_, std::move(m), errno_);
}

int Status::ToErrno() const {
  switch (code_) {
    case Code::kOk:
      return 0;
    case Code::kInvalidArgument:
      return EINVAL;
    case Code::kNotFound:
      return ENOENT;
    case Code::kAlreadyExists:
      return EEXIST;
    case Code::kCorruption:
      return EIO;  // EUCLEAN would be more exact, but callers expect EIO
    case Code::kIOError:
      return errno_ != 0 ? errno_ : EIO;
    case Code::kNoSpace:
      return ENOSPC;
    case Code::kSnapshotInvalid:
      return EIO;
    case Code::kTimedOut:
      return ETIMEDOUT;
    case Code::kBusy:
      return EBUSY;
    case Code::kPermissionDenied:
      return errno_ == EPERM ? EPERM : EACCES;
    case Code::kUnsupported:
      return EOPNOTSUPP;
    case Code::kWriterFailed:
      return ECANCELED;
  }
  return EIO;
}

}  // namespace umbra
