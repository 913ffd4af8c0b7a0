// Allocated ranges of an unmounted ext2/3/4 filesystem from its block
// bitmap (libext2fs), for --offline images: free blocks are not read.
#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>

#include "imaging/ext4_bitmap.h"

namespace umbra::imaging {

std::optional<std::vector<Range>> Ext4Allocated(const std::string& path, uint64_t size,
                                                std::string* why_not) {
  ext2_filsys fs = nullptr;
  errcode_t err = ext2fs_open(path.c_str(), 0 /* read-only */, 0, 0, unix_io_manager, &fs);
  if (err != 0) {
    *why_not = "no ext2/3/4 filesystem could be opened";
    return std::nullopt;
  }
  struct Closer {
    ext2_filsys fs;
    ~Closer() { ext2fs_close_free(&fs); }
  } closer{fs};
  // A filesystem that was not cleanly unmounted may have blocks in use that
  // only its journal records (bitmap updates not yet checkpointed): its
  // bitmap cannot be trusted, so everything is read.
  if ((fs->super->s_state & EXT2_VALID_FS) == 0 ||
      (fs->super->s_feature_incompat & EXT3_FEATURE_INCOMPAT_RECOVER) != 0) {
    *why_not = "the filesystem was not cleanly unmounted (its journal needs recovery)";
    return std::nullopt;
  }
  if (ext2fs_read_block_bitmap(fs) != 0) {
    *why_not = "its block bitmap could not be read";
    return std::nullopt;
  }
  const uint64_t bs = fs->blocksize;
  const blk64_t first = fs->super->s_first_data_block;
  const blk64_t last = ext2fs_blocks_count(fs->super) - 1;
  std::vector<Range> out;
  // Everything before the first data block (boot block, superblock of 1 KiB
  // block filesystems) is always read.
  uint64_t head = std::min<uint64_t>(size, std::max<uint64_t>(first * bs, 64 * 1024));
  if (head > 0) out.push_back({0, head});
  blk64_t b = first;
  while (b <= last) {
    blk64_t set = 0, clear = 0;
    if (ext2fs_find_first_set_block_bitmap2(fs->block_map, b, last, &set) != 0) break;
    if (ext2fs_find_first_zero_block_bitmap2(fs->block_map, set, last, &clear) != 0)
      clear = last + 1;
    uint64_t off = set * bs, end = std::min<uint64_t>(size, clear * bs);
    if (off < end) {
      if (!out.empty() && out.back().offset + out.back().length >= off) {
        uint64_t e = std::max(end, out.back().offset + out.back().length);
        out.back().length = e - out.back().offset;
      } else {
        out.push_back({off, end - off});
      }
    }
    b = clear + 1;
  }
  return out;
}

}  // namespace umbra::imaging
