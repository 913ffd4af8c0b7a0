# Writer cases of tests/system/cli_test.sh (sourced by it; uses its helpers):
# the freeze/thaw sequence with a library writer (umbra-example-writer) and
# hook scripts, failures of every kind, and umbrad killed while filesystems
# are frozen. docs/writers.md is the design these check.

writer_pids=()
# Seconds since the `date +%s.%N` value $1; whether $1 < $2 (decimals).
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }
less_than() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }
# Starts umbra-example-writer NAME [args...] and waits until it is registered.
start_writer() {
  local name=$1
  shift
  rm -f "$work/$name.ready"
  "$bin/umbra-example-writer" --name "$name" --ready-file "$work/$name.ready" "$@" \
    2>>"$work/writers.log" &
  local pid=$!
  writer_pids+=("$pid")
  bg_pids+=("$pid")
  for _ in $(seq 100); do [[ -s $work/$name.ready ]] && return 0; sleep 0.1; done
  fail "writer $name did not register"
}

# Field of the JSON object `writer list` shows for writer NAME.
writer_field() {
  umbra --json writer list |
    python3 -c 'import json,sys; w=[w for w in json.load(sys.stdin)["writers"] if w["name"]==sys.argv[1]]; print(w[0][sys.argv[2]] if w else "absent")' "$1" "$2"
}

snap_count() { umbra --json snapshot list v | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["snapshots"]))'; }

# The filesystem at $1 takes a write within a few seconds (it is not frozen).
fs_writable() { timeout 5 dd if=/dev/zero of="$1/.probe" bs=4k count=1 conv=fsync status=none; }

# Writes a config with short bounds so that failure cases finish quickly.
writers_config() {  # prepare_ms window_ms
  printf 'prepare_timeout_ms = %s\nfreeze_window_ms = %s\n' "$1" "$2" >"$work/umbrad.toml"
  mkdir -p "$work/writers.d"
  daemon_extra=(--config "$work/umbrad.toml" --writers-dir "$work/writers.d")
}

# A snapshot attempt that must fail, leave no snapshot, leave the filesystem
# writable, and report `want` (a substring) in its error. Sets $elapsed (s).
expect_writer_abort() {  # description want
  local what=$1 want=$2 before out t0
  before=$(snap_count)
  t0=$(date +%s.%N)
  out=$("$bin/umbra" snapshot create v 2>&1) && fail "$what: snapshot create succeeded"
  elapsed=$(since "$t0")
  [[ $out == *"$want"* ]] || fail "$what: error '$out' does not say '$want'"
  [[ $out == *"the snapshot was not taken"* ]] || fail "$what: error '$out' does not say that nothing was taken"
  [[ $(snap_count) == "$before" ]] || fail "$what: a snapshot was left behind"
  fs_writable "$mnt" || fail "$what: the filesystem is not writable afterwards (left frozen?)"
  log "$what: refused in ${elapsed}s: $out"
}

case_writers() {
  writers_config 3000 3000
  # A hook that records its calls and checks the filesystem is not frozen yet
  # when it is asked to freeze, and is thawed already when asked to thaw.
  cat >"$work/writers.d/10-order" <<EOF
#!/bin/sh
state=writable
timeout 2 dd if=/dev/zero of="$work/mnt-v/.hookprobe" bs=4k count=1 conv=fsync status=none || state=frozen
echo "hook-\$1 \$(date +%s%N) \$state set=\$UMBRA_SNAPSHOT_SET vols=\$UMBRA_VOLUMES" >>"$work/order.log"
EOF
  # Files qemu-ga's fsfreeze-hook skips, and a non-executable one: running
  # any of them would veto every snapshot.
  for skipped in 20-veto.bak 20-veto.dpkg-old 20-veto.rpmnew 20-veto~ 20-veto.sample .20-veto; do
    printf '#!/bin/sh\nexit 1\n' >"$work/writers.d/$skipped"
    chmod +x "$work/writers.d/$skipped"
  done
  printf '#!/bin/sh\nexit 1\n' >"$work/writers.d/30-not-executable"
  chmod +x "$work/writers.d/10-order"
  start_daemon
  make_fs_volume v 256M ext4
  umbra volume create other --size 64M >/dev/null || fail "volume create other"
  start_load "$mnt"
  start_writer A --volume v --log "$work/order.log"
  start_writer B --volume other --log "$work/b.log"

  # 1. The sequence and its order.
  local out
  out=$(umbra --json snapshot create v) || fail "snapshot create with writers"
  echo "$out" >"$work/snap1.json"
  python3 - "$work/snap1.json" "$work/order.log" <<'PY' || fail "writer sequence order"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["writers"] == "consistent", r["writers"]
assert set(r["writer_names"]) == {"A", "10-order", "filesystem"}, r["writer_names"]
t = r["writer_timeline"]
ev = {}
for line in open(sys.argv[2]):
    f = line.split()
    ev.setdefault(f[0], []).append((int(f[1]), f[2:]))
def at(name): return ev[name][0][0]
order = [("prepare", at("prepare")), ("freeze (A)", at("freeze")), ("A frozen", at("freeze-done")),
         ("hook freeze", at("hook-freeze")), ("window start", t["window_start"]),
         ("filesystems frozen", t["fs_frozen"]), ("commit", t["committed"]),
         ("filesystems thawed", t["fs_thawed"]), ("hook thaw", at("hook-thaw")),
         ("thaw (A)", at("thaw")), ("window end", t["window_end"]),
         ("post_snapshot", at("post_snapshot"))]
# The window starts at the first writer freeze (A's).
assert t["window_start"] <= at("freeze"), "window starts after A's freeze"
order.remove(("window start", t["window_start"]))
for (a, ta), (b, tb) in zip(order, order[1:]):
    assert ta <= tb, f"{a} ({ta}) after {b} ({tb})"
assert ev["hook-freeze"][0][1][0] == "writable", "the filesystem was frozen before the hook's freeze"
assert ev["hook-thaw"][0][1][0] == "writable", "the filesystem was still frozen at the hook's thaw"
assert ev["hook-freeze"][0][1][1] == "set=" + r["set_id"], ev["hook-freeze"]
assert ev["hook-freeze"][0][1][2] == "vols=v", ev["hook-freeze"]
assert r["freeze_window_ms"] > 0
print("order ok:", " < ".join(n for n, _ in order), f"window {r['freeze_window_ms']:.1f} ms")
PY
  # backup-complete reaches A once the requester (that umbra) has gone.
  for _ in $(seq 50); do grep -q '^backup_complete-done ' "$work/order.log" && break; sleep 0.1; done
  grep -q '^backup_complete-done ' "$work/order.log" || fail "A got no backup_complete"
  [[ ! -s $work/b.log ]] || fail "writer B (volume 'other') was asked about volume v: $(cat "$work/b.log")"
  [[ $(writer_field A state) == stable ]] || fail "A is not stable after the sequence"
  # The snapshot records its writer status, also across a restart.
  [[ $(umbra --json snapshot list v | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshots"][-1]["writers"])') == consistent ]] ||
    fail "snapshot list does not show the writer status"
  snapshot_equals_fsck() {
    local sdev
    sdev=$(umbra snapshot attach "$1") || fail "attach"
    e2fsck -fn "$sdev" >"$work/fsck.log" 2>&1 || { umbra snapshot detach "$1"; cat "$work/fsck.log"; fail "e2fsck -fn of a snapshot taken with the filesystem frozen"; }
    umbra snapshot detach "$1" || fail "detach"
  }
  snapshot_equals_fsck "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$work/snap1.json")"

  # 2. --no-writers: nobody is asked.
  : >"$work/order.log"
  [[ $(umbra --json snapshot create v --no-writers | jq_field '["writers"]') == none ]] || fail "--no-writers status"
  [[ ! -s $work/order.log ]] || fail "--no-writers still ran writers: $(cat "$work/order.log")"

  # 3. A library writer vetoes; then the same with --writer-failure ignore.
  start_writer V --veto-at freeze
  expect_writer_abort "library writer veto" "writer 'V': vetoed by request"
  [[ $(writer_field V state) == failed ]] || fail "writer list does not show V failed"
  [[ $(writer_field V last_error) == *"vetoed by request"* ]] || fail "writer list does not show V's error"
  [[ $(writer_field A state) == stable ]] || fail "A was not told to abort"
  grep -q '^abort-done ' "$work/order.log" || fail "A got no abort after V vetoed"
  out=$(umbra --json snapshot create v --writer-failure ignore) || fail "--writer-failure ignore"
  [[ $(echo "$out" | jq_field '["writers"]') == inconsistent ]] || fail "ignored failure not recorded"
  [[ $(echo "$out" | jq_field '["writers_failed"]["V"]') == *vetoed* ]] || fail "the failed writer is not named"
  [[ $(umbra --json snapshot list v | python3 -c 'import json,sys; s=json.load(sys.stdin)["snapshots"][-1]; print(s["writers"], ",".join(s["writers_failed"]))') == "inconsistent V" ]] ||
    fail "snapshot list does not record which writers were not consistent"
  kill "${writer_pids[-1]}"

  # 4. A library writer hangs in freeze: aborted at the window's bound (3 s).
  start_writer H --hang-at freeze
  expect_writer_abort "library writer hang" "writer 'H': no answer to freeze"
  less_than "$elapsed" 8 || fail "hang: took ${elapsed}s with a 3 s bound"
  [[ $(writer_field H state) == failed ]] || fail "writer list does not show H failed"
  kill -KILL "${writer_pids[-1]}"

  # 5. A library writer crashes during freeze.
  start_writer X --crash-at freeze
  expect_writer_abort "library writer crash" "writer 'X': disconnected during freeze"
  [[ $(writer_field X state) == failed && $(writer_field X connected) == False ]] ||
    fail "writer list does not show X failed and gone"

  # 6. A hook vetoes.
  printf '#!/bin/sh\n[ "$1" = freeze ] && { echo "not now" >&2; exit 3; }\nexit 0\n' >"$work/writers.d/40-veto"
  chmod +x "$work/writers.d/40-veto"
  expect_writer_abort "hook veto" "writer '40-veto': freeze exited with status 3"
  [[ $(writer_field 40-veto state) == failed ]] || fail "writer list does not show the hook's failure"
  rm -f "$work/writers.d/40-veto"

  # 7. A hook that never exits (and leaves a child behind): killed at the bound.
  cat >"$work/writers.d/50-stuck" <<EOF
#!/bin/sh
[ "\$1" = freeze ] || exit 0
sleep 1000 &
echo \$! >"$work/stuck-child.pid"
exec sleep 1000
EOF
  chmod +x "$work/writers.d/50-stuck"
  expect_writer_abort "hook never exits" "writer '50-stuck': freeze did not finish in time"
  less_than "$elapsed" 8 || fail "stuck hook: took ${elapsed}s with a 3 s bound"
  local child gone=0
  child=$(cat "$work/stuck-child.pid")
  for _ in $(seq 20); do  # gone, or a zombie waiting for init to reap it
    [[ $(ps -o stat= -p "$child" 2>/dev/null) == Z* || -z $(ps -o stat= -p "$child" 2>/dev/null) ]] && { gone=1; break; }
    sleep 0.1
  done
  ((gone)) || { kill -KILL "$child"; fail "the stuck hook's process group was not killed"; }
  rm -f "$work/writers.d/50-stuck"

  # 8. One set in preparation per volume: a second request fails as busy.
  start_writer S --hold-ms 1500
  "$bin/umbra" snapshot create v >"$work/c1.out" 2>&1 &
  local c1=$!
  sleep 0.5
  out=$("$bin/umbra" snapshot create v 2>&1) && fail "a second snapshot of a volume in preparation was not refused"
  [[ $out == *"in preparation"* ]] || fail "busy error unclear: $out"
  wait "$c1" || fail "the first snapshot failed: $(cat "$work/c1.out")"

  # 9. The requester vanishes mid-sequence (kill -9 while S holds its
  # freeze): the sequence still ends within its bound, nothing stays frozen
  # or busy.
  "$bin/umbra" snapshot create v >/dev/null 2>&1 &
  c1=$!
  sleep 0.5
  kill -KILL "$c1"
  wait "$c1" 2>/dev/null
  sleep 2
  fs_writable "$mnt" || fail "the filesystem stayed frozen after the requester vanished"
  [[ $(writer_field S state) != frozen ]] || fail "writer S left frozen after the requester vanished"
  umbra snapshot create v >/dev/null || fail "snapshot create after a vanished requester"
  kill "${writer_pids[-1]}"

  # 10. Library writers reconnect after umbrad restarts; the failed ones that
  # are gone are not listed any more, and the snapshot keeps its status.
  stop_load
  umount "$mnt" || fail "umount"
  stop_daemon
  start_daemon
  for _ in $(seq 100); do [[ $(writer_field A connected) == True ]] && break; sleep 0.1; done
  [[ $(writer_field A connected) == True ]] || fail "writer A did not reconnect after the restart"
  [[ $(writer_field X state) == absent ]] || fail "a writer of the previous umbrad is listed"
  umbra writer list || fail "writer list"
  log "PASS"
}

case_writers_kill9() {
  # Filesystems stay frozen 30 s before each commit (test knob) with a 4 s
  # window: the thaw guard must thaw them at the bound without umbrad, and
  # at once when umbrad is killed.
  writers_config 3000 4000
  export UMBRAD_TEST_FROZEN_DELAY_MS=30000
  start_daemon
  make_fs_volume v 256M ext4

  # a) The bound passes: the guard thaws while umbrad still waits.
  "$bin/umbra" snapshot create v >"$work/c.out" 2>&1 &
  local c=$! t0
  for _ in $(seq 50); do pgrep -f -- "--thaw-guard .*$mnt" >/dev/null && break; sleep 0.1; done
  pgrep -f -- "--thaw-guard .*$mnt" >/dev/null || fail "no thaw guard process"
  sleep 0.5
  t0=$(date +%s.%N)
  timeout 20 dd if=/dev/zero of="$mnt/blocked" bs=4k count=1 conv=fsync status=none ||
    fail "a write stayed blocked past the freeze window"
  log "a write blocked by the freeze finished $(since "$t0")s later (window 4 s)"
  grep -q "thaw guard: the freeze window ended: thawed $mnt" "$work/umbrad.log" || fail "the guard did not log its thaw"
  wait "$c" && fail "a snapshot committed after the window's bound"
  grep -q "freeze window" "$work/c.out" || fail "the bound's error is unclear: $(cat "$work/c.out")"
  [[ $(snap_count) == 0 ]] || fail "a snapshot was left"

  # b) umbrad is killed -9 while the filesystem is frozen. (The file is
  # written first so that the blocked write needs no read from the device,
  # which dies with umbrad.)
  dd if=/dev/zero of="$mnt/during" bs=4k count=1 conv=fsync status=none || fail "write"
  "$bin/umbra" snapshot create v >/dev/null 2>&1 &
  c=$!
  for _ in $(seq 50); do pgrep -f -- "--thaw-guard .*$mnt" >/dev/null && break; sleep 0.1; done
  sleep 0.5
  fsfreeze -f "$mnt" 2>/dev/null && { fsfreeze -u "$mnt"; fail "the filesystem was not frozen by umbrad"; }
  ( dd if=/dev/urandom of="$mnt/during" bs=4k count=1 conv=notrunc status=none && date +%s.%N >"$work/write-done" ) &
  local w=$!
  sleep 0.3
  [[ -e $work/write-done ]] && fail "a write went through a frozen filesystem"
  t0=$(date +%s.%N)
  kill -KILL "$daemon_pid"
  wait "$daemon_pid" 2>/dev/null
  daemon_pid=""
  for _ in $(seq 30); do [[ -e $work/write-done ]] && break; sleep 0.1; done
  [[ -e $work/write-done ]] || fail "writes did not resume after umbrad was killed (filesystem left frozen)"
  log "writes resumed $(awk -v a="$t0" -v b="$(cat "$work/write-done")" 'BEGIN { printf "%.2f", b - a }')s after kill -9 (the window had ~3 s left)"
  wait "$w" || fail "the write that waited for the thaw failed"
  wait "$c" 2>/dev/null
  grep -q "thaw guard: umbrad went away while filesystems were frozen: thawed $mnt" "$work/umbrad.log" ||
    fail "the guard did not log its thaw after the kill"
  pgrep -f -- "--thaw-guard" >/dev/null && fail "the thaw guard is still running"
  umount -l "$mnt" 2>/dev/null
  unset UMBRAD_TEST_FROZEN_DELAY_MS
  start_daemon
  umbra volume list >/dev/null || fail "umbrad did not come back after the kill"
  log "PASS"
}
