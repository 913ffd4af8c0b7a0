// The C API of the writer library (include/umbra/writer_c.h).
#include "umbra/writer_c.h"

#include <string>
#include <vector>

#include "umbra/writer.h"

struct umbra_writer {
  std::unique_ptr<umbra::WriterClient> client;
};

extern "C" umbra_writer* umbra_writer_start(const char* socket, const char* name,
                                            const char* const* volumes, size_t n_volumes,
                                            umbra_writer_handler handler, void* user) {
  if (name == nullptr || handler == nullptr || (n_volumes > 0 && volumes == nullptr))
    return nullptr;
  umbra::WriterOptions opt;
  if (socket != nullptr) opt.socket = socket;
  opt.name = name;
  for (size_t i = 0; i < n_volumes; ++i) {
    if (volumes[i] == nullptr) return nullptr;
    opt.volumes.emplace_back(volumes[i]);
  }
  auto* w = new umbra_writer;
  w->client = std::make_unique<umbra::WriterClient>(
      std::move(opt), [handler, user](const umbra::WriterEvent& e) -> umbra::Status {
        char error[512] = {0};
        if (handler(e.event.c_str(), e.set_id.c_str(), user, error, sizeof error) == 0)
          return umbra::Status::Ok();
        error[sizeof error - 1] = '\0';
        return umbra::Status(umbra::Code::kWriterFailed,
                             error[0] != '\0' ? error : "vetoed by the writer");
      });
  w->client->Start();
  return w;
}

extern "C" int umbra_writer_wait_registered(umbra_writer* w, int timeout_ms) {
  if (w == nullptr) return 0;
  return w->client->WaitRegistered(std::chrono::milliseconds(timeout_ms)) ? 1 : 0;
}

extern "C" void umbra_writer_stop(umbra_writer* w) {
  if (w == nullptr) return;
  w->client->Stop();
  delete w;
}
