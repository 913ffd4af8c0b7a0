#!/usr/bin/env bash
# Freeze window of snapshot create under pgbench (issue 4's benchmark): the
# time from the first freeze to the last thaw, as umbrad measures it
# ("freeze_window_ms" in `umbra --json snapshot create`), p50/p99 over N
# snapshots of a volume holding a PostgreSQL cluster under pgbench load:
#   (a) the filesystem writer alone (an empty hook directory): FIFREEZE, the
#       snapshot, FITHAW;
#   (b) examples/writers/postgresql (CHECKPOINT, LOCK TABLE ... IN SHARE MODE
#       held until thaw) and then the filesystem writer.
# Each snapshot is deleted right after it is taken. pgbench runs through both
# phases; its mean tps during each phase is reported too.
#
#   bench/writers_bench.sh [OUT_DIR]   (root; N=50 SCALE=5 CLIENTS=4 INTERVAL=0.5 SIZE=2G)
#   PG_BINDIR=/usr/lib/postgresql/15/bin  (default: the newest installed)
#
# Target (docs/writers.md): p99 < 200 ms for the filesystem writer alone.
# p99 is the nearest rank: with N=50 that is the largest sample.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
OUT=${1:-/var/tmp/umbra-writers-bench}
N=${N:-50}
SCALE=${SCALE:-5}
CLIENTS=${CLIENTS:-4}
INTERVAL=${INTERVAL:-0.5}
SIZE=${SIZE:-2G}
bin=${UMBRA_BIN:-build/release/src}
# shellcheck disable=SC2012 # /usr/lib/postgresql/VERSION/bin
pgbin=${PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[[ $(id -u) -eq 0 ]] || { echo "writers_bench: needs root" >&2; exit 1; }
for t in initdb pg_ctl pgbench psql; do
  [[ -x $pgbin/$t ]] || { echo "writers_bench: PostgreSQL's $t not found (PG_BINDIR=$pgbin)" >&2; exit 1; }
done
id postgres >/dev/null 2>&1 || { echo "writers_bench: no postgres user" >&2; exit 1; }
[[ -x $bin/umbrad && -x $bin/umbra ]] || { echo "writers_bench: $bin/umbrad or $bin/umbra missing" >&2; exit 1; }
"$bin/umbrad" --help 2>&1 | grep -q -- --writers-dir || { echo "writers_bench: this umbrad has no --writers-dir" >&2; exit 1; }
mkdir -p "$OUT"
work=$(mktemp -d /var/tmp/umbra-writers-bench.XXXXXX)
chmod 755 "$work"  # the postgres user reaches its socket and data under it
export UMBRA_SOCKET=$work/umbrad.sock
mnt=$work/mnt
mkdir -p "$mnt" "$work/writers.d" "$work/hooks"
install -d -o postgres -g postgres "$work/pgsock"
port=$((30000 + RANDOM % 20000))
daemon_pid=""
load_pid=""
hook=""

cleanup() {
  set +e
  [[ -n $load_pid ]] && kill -TERM "$load_pid" 2>/dev/null && wait "$load_pid" 2>/dev/null
  [[ -n $hook ]] && timeout 20 "$hook" thaw >/dev/null 2>&1
  [[ -f $mnt/pgdata/postmaster.pid ]] &&
    runuser -u postgres -- "$pgbin/pg_ctl" -D "$mnt/pgdata" -m immediate -w -t 30 stop >/dev/null 2>&1
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
as_pg() { runuser -u postgres -- "$@"; }
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2]))' "$1" "$2"; }

# umbrad with a hook directory that starts empty (phase a) and gets the
# PostgreSQL hook for phase b: umbrad reads the directory at every snapshot.
"$bin/umbrad" --foreground --state-dir "$work/state" --socket "$UMBRA_SOCKET" \
  --fuse-dir "$work/dev" --writers-dir "$work/writers.d" 2>>"$work/umbrad.log" &
daemon_pid=$!
for _ in $(seq 100); do umbra daemon status >/dev/null 2>&1 && break; sleep 0.1; done
umbra volume create bench --size "$SIZE" >/dev/null
dev=$(umbra volume attach bench)
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$dev"
mount "$dev" "$mnt"
chmod 755 "$mnt"
install -d -o postgres -g postgres -m 700 "$mnt/pgdata"
install -o postgres -g postgres -m 644 /dev/null "$work/pg.log"

log "PostgreSQL on the volume: initdb, pgbench -i -s $SCALE"
as_pg "$pgbin/initdb" -D "$mnt/pgdata" --auth-local=peer --auth-host=reject -U postgres >/dev/null
cat >>"$mnt/pgdata/postgresql.conf" <<EOF
listen_addresses = ''
port = $port
unix_socket_directories = '$work/pgsock'
shared_buffers = 128MB
max_wal_size = 1GB
EOF
as_pg "$pgbin/pg_ctl" -D "$mnt/pgdata" -l "$work/pg.log" -w -t 60 start >/dev/null
as_pg "$pgbin/pgbench" -h "$work/pgsock" -p "$port" -i -s "$SCALE" -q postgres >/dev/null 2>&1
as_pg "$pgbin/psql" -X -q -h "$work/pgsock" -p "$port" -d postgres -c CHECKPOINT

# The hook, configured for this server (the wrapper is installed for phase b).
cp "$src/examples/writers/postgresql" "$work/hooks/postgresql"
cat >"$work/pg-writer.conf" <<EOF
PGHOST=$work/pgsock
PGPORT=$port
PGDATABASE=postgres
UMBRA_PG_OS_USER=postgres
UMBRA_PG_BINDIR=$pgbin
UMBRA_PG_STATE_DIR=$work/pg-writer-state
UMBRA_PG_LOCK_TABLES="pgbench_accounts pgbench_tellers pgbench_branches pgbench_history"
EOF
printf '#!/bin/sh\nUMBRA_PG_WRITER_CONF=%s exec %s "$@"\n' "$work/pg-writer.conf" "$work/hooks/postgresql" >"$work/hooks/50-postgresql"
chmod 755 "$work/hooks/postgresql" "$work/hooks/50-postgresql"

as_pg "$pgbin/pgbench" -h "$work/pgsock" -p "$port" -c "$CLIENTS" -j 2 -T 86400 -P 1 --progress-timestamp \
  postgres >"$work/pgbench.out" 2>"$work/pgbench.progress" &
load_pid=$!
sleep 5

phase() {  # name -> $work/NAME.tsv: epoch_start epoch_end window_ms writers
  local name=$1 i out id t0 t1
  : >"$work/$name.tsv"
  log "phase $name: $N snapshots, $INTERVAL s apart"
  for ((i = 1; i <= N; i++)); do
    kill -0 "$load_pid" 2>/dev/null || { tail -3 "$work/pgbench.progress" >&2; log "pgbench stopped"; exit 1; }
    t0=$(date +%s.%N)
    out=$(umbra --json snapshot create bench) || { log "snapshot create failed: $out"; tail -5 "$work/umbrad.log" >&2; exit 1; }
    t1=$(date +%s.%N)
    id=$(field "$out" id)
    printf '%s\t%s\t%s\t%s\n' "$t0" "$t1" "$(field "$out" freeze_window_ms)" "$(field "$out" writers)" >>"$work/$name.tsv"
    umbra snapshot delete "$id" >/dev/null
    sleep "$INTERVAL"
  done
}
phase fs
mv "$work/hooks/50-postgresql" "$work/writers.d/"
hook=$work/writers.d/50-postgresql
phase pg
kill -TERM "$load_pid" 2>/dev/null
wait "$load_pid" 2>/dev/null || true
load_pid=""
hook_ms=$(grep -o 'lock held after [0-9]* ms' "$work/umbrad.log" | awk '{print $4}' | tr '\n' ' ')

python3 - "$work/fs.tsv" "$work/pg.tsv" "$work/pgbench.progress" "$OUT/writers.md" "$hook_ms" <<'PY'
import math, re, statistics, sys
fs_tsv, pg_tsv, progress, out, hook_ms = sys.argv[1:6]

def rows(path):
    return [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]

# pgbench --progress-timestamp lines: "progress: EPOCH s, TPS tps, lat ..."
prog = []
for line in open(progress):
    m = re.match(r"progress: ([0-9.]+) s, ([0-9.]+) tps", line)
    if m:
        prog.append((float(m.group(1)), float(m.group(2))))

def pct(xs, p):  # nearest rank
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]

def summary(name, path):
    r = rows(path)
    w = [float(x[2]) for x in r]
    bad = sum(1 for x in r if x[3] != "consistent")
    start, end = float(r[0][0]), float(r[-1][1])
    tps = [t for ts, t in prog if start <= ts <= end]
    return (f"| {name} | {len(w)} | {pct(w, 50):.1f} | {pct(w, 99):.1f} | {max(w):.1f} | "
            f"{statistics.mean(w):.1f} | {bad} | {statistics.mean(tps) if tps else float('nan'):.0f} |")

before = [t for ts, t in prog][:4]
hooks = [int(x) for x in hook_ms.split()]
lines = [
    "| writers | snapshots | p50 ms | p99 ms | max ms | mean ms | not consistent | pgbench tps |",
    "|---|---|---|---|---|---|---|---|",
    summary("filesystem only", fs_tsv),
    summary("PostgreSQL hook + filesystem", pg_tsv),
    "",
    "freeze window = first freeze to last thaw (umbrad's freeze_window_ms); p99 is the nearest rank"
    + (f"; PostgreSQL hook's own freeze (CHECKPOINT + lock) p50 {pct(hooks, 50)} ms, max {max(hooks)} ms" if hooks else ""),
    f"pgbench tps before the first snapshot: {statistics.mean(before):.0f}" if before else "",
]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
log "results in $OUT/writers.md"
