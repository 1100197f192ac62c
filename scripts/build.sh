#!/usr/bin/env bash
# Configures and builds retort into build/ (Release). Extra arguments go to cmake.
# CI=true turns warnings into errors.
set -euo pipefail
cd "$(dirname "$0")/.."
werror=OFF
[[ "${CI:-}" == "true" ]] && werror=ON
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DRETORT_WERROR=$werror "$@" >/dev/null
jobs=$(nproc)
# Keep memory in check on small machines: ~1.5 GiB per compile job.
mem_jobs=$(( $(awk '/MemAvailable/ {print $2}' /proc/meminfo) / 1500000 ))
(( mem_jobs >= 1 && mem_jobs < jobs )) && jobs=$mem_jobs
ninja -C build -j "$jobs"
