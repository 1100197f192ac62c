// mHC (manifold-constrained hyper-connections, V4_SPEC.md §2.1) on the
// device, matching ModelRunner::HcPre / HcPost and the hc_head collapse.
// HcPre runs in one launch: per row the rsqrt-normalised mix projection, the
// sigmoid maps, the Sinkhorn projection of comb and the stream collapse.
// Device pointers, row-major; hc <= 4 ((2+hc)*hc <= 24 mix rows).
#ifndef RETORT_MODEL_KERNELS_CUDA_MHC_CUH_
#define RETORT_MODEL_KERNELS_CUDA_MHC_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace retort::cuda {

struct HcParams {
  int hc = 4;                // streams
  int64_t d = 0;             // hidden size
  int sinkhorn_iters = 20;
  float rms_eps = 1e-6f;     // for rsqrt(mean(X^2) + rms_eps)
  float hc_eps = 1e-6f;      // added to pre (and in Sinkhorn)
};

// X [rows, hc, d]; fn [(2+hc)*hc, hc*d]; base [(2+hc)*hc]; scale [3].
// Outputs u [rows, d] = sum_j pre_j X_j, post [rows, hc], comb [rows, hc, hc]
// (row i = source stream, column k = destination).
[[nodiscard]] absl::Status HcPre(const HcParams& p, const float* X, int64_t rows, const float* fn, const float* base,
                                 const float* scale, float* u, float* post, float* comb, cudaStream_t stream);

// X'[r, k] = post[r, k] * F[r] + sum_j comb[r, j, k] * X[r, j] (in place on X).
[[nodiscard]] absl::Status HcPost(const HcParams& p, const float* F, const float* post, const float* comb,
                                  int64_t rows, float* X, cudaStream_t stream);

// hc_head: y[r] = sum_j w_j X[r, j], w_j = sigmoid(mix_j * rsqrt(mean(X^2)+rms_eps) * scale[0] + base_j) + hc_eps,
// fn [hc, hc*d], base [hc], scale [1]; y [rows, d].
[[nodiscard]] absl::Status HcHead(const HcParams& p, const float* X, int64_t rows, const float* fn,
                                  const float* base, const float* scale, float* y, cudaStream_t stream);

// The same two ops on the split path (Note [Split mHC mix projection] in
// mhc.cu): the mix projection spread over (rows, hc*d/1024) blocks, for the
// few-row decode steps where one block per row idles the GPU. scratch holds
// HcScratchFloats(p, rows) floats of device memory.
int64_t HcScratchFloats(const HcParams& p, int64_t rows);
[[nodiscard]] absl::Status HcPre(const HcParams& p, const float* X, int64_t rows, const float* fn, const float* base,
                                 const float* scale, float* u, float* post, float* comb, float* scratch,
                                 cudaStream_t stream);
[[nodiscard]] absl::Status HcHead(const HcParams& p, const float* X, int64_t rows, const float* fn,
                                  const float* base, const float* scale, float* y, float* scratch,
                                  cudaStream_t stream);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_MHC_CUH_
