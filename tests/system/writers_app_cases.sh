# Application writers end to end (docs/writers.md, issue 4): PostgreSQL under
# pgbench and SQLite in WAL mode, quiesced by the shipped hook scripts
# (examples/writers/) while umbrad takes the snapshot.
#
# Sourced by tests/system/cli_test.sh, after its helpers (start_daemon,
# make_fs_volume, fail, log, umbra) and variables (work, bin, daemon_extra,
# bg_pids, mounts) are defined. Defines case_writer_postgresql and
# case_writer_sqlite, and writers_app_cleanup, which stops what they start
# (database servers, loads, held hook sessions); cli_test.sh's cleanup calls
# it first, before it unmounts the volume.
#
# Exit 77 (skipped) when PostgreSQL or sqlite3 is not installed.
# shellcheck shell=bash
# shellcheck disable=SC2154,SC2034 # work, bin, mnt, snap, daemon_extra...: cli_test.sh's

writers_src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
writers_pg_datadirs=()  # data directories of the servers started here
writers_pg_bin=""
writers_hooks=()        # hook wrappers to "thaw" in cleanup

# Stops everything the writer cases started. Safe to call more than once and
# when nothing was started.
writers_app_cleanup() {
  local d pid h
  for pid in "${bg_pids[@]}"; do kill "$pid" 2>/dev/null; done
  # A hook session still holding its lock (a case failed between freeze and thaw).
  for h in "${writers_hooks[@]}"; do timeout 20 "$h" thaw >/dev/null 2>&1; done
  for d in "${writers_pg_datadirs[@]}"; do
    [[ -f $d/postmaster.pid ]] || continue
    runuser -u postgres -- "$writers_pg_bin/pg_ctl" -D "$d" -m immediate -w -t 30 stop >/dev/null 2>&1 && continue
    pid=$(head -1 "$d/postmaster.pid" 2>/dev/null)
    [[ $pid =~ ^[0-9]+$ ]] && kill -KILL "$pid" 2>/dev/null
  done
  writers_pg_datadirs=()
  writers_hooks=()
  return 0
}

# A writers.d with one hook: a wrapper that runs a copy of the shipped script
# with a configuration file (umbrad passes its environment on, qemu-ga does
# not: the file is what works everywhere).
writers_hook_dir() {  # script conf-file -> sets hook (the wrapper's path)
  local script=$1 conf=$2 var
  mkdir -p "$work/writers.d" "$work/hooks"
  cp "$writers_src/examples/writers/$script" "$work/hooks/$script" || fail "copy examples/writers/$script"
  chmod 755 "$work/hooks/$script"
  case $script in
    postgresql) var=UMBRA_PG_WRITER_CONF ;;
    sqlite) var=UMBRA_SQLITE_WRITER_CONF ;;
  esac
  hook=$work/writers.d/50-$script
  printf '#!/bin/sh\n%s=%s exec %s "$@"\n' "$var" "$conf" "$work/hooks/$script" >"$hook"
  chmod 755 "$hook"
  writers_hooks+=("$hook")
}

# The value of a top-level key of a JSON document.
writers_json() {  # json key
  python3 -c 'import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print(json.dumps(v) if isinstance(v,(dict,list)) else v)' "$1" "$2"
}

# snapshot create with the writers; checks the answer and the hook's own log
# lines (its stderr goes to umbrad.log). Sets snap.
writers_snapshot() {  # volume hook-log-name
  local vol=$1 name=$2 out writers window
  out=$(umbra --json snapshot create "$vol") || fail "snapshot create with the $name writer: $out"
  snap=$(writers_json "$out" id)
  writers=$(writers_json "$out" writers)
  window=$(writers_json "$out" freeze_window_ms)
  [[ -n $snap && $snap != None ]] || fail "snapshot create printed no id: $out"
  [[ $writers == consistent ]] || fail "snapshot create: writers '$writers', expected consistent: $out"
  [[ $window =~ ^[0-9]+(\.[0-9]+)?$ ]] || fail "freeze_window_ms is not a number: $out"
  python3 -c 'import json,sys; n=json.loads(sys.argv[1]).get("writer_names"); sys.exit(0 if n is None or any(x.endswith(sys.argv[2]) for x in n) else 1)' \
    "$out" "-$name" || fail "the hook 50-$name is not among the writers: $out"
  grep -q "$name-writer\[freeze\]: lock held" "$work/umbrad.log" || fail "the $name hook did not report holding its lock (umbrad.log)"
  grep -q "$name-writer\[thaw\]: lock released" "$work/umbrad.log" || fail "the $name hook did not release its lock cleanly (umbrad.log)"
  log "ok: snapshot $snap writers=$writers freeze_window_ms=$window ($name hook: $(grep -o "lock held after [0-9]* ms" "$work/umbrad.log" | tail -1))"
}

as_pg() { runuser -u postgres -- "$@"; }
pg_sql() {  # port sql
  as_pg "$writers_pg_bin/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$work/pgsock" -p "$1" -d postgres -c "$2"
}

case_writer_postgresql() {
  # shellcheck disable=SC2012 # /usr/lib/postgresql/VERSION/bin
  writers_pg_bin=${PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
  for t in initdb pg_ctl pgbench pg_amcheck psql; do
    [[ -x $writers_pg_bin/$t ]] || { echo "SKIP: PostgreSQL's $t not found (PG_BINDIR=$writers_pg_bin)"; exit 77; }
  done
  id postgres >/dev/null 2>&1 || { echo "SKIP: no postgres user"; exit 77; }
  local port=$((30000 + RANDOM % 20000))
  local port2=$((port + 1))
  # mktemp -d made $work 0700: the postgres user must reach its socket and data.
  chmod 755 "$work"
  mkdir -p "$work/pgsock"
  chown postgres: "$work/pgsock"
  cat >"$work/pg-writer.conf" <<EOF
PGHOST=$work/pgsock
PGPORT=$port
PGDATABASE=postgres
UMBRA_PG_OS_USER=postgres
UMBRA_PG_BINDIR=$writers_pg_bin
UMBRA_PG_STATE_DIR=$work/pg-writer-state
UMBRA_PG_LOCK_TABLES="pgbench_accounts pgbench_tellers pgbench_branches pgbench_history"
UMBRA_PG_RECORD=$work/pg-record
UMBRA_PG_RECORD_QUERY="SELECT count(*) FROM pgbench_history"
EOF
  writers_hook_dir postgresql "$work/pg-writer.conf"
  daemon_extra=(--writers-dir "$work/writers.d")
  start_daemon
  make_fs_volume v 1G ext4
  chmod 755 "$mnt"
  install -d -o postgres -g postgres -m 700 "$mnt/pgdata"
  install -o postgres -g postgres -m 644 /dev/null "$work/pg1.log"
  install -o postgres -g postgres -m 644 /dev/null "$work/pg2.log"

  # The server under test: data directory on the Umbra volume.
  as_pg "$writers_pg_bin/initdb" -D "$mnt/pgdata" --auth-local=peer --auth-host=reject -U postgres >"$work/initdb.log" 2>&1 ||
    { tail "$work/initdb.log"; fail "initdb"; }
  cat >>"$mnt/pgdata/postgresql.conf" <<EOF
listen_addresses = ''
port = $port
unix_socket_directories = '$work/pgsock'
shared_buffers = 64MB
max_wal_size = 512MB
EOF
  writers_pg_datadirs+=("$mnt/pgdata")
  as_pg "$writers_pg_bin/pg_ctl" -D "$mnt/pgdata" -l "$work/pg1.log" -w -t 60 start >/dev/null ||
    { tail "$work/pg1.log"; fail "PostgreSQL did not start on the volume"; }
  as_pg "$writers_pg_bin/pgbench" -h "$work/pgsock" -p "$port" -i -s 5 -q postgres >"$work/pgbench-init.log" 2>&1 ||
    { tail "$work/pgbench-init.log"; fail "pgbench -i"; }
  pg_sql "$port" CHECKPOINT || fail "CHECKPOINT"

  # Load, then a snapshot in the middle of it.
  as_pg "$writers_pg_bin/pgbench" -h "$work/pgsock" -p "$port" -c 4 -j 2 -T 120 postgres >"$work/pgbench.log" 2>&1 &
  local load=$!
  bg_pids+=("$load")
  sleep 4
  kill -0 "$load" 2>/dev/null || { tail "$work/pgbench.log"; fail "pgbench stopped early"; }
  local before
  before=$(pg_sql "$port" "SELECT count(*) FROM pgbench_history") || fail "count before the snapshot"
  ((before > 0)) || fail "pgbench wrote nothing in 4 s"
  writers_snapshot v postgresql
  local recorded
  recorded=$(cat "$work/pg-record" 2>/dev/null)
  [[ $recorded =~ ^[0-9]+$ ]] || fail "the hook recorded no row count under its lock: '$recorded'"
  ((recorded >= before)) || fail "recorded count $recorded < $before counted before the snapshot"
  sleep 2
  local after
  after=$(pg_sql "$port" "SELECT count(*) FROM pgbench_history") || fail "count after the snapshot"
  ((after > recorded)) || fail "pgbench did not resume after thaw ($after rows, $recorded at the freeze)"
  kill -TERM "$load" 2>/dev/null
  wait "$load" 2>/dev/null
  log "ok: pgbench ran through the snapshot: $before rows before, $recorded under the lock, $after after"

  # A copy of the snapshot's data directory, started as a second server.
  mkdir -p "$work/snapview"
  umbra snapshot mount "$snap" "$work/snapview" || fail "snapshot mount"
  cp -a "$work/snapview/pgdata" "$work/pgcopy" || { umbra snapshot unmount "$work/snapview"; fail "copy of the snapshot's data directory"; }
  umbra snapshot unmount "$work/snapview" || fail "snapshot unmount"
  chown -R postgres: "$work/pgcopy"
  chmod 700 "$work/pgcopy"
  rm -f "$work/pgcopy/postmaster.pid"
  writers_pg_datadirs+=("$work/pgcopy")
  as_pg "$writers_pg_bin/pg_ctl" -D "$work/pgcopy" -l "$work/pg2.log" -o "-p $port2" -w -t 120 start >/dev/null ||
    { tail "$work/pg2.log"; fail "PostgreSQL did not start on the copy of the snapshot"; }
  grep -q "database system is ready to accept connections" "$work/pg2.log" ||
    { tail "$work/pg2.log"; fail "the copy's server is not ready"; }
  log "ok: server on the copy started ($(grep -c 'redo done\|automatic recovery' "$work/pg2.log") recovery line(s) in its log)"

  as_pg "$writers_pg_bin/pg_amcheck" -h "$work/pgsock" -p "$port2" --all --install-missing \
    --heapallindexed --parent-check >"$work/amcheck.log" 2>&1 || { head -30 "$work/amcheck.log"; fail "pg_amcheck found corruption in the copy"; }
  local copy_count sums a t b h
  copy_count=$(pg_sql "$port2" "SELECT count(*) FROM pgbench_history") || fail "count on the copy"
  [[ $copy_count == "$recorded" ]] ||
    fail "pgbench_history has $copy_count rows in the snapshot, $recorded were counted under the hook's lock"
  # Every pgbench transaction adds the same delta to one account, teller and
  # branch and records it in history: the four sums stay equal.
  sums=$(pg_sql "$port2" "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers),
                                 (SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)") ||
    fail "balance sums on the copy"
  IFS='|' read -r a t b h <<<"$sums"
  [[ $a == "$t" && $t == "$b" && $b == "$h" ]] || fail "balances disagree in the copy: accounts $a, tellers $t, branches $b, history $h"
  log "ok: copy: pg_amcheck clean, $copy_count history rows as recorded, balances $a on accounts, tellers, branches and history"
  writers_app_cleanup
  log "PASS"
}

case_writer_sqlite() {
  command -v sqlite3 >/dev/null || { echo "SKIP: sqlite3 not installed"; exit 77; }
  mnt=$work/mnt-v  # make_fs_volume mounts here; the hook's configuration needs it first
  cat >"$work/sqlite-writer.conf" <<EOF
UMBRA_SQLITE_DBS=$mnt/app/app.db
UMBRA_SQLITE_STATE_DIR=$work/sqlite-writer-state
UMBRA_SQLITE_RECORD=$work/sqlite-record
UMBRA_SQLITE_RECORD_QUERY="SELECT n, (SELECT count(*) FROM items) FROM counter"
EOF
  writers_hook_dir sqlite "$work/sqlite-writer.conf"
  daemon_extra=(--writers-dir "$work/writers.d")
  start_daemon
  make_fs_volume v 256M ext4
  mkdir -p "$mnt/app"
  local db=$mnt/app/app.db
  [[ $(sqlite3 "$db" 'PRAGMA journal_mode=WAL;') == wal ]] || fail "WAL mode"
  sqlite3 "$db" 'CREATE TABLE items(id INTEGER PRIMARY KEY, v BLOB NOT NULL);
                 CREATE TABLE counter(n INTEGER NOT NULL); INSERT INTO counter VALUES (0);' || fail "schema"
  # The load: one process, transactions that each insert 3 rows and add 3 to
  # the counter (the invariant: counter.n == count(items)), 1 ms apart (a
  # writer with no pause at all starves any other SQLite writer: the lock is
  # polled, not queued). A busy error (a lock held longer than the 30 s busy
  # timeout) stops it, which the case notices.
  cat >"$work/sqlite-load.py" <<'EOF'
import signal, sqlite3, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
con = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
while True:
    con.execute("BEGIN IMMEDIATE")
    con.executemany("INSERT INTO items(v) VALUES (randomblob(300))", [()] * 3)
    con.execute("UPDATE counter SET n = n + 3")
    con.execute("COMMIT")
    time.sleep(0.001)
EOF
  python3 "$work/sqlite-load.py" "$db" 2>"$work/sqlite-load.log" &
  local load=$!
  bg_pids+=("$load")
  sleep 3
  kill -0 "$load" 2>/dev/null || fail "the SQLite load stopped: $(cat "$work/sqlite-load.log")"
  writers_snapshot v sqlite
  local recorded
  recorded=$(cat "$work/sqlite-record" 2>/dev/null)
  [[ $recorded =~ ^([0-9]+)\|([0-9]+)$ && ${BASH_REMATCH[1]} == "${BASH_REMATCH[2]}" && $recorded != "0|0" ]] ||
    fail "the hook recorded '$recorded' under its lock (expected N|N, N > 0)"
  sleep 2
  kill -0 "$load" 2>/dev/null || fail "the SQLite load stopped: $(cat "$work/sqlite-load.log")"
  local now
  now=$(sqlite3 "$db" '.timeout 30000' 'SELECT n FROM counter') || fail "read the live counter"
  ((now > ${recorded%%|*})) || fail "the load did not resume after thaw ($now, ${recorded%%|*} at the freeze)"
  kill -TERM "$load" 2>/dev/null
  wait "$load" 2>/dev/null
  [[ -s $work/sqlite-load.log ]] && fail "the SQLite load saw errors: $(tail -3 "$work/sqlite-load.log")"
  log "ok: load ran through the snapshot: counter ${recorded%%|*} under the lock, $now after"

  # The snapshot's database (and its WAL; not -shm) copied out and opened.
  mkdir -p "$work/snapview" "$work/sqlcopy"
  umbra snapshot mount "$snap" "$work/snapview" || fail "snapshot mount"
  local f
  for f in app.db app.db-wal; do
    [[ -e $work/snapview/app/$f ]] && { cp "$work/snapview/app/$f" "$work/sqlcopy/" || { umbra snapshot unmount "$work/snapview"; fail "copy $f"; }; }
  done
  umbra snapshot unmount "$work/snapview" || fail "snapshot unmount"
  local check counts
  check=$(sqlite3 "$work/sqlcopy/app.db" 'PRAGMA integrity_check;') || fail "open the copy"
  [[ $check == ok ]] || fail "integrity_check of the copy: $check"
  counts=$(sqlite3 "$work/sqlcopy/app.db" 'SELECT n, (SELECT count(*) FROM items) FROM counter;') || fail "read the copy"
  [[ $counts == "$recorded" ]] || fail "the copy has counter|rows $counts, the hook recorded $recorded under its lock"
  log "ok: copy: integrity_check ok, counter and rows $counts as recorded"
  writers_app_cleanup
  log "PASS"
}
