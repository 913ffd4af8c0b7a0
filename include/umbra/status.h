// Status and Result<T>: how every fallible call in Umbra reports failure.
//
// No exceptions cross module boundaries. A Status is either OK or carries a
// code, the errno that caused it (0 if none) and one human-readable message
// that names what failed ("shadow storage full", "snapshot 3f2a… invalidated:
// shadow storage I/O error"). Both types are [[nodiscard]]: ignoring one is a
// compile error under -Werror; deliberate ignores use IgnoreError() so they
// can be grepped.
#pragma once

#include <cerrno>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace umbra {

enum class Code : uint8_t {
  kOk = 0,
  kInvalidArgument,   // caller passed something that cannot be right
  kNotFound,          // unknown volume, snapshot, file
  kAlreadyExists,
  kCorruption,        // on-disk data failed validation
  kIOError,           // the OS returned an error (see errno())
  kNoSpace,           // ENOSPC or a configured maximum would be exceeded
  kSnapshotInvalid,   // the snapshot was invalidated; message names the cause
  kTimedOut,
  kBusy,              // resource in use (e.g. a set already being prepared)
  kPermissionDenied,
  kUnsupported,
  kWriterFailed,      // a writer failed, vetoed or timed out; the snapshot was not taken
};

std::string_view CodeName(Code c);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string msg, int err = 0) : code_(code), errno_(err), msg_(std::move(msg)) {}

  static Status Ok() { return {}; }
  static Status InvalidArgument(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
  static Status NotFound(std::string m) { return {Code::kNotFound, std::move(m)}; }
  static Status AlreadyExists(std::string m) { return {Code::kAlreadyExists, std::move(m)}; }
  static Status Corruption(std::string m) { return {Code::kCorruption, std::move(m)}; }
  static Status NoSpace(std::string m) { return {Code::kNoSpace, std::move(m), ENOSPC}; }
  static Status SnapshotInvalid(std::string m) { return {Code::kSnapshotInvalid, std::move(m)}; }
  static Status TimedOut(std::string m) { return {Code::kTimedOut, std::move(m), ETIMEDOUT}; }
  static Status Busy(std::string m) { return {Code::kBusy, std::move(m), EBUSY}; }
  static Status Unsupported(std::string m) { return {Code::kUnsupported, std::move(m), ENOTSUP}; }
  // An OS error: message is "<what>: <strerror(err)>". ENOSPC maps to kNoSpace.
  static Status FromErrno(int err, std::string_view what);

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  int err() const { return errno_; }
  const std::string& message() const { return msg_; }
  // "<code name>: <message>", or "OK".
  std::string ToString() const;
  // Adds context in front of the message, keeping code and errno.
  Status Annotate(std::string_view context) const;
  // The errno a block-device front end should return for this status.
  int ToErrno() const;
  void IgnoreError() const {}

 private:
  Code code_ = Code::kOk;
  int errno_ = 0;
  std::string msg_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}          // NOLINT(implicit)
  Result(Status status) : v_(std::move(status)) {}   // NOLINT(implicit); must not be OK

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace umbra

// Early return on error. Usage: UMBRA_RETURN_IF_ERROR(file->Sync());
#define UMBRA_RETURN_IF_ERROR(expr)            \
  do {                                         \
    ::umbra::Status umbra_status_ = (expr);    \
    if (!umbra_status_.ok()) return umbra_status_; \
  } while (0)

#define UMBRA_CONCAT_INNER(a, b) a##b
#define UMBRA_CONCAT(a, b) UMBRA_CONCAT_INNER(a, b)
// UMBRA_ASSIGN_OR_RETURN(auto f, env->Open(...));
#define UMBRA_ASSIGN_OR_RETURN(lhs, expr)                              \
  auto UMBRA_CONCAT(umbra_result_, __LINE__) = (expr);                 \
  if (!UMBRA_CONCAT(umbra_result_, __LINE__).ok())                     \
    return UMBRA_CONCAT(umbra_result_, __LINE__).status();             \
  lhs = std::move(UMBRA_CONCAT(umbra_result_, __LINE__)).value()
