// CUDA runtime helpers for retort: device discovery and errors as absl::Status
// naming the failing call, file and line. The CUDA backend of the tensor
// runtime and the kernels build on these. Compiles without a GPU; every entry
// point reports "no device" cleanly when none is present.
#ifndef RETORT_MODEL_KERNELS_CUDA_CUDA_RUNTIME_CUH_
#define RETORT_MODEL_KERNELS_CUDA_CUDA_RUNTIME_CUH_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace retort::cuda {

// Number of usable CUDA devices; 0 (not an error) when there is no driver or GPU.
int DeviceCount();

// "NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB" for device `index`.
absl::StatusOr<std::string> DeviceDescription(int index);

// Element-wise MXFP4 decode on the device: codes [rows, cols/2] packed e2m1
// (low nibble first), scales [rows, cols/32] E8M0 -> out [rows, cols] f32.
// Host pointers in, host pointers out (a self-contained check of the device
// path against the CPU decoder; the real kernels keep weights resident).
absl::Status DecodeMxFp4OnDevice(const unsigned char* codes, const unsigned char* scales,
                                 int rows, int cols, float* out);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_CUDA_RUNTIME_CUH_
