#!/usr/bin/env bash
# Installs adalora with CMake into a temporary prefix, then configures, builds and runs
# tests/cmake_consumer against it with find_package(adalora CONFIG). Offline; /usr/bin/cmake.
# Under Bazel the sources arrive as runfiles (symlinks); they are copied to a scratch tree first
# so that what is installed is plain files.
set -euo pipefail
cmake=${CMAKE:-/usr/bin/cmake}
if [ ! -x "$cmake" ]; then
  echo "cmake_consumer_test: $cmake not found (install Debian's cmake, or run scripts/setup.sh)" >&2
  exit 1
fi
root="${TEST_SRCDIR:+$TEST_SRCDIR/${TEST_WORKSPACE:-adalora}}"
root="${root:-$(cd "$(dirname "$0")/.." && pwd)}"
work="${TEST_TMPDIR:-$(mktemp -d)}/cmake_consumer"
rm -rf "$work"
mkdir -p "$work/src"
cp -rL "$root/CMakeLists.txt" "$root/cmake" "$root/adalora" "$work/src/"
cp -rL "$root/tests/cmake_consumer" "$work/consumer"

generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
common=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
        -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)

echo "== configure and install adalora into $work/prefix"
"$cmake" -S "$work/src" -B "$work/build" "${generator[@]}" "${common[@]}" \
  -DCMAKE_INSTALL_PREFIX="$work/prefix"
"$cmake" --install "$work/build"
test -f "$work/prefix/share/cmake/adalora/adaloraConfig.cmake"
test -f "$work/prefix/include/adalora/svd_adapter.hpp"
test -f "$work/prefix/include/adalora/integrations/eigen.hpp"

echo "== build the consumer against the installed package"
"$cmake" -S "$work/consumer" -B "$work/consumer-build" "${generator[@]}" "${common[@]}" \
  -DCMAKE_PREFIX_PATH="$work/prefix"
"$cmake" --build "$work/consumer-build"
"$work/consumer-build/consumer"
