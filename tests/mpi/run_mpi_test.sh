#!/usr/bin/env bash
# Runs an MPI program on NP local ranks and checks that its output contains an expected line.
# Usage: run_mpi_test.sh NP 'expected text' PROGRAM [program arguments...]
#
# Loopback only, on any number of cores: shared memory between ranks (btl self,vader with the ob1
# layer, so no network library such as UCX is tried), the runtime's own traffic on lo,
# --oversubscribe for more ranks than cores, and ranks that wait in a collective yield the core
# (a shared CI machine is often busier than its core count; busy-polling ranks then starve the
# one they wait for). CI runs as root, which Open MPI refuses unless told.
set -uo pipefail
np=$1
expected=$2
program=$3
shift 3
if ! command -v mpirun >/dev/null 2>&1; then
  echo "run_mpi_test: mpirun not found (Debian: apt-get install openmpi-bin libopenmpi-dev)" >&2
  exit 1
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# A private directory for Open MPI's session files and shared-memory segments. Their default
# names derive from mpirun's pid, and Bazel runs each test in its own pid namespace, so two
# tests running at once would both be pid 17 or so and read each other's files (MPI_Init then
# fails or hangs). Short, under /tmp: PMIx puts Unix sockets there (108-byte path limit).
session=$(mktemp -d /tmp/adalora_mpi.XXXXXX) || exit 1
trap 'rm -rf "$session"' EXIT
export TMPDIR=$session
# Under --config=asan: Open MPI leaves ~120 KB allocated at exit (libmpi, libhwloc and its
# plugins, which are unloaded by then, so their frames cannot be suppressed by name). Leaks in
# adalora's own code are caught by the single-process tests, which run with leak checks.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
output=$(mpirun -np "$np" --oversubscribe --bind-to none \
  --mca pml ob1 --mca btl self,vader --mca oob_tcp_if_include lo --mca mpi_yield_when_idle 1 \
  --mca orte_tmpdir_base "$session" --mca btl_vader_backing_directory "$session" \
  "$program" "$@" 2>&1)
status=$?
echo "$output"
if [ $status -ne 0 ]; then
  echo "run_mpi_test: mpirun -np $np $program exited with status $status" >&2
  exit 1
fi
if ! grep -qF -- "$expected" <<<"$output"; then
  echo "run_mpi_test: expected output to contain: $expected" >&2
  exit 1
fi
