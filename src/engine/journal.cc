// Journal, checkpoint and recovery replay. Format: docs/format/shadow-storage.md.
#include "engine/journal.h"

#include "base/checksum.h"

namespace umbra::engine {

Result<std::vector<std::byte>> ReadAll(Env* env, const std::string& path) {
  UMBRA_ASSIGN_OR_RETURN(auto f, env->Open(path, OpenMode::kReadOnly));
  UMBRA_ASSIGN_OR_RETURN(uint64_t size, f->Size());
  std::vector<std::byte> buf(size);
  UMBRA_RETURN_IF_ERROR(f->ReadAt(0, buf));
  return buf;
}

Journal::Journal(std::unique_ptr<File> f, uint64_t gen, uint64_t first_lsn)
    : file_(std::move(f)),
      gen_(gen),
      next_lsn_(first_lsn),
      durable_lsn_(first_lsn - 1),
      write_off_(kJournalHeaderSize) {}

Result<std::unique_ptr<Journal>> Journal::Create(Env* env, const std::string& dir,
                                                 const Uuid& uuid, uint64_t gen,
                                                 uint64_t first_lsn) {
  std::string path = dir + "/" + JournalName(gen);
  UMBRA_ASSIGN_OR_RETURN(auto f, env->Open(path, OpenMode::kCreate));
  UMBRA_RETURN_IF_ERROR(f->Truncate(0));
  JournalHeader h{uuid, gen, first_lsn};
  auto hdr = EncodeJournalHeader(h);
  UMBRA_RETURN_IF_ERROR(f->WriteAt(0, hdr));
  UMBRA_RETURN_IF_ERROR(f->Sync());
  UMBRA_RETURN_IF_ERROR(env->SyncDir(dir));
  return std::unique_ptr<Journal>(new Journal(std::move(f), gen, first_lsn));
}

uint64_t Journal::Append(Record r) {
  std::lock_guard l(mu_);
  r.lsn = next_lsn_++;
  EncodeRecord(r, buf_);
  return r.lsn;
}

Status Journal::SyncTo(uint64_t lsn) {
  std::unique_lock l(mu_);
  if (lsn == UINT64_MAX) lsn = next_lsn_ - 1;
  for (;;) {
    if (!error_.ok()) return error_;
    if (durable_lsn_ >= lsn) return Status::Ok();
    if (!syncing_) break;
    cv_.wait(l);
  }
  // This caller leads the group: everything buffered so far goes in one write.
  syncing_ = true;
  std::vector<std::byte> buf;
  buf.swap(buf_);
  uint64_t upto = next_lsn_ - 1;
  uint64_t off = write_off_;
  write_off_ += buf.size();
  l.unlock();
  Status s = before_write_ ? before_write_() : Status::Ok();
  if (s.ok() && !buf.empty()) s = file_->WriteAt(off, buf);
  if (s.ok()) s = file_->Sync();
  l.lock();
  syncing_ = false;
  if (s.ok()) {
    durable_lsn_ = upto;
  } else {
    error_ = s.Annotate("shadow storage journal");
  }
  cv_.notify_all();
  if (!error_.ok()) return error_;
  return durable_lsn_ >= lsn ? Status::Ok() : Status(Code::kIOError, "journal sync lost a record");
}

uint64_t Journal::next_lsn() {
  std::lock_guard l(mu_);
  return next_lsn_;
}

uint64_t Journal::bytes_written() {
  std::lock_guard l(mu_);
  return write_off_ + buf_.size();
}

Status Journal::error() {
  std::lock_guard l(mu_);
  return error_;
}

Status WriteCheckpoint(Env* env, const std::string& dir, const CheckpointHeader& header,
                       std::span<const std::byte> body) {
  CheckpointHeader h = header;
  h.body_length = body.size();
  h.body_crc = Crc32(body);
  auto hdr = EncodeCheckpointHeader(h);
  std::string tmp = dir + "/" + kCheckpointTmpName;
  UMBRA_ASSIGN_OR_RETURN(auto f, env->Open(tmp, OpenMode::kCreate));
  UMBRA_RETURN_IF_ERROR(f->Truncate(0));
  UMBRA_RETURN_IF_ERROR(f->WriteAt(0, hdr));
  if (!body.empty()) UMBRA_RETURN_IF_ERROR(f->WriteAt(kCheckpointHeaderSize, body));
  UMBRA_RETURN_IF_ERROR(f->Sync());
  UMBRA_RETURN_IF_ERROR(env->Rename(tmp, dir + "/" + kCheckpointName));
  return env->SyncDir(dir);
}

Result<ReplayResult> ReadAndReplay(Env* env, const std::string& dir,
                                   const std::function<Status(const CheckpointHeader&)>& validate,
                                   const std::function<Status(const Record&)>& apply) {
  std::string ckpt_path = dir + "/" + kCheckpointName;
  UMBRA_ASSIGN_OR_RETURN(bool exists, env->Exists(ckpt_path));
  if (!exists) return Status::NotFound("no shadow storage in " + dir + " (" + kCheckpointName +
                                       " is missing)");
  UMBRA_ASSIGN_OR_RETURN(auto ckpt, ReadAll(env, ckpt_path));
  ReplayResult res;
  UMBRA_RETURN_IF_ERROR(DecodeCheckpointHeader(ckpt, res.header).Annotate(ckpt_path));
  if (ckpt.size() - kCheckpointHeaderSize < res.header.body_length)
    return Status::Corruption(ckpt_path + ": checkpoint is truncated");
  std::span<const std::byte> body(ckpt.data() + kCheckpointHeaderSize, res.header.body_length);
  if (Crc32(body) != res.header.body_crc)
    return Status::Corruption(ckpt_path + ": checkpoint body checksum mismatch");
  UMBRA_RETURN_IF_ERROR(validate(res.header));

  Record r;
  while (!body.empty()) {
    size_t n = DecodeRecord(body, r);
    if (n == 0) return Status::Corruption(ckpt_path + ": undecodable record in checkpoint");
    UMBRA_RETURN_IF_ERROR(apply(r).Annotate(ckpt_path));
    body = body.subspan(n);
    ++res.records;
  }

  uint64_t lsn = res.header.next_lsn;
  uint64_t gen = res.header.journal_gen;
  for (bool first = true;; first = false, ++gen) {
    std::string path = dir + "/" + JournalName(gen);
    UMBRA_ASSIGN_OR_RETURN(bool jexists, env->Exists(path));
    if (!jexists) {
      if (first) return Status::Corruption(path + " is missing (the checkpoint refers to it)");
      break;
    }
    UMBRA_ASSIGN_OR_RETURN(auto j, ReadAll(env, path));
    JournalHeader jh;
    Status hs = DecodeJournalHeader(j, jh);
    if (!hs.ok() || jh.volume_uuid != res.header.volume_uuid || jh.generation != gen) {
      // The next generation's header may be torn (crash during rotation):
      // it then holds no durable record, so recovery stops before it.
      if (first) return Status::Corruption(path + ": bad journal header");
      break;
    }
    if (jh.first_lsn != lsn) {
      if (first) return Status::Corruption(path + ": journal does not continue the checkpoint");
      break;
    }
    std::span<const std::byte> rest(j.data() + kJournalHeaderSize, j.size() - kJournalHeaderSize);
    while (!rest.empty()) {
      size_t n = DecodeRecord(rest, r);
      if (n == 0 || r.lsn != lsn) {
        res.torn_tail = true;
        break;
      }
      UMBRA_RETURN_IF_ERROR(apply(r).Annotate(path));
      rest = rest.subspan(n);
      ++lsn;
      ++res.records;
    }
    res.last_gen = gen;
    if (res.torn_tail) break;
  }
  res.next_lsn = lsn;
  if (res.last_gen == 0) res.last_gen = res.header.journal_gen;
  return res;
}

}  // namespace umbra::engine
