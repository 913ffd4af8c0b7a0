#!/usr/bin/env bash
# The disk's own ceiling for first writes under a snapshot, measured with fio
# on plain files (no Umbra, no FUSE, no loop device), so that fs_bench.sh's
# UMBRA-1 first-write figures can be read against what the disk allows.
#
# A first write under a copy-before-write snapshot must read the old chunk
# and write its copy before (or, at best, while) the new data lands:
#   firstseq1m  one pass of 1 MiB first writes over 1 GiB moves 1 GiB read
#               (the old data, cold) and 1 GiB written (the copies, appended
#               to the data file). Measured: 1 MiB direct reads of a cold
#               1 GiB file, 8 in flight, while 1 GiB of 1 MiB direct writes
#               extend another file one at a time (ext4 serialises extending
#               direct writes anyway). The pass cannot end before the slower
#               of the two, so 1024 / that time is the most first 1 MiB
#               writes per second any copy-before-write design can sustain
#               here. (The no-snapshot pass only fills the page cache.)
#   first4k     one 16 KiB chunk read per first 4 KiB write: 16 KiB direct
#               random reads of a cold file, 8 and 32 in flight.
#
# Usage (root: drops the page cache):
#   bench/disk_ceiling.sh [DIR]        (default /var/tmp; 3 GiB of scratch)
set -euo pipefail

dir=${1:-/var/tmp}
[[ $(id -u) == 0 ]] || { echo "disk_ceiling.sh: needs root (drops the page cache)" >&2; exit 1; }
command -v fio >/dev/null || { echo "disk_ceiling.sh: needs fio (scripts/setup.sh)" >&2; exit 1; }
work=$(mktemp -d "$dir/umbra-disk-ceiling-XXXXXX")
trap 'rm -rf "$work"' EXIT

cold() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# fio JSON on stdin -> "jobname iops runtime_ms" per job
summary() {
  python3 -c '
import json, sys
for j in json.load(sys.stdin)["jobs"]:
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    print(j["jobname"], round(side["iops"]), side["runtime"])'
}

fio --name=layout --filename="$work/old" --rw=write --bs=1M --size=1G --direct=1 \
  --output-format=terse >/dev/null
fio --name=layout --filename="$work/rand" --rw=write --bs=1M --size=2G --direct=1 \
  --output-format=terse >/dev/null

cold
mixed=$(fio --output-format=json --direct=1 --bs=1M --size=1G \
  --name=read-old --filename="$work/old" --rw=read --ioengine=libaio --iodepth=8 \
  --name=write-copy --filename="$work/copy" --rw=write --ioengine=psync --fallocate=none |
  summary)
rm -f "$work/copy"
cold
alone=$(fio --output-format=json --direct=1 --bs=1M --size=1G \
  --name=read-old-alone --filename="$work/old" --rw=read --ioengine=libaio --iodepth=8 | summary)
rand=""
for qd in 8 32; do
  cold
  rand+=$(fio --output-format=json --direct=1 --bs=16k --size=2G --runtime=5 --time_based \
    --name="randread16k-qd$qd" --filename="$work/rand" --rw=randread --ioengine=libaio \
    --iodepth=$qd | summary)$'\n'
done

python3 - "$mixed" "$alone" "$rand" <<'EOF'
import sys
rows = [l.split() for part in sys.argv[1:] for l in part.splitlines() if l.strip()]
r = {name: (int(iops), int(ms)) for name, iops, ms in rows}
print("| fio job | IOPS | runtime ms |")
print("|---|---|---|")
for name, (iops, ms) in r.items():
    print("| %s | %d | %d |" % (name, iops, ms))
slowest = max(r["read-old"][1], r["write-copy"][1])
print()
print("firstseq1m ceiling under a snapshot: 1 GiB read + 1 GiB written in %d ms "
      "= %.0f first 1 MiB writes/s" % (slowest, 1024 * 1000.0 / slowest))
print("first4k: one 16 KiB read per first write; the disk serves %d (8 in flight) "
      "to %d (32 in flight) per second" % (r["randread16k-qd8"][0], r["randread16k-qd32"][0]))
EOF
