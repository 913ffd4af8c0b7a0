#!/usr/bin/env bash
# Builds the NBD fuzz target with clang (libFuzzer + ASan + UBSan) and runs
# it for SECONDS (default 30). Used by ctest (nbd_fuzz, 30 s); run it for
# longer by hand:   tests/fuzz/run_nbd_fuzz.sh . build/fuzz 600
# Exit 0 if no crash was found; 77 (skipped) if clang++ is missing.
set -euo pipefail
src=$(cd "${1:-.}" && pwd)
out=${2:-$src/build/fuzz}
seconds=${3:-30}
command -v clang++ >/dev/null || { echo "SKIP: clang++ not installed (scripts/setup.sh installs it)"; exit 77; }
mkdir -p "$out/corpus"
bin=$out/nbd_fuzz
sources=("$src/tests/fuzz/nbd_fuzz.cc" "$src/src/frontend/nbd/nbd_server.cc" "$src/src/base/status.cc")
if [[ ! -x $bin || -n $(find "${sources[@]}" "$src/src/frontend/nbd/nbd_server.h" \
      "$src/tests/frontend/nbd_test_util.h" -newer "$bin" 2>/dev/null) ]]; then
  clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I"$src/include" -I"$src/src" -I"$src/tests" "${sources[@]}" -o "$bin"
fi
cd "$out"
# corpus/ collects new inputs; seeds/ (checked in: the merged corpus of a
# 10-minute run, 503 coverage edges) starts every run deep in the protocol.
"$bin" -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
  -print_final_stats=1 corpus "$src/tests/fuzz/seeds" 2>&1 | grep -E "INITED|DONE|^stat::|ERROR|SUMMARY|crash|Test unit" | tail -n 20
exit "${PIPESTATUS[0]}"
