#!/usr/bin/env bash
# The main job: builds Umbra (release preset) and runs the live demo
# (scripts/live-demo.sh: umbrad, a file-backed volume with ext4 under writes,
# a snapshot taken while writing and shown to be point-in-time). Needs root.
#   scripts/demo.sh [--size SIZE] [--seconds N]   live demo
#   scripts/demo.sh --engine [engine demo options] engine-only demo, no root
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release
if [[ ${1:-} == --engine ]]; then
  shift
  exec build/release/src/umbra-engine-demo "$@"
fi
exec ./scripts/live-demo.sh "$@"
