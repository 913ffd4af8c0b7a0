#include "daemon/registry.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace umbra::daemon {

using Json = nlohmann::json;

Status WriteFileAtomic(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Status::FromErrno(errno, "create " + tmp);
  size_t done = 0;
  while (done < content.size()) {
    ssize_t w = ::write(fd, content.data() + done, content.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return Status::FromErrno(e, "write " + tmp);
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0) {
    int e = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return Status::FromErrno(e, "fsync " + tmp);
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    return Status::FromErrno(e, "rename " + tmp + " to " + path);
  }
  std::string dir = path.substr(0, path.find_last_of('/'));
  if (dir.empty()) dir = "/";
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return Status::FromErrno(errno, "open directory " + dir);
  int rc = ::fsync(dfd);
  int e = errno;
  ::close(dfd);
  if (rc != 0) return Status::FromErrno(e, "fsync directory " + dir);
  return Status::Ok();
}

Result<std::vector<VolumeRecord>> LoadRegistry(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    if (errno == ENOENT) return std::vector<VolumeRecord>{};
    return Status::FromErrno(errno, "open " + path);
  }
  std::stringstream ss;
  ss << in.rdbuf();
  Json j = Json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return Status::Corruption("volume registry " + path + " is not valid JSON");
  std::vector<VolumeRecord> out;
  try {
    if (j.at("version").get<int>() != 1)
      return Status::Corruption("volume registry " + path + " has an unknown version");
    for (const Json& v : j.at("volumes")) {
      VolumeRecord r;
      r.name = v.at("name").get<std::string>();
      r.uuid = v.at("uuid").get<std::string>();
      r.origin = v.at("origin").get<std::string>();
      r.kind = v.at("kind").get<std::string>();
      r.size = v.at("size").get<uint64_t>();
      r.chunk_size = v.at("chunk_size").get<uint32_t>();
      r.storage = v.at("storage").get<std::string>();
      r.created_backing = v.value("created_backing", false);
      out.push_back(std::move(r));
    }
  } catch (const Json::exception& e) {
    return Status::Corruption("volume registry " + path + " is malformed: " + e.what());
  }
  return out;
}

Status SaveRegistry(const std::string& path, const std::vector<VolumeRecord>& volumes) {
  Json arr = Json::array();
  for (const VolumeRecord& r : volumes) {
    arr.push_back(Json{{"name", r.name},
                       {"uuid", r.uuid},
                       {"origin", r.origin},
                       {"kind", r.kind},
                       {"size", r.size},
                       {"chunk_size", r.chunk_size},
                       {"storage", r.storage},
                       {"created_backing", r.created_backing}});
  }
  Json j{{"version", 1}, {"volumes", arr}};
  return WriteFileAtomic(path, j.dump(2) + "\n");
}

}  // namespace umbra::daemon
