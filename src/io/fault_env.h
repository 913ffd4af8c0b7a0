// FaultEnv: wraps another Env and injects failures and delays.
//
// Every File opened through a FaultEnv is wrapped too, so faults apply to
// file operations as well as namespace operations. An injected failure is
// decided *before* the operation reaches the base Env, so a failed operation
// has no effect at all (a failed write changes nothing). Injected errors are
// Status::FromErrno(err, "injected fault: <op> <path>"), so ENOSPC becomes
// kNoSpace, EIO kIOError, and so on.
//
// Operations that can be faulted (and counted): ReadAt (kRead), WriteAt
// (kWrite), File::Sync (kSync), PunchHole (kPunch), Truncate (kTruncate),
// Open (kOpen), Rename (kRename; matches a rule if either path does), Remove
// (kRemove), SyncDir (kSyncDir), CreateDir (kCreateDir). Size, AllocatedBytes,
// Exists, ListDir, StatFs, IsOnVolume, SameFilesystem and the clock pass
// straight through.
//
// Thread-safety: all methods may be called concurrently (one mutex guards
// the fault state; injected delays are slept outside it). The base Env must
// outlive the FaultEnv and every File it opened.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "umbra/io.h"

namespace umbra {

class FaultEnv final : public Env {
 public:
  enum class Op : uint32_t {
    kRead = 1,
    kWrite = 2,
    kSync = 4,
    kPunch = 8,
    kTruncate = 16,
    kOpen = 32,
    kRename = 64,
    kRemove = 128,
    kSyncDir = 256,
    kCreateDir = 512,
  };
  // Bit masks of Ops, for the `ops` arguments below.
  static constexpr uint32_t kRead = 1, kWrite = 2, kSync = 4, kPunch = 8, kTruncate = 16,
                            kOpen = 32, kRename = 64, kRemove = 128, kSyncDir = 256,
                            kCreateDir = 512;
  static constexpr uint32_t kAllOps = 1023;
  static constexpr uint32_t kAllMutating = kAllOps & ~kRead;
  static constexpr uint32_t Mask(Op op) { return static_cast<uint32_t>(op); }
  friend constexpr uint32_t operator|(Op a, Op b) { return Mask(a) | Mask(b); }
  friend constexpr uint32_t operator|(uint32_t a, Op b) { return a | Mask(b); }

  struct Rule {
    std::string path_substr;  // matches paths containing this ("" matches all)
    uint32_t ops = kAllMutating;
    int err = 0;                  // 0: delay only
    uint64_t delay_ns = 0;        // slept via base->SleepNanos before failing/proceeding
    uint64_t skip = 0;            // the first `skip` matching operations are let through
    uint64_t count = UINT64_MAX;  // then at most this many are affected
  };

  explicit FaultEnv(Env* base);
  FaultEnv(const FaultEnv&) = delete;
  FaultEnv& operator=(const FaultEnv&) = delete;

  // Counting from now, the n-th (1-based) operation matching `ops` fails with
  // `err`, once. Several FailNth calls may be pending at the same time; each
  // counts independently. n == 0 is ignored.
  void FailNth(uint64_t n, int err, uint32_t ops = kAllMutating);
  void FailNth(uint64_t n, int err, Op op) { FailNth(n, err, Mask(op)); }
  // Returns an id for RemoveRule. Rules are checked in the order added; all
  // matching rules' delays add up and the first matching error wins.
  int AddRule(Rule rule);
  void RemoveRule(int id);
  void ClearRules();
  // Writes to paths containing `path_substr` fail with ENOSPC once the bytes
  // written to them (since this call) would exceed `bytes`; failed writes do
  // not count. Calling again with the same substring resets that budget.
  void SetWriteBudget(std::string path_substr, uint64_t bytes);
  void ClearWriteBudgets();
  // Operations of kind `op` attempted so far (including failed ones).
  uint64_t op_count(Op op) const;
  // Clears counters, FailNth countdowns, rules and write budgets.
  void Reset();

  Env* base() const { return base_; }

  // --- Env ---
  Result<std::unique_ptr<File>> Open(const std::string& path, OpenMode mode,
                                     bool direct = false) override;
  Result<bool> Exists(const std::string& path) override;
  Status CreateDir(const std::string& path) override;
  Status Remove(const std::string& path) override;
  Status Rename(const std::string& from, const std::string& to) override;
  Status SyncDir(const std::string& dir) override;
  Result<std::vector<std::string>> ListDir(const std::string& dir) override;
  Result<FsStats> StatFs(const std::string& path) override;
  Result<bool> IsOnVolume(const std::string& dir, const std::string& volume_path) override;
  Result<bool> SameFilesystem(const std::string& a, const std::string& b) override;
  uint64_t NowNanos() override;
  void SleepNanos(uint64_t ns) override;

 private:
  class FaultFile;
  struct NthFault {
    uint64_t remaining;
    int err;
    uint32_t ops;
  };
  struct RuleState {
    Rule rule;
    uint64_t seen = 0;
    uint64_t fired = 0;
  };
  struct Budget {
    std::string path_substr;
    uint64_t limit;
    uint64_t used = 0;
  };

  // Counts the operation and decides its fate: sleeps any injected delay,
  // then returns the injected error or OK. For writes, `write_bytes` are
  // charged to matching budgets (see RefundWrite).
  Status Check(Op op, const std::string& path, const std::string& path2 = "",
               uint64_t write_bytes = 0);
  // Gives back budget charged by Check when the base write itself failed.
  void RefundWrite(const std::string& path, uint64_t bytes);

  Env* const base_;
  mutable std::mutex mu_;
  std::array<uint64_t, 10> counts_{};
  std::vector<NthFault> nth_;
  std::map<int, RuleState> rules_;
  int next_rule_id_ = 1;
  std::vector<Budget> budgets_;
};

}  // namespace umbra
