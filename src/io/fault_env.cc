// FaultEnv implementation (see fault_env.h).
#include "io/fault_env.h"

#include <algorithm>
#include <bit>
#include <utility>

namespace umbra {
namespace {

const char* OpName(FaultEnv::Op op) {
  switch (op) {
    case FaultEnv::Op::kRead:
      return "read";
    case FaultEnv::Op::kWrite:
      return "write";
    case FaultEnv::Op::kSync:
      return "sync";
    case FaultEnv::Op::kPunch:
      return "punch hole";
    case FaultEnv::Op::kTruncate:
      return "truncate";
    case FaultEnv::Op::kOpen:
      return "open";
    case FaultEnv::Op::kRename:
      return "rename";
    case FaultEnv::Op::kRemove:
      return "remove";
    case FaultEnv::Op::kSyncDir:
      return "sync dir";
    case FaultEnv::Op::kCreateDir:
      return "create dir";
  }
  return "?";
}

size_t OpIndex(FaultEnv::Op op) {
  return static_cast<size_t>(std::countr_zero(static_cast<uint32_t>(op)));
}

bool PathMatches(const std::string& substr, const std::string& path, const std::string& path2) {
  return path.find(substr) != std::string::npos ||
         (!path2.empty() && path2.find(substr) != std::string::npos);
}

}  // namespace

class FaultEnv::FaultFile final : public File {
 public:
  FaultFile(FaultEnv* env, std::unique_ptr<File> base) : env_(env), base_(std::move(base)) {}

  Status ReadAt(uint64_t off, std::span<std::byte> buf) override {
    UMBRA_RETURN_IF_ERROR(env_->Check(Op::kRead, path()));
    return base_->ReadAt(off, buf);
  }
  Status WriteAt(uint64_t off, std::span<const std::byte> buf) override {
    UMBRA_RETURN_IF_ERROR(env_->Check(Op::kWrite, path(), "", buf.size()));
    Status s = base_->WriteAt(off, buf);
    if (!s.ok()) env_->RefundWrite(path(), buf.size());
    return s;
  }
  Status Sync() override {
    UMBRA_RETURN_IF_ERROR(env_->Check(Op::kSync, path()));
    return base_->Sync();
  }
  Status PunchHole(uint64_t off, uint64_t len) override {
    UMBRA_RETURN_IF_ERROR(env_->Check(Op::kPunch, path()));
    return base_->PunchHole(off, len);
  }
  Status Truncate(uint64_t size) override {
    UMBRA_RETURN_IF_ERROR(env_->Check(Op::kTruncate, path()));
    return base_->Truncate(size);
  }
  Result<uint64_t> Size() override { return base_->Size(); }
  Result<uint64_t> AllocatedBytes() override { return base_->AllocatedBytes(); }
  const std::string& path() const override { return base_->path(); }

 private:
  FaultEnv* const env_;
  const std::unique_ptr<File> base_;
};

FaultEnv::FaultEnv(Env* base) : base_(base) {}

Status FaultEnv::Check(Op op, const std::string& path, const std::string& path2,
                       uint64_t write_bytes) {
  const uint32_t bit = Mask(op);
  uint64_t delay = 0;
  int err = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    ++counts_[OpIndex(op)];
    for (auto it = nth_.begin(); it != nth_.end();) {
      if ((it->ops & bit) != 0 && --it->remaining == 0) {
        if (err == 0) err = it->err;
        it = nth_.erase(it);
        continue;
      }
      ++it;
    }
    for (auto& [id, st] : rules_) {
      if ((st.rule.ops & bit) == 0 || !PathMatches(st.rule.path_substr, path, path2)) continue;
      if (++st.seen <= st.rule.skip || st.fired >= st.rule.count) continue;
      ++st.fired;
      delay += st.rule.delay_ns;
      if (err == 0) err = st.rule.err;
    }
    if (op == Op::kWrite && err == 0) {
      // Charge every matching budget, or none if any would overflow.
      for (const Budget& b : budgets_) {
        if (PathMatches(b.path_substr, path, "") && b.used + write_bytes > b.limit) {
          err = ENOSPC;
          break;
        }
      }
      if (err == 0) {
        for (Budget& b : budgets_) {
          if (PathMatches(b.path_substr, path, "")) b.used += write_bytes;
        }
      }
    }
  }
  if (delay > 0) base_->SleepNanos(delay);
  if (err != 0) {
    std::string what = std::string("injected fault: ") + OpName(op) + " " + path;
    if (!path2.empty()) what += " -> " + path2;
    return Status::FromErrno(err, what);
  }
  return Status::Ok();
}

void FaultEnv::RefundWrite(const std::string& path, uint64_t bytes) {
  std::lock_guard<std::mutex> l(mu_);
  for (Budget& b : budgets_) {
    if (PathMatches(b.path_substr, path, "")) b.used -= std::min(b.used, bytes);
  }
}

void FaultEnv::FailNth(uint64_t n, int err, uint32_t ops) {
  if (n == 0) return;
  std::lock_guard<std::mutex> l(mu_);
  nth_.push_back(NthFault{n, err, ops});
}

int FaultEnv::AddRule(Rule rule) {
  std::lock_guard<std::mutex> l(mu_);
  const int id = next_rule_id_++;
  rules_.emplace(id, RuleState{std::move(rule)});
  return id;
}

void FaultEnv::RemoveRule(int id) {
  std::lock_guard<std::mutex> l(mu_);
  rules_.erase(id);
}

void FaultEnv::ClearRules() {
  std::lock_guard<std::mutex> l(mu_);
  rules_.clear();
}

void FaultEnv::SetWriteBudget(std::string path_substr, uint64_t bytes) {
  std::lock_guard<std::mutex> l(mu_);
  for (Budget& b : budgets_) {
    if (b.path_substr == path_substr) {
      b.limit = bytes;
      b.used = 0;
      return;
    }
  }
  budgets_.push_back(Budget{std::move(path_substr), bytes});
}

void FaultEnv::ClearWriteBudgets() {
  std::lock_guard<std::mutex> l(mu_);
  budgets_.clear();
}

uint64_t FaultEnv::op_count(Op op) const {
  std::lock_guard<std::mutex> l(mu_);
  return counts_[OpIndex(op)];
}

void FaultEnv::Reset() {
  std::lock_guard<std::mutex> l(mu_);
  counts_.fill(0);
  nth_.clear();
  rules_.clear();
  budgets_.clear();
}

Result<std::unique_ptr<File>> FaultEnv::Open(const std::string& path, OpenMode mode, bool direct) {
  UMBRA_RETURN_IF_ERROR(Check(Op::kOpen, path));
  UMBRA_ASSIGN_OR_RETURN(std::unique_ptr<File> f, base_->Open(path, mode, direct));
  return std::unique_ptr<File>(std::make_unique<FaultFile>(this, std::move(f)));
}

Result<bool> FaultEnv::Exists(const std::string& path) { return base_->Exists(path); }

Status FaultEnv::CreateDir(const std::string& path) {
  UMBRA_RETURN_IF_ERROR(Check(Op::kCreateDir, path));
  return base_->CreateDir(path);
}

Status FaultEnv::Remove(const std::string& path) {
  UMBRA_RETURN_IF_ERROR(Check(Op::kRemove, path));
  return base_->Remove(path);
}

Status FaultEnv::Rename(const std::string& from, const std::string& to) {
  UMBRA_RETURN_IF_ERROR(Check(Op::kRename, from, to));
  return base_->Rename(from, to);
}

Status FaultEnv::SyncDir(const std::string& dir) {
  UMBRA_RETURN_IF_ERROR(Check(Op::kSyncDir, dir));
  return base_->SyncDir(dir);
}

Result<std::vector<std::string>> FaultEnv::ListDir(const std::string& dir) {
  return base_->ListDir(dir);
}

Result<FsStats> FaultEnv::StatFs(const std::string& path) { return base_->StatFs(path); }

Result<bool> FaultEnv::IsOnVolume(const std::string& dir, const std::string& volume_path) {
  return base_->IsOnVolume(dir, volume_path);
}

Result<bool> FaultEnv::SameFilesystem(const std::string& a, const std::string& b) {
  return base_->SameFilesystem(a, b);
}

uint64_t FaultEnv::NowNanos() { return base_->NowNanos(); }
void FaultEnv::SleepNanos(uint64_t ns) { base_->SleepNanos(ns); }

}  // namespace umbra
