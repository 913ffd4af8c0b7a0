#!/usr/bin/env bash
# Installs every Debian package Umbra needs to build, test and demo.
#
# Idempotent and quick when everything is present (one dpkg-query per
# package, no apt-get at all). Runs apt-get update only when something is
# missing. Needs root: uses sudo when not root and sudo exists.
#
# Add new dependencies to PACKAGES below -- this is the single list.
set -euo pipefail

PACKAGES=(
  build-essential g++ cmake ninja-build pkg-config git
  libgtest-dev libgmock-dev libbenchmark-dev zlib1g-dev
  clang-format
  nlohmann-json3-dev libcli11-dev libtomlplusplus-dev libsystemd-dev
  fio e2fsprogs xfsprogs util-linux procps
  libfuse3-dev fuse3 liburing-dev
  libnbd-bin libnbd-dev nbdfuse qemu-utils clang
  libzstd-dev zstd libssl-dev libext2fs-dev partclone sqlite3 time
  postgresql
  python3
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "setup: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
