#!/usr/bin/env bash
# Runs on the GPU machine from the repository root after scripts/device_bundle.sh
# (binaries carried in .device-bin/bundle.tar.xz): the `cuda` tests, then the benchmarks.
# Logs go to $OUT when set.
set -uo pipefail
bin=/tmp/retort-device-bin
rm -rf "$bin"; mkdir -p "$bin"
tar -C "$bin" -xJf .device-bin/bundle.tar.xz || { echo "no .device-bin/bundle.tar.xz: run scripts/device_bundle.sh and carry .device-bin"; exit 1; }
cublas_dir=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH="$bin/lib${cublas_dir:+:$cublas_dir}:${LD_LIBRARY_PATH:-}"
log=${OUT:-/tmp}/device.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  status=0
  for t in $bin/bin/*_test; do
    case "$(basename "$t")" in cuda_*|*_cuda_*) ;; *) continue ;; esac
    echo "== $t"; "$t" || status=1
  done
  # GPU benchmarks (the CPU ones are measured on the CI-class machine).
  for b in $bin/bin/*_bench; do
    case "$(basename "$b")" in cpu_*|sandbox_*|tokenizer_*) continue ;; esac
    echo "== $b"; "$b" ${BENCH_ARGS:-} | tee "${OUT:-/tmp}/$(basename "$b").log" || status=1
  done
  # The PyTorch baseline of bench/decode on the same GPU, joined to decode_bench's lines.
  if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    echo "== bench/decode/torch_v4.py"
    python3 bench/decode/torch_v4.py bench --layers 4 --cuda-graph > "${OUT:-/tmp}/torch_v4.jsonl" || status=1
    python3 bench/decode/compare.py "${OUT:-/tmp}/decode_bench.log" "${OUT:-/tmp}/torch_v4.jsonl" || status=1
  fi
  exit $status
} 2>&1 | tee "$log"
