#!/usr/bin/env bash
# End-to-end tests of umbrad + umbra with real filesystems on real loop devices.
#
#   tests/system/cli_test.sh BUILD_DIR CASE
#
# CASE: pit_ext4 | pit_xfs | many | cap | kill9 | revert | bad_input | nbd_snapshot | nbd_live | image
#       | writers | writers_kill9 (tests/system/writers_cases.sh)
#       | writer_postgresql | writer_sqlite (tests/system/writers_app_cases.sh)
# Each case starts its own umbrad in a fresh /var/tmp directory and removes
# everything (mounts, loop devices, daemon, files) on exit, pass or fail.
# Exit 0 pass, 1 fail, 77 skipped (not root / no FUSE / no loop).
set -uo pipefail

build=$1
case_name=$2
bin=$build/src
[[ $(id -u) -eq 0 ]] || { echo "SKIP: needs root"; exit 77; }
[[ -e /dev/fuse && -e /dev/loop-control ]] || { echo "SKIP: needs /dev/fuse and loop devices"; exit 77; }
[[ -x $bin/umbrad && -x $bin/umbra ]] || { echo "FAIL: $bin/umbrad or $bin/umbra missing"; exit 1; }

work=$(mktemp -d /var/tmp/umbra-cli-test.XXXXXX)
export UMBRA_SOCKET=$work/umbrad.sock
daemon_pid=""
daemon_extra=()
bg_pids=()
mounts=()

log() { printf '[%s] %s\n' "$case_name" "$*"; }
fail() { log "FAIL: $*"; [[ -f $work/umbrad.log ]] && tail -20 "$work/umbrad.log"; exit 1; }
umbra() { "$bin/umbra" "$@"; }

start_daemon() {
  "$bin/umbrad" --foreground --state-dir "$work/state" --socket "$UMBRA_SOCKET" \
    --fuse-dir "$work/dev" "${daemon_extra[@]}" 2>>"$work/umbrad.log" &
  daemon_pid=$!
  for _ in $(seq 100); do
    umbra daemon status >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "umbrad did not start"
}

stop_daemon() {
  [[ -z $daemon_pid ]] && return
  kill -TERM "$daemon_pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$daemon_pid" 2>/dev/null
  wait "$daemon_pid" 2>/dev/null
  daemon_pid=""
}

cleanup() {
  set +e
  declare -F writers_app_cleanup >/dev/null && writers_app_cleanup
  for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  for m in "${mounts[@]}"; do fsfreeze -u "$m" 2>/dev/null; done
  # Unmount our filesystems (not umbrad's FUSE export: it still serves the
  # loop devices under them), deepest first; then stop umbrad.
  for m in $(awk -v w="$work" -v d="$work/dev" '$2 ~ "^"w && $2 != d {print $2}' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
  stop_daemon
  for m in $(awk -v w="$work" '$2 ~ "^"w {print $2}' /proc/mounts | sort -r); do umount -l "$m"; done
  # Loop devices whose backing file was under the work dir.
  for l in $(losetup -a 2>/dev/null | grep -F "$work" | cut -d: -f1); do losetup -d "$l"; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

# A background load on a mounted filesystem: creates, overwrites, deletes.
start_load() {
  local m=$1
  mkdir -p "$m/load"
  (
    n=0
    while true; do
      n=$((n + 1))
      head -c $(((n * 7919) % 200000 + 1)) /dev/urandom >"$m/load/f$((n % 40))" 2>/dev/null || exit 3
      dd if=/dev/urandom of="$m/load/f$(((n + 13) % 40))" bs=4k count=2 seek=$((n % 7)) conv=notrunc status=none 2>/dev/null || exit 3
      rm -f "$m/load/f$(((n + 20) % 40))"
      ((n % 25 == 0)) && sync
    done
  ) &
  load_pid=$!
  bg_pids+=("$load_pid")
}
stop_load() {
  # The loop's current head/dd would outlive its shell and keep the
  # filesystem busy for umount: stop the shell, then end it and its child.
  local kids=""
  if kill -STOP "$load_pid" 2>/dev/null; then
    kids=$(pgrep -P "$load_pid")
    kill -KILL "$load_pid" 2>/dev/null
    [[ -n $kids ]] && kill -TERM $kids 2>/dev/null
  fi
  wait "$load_pid" 2>/dev/null
  local rc=$?
  for k in $kids; do
    for _ in $(seq 50); do kill -0 "$k" 2>/dev/null || break; sleep 0.1; done
  done
  # 137 = killed by us; 3 = a write failed (the filesystem saw an I/O error).
  [[ $rc -eq 3 ]] && fail "the writer saw an I/O error"
  return 0
}

# Freeze, copy the device and the files, snapshot, thaw. Sets $snap.
frozen_snapshot() {
  local m=$1 dev=$2 vol=$3 tag=$4 extra=${5:-}
  fsfreeze -f "$m" || fail "fsfreeze"
  dd if="$dev" of="$work/ref-$tag.img" bs=1M iflag=direct status=none || { fsfreeze -u "$m"; fail "reference copy"; }
  mkdir -p "$work/ref-$tag-files" && cp -a "$m/." "$work/ref-$tag-files/" 2>/dev/null
  snap=$(umbra --json snapshot create "$vol" $extra | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  local rc=$?
  fsfreeze -u "$m"
  [[ $rc -eq 0 && -n $snap ]] || fail "snapshot create"
}

snapshot_equals_ref() {
  local id=$1 tag=$2
  local sdev
  sdev=$(umbra snapshot attach "$id") || fail "snapshot attach $id"
  cmp "$sdev" "$work/ref-$tag.img" || { umbra snapshot detach "$id"; fail "snapshot $id differs from its reference ($tag)"; }
  umbra snapshot detach "$id" || fail "snapshot detach"
}

make_fs_volume() {  # name size fstype -> sets dev, mnt
  local name=$1 size=$2 fstype=$3
  umbra volume create "$name" --size "$size" >/dev/null || fail "volume create"
  dev=$(umbra volume attach "$name") || fail "volume attach"
  [[ -b $dev ]] || fail "volume attach did not print a block device: '$dev'"
  if [[ $fstype == xfs ]]; then mkfs.xfs -q -f "$dev" || fail mkfs.xfs; else
    mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$dev" || fail mkfs.ext4; fi
  mnt=$work/mnt-$name
  mkdir -p "$mnt"
  mount "$dev" "$mnt" || fail "mount"
  mounts+=("$mnt")
}

case_pit() {
  local fstype=$1
  start_daemon
  make_fs_volume v 512M "$fstype"
  start_load "$mnt"
  sleep 2
  frozen_snapshot "$mnt" "$dev" v pit
  sleep 3
  fstrim "$mnt" >/dev/null 2>&1
  sleep 1
  stop_load
  snapshot_equals_ref "$snap" pit
  # fsck of the snapshot (read-only device)
  local sdev
  sdev=$(umbra snapshot attach "$snap") || fail "attach"
  if [[ $fstype == ext4 ]]; then
    e2fsck -fn "$sdev" >"$work/fsck.log" 2>&1 || { cat "$work/fsck.log"; fail "e2fsck -fn on the snapshot"; }
  fi
  umbra snapshot detach "$snap" || fail "detach"
  # Files through snapshot mount equal the files at the instant.
  mkdir -p "$work/view"
  umbra snapshot mount "$snap" "$work/view" || fail "snapshot mount"
  diff -r "$work/ref-pit-files" "$work/view" >"$work/diff.log" 2>&1 || { head "$work/diff.log"; fail "files in the snapshot mount differ from the instant"; }
  if [[ $fstype == xfs ]]; then
    local vdev
    vdev=$(awk -v d="$work/view" '$2 == d {print $1}' /proc/mounts)
    [[ -n $vdev ]] || fail "no device for the snapshot mount"
  fi
  umbra snapshot unmount "$work/view" || fail "snapshot unmount"
  log "PASS"
}

case_many() {
  start_daemon
  make_fs_volume v 256M ext4
  start_load "$mnt"
  local ids=()
  for i in 1 2 3 4 5; do
    sleep 1
    frozen_snapshot "$mnt" "$dev" v "s$i" --persistent
    ids+=("$snap")
  done
  sleep 1
  stop_load
  umbra snapshot delete "${ids[1]}" || fail "delete middle"
  umbra snapshot delete "${ids[3]}" || fail "delete middle"
  for i in 0 2 4; do snapshot_equals_ref "${ids[$i]}" "s$((i + 1))"; done
  [[ $(umbra --json snapshot list v | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["snapshots"]))') == 3 ]] || fail "snapshot list count"
  umbra snapshot delete --oldest v || fail "delete --oldest"
  for i in 2 4; do snapshot_equals_ref "${ids[$i]}" "s$((i + 1))"; done
  umbra snapshot delete --all v || fail "delete --all"
  [[ $(umbra --json snapshot list v | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["snapshots"]))') == 0 ]] || fail "delete --all left snapshots"
  log "PASS"
}

case_cap() {
  start_daemon
  make_fs_volume v 256M ext4
  mkdir -p "$work/shadow-elsewhere"
  umbra storage add v --on "$work/shadow-elsewhere" --max-size 24M || fail "storage add"
  dd if=/dev/urandom of="$mnt/big" bs=1M count=100 conv=fsync status=none || fail "fill"
  local ids=()
  for i in 1 2 3; do
    umbra snapshot create v >/dev/null || fail "snapshot create"
    ids+=("$(umbra --json snapshot list v | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshots"][-1]["id"])')")
    dd if=/dev/urandom of="$mnt/big" bs=1M count=10 seek=$((i * 10)) conv=notrunc,fsync status=none || fail "writes saw an error"
  done
  # Heavy writer: overwrite everything; the filesystem must see no error.
  dd if=/dev/urandom of="$mnt/big" bs=1M count=100 conv=notrunc,fsync status=none || fail "the filesystem saw an I/O error"
  sync
  umbra snapshot list v || fail "list"
  local state
  state=$(umbra --json snapshot list v)
  python3 - "$state" "${ids[@]}" <<'EOF' || fail "cap policy"
import json, sys
snaps = json.loads(sys.argv[1])["snapshots"]
ids = sys.argv[2:]
present = {s["id"]: s for s in snaps}
assert ids[0] not in present, "the oldest snapshot should have been deleted first"
last = present.get(ids[-1])
assert last is not None, "the newest snapshot should be listed (invalidated)"
assert last["valid"] is False and last["cause"], "the newest should be invalid with a cause: %r" % last
EOF
  local out
  if out=$(umbra snapshot attach "${ids[2]}" 2>&1); then
    dd if="$out" of=/dev/null bs=1M count=1 iflag=direct status=none 2>/dev/null && fail "reading an invalidated snapshot succeeded"
    umbra snapshot detach "${ids[2]}"
  else
    grep -qi "full\|invalid" <<<"$out" || fail "attach of an invalid snapshot did not name the cause: $out"
  fi
  umount "$mnt"
  local vdev
  e2fsck -fn "$dev" >/dev/null 2>&1 || fail "live filesystem not clean after the overflow"
  log "PASS"
}

case_kill9() {
  start_daemon
  make_fs_volume v 256M ext4
  start_load "$mnt"
  sleep 1
  frozen_snapshot "$mnt" "$dev" v k1 --persistent
  local id1=$snap
  sleep 1
  frozen_snapshot "$mnt" "$dev" v k2 --persistent
  local id2=$snap
  # A second volume with dirty page cache on its raw device and no mount: the
  # last close of that loop device must not be umbrad's own (it would write
  # back into the dying FUSE server and the exit would never finish).
  umbra volume create raw --size 64M >/dev/null || fail "volume create raw"
  local rawdev
  rawdev=$(umbra volume attach raw) || fail "volume attach raw"
  dd if=/dev/urandom of="$rawdev" bs=1M count=4 status=none || fail "buffered write to $rawdev"
  sleep 1
  kill -KILL "$daemon_pid"
  # If the exit hangs, ctest's timeout fails this test.
  wait "$daemon_pid" 2>/dev/null
  daemon_pid=""
  timeout 60 sync || fail "sync hangs after kill -9 umbrad"
  kill "$load_pid" 2>/dev/null; wait "$load_pid" 2>/dev/null
  # The live mount lost its block device: unmount it lazily.
  umount -l "$mnt" 2>/dev/null
  start_daemon
  umbra snapshot list v || fail "list after restart"
  snapshot_equals_ref "$id1" k1
  snapshot_equals_ref "$id2" k2
  dev=$(umbra volume attach v) || fail "reattach after crash"
  e2fsck -fy "$dev" >/dev/null 2>&1
  rc=$?
  ((rc <= 1)) || fail "volume not repairable after kill -9 (e2fsck rc $rc)"
  umbra volume detach v || fail "detach"
  [[ -e /sys/block/${rawdev#/dev/}/loop/backing_file ]] &&
    [[ $(cat "/sys/block/${rawdev#/dev/}/loop/backing_file") == "$work/dev/"* ]] &&
    fail "restart did not detach the stale $rawdev"
  log "PASS"
}

case_revert() {
  start_daemon
  make_fs_volume v 256M ext4
  echo "before" >"$mnt/state.txt"
  sync
  frozen_snapshot "$mnt" "$dev" v r1 --persistent
  echo "after" >"$mnt/state.txt"
  dd if=/dev/urandom of="$mnt/junk" bs=1M count=20 conv=fsync status=none
  out=$(umbra snapshot revert "$snap" 2>&1) && fail "revert while mounted/attached succeeded"
  log "refused as expected: $out"
  umount "$mnt"
  umbra volume detach v || fail "detach"
  umbra snapshot revert "$snap" || fail "revert"
  dev=$(umbra volume attach v) || fail "attach"
  e2fsck -fn "$dev" >/dev/null 2>&1 || fail "fsck after revert"
  cmp "$dev" "$work/ref-r1.img" || fail "reverted volume differs from the snapshot"
  mount "$dev" "$mnt" || fail "mount"
  [[ $(cat "$mnt/state.txt") == before ]] || fail "file content not reverted"
  [[ ! -e $mnt/junk ]] || fail "file created after the snapshot still there"
  log "PASS"
}

need_nbd_tools() {
  for t in nbdinfo nbdcopy nbdfuse qemu-img; do
    command -v "$t" >/dev/null || { echo "SKIP: $t not installed (scripts/setup.sh installs it)"; exit 77; }
  done
}

# Every hole nbdinfo --map reports must read as zeros in the reference;
# prints the number of hole bytes.
holes_are_zero() {  # uri reference
  nbdinfo --map "$1" >"$work/map.txt" || fail "nbdinfo --map $1"
  python3 - "$work/map.txt" "$2" <<'PY' || fail "a hole in nbdinfo --map is not zero in the reference"
import sys
holes = 0
with open(sys.argv[2], "rb") as ref:
    for line in open(sys.argv[1]):
        f = line.split()
        off, length, kind = int(f[0]), int(f[1]), int(f[2])
        if kind & 1:
            ref.seek(off)
            left = length
            while left:
                b = ref.read(min(left, 1 << 20))
                if b.count(0) != len(b):
                    sys.exit("hole at %d+%d has data" % (off, length))
                left -= len(b)
            holes += length
print(holes)
PY
}

# A snapshot exported over NBD, read by real clients while the filesystem
# keeps changing: nbdinfo lists it and maps trimmed space as holes, nbdcopy
# and qemu-img copies equal the reference taken at the instant.
case_nbd_snapshot() {
  need_nbd_tools
  local port=$((20000 + RANDOM % 20000))
  daemon_extra=(--nbd-tcp "127.0.0.1:$port")
  start_daemon
  make_fs_volume v 256M ext4
  start_load "$mnt"
  sleep 1
  fstrim "$mnt" || fail "fstrim"
  frozen_snapshot "$mnt" "$dev" v n1
  sleep 2
  fstrim "$mnt"
  stop_load
  local uri
  uri=$(umbra snapshot export "$snap") || fail "snapshot export"
  [[ $uri == "nbd+unix:///snap-$snap?socket=$work/nbd.sock" ]] || fail "unexpected URI: $uri"
  nbdinfo --list "nbd+unix:///?socket=$work/nbd.sock" >"$work/list.txt" || fail "nbdinfo --list"
  grep -q "export=\"snap-$snap\"" "$work/list.txt" || fail "nbdinfo --list does not show snap-$snap"
  grep -q 'export="v"' "$work/list.txt" || fail "nbdinfo --list does not show the volume"
  nbdinfo "$uri" | grep -q "is_read_only: true" || fail "snapshot export is not read-only"
  local holes
  holes=$(holes_are_zero "$uri" "$work/ref-n1.img")
  ((holes > 64 * 1024 * 1024)) || fail "only $holes bytes of holes after fstrim of a mostly empty filesystem"
  log "ok: nbdinfo --map: $holes bytes of holes, all zero in the reference"
  # The live volume's export maps the trimmed space as holes too.
  sync
  dd if="$dev" of="$work/live.img" bs=1M iflag=direct status=none || fail "copy of the live volume"
  holes=$(holes_are_zero "nbd+unix:///v?socket=$work/nbd.sock" "$work/live.img")
  ((holes > 64 * 1024 * 1024)) || fail "live export: only $holes bytes of holes after fstrim"
  log "ok: live export: $holes bytes of holes, all zero on the device"
  # Misbehaving clients hammer the socket while real clients copy: garbage
  # from the first byte, a bad option magic, a request past the end, an
  # oversized write, a disconnect mid-request. None may disturb the copies.
  python3 - "$work/nbd.sock" "snap-$snap" >"$work/bad-clients.txt" 2>&1 <<'PY' &
import os, random, socket, struct, sys
path, name = sys.argv[1], sys.argv[2].encode()
random.seed(1)
def conn():
    s = socket.socket(socket.AF_UNIX); s.connect(path); s.settimeout(5); return s
def handshake(s):
    s.recv(18); s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 8, 0)); s.recv(20)
    d = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(d)) + d)
    got = b""
    while not got.endswith(struct.pack(">QIII", 0x3e889045565a9, 7, 1, 0)):
        chunk = s.recv(4096)
        if not chunk: raise SystemExit("server closed during GO")
        got += chunk
def until_closed(s):  # the server must drop this client
    while s.recv(4096):
        pass
for i in range(200):
    kind = i % 5
    try:
        s = conn()
        if kind == 0:    # garbage from the first byte
            s.sendall(os.urandom(random.randint(4, 4096)))
            until_closed(s)
        elif kind == 1:  # bad option magic
            s.recv(18); s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x1234, 7, 0))
            until_closed(s)
        else:
            handshake(s)
            if kind == 2:  # offset far past the end: an error reply, the connection stays
                s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 1 << 62, 4096))
                s.recv(64)
            elif kind == 3:  # a 2 GiB write: dropped
                s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 2, 0, 1 << 31))
                until_closed(s)
            else:  # disconnect right after a read request
                s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 3, 0, 1 << 20))
        s.close()
    except socket.timeout:
        sys.exit("connection %d (kind %d): the server neither answered nor dropped it" % (i, kind))
    except OSError:
        pass
print("done")
PY
  local bad_pid=$!
  bg_pids+=("$bad_pid")
  nbdcopy "$uri" "$work/nbdcopy.img" || fail "nbdcopy"
  cmp "$work/nbdcopy.img" "$work/ref-n1.img" || fail "nbdcopy of the snapshot differs from the reference"
  wait "$bad_pid" || fail "the misbehaving clients script failed: $(cat "$work/bad-clients.txt")"
  grep -q done "$work/bad-clients.txt" || fail "misbehaving clients did not finish"
  kill -0 "$daemon_pid" || fail "umbrad died"
  nbdcopy "$uri" "$work/nbdcopy2.img" && cmp "$work/nbdcopy2.img" "$work/ref-n1.img" ||
    fail "a copy after the misbehaving clients differs"
  qemu-img convert -f raw -O qcow2 "$uri" "$work/snap.qcow2" || fail "qemu-img convert"
  qemu-img compare -f qcow2 -F raw "$work/snap.qcow2" "$work/ref-n1.img" || fail "qemu-img compare"
  # Writes to a read-only export are refused; the snapshot is unchanged.
  nbdcopy "$work/nbdcopy.img" "$uri" 2>"$work/ro.txt" && fail "write to a snapshot export succeeded"
  # The same export on loopback TCP: root may read it, nobody is refused.
  local tcp_uri
  tcp_uri=$(umbra --json snapshot export "$snap" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tcp_uri"])')
  [[ $tcp_uri == "nbd://127.0.0.1:$port/snap-$snap" ]] || fail "unexpected TCP URI: $tcp_uri"
  nbdcopy "$tcp_uri" "$work/tcp.img" || fail "nbdcopy over TCP"
  cmp "$work/tcp.img" "$work/ref-n1.img" || fail "nbdcopy over TCP differs from the reference"
  setpriv --reuid=65534 --regid=65534 --clear-groups nbdinfo "$tcp_uri" >/dev/null 2>&1 &&
    fail "a non-root user read the NBD export over TCP"
  grep -q "uid 65534) refused" "$work/umbrad.log" || fail "umbrad did not log refusing uid 65534"
  log "ok: TCP export readable by root, refused to nobody"
  snapshot_equals_ref "$snap" n1
  expect_fail "export of an unknown snapshot" umbra snapshot export 00000000-0000-4000-8000-000000000000
  expect_fail "export of an unknown volume" umbra volume export nosuch
  log "PASS"
}

# The live volume used through NBD (nbdfuse -> loop -> ext4) while
# snapshots exist: writes go through copy-on-write, the snapshots stay exact.
case_nbd_live() {
  need_nbd_tools
  start_daemon
  umbra volume create v --size 256M >/dev/null || fail "volume create"
  local uri fusedir="$work/dev-nbd"
  uri=$(umbra volume export v) || fail "volume export"
  mkdir -p "$fusedir"
  nbdfuse "$fusedir" --uri "$uri" &
  bg_pids+=($!)
  for _ in $(seq 100); do [[ -e $fusedir/nbd ]] && break; sleep 0.1; done
  [[ -e $fusedir/nbd ]] || fail "nbdfuse did not come up"
  dev=$(losetup -f --show --direct-io=on "$fusedir/nbd") || fail "losetup over nbdfuse"
  mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$dev" || fail mkfs.ext4
  mnt=$work/mnt-v
  mkdir -p "$mnt"
  mount "$dev" "$mnt" || fail "mount"
  start_load "$mnt"
  sleep 1
  frozen_snapshot "$mnt" "$dev" v l1
  local s1=$snap
  sleep 2
  frozen_snapshot "$mnt" "$dev" v l2
  local s2=$snap
  sleep 2
  fstrim "$mnt"
  stop_load
  expect_fail "volume delete while an NBD client uses it" umbra volume delete v
  umount "$mnt" || fail "umount"
  losetup -d "$dev"
  umount "$fusedir" 2>/dev/null || fusermount3 -u "$fusedir"
  snapshot_equals_ref "$s1" l1
  snapshot_equals_ref "$s2" l2
  nbdcopy "$(umbra snapshot export "$s1")" "$work/l1.img" || fail "nbdcopy"
  cmp "$work/l1.img" "$work/ref-l1.img" || fail "nbdcopy of $s1 differs"
  log "PASS"
}

expect_fail() {  # description, command...
  local what=$1
  shift
  local out rc
  out=$("$@" 2>&1)
  rc=$?
  [[ $rc -ne 0 ]] || fail "$what: succeeded but should fail"
  [[ $(grep -c . <<<"$out") -ge 1 ]] || fail "$what: no message"
  grep -q "^umbra: " <<<"$out" || [[ $rc -eq 2 ]] || fail "$what: message not in 'umbra: ...' form: $out"
  log "ok: $what -> $(head -1 <<<"$out")"
}

case_bad_input() {
  # Daemon not running.
  expect_fail "daemon not running" umbra volume list
  start_daemon
  umbra volume create v --size 64M >/dev/null || fail "volume create"
  local before
  # What bad input must not change: the set of volumes and their identity.
  volumes() { umbra --json volume list | python3 -c 'import json,sys; print(sorted((v["name"], v["uuid"], v["size"], v["origin"]) for v in json.load(sys.stdin)["volumes"]))'; }
  before=$(volumes)
  expect_fail "duplicate volume" umbra volume create v --size 64M
  expect_fail "bad size" umbra volume create w --size 12Q
  expect_fail "zero size" umbra volume create w --size 0
  expect_fail "bad name" umbra volume create "a/b" --size 64M
  expect_fail "unknown volume attach" umbra volume attach nope
  expect_fail "unknown volume detach" umbra volume detach nope
  expect_fail "unknown volume delete" umbra volume delete nope
  expect_fail "adopt non-device" umbra volume adopt w --device /etc/passwd
  expect_fail "storage on unknown volume" umbra storage add nope --on "$work"
  expect_fail "storage bad max" umbra storage add v --on "$work" --max-size 120%
  expect_fail "storage missing dir" umbra storage add v --on "$work/does-not-exist"
  expect_fail "resize unknown" umbra storage resize nope --max-size 1G
  expect_fail "snapshot unknown volume" umbra snapshot create nope
  expect_fail "snapshot delete unknown" umbra snapshot delete 00000000-0000-0000-0000-000000000000
  expect_fail "snapshot attach unknown" umbra snapshot attach 00000000-0000-0000-0000-000000000000
  expect_fail "snapshot mount unknown" umbra snapshot mount 00000000-0000-0000-0000-000000000000 "$work"
  expect_fail "snapshot revert unknown" umbra snapshot revert 00000000-0000-0000-0000-000000000000
  expect_fail "delete --oldest unknown volume" umbra snapshot delete --oldest nope
  expect_fail "unknown command" umbra volume frobnicate
  # Shadow storage on the volume itself.
  local dev m
  dev=$(umbra volume attach v) || fail attach
  mkfs.ext4 -q "$dev" && m=$work/m && mkdir -p "$m" && mount "$dev" "$m" && mounts+=("$m")
  mkdir -p "$m/shadow"
  expect_fail "storage on the volume itself" umbra storage add v --on "$m/shadow"
  expect_fail "delete attached volume" umbra volume delete v
  umount "$m"
  umbra volume detach v
  [[ $(volumes) == "$before" ]] || fail "bad input changed the volumes"
  # Permission: a non-root user is refused.
  chmod 755 "$work"
  local out
  out=$(setpriv --reuid=65534 --regid=65534 --clear-groups "$bin/umbra" volume list 2>&1) && fail "non-root request succeeded"
  grep -qi "permission\|denied\|not allowed" <<<"$out" || fail "non-root refusal unclear: $out"
  log "ok: non-root refused -> $out"
  log "PASS"
}

# ---- images (docs/format/repository.md) ----

jq_field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval("d"+sys.argv[1]))' "$1"; }

# Mixed data: random, compressible text, and duplicates of both.
fill_mixed() {
  local m=$1 mb=$2
  mkdir -p "$m/data"
  head -c $((mb * 1024 * 1024 / 3)) /dev/urandom >"$m/data/random.bin"
  yes "umbra image test line $(date +%s) compressible text" | head -c $((mb * 1024 * 1024 / 3)) >"$m/data/text.txt"
  cp "$m/data/random.bin" "$m/data/random-copy.bin"
  sync
}

# Image VOLUME while writing: freeze, reference copy, start `image create`,
# thaw as soon as its snapshot exists. Sets $image and $image_json.
live_image() {
  local m=$1 dev=$2 vol=$3 tag=$4; shift 4
  fsfreeze -f "$m" || fail "fsfreeze"
  dd if="$dev" of="$work/ref-$tag.img" bs=1M iflag=direct status=none || { fsfreeze -u "$m"; fail "reference copy"; }
  mkdir -p "$work/ref-$tag-files" && cp -a "$m/data" "$work/ref-$tag-files/" 2>/dev/null
  umbra --json image create "$vol" --repo "$repo" "$@" >"$work/img-$tag.json" 2>"$work/img-$tag.err" &
  local ipid=$!
  for _ in $(seq 300); do
    umbra --json snapshot list "$vol" 2>/dev/null | grep -q '"name": "image-' && break
    kill -0 $ipid 2>/dev/null || break
    sleep 0.05
  done
  fsfreeze -u "$m"
  wait $ipid || { cat "$work/img-$tag.err"; fail "image create ($tag)"; }
  image=$(jq_field '["id"]' <"$work/img-$tag.json")
  [[ -n $image ]] || fail "image create printed no id"
  umbra --json snapshot list "$vol" | grep -q '"name": "image-' && fail "image create left its snapshot behind"
  return 0
}

restore_equals_ref() {  # image tag [restore args...]
  local id=$1 tag=$2; shift 2
  rm -f "$work/restored.img"
  umbra image restore "$id" --repo "$repo" --to "$work/restored.img" "$@" >/dev/null || fail "image restore $id"
  cmp "$work/restored.img" "$work/ref-$tag.img" || fail "image $id does not restore to the bytes of $tag"
}

case_image() {
  start_daemon
  repo=$work/repo
  make_fs_volume v 256M ext4
  fill_mixed "$mnt" 60
  start_load "$mnt"
  sleep 1
  # 1. A full image taken while writing restores to the snapshot's exact bytes.
  live_image "$mnt" "$dev" v i1
  local i1=$image
  [[ $(jq_field '["filesystem"]' <"$work/img-i1.json") == ext4 ]] || fail "filesystem not detected"
  [[ $(jq_field '["writers"]' <"$work/img-i1.json") == consistent ]] || fail "the manifest does not record the writer status"
  restore_equals_ref "$i1" i1
  e2fsck -fn "$work/restored.img" >/dev/null 2>&1 || fail "fsck -n of the restored image is not clean"
  mkdir -p "$work/rmnt" && mount -o ro,loop "$work/restored.img" "$work/rmnt" && mounts+=("$work/rmnt") || fail "mount restored image"
  diff -r "$work/rmnt/data" "$work/ref-i1-files/data" >/dev/null || fail "files in the restored image differ from the instant"
  umount "$work/rmnt"
  # Dedup: the random file and its copy are stored once.
  local stored
  stored=$(jq_field '["stats"]["stored"]' <"$work/img-i1.json")
  ((stored < 60 * 1024 * 1024)) || fail "image 1 stored $stored bytes: duplicates not shared or text not compressed"
  log "ok: full image $i1 exact, fsck clean, files equal, stored $stored bytes"

  # 2. Incremental after changes reads only what changed and restores exactly.
  head -c $((3 * 1024 * 1024)) /dev/urandom >"$mnt/data/new.bin"; sync
  live_image "$mnt" "$dev" v i2 --incremental
  local i2=$image read2 base2
  read2=$(jq_field '["stats"]["read"]' <"$work/img-i2.json")
  base2=$(jq_field '["base"]' <"$work/img-i2.json")
  [[ $base2 == "$i1" ]] || fail "incremental image has base '$base2', expected $i1"
  ((read2 < 40 * 1024 * 1024)) || fail "incremental image read $read2 bytes (full read?)"
  restore_equals_ref "$i2" i2
  log "ok: incremental $i2 read $read2 bytes, exact"

  # 2b. Image mount (file-level restore) and NBD export (issue 6) of image 2.
  umbra image mount "${i2:0:8}" "$work/imnt" --repo "$repo" >/dev/null || fail "image mount"
  diff -r "$work/imnt/data" "$work/ref-i2-files/data" >/dev/null || { umbra image unmount "$work/imnt"; fail "files in the mounted image differ from the instant"; }
  umbra image unmount "$work/imnt" >/dev/null || fail "image unmount"
  mountpoint -q "$work/imnt" 2>/dev/null && fail "image unmount left the mount"
  if command -v nbdinfo >/dev/null && command -v qemu-img >/dev/null; then
    local uri holes
    uri=$(umbra -q image export "$i2" --repo "$repo") || fail "image export"
    nbdinfo --list "nbd+unix:///?socket=$work/nbd.sock" | grep -q "export=\"image-$i2\"" || fail "nbdinfo --list does not show image-$i2"
    nbdinfo "$uri" | grep -q "is_read_only: true" || fail "image export is not read-only"
    qemu-img convert -f raw -O qcow2 "$uri" "$work/i2.qcow2" || fail "qemu-img convert of the image export"
    qemu-img compare -f qcow2 -F raw "$work/i2.qcow2" "$work/ref-i2.img" >/dev/null || fail "qemu-img compare: image export differs from the reference"
    holes=$(holes_are_zero "$uri" "$work/ref-i2.img")
    ((holes > 64 * 1024 * 1024)) || fail "image export maps only $holes bytes of holes"
    umbra image unexport "$i2" >/dev/null || fail "image unexport"
    nbdinfo "$uri" >/dev/null 2>&1 && fail "unexported image still served"
    rm -f "$work/i2.qcow2"
    log "ok: image mount files equal; image export: qemu-img compare identical, $holes bytes of holes"
  fi

  # 3. Tracking survives kill -9 umbrad between two images.
  stop_load
  kill -KILL "$daemon_pid"; wait "$daemon_pid" 2>/dev/null; daemon_pid=""
  umount -l "$mnt" 2>/dev/null
  start_daemon
  grep -q "change tracking was reset" "$work/umbrad.log" && fail "kill -9 reset change tracking"
  dev=$(umbra volume attach v) || fail "reattach after kill -9"
  e2fsck -fy "$dev" >/dev/null 2>&1
  mount "$dev" "$mnt" || fail "remount after kill -9"
  head -c $((2 * 1024 * 1024)) /dev/urandom >"$mnt/data/after-kill.bin"; sync
  start_load "$mnt"
  live_image "$mnt" "$dev" v i3 --incremental
  local i3=$image
  [[ $(jq_field '["base"]' <"$work/img-i3.json") == "$i2" ]] || fail "after kill -9 the incremental did not use tracking: $(cat "$work/img-i3.json")"
  grep -q '"note"' "$work/img-i3.json" && fail "after kill -9: $(jq_field '["note"]' <"$work/img-i3.json")"
  restore_equals_ref "$i3" i3
  log "ok: tracking survived kill -9; incremental $i3 exact"
  stop_load

  # 4. Deleting the first image leaves the later ones whole (after gc too).
  umbra image delete "$i1" --repo "$repo" >/dev/null 2>&1 || fail "image delete"
  umbra repo gc --repo "$repo" >/dev/null || fail "repo gc"
  restore_equals_ref "$i2" i2
  restore_equals_ref "$i3" i3
  log "ok: delete + gc left $i2 and $i3 exact"

  # 5. Delta restore onto a stale copy writes only the changed chunks.
  cp "$work/ref-i2.img" "$work/stale.img"
  local expect delta_json
  expect=$(python3 - "$work/ref-i2.img" "$work/ref-i3.img" "$(jq_field '["chunk_size"]' <"$work/img-i3.json")" <<'PY'
import sys
a, b, cs = open(sys.argv[1], "rb"), open(sys.argv[2], "rb"), int(sys.argv[3])
n = 0
while True:
    x, y = a.read(cs), b.read(cs)
    if not x and not y: break
    n += x != y
print(n)
PY
)
  delta_json=$(umbra --json image restore "$i3" --repo "$repo" --to "$work/stale.img" --delta) || fail "delta restore"
  cmp "$work/stale.img" "$work/ref-i3.img" || fail "delta restore is not exact"
  [[ $(jq_field '["written_chunks"]' <<<"$delta_json") == "$expect" ]] ||
    fail "delta restore wrote $(jq_field '["written_chunks"]' <<<"$delta_json") chunks, $expect differ"
  log "ok: delta restore exact, wrote $expect changed chunks of $(jq_field '["chunks"]' <<<"$delta_json")"

  # 6. verify finds a flipped byte and names the images that need the chunk.
  umbra image verify --repo "$repo" >/dev/null || fail "verify of a good repository failed"
  local victim
  victim=$(python3 - "$repo" <<'PY'
import os, sys
best = None
for d, _, fs in os.walk(os.path.join(sys.argv[1], "chunks")):
    for f in fs:
        p = os.path.join(d, f)
        if os.path.getsize(p) > 4096 and best is None: best = p
print(best)
PY
)
  python3 -c 'import sys; f = open(sys.argv[1], "r+b"); f.seek(2000); b = f.read(1); f.seek(2000); f.write(bytes([b[0] ^ 0xFF]))' "$victim"
  local vout
  vout=$(umbra image verify --repo "$repo" 2>&1) && fail "verify missed a flipped byte"
  grep -q "$(basename "$victim")" <<<"$vout" || fail "verify did not name the chunk: $vout"
  grep -q "$i2\|$i3" <<<"$vout" || fail "verify did not name the images: $vout"
  log "ok: verify -> $(grep -c DAMAGED <<<"$vout") damaged chunk(s), images named"
  umbra image verify --repair --repo "$repo" >/dev/null 2>&1 && fail "verify --repair reported no damage"
  [[ -e $victim ]] && fail "verify --repair left the damaged chunk"
  vout=$(umbra image verify --repo "$repo" 2>&1) && fail "verify after repair passed"
  grep -q "missing" <<<"$vout" || fail "verify after repair does not report the chunk missing: $vout"

  # 7. An interrupted image create leaves the repository consistent; the rerun reuses.
  local repo2=$work/repo2
  repo=$repo2
  head -c $((40 * 1024 * 1024)) /dev/urandom >"$mnt/data/big.bin"; sync
  # zstd -19 on one thread: slow enough to be killed half way.
  # The binary itself, not the umbra() shell function: kill must hit umbra.
  "$bin/umbra" --json image create v --repo "$repo2" --threads 1 --compression 19 --checkpoint-interval 0.2 >/dev/null 2>&1 &
  local cpid=$!
  for _ in $(seq 400); do
    (( $(find "$repo2/chunks" -type f 2>/dev/null | wc -l) >= 20 )) && [[ -n $(ls "$repo2/resume" 2>/dev/null) ]] && break
    sleep 0.05
  done
  kill -KILL $cpid; wait $cpid 2>/dev/null
  local partial
  partial=$(find "$repo2/chunks" -type f | wc -l)
  ((partial >= 20)) || fail "interrupted create stored only $partial chunks before the kill"
  resume_before=$(ls "$repo2/resume" 2>&1)
  umbra image verify --repo "$repo2" >/dev/null || fail "repository does not verify after an interrupted create"
  for _ in $(seq 50); do umbra --json snapshot list v | grep -q '"name": "image-' || break; sleep 0.1; done
  umbra --json snapshot list v | grep -q '"name": "image-' && fail "killed image create left its snapshot"
  # --no-writers here and for the full image below: freezing the mounted
  # filesystem writes its superblock (ext4 s_wtime), so two images of the idle
  # filesystem taken with writers differ in those bytes.
  umbra --json image create v --repo "$repo2" --no-writers >"$work/rerun.json" || fail "rerun"
  [[ $(jq_field '["writers"]' <"$work/rerun.json") == none ]] || fail "an image made with --no-writers does not say so"
  local reused rread full_read
  reused=$(jq_field '["stats"]["reused"]' <"$work/rerun.json")
  rread=$(jq_field '["stats"]["read"]' <"$work/rerun.json")
  ((reused >= partial)) || fail "rerun reused $reused chunks, $partial were stored before the kill"
  grep -q "resumed an interrupted create" "$work/rerun.json" || fail "rerun did not resume (resume records before: $resume_before): $(tr -d "\n" <"$work/rerun.json")"
  [[ -z $(ls "$repo2/resume") ]] || fail "resume record left after a finished create"
  umbra image verify --repo "$repo2" >/dev/null || fail "verify after rerun"
  # The resumed image is exact: it restores to the same bytes as a fresh full
  # image of the same (unchanged) data, which reads more.
  umbra --json image create v --repo "$repo2" --no-writers >"$work/full2.json" || fail "second full image"
  full_read=$(jq_field '["stats"]["read"]' <"$work/full2.json")
  ((rread < full_read)) || fail "resumed create read $rread bytes, a full one $full_read: nothing was skipped"
  umbra image restore "$(jq_field '["id"]' <"$work/rerun.json")" --repo "$repo2" --to "$work/resumed.img" >/dev/null || fail "restore resumed"
  umbra image restore "$(jq_field '["id"]' <"$work/full2.json")" --repo "$repo2" --to "$work/full2.img" >/dev/null || fail "restore full2"
  cmp "$work/resumed.img" "$work/full2.img" || fail "the resumed image differs from a full image of the same data"
  rm -f "$work/resumed.img" "$work/full2.img"
  log "ok: interrupted create: $partial chunks kept; rerun resumed, read $rread of $full_read bytes, reused $reused"
  # repo gc next to a running image create: the chunks the create has stored
  # but not yet referenced (no manifest yet) must survive.
  head -c $((24 * 1024 * 1024)) /dev/urandom >"$mnt/data/gc.bin"; sync
  umbra --json image create v --repo "$repo2" --threads 1 >"$work/conc.json" 2>&1 &
  cpid=$!
  for _ in $(seq 200); do
    (( $(find "$repo2/chunks" -type f | wc -l) > partial + 10 )) && break
    sleep 0.02
  done
  umbra repo gc --repo "$repo2" >/dev/null || fail "repo gc next to image create"
  wait $cpid || fail "image create next to repo gc: $(cat "$work/conc.json")"
  umbra image verify --repo "$repo2" >/dev/null || fail "repo gc removed chunks of a concurrent image create"
  log "ok: repo gc waited for a concurrent image create; repository verifies"

  # 8. Encrypted repository.
  repo=$work/repo-enc
  UMBRA_PASSPHRASE=correct-horse umbra repo init "$repo" --encrypt >/dev/null || fail "repo init --encrypt"
  UMBRA_PASSPHRASE=correct-horse live_image "$mnt" "$dev" v enc
  UMBRA_PASSPHRASE=correct-horse restore_equals_ref "$image" enc
  grep -rqa "umbra image test line" "$repo" && fail "plaintext found in the encrypted repository"
  local out
  out=$(UMBRA_PASSPHRASE=wrong umbra image list --repo "$repo" 2>&1) && fail "wrong passphrase accepted"
  grep -qi "wrong passphrase" <<<"$out" || fail "wrong passphrase message unclear: $out"
  log "ok: encrypted repository round trip; wrong passphrase -> $out"

  # 8b. Offline image of an unmounted ext4 file: the block bitmap skips free space.
  repo=$work/repo
  truncate -s 128M "$work/offline.img"
  mkfs.ext4 -q "$work/offline.img" || fail "mkfs offline"
  mkdir -p "$work/omnt" && mount -o loop "$work/offline.img" "$work/omnt" && mounts+=("$work/omnt") || fail "mount offline"
  head -c $((20 * 1024 * 1024)) /dev/urandom >"$work/omnt/r.bin"
  umount "$work/omnt"
  umbra --json image create "$work/offline.img" --offline --repo "$repo" >"$work/off.json" || fail "offline image create"
  grep -q "ext4 block bitmap" "$work/off.json" || fail "offline image did not use the ext4 bitmap: $(cat "$work/off.json")"
  (( $(jq_field '["stats"]["read"]' <"$work/off.json") < 64 * 1024 * 1024 )) || fail "offline image read free space"
  restore_id=$(jq_field '["id"]' <"$work/off.json")
  rm -f "$work/restored.img"
  umbra image restore "$restore_id" --repo "$repo" --to "$work/restored.img" >/dev/null || fail "restore offline image"
  e2fsck -fn "$work/restored.img" >/dev/null 2>&1 || fail "restored offline image fails fsck"
  mount -o ro,loop "$work/restored.img" "$work/omnt" || fail "mount restored offline image"
  cmp "$work/omnt/r.bin" <(mount -o ro,loop "$work/offline.img" "$work/rmnt" && cat "$work/rmnt/r.bin"; umount "$work/rmnt") || fail "offline image file differs"
  umount "$work/omnt"
  log "ok: offline ext4 image read $(jq_field '["stats"]["read"]' <"$work/off.json") of 134217728 bytes, restores with the same files"

  # 9. Bad input: clear error, non-zero exit, nothing changed.
  repo=$work/repo
  local snapshot_before
  snapshot_before=$(find "$repo" -type f | sort | xargs sha256sum)
  expect_fail "unknown volume" umbra image create nope --repo "$repo"
  expect_fail "unknown image" umbra image restore ffffffff --repo "$repo" --to "$work/x.img"
  expect_fail "missing repository" umbra image list --repo "$work/no-such-repo"
  mkdir -p "$work/foreign" && echo hello >"$work/foreign/file"
  expect_fail "foreign repository" umbra image list --repo "$work/foreign"
  expect_fail "image create into a foreign directory" umbra image create v --repo "$work/foreign"
  [[ $(ls "$work/foreign") == file ]] || fail "a foreign directory was written to"
  truncate -s 1M "$work/small.img"
  expect_fail "restore target too small" umbra image restore "$i3" --repo "$repo" --to "$work/small.img"
  [[ $(stat -c %s "$work/small.img") == 1048576 ]] || fail "too-small target was changed"
  cmp -s "$work/small.img" <(head -c 1048576 /dev/zero) || fail "too-small target was written"
  expect_fail "restore onto a mounted device" umbra image restore "$i3" --repo "$repo" --to "$dev"
  expect_fail "offline image of a mounted volume" umbra image create "$dev" --offline --repo "$repo"
  expect_fail "no repository given" env -u UMBRA_REPO "$bin/umbra" image list
  [[ $(find "$repo" -type f | sort | xargs sha256sum) == "$snapshot_before" ]] || fail "bad input changed the repository"
  log "PASS"
}

# shellcheck source=writers_cases.sh
source "$(dirname "${BASH_SOURCE[0]}")/writers_cases.sh"
# shellcheck source=writers_app_cases.sh
source "$(dirname "${BASH_SOURCE[0]}")/writers_app_cases.sh"

case "$case_name" in
  pit_ext4) case_pit ext4 ;;
  pit_xfs) case_pit xfs ;;
  many) case_many ;;
  cap) case_cap ;;
  kill9) case_kill9 ;;
  revert) case_revert ;;
  bad_input) case_bad_input ;;
  nbd_snapshot) case_nbd_snapshot ;;
  nbd_live) case_nbd_live ;;
  image) case_image ;;
  writers) case_writers ;;
  writers_kill9) case_writers_kill9 ;;
  writer_postgresql) case_writer_postgresql ;;
  writer_sqlite) case_writer_sqlite ;;
  *) echo "unknown case $case_name"; exit 2 ;;
esac
