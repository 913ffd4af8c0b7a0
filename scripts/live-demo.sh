#!/usr/bin/env bash
# The live demo: umbrad serves a file-backed volume, ext4 on it takes writes,
# a snapshot is taken while writing, and is shown to be point-in-time.
#
#   scripts/live-demo.sh [--size SIZE] [--seconds N]
#
# Needs root (FUSE mount, loop devices, mkfs, mount). Everything it creates
# lives in a fresh directory under /var/tmp and is removed at the end, also
# on failure or Ctrl-C: mounts, loop devices, the daemon, files.
set -euo pipefail
cd "$(dirname "$0")/.."

size=1G
seconds=5
while [[ $# -gt 0 ]]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "live-demo: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ $(id -u) -ne 0 ]]; then echo "live-demo: needs root (FUSE, loop devices, mount)" >&2; exit 1; fi

bin=${UMBRA_BIN:-build/release/src}
work=$(mktemp -d /var/tmp/umbra-live-demo.XXXXXX)
export UMBRA_SOCKET=$work/umbrad.sock
mnt=$work/mnt
snapmnt=$work/snapshot-view
mkdir -p "$mnt" "$snapmnt"
daemon_pid=""
writer_pid=""

cleanup() {
  set +e
  [[ -n $writer_pid ]] && kill "$writer_pid" 2>/dev/null && wait "$writer_pid" 2>/dev/null
  fsfreeze -u "$mnt" 2>/dev/null
  mountpoint -q "$snapmnt" && "$bin/umbra" snapshot unmount "$snapmnt" >/dev/null 2>&1
  mountpoint -q "$snapmnt" && umount -l "$snapmnt"
  mountpoint -q "$mnt" && umount "$mnt"
  if [[ -n $daemon_pid ]]; then
    kill -TERM "$daemon_pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$daemon_pid" 2>/dev/null
  fi
  mountpoint -q "$work/dev" && umount -l "$work/dev"
  rm -rf "$work"
  echo "live-demo: cleaned up $work"
}
trap cleanup EXIT INT TERM

say() { printf '\n== %s\n' "$*"; }
umbra() { "$bin/umbra" "$@"; }

say "Starting umbrad (state in $work)"
"$bin/umbrad" --foreground --state-dir "$work/state" --socket "$UMBRA_SOCKET" \
  --fuse-dir "$work/dev" 2>"$work/umbrad.log" &
daemon_pid=$!
for _ in $(seq 100); do [[ -S $UMBRA_SOCKET ]] && break; sleep 0.1; done
umbra daemon status

say "umbra volume create demo --size $size; umbra volume attach demo"
umbra volume create demo --size "$size"
dev=$(umbra volume attach demo)
echo "block device: $dev"
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$dev"
mount -o discard "$dev" "$mnt"
mkdir -p "$mnt/data"
for i in $(seq 1 20); do head -c $((RANDOM * 16)) /dev/urandom >"$mnt/data/file-$i"; done
sync

say "A writer keeps creating, overwriting and deleting files"
(
  n=0
  while true; do
    n=$((n + 1))
    head -c $((RANDOM * 8)) /dev/urandom >"$mnt/data/new-$((n % 50))" 2>/dev/null || true
    dd if=/dev/urandom of="$mnt/data/file-$((n % 20 + 1))" bs=4k count=4 conv=notrunc,fsync status=none 2>/dev/null || true
    rm -f "$mnt/data/new-$(((n + 25) % 50))"
  done
) &
writer_pid=$!
sleep 1

say "Snapshot while writing: freeze, copy the device as the reference, snapshot, thaw"
fsfreeze -f "$mnt"
dd if="$dev" of="$work/reference.img" bs=1M iflag=direct status=none
snap=$(umbra --json snapshot create demo --persistent | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
fsfreeze -u "$mnt"
echo "snapshot $snap"
sleep "$seconds"
fstrim "$mnt" || true

say "umbra snapshot list"
umbra snapshot list
say "umbra storage list"
umbra storage list

say "Proof: the snapshot equals the reference byte for byte, while the live volume moved on"
kill "$writer_pid"; wait "$writer_pid" 2>/dev/null || true; writer_pid=""
sdev=$(umbra snapshot attach "$snap")
if cmp -s "$sdev" "$work/reference.img"; then echo "snapshot == reference: YES"; else echo "snapshot == reference: NO"; exit 1; fi
if cmp -s "$dev" "$work/reference.img"; then echo "live volume changed: NO (unexpected)"; exit 1; else echo "live volume changed since: yes"; fi
umbra snapshot detach "$snap"

say "umbra snapshot mount: the files as they were at the instant"
umbra snapshot mount "$snap" "$snapmnt"
ls -l "$snapmnt/data" | head -8
umbra snapshot unmount "$snapmnt"

say "Cleaning up: unmount, detach, delete"
umount "$mnt"
umbra volume detach demo
umbra snapshot delete "$snap"
umbra volume delete demo
echo
echo "live-demo: all checks passed"
