#!/usr/bin/env bash
# Installs the Debian packages adalora needs, if any are missing (idempotent), and says which.
# Usage: scripts/setup.sh [extra packages...]
set -euo pipefail

packages=(
  bazel-bootstrap default-jdk-headless g++     # build: Bazel 4.2.3 (offline) and g++ 12
  libeigen3-dev libxtensor-dev xtl-dev libxsimd-dev nlohmann-json3-dev zlib1g-dev
  catch2 libbenchmark-dev                      # tests and micro-benchmarks
  libopenmpi-dev openmpi-bin                   # //adalora/integrations:mpi, its tests and example
  cmake make                                   # tests/cmake_consumer_test.sh
  wordnet-base dict-gcide                      # examples/transformer's data: WordNet 3.0, GCIDE
  "$@"
)
# For the targets tagged "libtorch": installed when possible; where not, scripts/test.sh skips
# those targets and says so. libopenblas0 is the BLAS Debian's libtorch recommends and what its
# users get: without it (--no-install-recommends) torch multiplies on the reference BLAS, some
# 10x slower.
optional=(libtorch-dev python3-torch libopenblas0)
missing_optional=()
for p in "${optional[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing_optional+=("$p")
done

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ] && [ ${#missing_optional[@]} -eq 0 ]; then
  echo "setup: all $((${#packages[@]} + ${#optional[@]})) Debian packages already installed"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "setup: need root (or sudo) to install: ${missing[*]} ${missing_optional[*]}" >&2
    [ ${#missing[@]} -eq 0 ] && exit 0  # only optional packages missing
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing missing Debian packages: ${missing[*]}"
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "setup: installed ${#missing[@]} package(s)"
fi
if [ ${#missing_optional[@]} -gt 0 ]; then
  echo "setup: installing missing Debian packages for libtorch: ${missing_optional[*]}"
  if $sudo apt-get install -y -qq --no-install-recommends "${missing_optional[@]}" >/dev/null; then
    echo "setup: installed ${#missing_optional[@]} package(s)"
  else
    echo "setup: could not install ${missing_optional[*]}: the libtorch targets will be skipped" >&2
  fi
fi
