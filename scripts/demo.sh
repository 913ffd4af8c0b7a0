#!/usr/bin/env bash
# Builds the release preset and runs the engine demo, passing all arguments
# through: scripts/demo.sh [demo options...]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release
exec build/release/src/umbra-engine-demo "$@"
