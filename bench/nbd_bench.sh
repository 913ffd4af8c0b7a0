#!/usr/bin/env bash
# Read throughput of a snapshot over NBD: `nbdcopy` from umbrad's snapshot
# export to null: and to a file, against `nbdkit file` serving a copy of the
# same bytes, in the same run. Median of REPEAT runs each, caches dropped
# before every run.
#
#   bench/nbd_bench.sh [OUT_DIR]      (root; SIZE=2G REPEAT=3; needs nbdkit, libnbd-bin)
#
# The volume: SIZE bytes, the first half random data, the second half never
# written. nbdkit serves a sparse copy made with nbdcopy, so both servers
# report the same holes (nbdkit from SEEK_HOLE on the copy, umbrad from the
# engine's free map) and both clients read the same 50% of data.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/var/tmp/umbra-nbd-bench}
SIZE=${SIZE:-2G}
REPEAT=${REPEAT:-3}
bin=${UMBRA_BIN:-build/release/src}
[[ $(id -u) -eq 0 ]] || { echo "nbd_bench: needs root" >&2; exit 1; }
for t in nbdcopy nbdkit; do
  command -v $t >/dev/null || { echo "nbd_bench: $t missing (apt-get install libnbd-bin nbdkit)" >&2; exit 1; }
done
mkdir -p "$OUT"
work=$(mktemp -d /var/tmp/umbra-nbd-bench.XXXXXX)
export UMBRA_SOCKET=$work/umbrad.sock
daemon_pid="" nbdkit_pid=""
cleanup() {
  set +e
  [[ -n $nbdkit_pid ]] && kill "$nbdkit_pid" && wait "$nbdkit_pid"
  if [[ -n $daemon_pid ]]; then
    "$bin/umbra" volume detach v >/dev/null 2>&1
    kill -TERM "$daemon_pid"; wait "$daemon_pid"
  fi
  mountpoint -q "$work/dev" && umount -l "$work/dev"
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
log() { echo "[$(date +%T)] $*" >&2; }

"$bin/umbrad" --foreground --state-dir "$work/state" --socket "$UMBRA_SOCKET" --fuse-dir "$work/dev" \
  2>"$work/umbrad.log" &
daemon_pid=$!
for _ in $(seq 100); do "$bin/umbra" daemon status >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/umbra" volume create v --size "$SIZE" >/dev/null
dev=$("$bin/umbra" volume attach v)
bytes=$(blockdev --getsize64 "$dev")
mib=$((bytes >> 20))
log "filling $dev: $((mib / 2)) MiB random, the rest never written"
dd if=/dev/urandom of="$dev" bs=1M count=$((mib / 2)) oflag=direct status=none
"$bin/umbra" volume detach v >/dev/null
id=$("$bin/umbra" --json snapshot create v | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
umbra_uri=$("$bin/umbra" snapshot export "$id")
nbdcopy "$umbra_uri" "$work/copy.img"
nbdkit -f -U "$work/nbdkit.sock" file "$work/copy.img" &
nbdkit_pid=$!
for _ in $(seq 100); do [[ -S $work/nbdkit.sock ]] && break; sleep 0.1; done
nbdkit_uri="nbd+unix:///?socket=$work/nbdkit.sock"

results=$OUT/results.tsv
echo -e "server\ttarget\trun\tseconds\tMiB_per_s" >"$results"
measure() {  # server uri target run
  local dst=$3
  [[ $dst == file ]] && dst=$work/out.img && rm -f "$dst"
  [[ $dst == null ]] && dst=null:
  sync
  echo 3 >/proc/sys/vm/drop_caches
  local t0 t1
  t0=$(date +%s.%N)
  nbdcopy "$2" "$dst"
  [[ $3 == file ]] && sync
  t1=$(date +%s.%N)
  python3 -c "import sys; s=$t1-$t0; print('%s\t%s\t%s\t%.3f\t%.1f' % ('$1', '$3', $4, s, $mib / s))" >>"$results"
  log "$(tail -1 "$results")"
}
for run in $(seq "$REPEAT"); do
  for target in null file; do
    measure umbra "$umbra_uri" "$target" "$run"
    measure nbdkit "$nbdkit_uri" "$target" "$run"
  done
done
cmp "$work/out.img" "$work/copy.img" || { echo "nbd_bench: copies differ" >&2; exit 1; }

python3 - "$results" <<'EOF' | tee "$OUT/summary.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = {}
for r in rows:
    med.setdefault((r["server"], r["target"]), []).append(float(r["MiB_per_s"]))
print("| target | umbrad snapshot export MiB/s | nbdkit file MiB/s | umbrad / nbdkit |")
print("|---|---|---|---|")
for t in ("null", "file"):
    u = statistics.median(med[("umbra", t)])
    n = statistics.median(med[("nbdkit", t)])
    print("| %s | %.0f | %.0f | %.2f |" % (t, u, n, u / n))
EOF
