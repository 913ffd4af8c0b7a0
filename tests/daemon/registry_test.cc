// The volume registry (src/daemon/registry.h) and the config file
// (src/daemon/config.h): round trips, and clear errors for bad files.
#include "daemon/registry.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "daemon/config.h"
#include "system_util.h"

namespace umbra::daemon {
namespace {

namespace fs = std::filesystem;

class TempDir : public test_util::TempDir {
 public:
  TempDir() : test_util::TempDir("umbra-registry-test") {}
};

void Write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

TEST(RegistryTest, RoundTripsAndLeavesNoTempFile) {
  TempDir d;
  const std::string path = d.path() + "/volumes.json";
  auto empty = LoadRegistry(path);
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
  std::vector<VolumeRecord> recs(2);
  recs[0] = {"db",
             "3f2a9c1e-8b7d-4e2f-a1b0-0123456789ab",
             "/srv/db.img",
             "file",
             1 << 30,
             16384,
             "/var/lib/umbra/shadow/x",
             true};
  recs[1] = {"sdb",
             "3f2a9c1e-8b7d-4e2f-a1b0-0123456789ac",
             "/dev/sdb",
             "device",
             4096 * 100,
             65536,
             "/mnt/other/umbra-shadow-y",
             false};
  ASSERT_TRUE(SaveRegistry(path, recs).ok());
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  auto back = LoadRegistry(path);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  ASSERT_EQ(back->size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ((*back)[i].name, recs[i].name);
    EXPECT_EQ((*back)[i].uuid, recs[i].uuid);
    EXPECT_EQ((*back)[i].origin, recs[i].origin);
    EXPECT_EQ((*back)[i].kind, recs[i].kind);
    EXPECT_EQ((*back)[i].size, recs[i].size);
    EXPECT_EQ((*back)[i].chunk_size, recs[i].chunk_size);
    EXPECT_EQ((*back)[i].storage, recs[i].storage);
    EXPECT_EQ((*back)[i].created_backing, recs[i].created_backing);
  }
}

TEST(RegistryTest, CorruptFileIsAClearError) {
  TempDir d;
  const std::string path = d.path() + "/volumes.json";
  for (const char* text : {"{not json", "[]", "{\"version\": 2, \"volumes\": []}",
                           "{\"version\": 1, \"volumes\": [{\"name\": 3}]}"}) {
    Write(path, text);
    auto r = LoadRegistry(path);
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_EQ(r.status().code(), Code::kCorruption) << text;
    EXPECT_NE(r.status().message().find(path), std::string::npos) << r.status().message();
  }
}

TEST(ConfigTest, ReadsKeysAndRejectsBadOnes) {
  TempDir d;
  const std::string path = d.path() + "/umbrad.toml";
  Write(path,
        "state_dir = \"/srv/umbra\"\nsocket = \"/run/u.sock\"\nfuse_dir = \"/run/u\"\n"
        "admin_group = \"umbra\"\ncopy_timeout_ms = 2500\norigin_cache = \"direct\"\n"
        "writers_dir = \"/srv/hooks\"\nprepare_timeout_ms = 1500\nfreeze_window_ms = 700\n");
  Config cfg;
  ASSERT_TRUE(LoadConfigFile(path, &cfg).ok());
  EXPECT_EQ(cfg.state_dir, "/srv/umbra");
  EXPECT_EQ(cfg.socket, "/run/u.sock");
  EXPECT_EQ(cfg.fuse_dir, "/run/u");
  EXPECT_EQ(cfg.admin_group, "umbra");
  EXPECT_EQ(cfg.copy_timeout_ms, 2500u);
  EXPECT_EQ(cfg.origin_cache, "direct");
  EXPECT_EQ(cfg.writers_dir, "/srv/hooks");
  EXPECT_EQ(cfg.prepare_timeout_ms, 1500u);
  EXPECT_EQ(cfg.freeze_window_ms, 700u);
  EXPECT_EQ(Config().origin_cache, "writeback");
  for (const char* text :
       {"statedir = \"/x\"\n", "copy_timeout_ms = \"soon\"\n", "copy_timeout_ms = 0\n",
        "socket = 5\n", "state_dir = \n", "origin_cache = \"none\"\n", "origin_cache = 1\n",
        "freeze_window_ms = 0\n", "prepare_timeout_ms = -5\n", "writers_dir = 3\n"}) {
    Write(path, text);
    Config c;
    Status s = LoadConfigFile(path, &c);
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << text;
    EXPECT_NE(s.message().find(path), std::string::npos) << s.message();
    EXPECT_EQ(c.state_dir, Config().state_dir) << "a bad file changed the config";
  }
  Config c;
  EXPECT_EQ(LoadConfigFile(d.path() + "/missing.toml", &c).code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace umbra::daemon
