#!/usr/bin/env bash
# The one command that builds and runs every test.
#
# Installs dependencies (scripts/setup.sh), then for each of the `release`
# and `asan` CMake presets: configure, build, ctest -j2. Every preset is
# attempted even if an earlier one failed. The last line printed is always
# "N passed, N failed", summed over both ctest runs; a preset whose
# configure or build fails counts as one failure. Exits non-zero if anything
# failed.
#
# UMBRA_TEST_LONG=1 is passed through (exported) so tests can run their
# longer modes.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${UMBRA_TEST_LONG:-}" ]]; then
  export UMBRA_TEST_LONG
fi

./scripts/setup.sh || { echo "test: setup failed" >&2; echo "0 passed, 1 failed"; exit 1; }

total_passed=0
total_failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

for preset in release asan; do
  echo "=== [$preset] configure + build"
  if ! cmake --preset "$preset" >"$log" 2>&1; then
    cat "$log"
    echo "test: [$preset] configure FAILED" >&2
    total_failed=$((total_failed + 1))
    continue
  fi
  if ! cmake --build --preset "$preset"; then
    echo "test: [$preset] build FAILED" >&2
    total_failed=$((total_failed + 1))
    continue
  fi

  echo "=== [$preset] ctest"
  ctest --preset "$preset" -j2 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  # "100% tests passed, 0 tests failed out of 28"
  summary=$(grep -Eo '[0-9]+ tests failed out of [0-9]+' "$log" | tail -n1 || true)
  if [[ -n "$summary" ]]; then
    failed=$(awk '{print $1}' <<<"$summary")
    ran=$(awk '{print $NF}' <<<"$summary")
    total_passed=$((total_passed + ran - failed))
    total_failed=$((total_failed + failed))
    if [[ $rc -ne 0 && $failed -eq 0 ]]; then
      echo "test: [$preset] ctest exited $rc" >&2
      total_failed=$((total_failed + 1))
    fi
  elif grep -q 'No tests were found' "$log"; then
    echo "test: [$preset] no tests found" >&2
    total_failed=$((total_failed + 1))
  else
    echo "test: [$preset] ctest exited $rc without a summary" >&2
    total_failed=$((total_failed + 1))
  fi
done

echo "${total_passed} passed, ${total_failed} failed"
[[ $total_failed -eq 0 ]]
