#!/usr/bin/env bash
# Runs on the GPU machine from the repository root after scripts/device_bundle.sh
# (binaries carried in .device-bin): the `cuda` tests, then the benchmarks.
# Logs go to $OUT when set.
set -uo pipefail
export LD_LIBRARY_PATH="$PWD/.device-bin/lib:${LD_LIBRARY_PATH:-}"
log=${OUT:-/tmp}/device.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  status=0
  for t in .device-bin/bin/*_test; do
    case "$(basename "$t")" in cuda_*|*_cuda_*) ;; *) continue ;; esac
    echo "== $t"; "$t" || status=1
  done
  for b in .device-bin/bin/*_bench; do
    echo "== $b"; "$b" ${BENCH_ARGS:-} || status=1
  done
  exit $status
} 2>&1 | tee "$log"
