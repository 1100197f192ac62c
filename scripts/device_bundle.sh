#!/usr/bin/env bash
# Bundles built binaries and the non-system shared libraries they need into
# .device-bin/ (git-ignored) so the GPU machine, which has no -dev packages,
# can run them: pass `.device-bin` in the device tool's `carry` and run
#   bash scripts/device_run.sh
# on the device. Usage: scripts/device_bundle.sh [BUILD_DIR]   (default build)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=.device-bin
rm -rf "$out"
mkdir -p "$out/lib" "$out/bin"
mapfile -t bins < <(find "$build/tests" "$build/bench" -maxdepth 3 -type f -perm -u+x \
                     \( -name '*_test' -o -name '*_bench' \) ; echo "$build/controller/retort")
for b in "${bins[@]}"; do
  [[ -x "$b" ]] || continue
  cp "$b" "$out/bin/"
  ldd "$b" | awk '/=> \// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libstdc++.so*|libgcc_s.so*|libcuda.so*|libnccl.so*|ld-linux*|libpthread.so*|libdl.so*|librt.so*) ;;
      *) cp -Ln "$lib" "$out/lib/" 2>/dev/null || true ;;
    esac
  done
done
du -sh "$out"
