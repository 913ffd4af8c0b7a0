#include "daemon/config.h"

#include <toml++/toml.h>

#include <set>
#include <sstream>

namespace umbra::daemon {

Status LoadConfigFile(const std::string& path, Config* cfg) {
  toml::table tbl;
  try {
    tbl = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    std::ostringstream msg;
    if (e.source().begin.line == 0) {
      msg << "cannot read config file " << path << ": " << e.description();
    } else {
      msg << "config file " << path << " line " << e.source().begin.line << ": " << e.description();
    }
    return Status::InvalidArgument(msg.str());
  }
  static const std::set<std::string, std::less<>> kKeys = {
      "state_dir",       "socket",     "fuse_dir", "admin_group", "copy_timeout_ms",
      "origin_cache",    "nbd_socket", "nbd_tcp",  "writers_dir", "prepare_timeout_ms",
      "freeze_window_ms"};
  for (const auto& [key, node] : tbl) {
    if (!kKeys.count(key.str()))
      return Status::InvalidArgument("config file " + path + ": unknown key '" +
                                     std::string(key.str()) + "'");
  }
  auto str = [&](const char* key, std::string* out) -> Status {
    const toml::node* n = tbl.get(key);
    if (n == nullptr) return Status::Ok();
    auto v = n->value<std::string>();
    if (!v || v->empty())
      return Status::InvalidArgument("config file " + path + ": '" + key +
                                     "' must be a non-empty string");
    *out = *v;
    return Status::Ok();
  };
  UMBRA_RETURN_IF_ERROR(str("state_dir", &cfg->state_dir));
  UMBRA_RETURN_IF_ERROR(str("socket", &cfg->socket));
  UMBRA_RETURN_IF_ERROR(str("fuse_dir", &cfg->fuse_dir));
  UMBRA_RETURN_IF_ERROR(str("nbd_socket", &cfg->nbd_socket));
  UMBRA_RETURN_IF_ERROR(str("nbd_tcp", &cfg->nbd_tcp));
  UMBRA_RETURN_IF_ERROR(str("admin_group", &cfg->admin_group));
  std::string origin_cache = cfg->origin_cache;
  UMBRA_RETURN_IF_ERROR(str("origin_cache", &origin_cache));
  if (origin_cache != "writeback" && origin_cache != "direct")
    return Status::InvalidArgument("config file " + path +
                                   ": 'origin_cache' must be \"writeback\" or \"direct\"");
  UMBRA_RETURN_IF_ERROR(str("writers_dir", &cfg->writers_dir));
  auto ms = [&](const char* key, uint32_t* out) -> Status {
    const toml::node* n = tbl.get(key);
    if (n == nullptr) return Status::Ok();
    auto v = n->value<int64_t>();
    if (!v || *v < 1 || *v > 3'600'000)
      return Status::InvalidArgument("config file " + path + ": '" + key +
                                     "' must be an integer from 1 to 3600000");
    *out = static_cast<uint32_t>(*v);
    return Status::Ok();
  };
  UMBRA_RETURN_IF_ERROR(ms("copy_timeout_ms", &cfg->copy_timeout_ms));
  UMBRA_RETURN_IF_ERROR(ms("prepare_timeout_ms", &cfg->prepare_timeout_ms));
  UMBRA_RETURN_IF_ERROR(ms("freeze_window_ms", &cfg->freeze_window_ms));
  cfg->origin_cache = origin_cache;
  return Status::Ok();
}

}  // namespace umbra::daemon
