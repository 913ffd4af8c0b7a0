// umbra-shadow-dump DIR: prints the checkpoint header and every record of a
// shadow storage directory (docs/format/shadow-storage.md). Read-only.
#include <cstdio>
#include <string>

#include "base/random.h"
#include "engine/format.h"
#include "engine/journal.h"

using namespace umbra;
using namespace umbra::engine;

static void Print(const Record& r) {
  std::printf("  lsn=%-8llu %-16s", static_cast<unsigned long long>(r.lsn),
              std::string(RecordTypeName(r.type)).c_str());
  switch (r.type) {
    case RecordType::kConfig:
      std::printf(" max_kind=%u max=%llu protection=%u copy_timeout_ms=%u", r.max_kind,
                  static_cast<unsigned long long>(r.max_value), r.protection, r.copy_timeout_ms);
      break;
    case RecordType::kSnapCreate:
      std::printf(" seq=%llu id=%s persistent=%u set=%s/%u name=\"%s\"",
                  static_cast<unsigned long long>(r.seq), FormatUuid(r.snap_uuid).c_str(),
                  r.flags & 1, FormatUuid(r.set_uuid).c_str(), r.set_size, r.name.c_str());
      break;
    case RecordType::kSnapDelete:
    case RecordType::kNextSeq:
      std::printf(" seq=%llu", static_cast<unsigned long long>(r.seq));
      break;
    case RecordType::kSnapInvalidate:
      std::printf(" seq=%llu cause=%u msg=\"%s\"", static_cast<unsigned long long>(r.seq),
                  r.cause, r.name.c_str());
      break;
    case RecordType::kException:
      if (r.slot == kZeroSlot)
        std::printf(" chunk=%llu key=%llu slot=ZERO", static_cast<unsigned long long>(r.chunk),
                    static_cast<unsigned long long>(r.key));
      else
        std::printf(" chunk=%llu key=%llu slot=%llu", static_cast<unsigned long long>(r.chunk),
                    static_cast<unsigned long long>(r.key), static_cast<unsigned long long>(r.slot));
      break;
    case RecordType::kFree:
    case RecordType::kAlloc:
    case RecordType::kNewestFree:
      std::printf(" first=%llu count=%llu", static_cast<unsigned long long>(r.chunk),
                  static_cast<unsigned long long>(r.count));
      break;
  }
  std::printf("\n");
}

int main(int argc, char** argv) {
  if (argc != 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fprintf(stderr,
                 "usage: umbra-shadow-dump DIR\n"
                 "Prints the checkpoint header and every record of the shadow storage in DIR.\n");
    return argc == 2 ? 0 : 2;
  }
  Env* env = DefaultEnv();
  auto validate = [](const CheckpointHeader& h) {
    std::printf("checkpoint: volume=%s size=%llu chunk=%u journal_gen=%llu next_lsn=%llu body=%llu\n",
                FormatUuid(h.volume_uuid).c_str(), static_cast<unsigned long long>(h.volume_size),
                h.chunk_size, static_cast<unsigned long long>(h.journal_gen),
                static_cast<unsigned long long>(h.next_lsn),
                static_cast<unsigned long long>(h.body_length));
    return Status::Ok();
  };
  auto apply = [](const Record& r) {
    Print(r);
    return Status::Ok();
  };
  auto res = ReadAndReplay(env, argv[1], validate, apply);
  if (!res.ok()) {
    std::fprintf(stderr, "umbra-shadow-dump: %s\n", res.status().ToString().c_str());
    return 1;
  }
  std::printf("records=%llu next_lsn=%llu last_journal=%llu torn_tail=%s\n",
              static_cast<unsigned long long>(res->records),
              static_cast<unsigned long long>(res->next_lsn),
              static_cast<unsigned long long>(res->last_gen), res->torn_tail ? "yes" : "no");
  return 0;
}
