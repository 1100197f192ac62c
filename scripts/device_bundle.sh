#!/usr/bin/env bash
# Bundles built binaries and the non-system shared libraries they need into
# .device-bin/bundle.tar.xz (git-ignored) so the GPU machine, which has no -dev
# packages, can run them: pass `.device-bin` in the device tool's `carry` and run
#   bash scripts/device_run.sh
# on the device. The archive keeps the carried tree under the tool's 64 MiB.
# Usage: scripts/device_bundle.sh [BUILD_DIR]   (default build)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=.device-bin
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/lib" "$stage/bin"
# The GPU machine runs the cuda tests, the benchmarks and the CLI; the CPU
# suites run in CI.
mapfile -t bins < <(find "$build/tests" "$build/bench" -maxdepth 3 -type f -perm -u+x \
                     \( -name 'cuda_*_test' -o -name '*_bench' \) ; echo "$build/controller/retort")
for b in "${bins[@]}"; do
  [[ -x "$b" ]] || continue
  cp "$b" "$stage/bin/"
  ldd "$b" | awk '/=> \// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libstdc++.so*|libgcc_s.so*|libcuda.so*|libnccl.so*|ld-linux*|libpthread.so*|libdl.so*|librt.so*) ;;
      # cuBLAS (~600 MB) is on the GPU machine already, in PyTorch's
      # nvidia-cublas wheel; scripts/device_run.sh puts it on the path.
      libcublas.so*|libcublasLt.so*) ;;
      *) cp -Ln "$lib" "$stage/lib/" 2>/dev/null || true ;;
    esac
  done
done
rm -rf "$out"
mkdir -p "$out"
XZ_OPT=-T0 tar -C "$stage" -cJf "$out/bundle.tar.xz" bin lib
du -sh "$out/bundle.tar.xz"
