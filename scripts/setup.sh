#!/usr/bin/env bash
# Installs the Debian packages adalora needs, if any are missing (idempotent), and says which.
# Usage: scripts/setup.sh [extra packages...]
set -euo pipefail

packages=(
  bazel-bootstrap default-jdk-headless g++     # build: Bazel 4.2.3 (offline) and g++ 12
  libeigen3-dev libxtensor-dev xtl-dev libxsimd-dev nlohmann-json3-dev zlib1g-dev
  catch2 libbenchmark-dev                      # tests and micro-benchmarks
  "$@"
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} Debian packages already installed"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "setup: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi
echo "setup: installing missing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: installed ${#missing[@]} package(s)"
