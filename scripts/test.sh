#!/usr/bin/env bash
# Sets up (Debian packages), builds and runs every default test with CTest.
# GPU tests carry the label `cuda` and skip cleanly without a device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/build.sh
cd build
ctest --output-on-failure -j "$(nproc)" "$@"
