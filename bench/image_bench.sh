#!/usr/bin/env bash
# umbra image create / restore on a 4 GiB ext4 volume about half full of
# mixed data, against partclone.ext4 | zstd -T0 and dd on the same bytes, in
# the same run (issue 5's benchmark; results in docs/benchmarks.md).
#
#   bench/image_bench.sh [OUT_DIR]     (root; SIZE=4G FILL_MIB=2048 LEVEL=3 CHUNK=256K)
#
# Data (FILL_MIB in total): 35% random, 35% compressible text, 30% copies of
# earlier files (dedup). Steps, each with cold caches (drop_caches):
#   1. partclone.ext4 -c -s ORIGIN -o - | zstd -T0 -LEVEL  (ORIGIN = the volume's
#      backing file, read directly; the filesystem is unmounted)
#   2. umbra image create VOLUME (live path: snapshot + NBD export), into an
#      empty repository
#   3. change 1% of the data (rewrite FILL_MIB/100 MiB inside files), then
#      umbra image create --incremental
#   4. umbra image restore of image 2 to a new file, against dd of the
#      backing file to a new file (conv=fsync: both end durable)
# Peak memory (max RSS) of image create and restore from /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/var/tmp/umbra-image-bench}
SIZE=${SIZE:-4G}
FILL_MIB=${FILL_MIB:-2048}
LEVEL=${LEVEL:-3}
CHUNK=${CHUNK:-256K}  # the repository's chunk size
bin=${UMBRA_BIN:-build/release/src}
[[ $(id -u) -eq 0 ]] || { echo "image_bench: needs root" >&2; exit 1; }
for t in partclone.ext4 zstd /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "image_bench: $t missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
mkdir -p "$OUT"
work=$(mktemp -d /var/tmp/umbra-image-bench.XXXXXX)
export UMBRA_SOCKET=$work/umbrad.sock
mnt=$work/mnt
mkdir -p "$mnt"
daemon_pid=""

cleanup() {
  set +e
  mountpoint -q "$mnt" && umount "$mnt"
  if [[ -n $daemon_pid ]]; then
    "$bin/umbra" volume detach bench >/dev/null 2>&1
    kill -TERM "$daemon_pid"
    for _ in $(seq 100); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$daemon_pid" 2>/dev/null
  fi
  mountpoint -q "$work/dev" && umount -l "$work/dev"
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
log() { echo "[$(date +%T)] $*" >&2; }
umbra() { "$bin/umbra" "$@"; }
# Cold data, warm tools: the page cache is dropped, then the programs about to
# run are loaded once, so the figures time reading the volume, not exec.
cold() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
  "$bin/umbra" --version >/dev/null
  partclone.ext4 -v >/dev/null 2>&1 || true
  zstd --version >/dev/null
}
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
field() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval("d"+sys.argv[2]))' "$1" "$2"; }

"$bin/umbrad" --foreground --state-dir "$work/state" --socket "$UMBRA_SOCKET" \
  --fuse-dir "$work/dev" 2>>"$work/umbrad.log" &
daemon_pid=$!
for _ in $(seq 100); do umbra daemon status >/dev/null 2>&1 && break; sleep 0.1; done
umbra volume create bench --size "$SIZE" >/dev/null
dev=$(umbra volume attach bench)
origin=$(umbra --json volume list | python3 -c 'import json,sys; print([v for v in json.load(sys.stdin)["volumes"] if v["name"]=="bench"][0]["origin"])')
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$dev"
mount "$dev" "$mnt"

log "filling $FILL_MIB MiB of mixed data"
rnd=$((FILL_MIB * 35 / 100)); txt=$((FILL_MIB * 35 / 100)); dup=$((FILL_MIB - rnd - txt))
mkdir -p "$mnt/random" "$mnt/text" "$mnt/dup"
for i in $(seq 0 $((rnd / 64 - 1))); do head -c 64M /dev/urandom >"$mnt/random/r$i.bin"; done
python3 - "$mnt/text" "$txt" <<'PY'
import os, random, sys
random.seed(7)
words = [w.strip() for w in open("/usr/share/dict/words")] if os.path.exists("/usr/share/dict/words") else \
    ["umbra", "snapshot", "volume", "chunk", "image", "repository", "ext4", "journal", "extent", "inode",
     "block", "flush", "barrier", "commit", "table", "index", "row", "page", "log", "checkpoint"]
out, total = sys.argv[1], int(sys.argv[2]) << 20
n = 0
while total > 0:
    size = min(total, 64 << 20)
    with open(os.path.join(out, "t%d.txt" % n), "w") as f:
        left = size
        while left > 0:
            line = "%08d %s %s %s %d\n" % (random.randrange(10**8), random.choice(words),
                                           random.choice(words), random.choice(words), random.randrange(1000))
            f.write(line)
            left -= len(line)
    total -= size
    n += 1
PY
i=0
for f in "$mnt"/random/*.bin "$mnt"/text/*.txt; do
  (( i * 64 >= dup )) && break
  cp "$f" "$mnt/dup/c$i"
  i=$((i + 1))
done
sync
used=$(df -B1 --output=used "$mnt" | tail -1)
log "filesystem used: $((used >> 20)) MiB"
umount "$mnt"

# 1. partclone.ext4 | zstd -T0 on the unmounted filesystem's backing file.
cold
t0=$(now)
partclone.ext4 -c -s "$origin" -o - -q 2>/dev/null | zstd -T0 -"$LEVEL" -q -c >"$work/partclone.zst"
sync "$work/partclone.zst"  # a backup is done when it is durable (umbra syncs its chunks too)
t1=$(now)
pc_secs=$(secs "$t0" "$t1")
pc_size=$(stat -c %s "$work/partclone.zst")
rm -f "$work/partclone.zst"
log "partclone+zstd: $pc_secs s, $pc_size bytes"

# 2. umbra image create (live path: snapshot, NBD export).
repo=$work/repo
cold
t0=$(now)
/usr/bin/time -f %M -o "$work/create.rss" "$bin/umbra" --json image create bench --repo "$repo" \
  --compression "$LEVEL" --chunk-size "$CHUNK" >"$work/full.json"
t1=$(now)
full_secs=$(secs "$t0" "$t1")  # the whole command: snapshot, export, read, store, manifest
full_stored=$(du -sb "$repo" | cut -f1)
full_read=$(field "$work/full.json" '["stats"]["read"]')
create_rss=$(cat "$work/create.rss")
log "image create: $full_secs s, repository $full_stored bytes, read $full_read"

# 3. Change 1% of the data in place, then an incremental image.
mount "$dev" "$mnt"
change_mib=$((FILL_MIB / 100))
python3 - "$mnt" "$change_mib" <<'PY'
import os, random, sys
random.seed(11)
root, left = sys.argv[1], int(sys.argv[2]) << 20
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if not f.startswith("lost"))
while left > 0:
    p = random.choice(files)
    size = os.path.getsize(p)
    n = min(left, 256 << 10, size)
    with open(p, "r+b") as f:
        f.seek(random.randrange(0, max(1, size - n)))
        f.write(os.urandom(n))
    left -= n
PY
sync
umount "$mnt"
cold
t0=$(now)
"$bin/umbra" --json image create bench --repo "$repo" --incremental --compression "$LEVEL" >"$work/incr.json"
t1=$(now)
incr_secs=$(secs "$t0" "$t1")
incr_read=$(field "$work/incr.json" '["stats"]["read"]')
incr_id=$(field "$work/incr.json" '["id"]')
log "incremental: $incr_secs s, read $incr_read"

# 4. Restore vs dd of the same bytes.
cold
t0=$(now)
/usr/bin/time -f %M -o "$work/restore.rss" "$bin/umbra" --json image restore "$incr_id" --repo "$repo" \
  --to "$work/restored.img" >"$work/restore.json"
t1=$(now)
restore_secs=$(secs "$t0" "$t1")
restore_written=$(field "$work/restore.json" '["written_bytes"]')
restore_rss=$(cat "$work/restore.rss")
rm -f "$work/restored.img"
cold
t0=$(now)
dd if="$origin" of="$work/dd.img" bs=1M conv=fsync status=none
t1=$(now)
dd_secs=$(secs "$t0" "$t1")
rm -f "$work/dd.img"
log "restore: $restore_secs s; dd: $dd_secs s"

size_bytes=$(stat -c %s "$origin")
python3 - "$OUT/results.md" <<PY
import sys
used, size = $used, $size_bytes
pc, full, incr, rs, dd = $pc_secs, $full_secs, $incr_secs, $restore_secs, $dd_secs
mib = lambda b: b / 2**20
lines = [
 "| step | seconds | rate (used data) | output | ratio |",
 "|---|---|---|---|---|",
 f"| partclone.ext4 \\\\| zstd -T0 -$LEVEL | {pc:.2f} | {mib(used)/pc:.0f} MiB/s | {mib($pc_size):.0f} MiB | 1.00 |",
 f"| umbra image create (full, live) | {full:.2f} | {mib(used)/full:.0f} MiB/s | {mib($full_stored):.0f} MiB | {pc/full:.2f}x partclone |",
 f"| umbra image create --incremental (1% changed) | {incr:.2f} | read {mib($incr_read):.0f} MiB | - | {incr/full*100:.1f}% of full |",
 f"| dd of the volume (conv=fsync) | {dd:.2f} | {mib(size)/dd:.0f} MiB/s | - | 1.00 |",
 f"| umbra image restore to a new file | {rs:.2f} | {mib(size)/rs:.0f} MiB/s ({mib($restore_written)/rs:.0f} MiB/s of bytes written) | - | {dd/rs:.2f}x dd |",
 "",
 f"volume {mib(size):.0f} MiB, filesystem used {mib(used):.0f} MiB; peak RSS: image create {$create_rss/1024:.0f} MiB, restore {$restore_rss/1024:.0f} MiB",
]
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
