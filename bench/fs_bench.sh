#!/usr/bin/env bash
# fio on ext4 on an Umbra volume (umbrad: FUSE file -> loop with direct I/O),
# against the same jobs on a loop device over a plain file, in the same run.
# With PEERS=1 it then runs ../shared/bench/peers/run.sh (nbdkit + nbdfuse,
# qemu-storage-daemon with a copy-before-write snapshot) so every figure
# comes from one session on one machine.
#
#   bench/fs_bench.sh [OUT_DIR]      (root; RUNTIME=10 SIZE=4G PEERS=0)
#   WORKLOADS="randwrite4k seqwrite1m" SNAPS="0 1" bench/fs_bench.sh   (a subset)
#   ORIGIN_CACHE=direct bench/fs_bench.sh   (umbrad's origin_cache; default writeback)
#   REPEAT=3 bench/fs_bench.sh   (rounds; default 1)
#   BARE=1 bench/fs_bench.sh   (adds FUSE-BARE: umbra-bare-fuse, the FUSE path's ceiling)
#
# Workloads (fio --direct=1 --ioengine=libaio on a 1 GiB file f1, as in the
# peers' harness): randwrite4k, seqwrite1m, randread4k (time based), first4k
# (one 4 KiB write at offset 0 of each 64 KiB of f1, shuffled: every write
# hits a never-copied chunk under a snapshot) and firstseq1m (one pass).
# Configs: RAW (plain loop), UMBRA-0/1/16 (no, one, sixteen snapshots taken
# right before each job), and with BARE=1 FUSE-BARE (bench/bare_fuse.cc: a bare
# libfuse3 server passing reads and writes to a file, behind the same loop
# device with direct I/O and ext4: what FUSE alone costs). All filesystems
# stay mounted and every workload runs RAW (then FUSE-BARE), then each
# UMBRA-n, back to back, REPEAT rounds: a ratio is taken
# within one round (the VM's speed drifts by tens of percent over minutes)
# and the summary gives the median per config and workload. Reports IOPS,
# MB/s, ratio to RAW, umbrad CPU seconds per GiB written, umbrad context
# switches per I/O (all its threads) and umbrad's peak resident memory.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/var/tmp/umbra-fs-bench}
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-4G}
PEERS=${PEERS:-0}
WORKLOADS=${WORKLOADS:-randwrite4k seqwrite1m randread4k first4k firstseq1m}
SNAPS=${SNAPS:-0 1 16}
REPEAT=${REPEAT:-1}
BARE=${BARE:-0}
ORIGIN_CACHE=${ORIGIN_CACHE:-writeback}
bin=${UMBRA_BIN:-build/release/src}
bare_bin=${UMBRA_BARE_BIN:-build/release/bench/umbra-bare-fuse}
[[ $(id -u) -eq 0 ]] || { echo "fs_bench: needs root" >&2; exit 1; }
command -v fio >/dev/null || { echo "fs_bench: fio missing (scripts/setup.sh installs it)" >&2; exit 1; }
mkdir -p "$OUT"
work=$(mktemp -d /var/tmp/umbra-fs-bench.XXXXXX)
export UMBRA_SOCKET=$work/umbrad.sock
mnt=$work/mnt
rawmnt=$work/rawmnt
baremnt=$work/baremnt
mkdir -p "$mnt" "$rawmnt" "$baremnt" "$work/bare"
daemon_pid=""
rawloop=""
bare_pid=""
bareloop=""
results=$OUT/results.tsv
echo -e "round\tconfig\tworkload\tiops\tmbs\tclat_us\tumbrad_cpu_s_per_gib\tumbrad_cs_per_io" >"$results"

cleanup() {
  set +e
  mountpoint -q "$mnt" && umount "$mnt"
  mountpoint -q "$rawmnt" && umount "$rawmnt"
  [[ -n $rawloop ]] && losetup -d "$rawloop"
  mountpoint -q "$baremnt" && umount "$baremnt"
  [[ -n $bareloop ]] && losetup -d "$bareloop"
  mountpoint -q "$work/bare" && umount "$work/bare"
  [[ -n $bare_pid ]] && kill "$bare_pid" 2>/dev/null && wait "$bare_pid" 2>/dev/null
  if [[ -n $daemon_pid ]]; then
    kill -TERM "$daemon_pid"
    for _ in $(seq 100); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$daemon_pid" 2>/dev/null
  fi
  mountpoint -q "$work/dev" && umount -l "$work/dev"
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

log() { echo "[$(date +%T)] $*" >&2; }

make_iolog() {  # DIR; first4k: one 4 KiB write at offset 0 of every 64 KiB chunk of f1, shuffled
  python3 - "$work/first4k-$(basename "$1").iolog" "$1/f1" <<'EOF'
import random, sys
random.seed(42)
offs = [i * 65536 for i in range(16384)]
random.shuffle(offs)
name = sys.argv[2]
with open(sys.argv[1], "w") as f:
    f.write("fio version 2 iolog\n")
    f.write("%s add\n%s open\n" % (name, name))
    for o in offs:
        f.write("%s write %d 4096\n" % (name, o))
    f.write("%s close\n" % name)
EOF
}

cpu_ticks() { [[ -n $daemon_pid ]] && awk '{print $14+$15}' "/proc/$daemon_pid/stat" || echo 0; }
# Context switches of all umbrad threads so far (voluntary and not). A thread
# may exit between listing and reading (libfuse retires idle workers): skip it.
ctx_switches() {
  [[ -n $daemon_pid ]] || { echo 0; return; }
  local n=0 f v
  for f in /proc/"$daemon_pid"/task/*/status; do
    v=$(awk '/ctxt_switches/ {n += $2} END {print n + 0}' "$f" 2>/dev/null) || continue
    n=$((n + v))
  done
  echo "$n"
}
peak_rss=0
note_rss() {
  [[ -n $daemon_pid ]] || return 0
  local r
  r=$(awk '/VmHWM/ {print $2}' "/proc/$daemon_pid/status")
  ((r > peak_rss)) && peak_rss=$r
  return 0
}

run_job() {  # round config workload
  local round=$1 cfg=$2 wl=$3 args dir=$mnt
  [[ $cfg == RAW ]] && dir=$rawmnt
  [[ $cfg == FUSE-BARE ]] && dir=$baremnt
  local common="--name=$wl --directory=$dir --filename=f1 --direct=1 --ioengine=libaio --numjobs=1 --group_reporting --output-format=json"
  case $wl in
    randwrite4k) args="--rw=randwrite --bs=4k --iodepth=32 --size=1G --time_based --runtime=$RUNTIME" ;;
    seqwrite1m) args="--rw=write --bs=1M --iodepth=8 --size=1G --time_based --runtime=$RUNTIME" ;;
    randread4k) args="--rw=randread --bs=4k --iodepth=32 --size=1G --time_based --runtime=$RUNTIME" ;;
    first4k)
      common="--name=$wl --direct=1 --ioengine=libaio --output-format=json"
      args="--read_iolog=$work/first4k-$(basename "$dir").iolog --replay_no_stall=1 --iodepth=32" ;;
    firstseq1m) args="--rw=write --bs=1M --iodepth=8 --size=1G" ;;
  esac
  sync
  echo 3 >/proc/sys/vm/drop_caches
  local t0 t1 c0 c1
  t0=$(cpu_ticks)
  c0=$(ctx_switches)
  # shellcheck disable=SC2086
  fio $common $args >"$OUT/$cfg-$wl-$round.json"
  t1=$(cpu_ticks)
  c1=$(ctx_switches)
  note_rss
  python3 - "$OUT/$cfg-$wl-$round.json" "$cfg" "$wl" "$((t1 - t0))" "$(getconf CLK_TCK)" "$round" \
    "$((c1 - c0))" >>"$results" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
cfg, wl, ticks, hz, rnd = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
switches = int(sys.argv[7])
side = j["read"] if "read" in wl else j["write"]
gib = j["write"]["io_bytes"] / 2**30
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
umbra = cfg.startswith("UMBRA")
cpu = (ticks / hz / gib) if (gib > 0 and umbra) else float("nan")
cs = (switches / ios) if (ios > 0 and umbra) else float("nan")
print("%s\t%s\t%s\t%.0f\t%.1f\t%.0f\t%.2f\t%.2f" % (rnd, cfg, wl, side["iops"],
      side["bw_bytes"] / 1e6, side["clat_ns"]["mean"] / 1000, cpu, cs))
EOF
  log "$(tail -1 "$results")"
}

prepare_fs() {  # DEV DIR: ext4 on DEV mounted at DIR, every block of f1 written once
  mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$1"
  mount "$1" "$2"
  fio --name=layout --directory="$2" --filename=f1 --rw=write --bs=1M --size=1G --direct=1 \
    --ioengine=libaio --iodepth=8 --output-format=terse >/dev/null
  make_iolog "$2"
}

log "RAW: loop device over a plain file (the ceiling of this path)"
truncate -s "$SIZE" "$work/raw.img"
rawloop=$(losetup -f --show --direct-io=on "$work/raw.img")
prepare_fs "$rawloop" "$rawmnt"

if [[ $BARE == 1 ]]; then
  [[ -x $bare_bin ]] ||
    { echo "fs_bench: $bare_bin missing (build the bench targets)" >&2; exit 1; }
  log "FUSE-BARE: umbra-bare-fuse (pread/pwrite to a file), loop device with direct I/O over it"
  truncate -s "$SIZE" "$work/bare.img"
  "$bare_bin" "$work/bare.img" "$work/bare" -f 2>"$work/bare.log" &
  bare_pid=$!
  for _ in $(seq 100); do [[ -e $work/bare/disk ]] && break; sleep 0.1; done
  bareloop=$(losetup -f --show --direct-io=on "$work/bare/disk")
  prepare_fs "$bareloop" "$baremnt"
fi

log "UMBRA: umbrad (origin_cache $ORIGIN_CACHE), volume attached as a loop device over its FUSE file"
echo "origin_cache = \"$ORIGIN_CACHE\"" >"$work/umbrad.toml"
"$bin/umbrad" --foreground --state-dir "$work/state" --socket "$UMBRA_SOCKET" --fuse-dir "$work/dev" \
  --config "$work/umbrad.toml" 2>"$work/umbrad.log" &
daemon_pid=$!
for _ in $(seq 100); do "$bin/umbra" daemon status >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/umbra" volume create v --size "$SIZE" >/dev/null
mkdir -p "$work/shadow"
"$bin/umbra" storage add v --on "$work/shadow" --max-size unbounded >/dev/null
dev=$("$bin/umbra" volume attach v)
prepare_fs "$dev" "$mnt"

for round in $(seq "$REPEAT"); do
  for wl in $WORKLOADS; do
    run_job "$round" RAW "$wl"
    [[ $BARE == 1 ]] && run_job "$round" FUSE-BARE "$wl"
    for n in $SNAPS; do
      "$bin/umbra" snapshot delete --all v >/dev/null
      for _ in $(seq "$n"); do
        sync
        fsfreeze -f "$mnt"
        "$bin/umbra" snapshot create v >/dev/null || { fsfreeze -u "$mnt"; exit 1; }
        fsfreeze -u "$mnt"
      done
      run_job "$round" "UMBRA-$n" "$wl"
    done
  done
done
"$bin/umbra" snapshot delete --all v >/dev/null
umount "$mnt"
"$bin/umbra" volume detach v >/dev/null
note_rss
umount "$rawmnt"
losetup -d "$rawloop"
rawloop=""
if [[ $BARE == 1 ]]; then
  umount "$baremnt"
  losetup -d "$bareloop"
  bareloop=""
fi

python3 - "$results" "$peak_rss" <<'EOF' | tee "$OUT/summary.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
raw = {(r["round"], r["workload"]): float(r["iops"]) for r in rows if r["config"] == "RAW"}
cells = {}
for r in rows:
    cells.setdefault((r["config"], r["workload"]), []).append(r)
rounds = len({r["round"] for r in rows})
print("Median of %d round(s); each ratio is taken within its round." % rounds)
print()
print("| config | workload | IOPS | MB/s | clat µs | vs RAW | ratios per round "
      "| umbrad CPU s/GiB written | umbrad context switches per I/O |")
print("|---|---|---|---|---|---|---|---|---|")
def med(rs, k):
    return statistics.median(float(x[k]) for x in rs)
for (cfg, wl), rs in cells.items():
    ratios = [float(x["iops"]) / raw[(x["round"], wl)] for x in rs if raw.get((x["round"], wl))]
    print("| %s | %s | %.0f | %.1f | %.0f | %.2f | %s | %.2f | %.2f |" % (
        cfg, wl, med(rs, "iops"), med(rs, "mbs"), med(rs, "clat_us"),
        statistics.median(ratios) if ratios else float("nan"),
        " ".join("%.2f" % x for x in ratios), med(rs, "umbrad_cpu_s_per_gib"),
        med(rs, "umbrad_cs_per_io")))
# The bars of issue 3 that compare Umbra with itself, per round: one snapshot
# against none, and sixteen against one.
iops = {(r["round"], r["config"], r["workload"]): float(r["iops"]) for r in rows}
pairs = [("UMBRA-1", "UMBRA-0"), ("UMBRA-16", "UMBRA-1")]
lines = []
for wl in dict.fromkeys(r["workload"] for r in rows):
    for num, den in pairs:
        rs = sorted({r for (r, c, w) in iops if w == wl and c == num and iops.get((r, den, wl))})
        ratios = [iops[(r, num, wl)] / iops[(r, den, wl)] for r in rs]
        if ratios:
            lines.append("| %s | %s / %s | %.2f | %s |" % (wl, num, den, statistics.median(ratios),
                         " ".join("%.2f" % x for x in ratios)))
if lines:
    print("\n| workload | ratio | median | per round |\n|---|---|---|---|")
    print("\n".join(lines))
print("\numbrad peak resident memory: %.1f MiB" % (int(sys.argv[2]) / 1024))
EOF

if [[ $PEERS == 1 ]]; then
  log "peers: ../shared/bench/peers/run.sh (nbdkit+nbdfuse, qemu-storage-daemon CBW)"
  for p in nbdkit nbdfuse qemu-system-common; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -q installed ||
      apt-get install -y --no-install-recommends nbdkit nbdfuse qemu-system-common >/dev/null
  done
  RUNTIME=$RUNTIME ../shared/bench/peers/run.sh "$OUT/peers" || log "peers run failed (see $OUT/peers)"
fi
