// Deterministic random fills on the device for benchmarks and tests that need
// model-sized weights or state without a host copy (a V4-Flash layer is
// ~3.5 GB): a counter-based hash of (seed, index), so the same seed gives the
// same bytes for any launch shape.
#ifndef RETORT_MODEL_KERNELS_CUDA_RANDOM_FILL_CUH_
#define RETORT_MODEL_KERNELS_CUDA_RANDOM_FILL_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace retort::cuda {

// p[i] = uniform in [lo, hi).
[[nodiscard]] absl::Status FillUniform(float* p, int64_t n, uint64_t seed, float lo, float hi, cudaStream_t stream);
// bf16 bit patterns of uniform values in [lo, hi).
[[nodiscard]] absl::Status FillUniformBf16(uint16_t* p, int64_t n, uint64_t seed, float lo, float hi,
                                           cudaStream_t stream);
// Bytes uniform in [lo, hi] (e.g. e2m1 code pairs: 0..255; E8M0 scales: a narrow band).
[[nodiscard]] absl::Status FillBytes(uint8_t* p, int64_t n, uint64_t seed, uint8_t lo, uint8_t hi,
                                     cudaStream_t stream);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_RANDOM_FILL_CUH_
