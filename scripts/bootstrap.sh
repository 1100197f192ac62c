#!/usr/bin/env bash
# Installs every Debian 12 package retort's build, tests and benchmarks use.
# Idempotent: packages already present are left alone; safe to run again.
# CUDA 13 (nvcc, cuBLAS, NCCL) is expected at /usr/local/cuda and is not
# installed here; without it the build simply leaves the CUDA backend out.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libabsl-dev                      # Status, StatusOr, flags, strings, synchronization
  libgtest-dev libgmock-dev        # unit tests
  libbenchmark-dev                 # bench/ programs
  libopenblas-dev                  # sgemm ceiling in bench/, optional BLAS for CPU matmuls
  nlohmann-json3-dev               # config.json, safetensors headers, tokenizer.json
  libpcre2-dev                     # tokenizer pre-tokenizer regexes (Unicode properties, look-ahead)
  libicu-dev                       # tokenizer NFC normalizer
  libseccomp-dev                   # sandbox syscall filter
  libprotobuf-dev protobuf-compiler
  libgrpc++-dev protobuf-compiler-grpc
  librocksdb-dev                   # trajectory store, write-ahead log
  python3                          # sandbox runs untrusted Python
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "bootstrap: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "bootstrap: all ${#PACKAGES[@]} packages present"
fi
