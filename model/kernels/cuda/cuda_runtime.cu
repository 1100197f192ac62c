#include "model/kernels/cuda/cuda_runtime.cuh"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"

namespace retort::cuda {
namespace {

absl::Status CudaStatus(cudaError_t err, const char* call, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(call, " failed at ", file, ":", line, ": ", cudaGetErrorString(err)));
}
#define RETORT_CUDA_RETURN(call)                                             \
  do {                                                                       \
    absl::Status s_ = CudaStatus((call), #call, __FILE__, __LINE__);         \
    if (!s_.ok()) return s_;                                                 \
  } while (0)

__device__ float E2M1Value(unsigned code) {
  const float mag[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  float v = mag[code & 7u];
  return (code & 8u) ? -v : v;
}

__global__ void DecodeMxFp4Kernel(const unsigned char* codes, const unsigned char* scales, int rows,
                                  int cols, float* out) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long>(rows) * cols) return;
  const int r = static_cast<int>(i / cols), c = static_cast<int>(i % cols);
  const unsigned byte = codes[static_cast<long>(r) * (cols / 2) + c / 2];
  const unsigned code = (c & 1) ? (byte >> 4) : (byte & 0xfu);
  const unsigned s = scales[static_cast<long>(r) * (cols / 32) + c / 32];
  out[i] = (s == 0xffu) ? __int_as_float(0x7fc00000) : E2M1Value(code) * exp2f(static_cast<float>(s) - 127.f);
}

// Frees a device buffer on scope exit.
struct DeviceBuffer {
  void* ptr = nullptr;
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
};

}  // namespace

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

absl::StatusOr<std::string> DeviceDescription(int index) {
  cudaDeviceProp p{};
  RETORT_CUDA_RETURN(cudaGetDeviceProperties(&p, index));
  return absl::StrCat(p.name, ", sm_", p.major, p.minor, ", ",
                      static_cast<double>(p.totalGlobalMem) / (1 << 30), " GiB");
}

absl::Status DecodeMxFp4OnDevice(const unsigned char* codes, const unsigned char* scales, int rows,
                                 int cols, float* out) {
  if (cols % 32 != 0) return absl::InvalidArgumentError("mxfp4 columns must be a multiple of 32");
  if (DeviceCount() == 0) return absl::FailedPreconditionError("no CUDA device");
  const size_t n_codes = static_cast<size_t>(rows) * cols / 2, n_scales = static_cast<size_t>(rows) * cols / 32;
  const size_t n_out = static_cast<size_t>(rows) * cols;
  DeviceBuffer d_codes, d_scales, d_out;
  RETORT_CUDA_RETURN(cudaMalloc(&d_codes.ptr, n_codes));
  RETORT_CUDA_RETURN(cudaMalloc(&d_scales.ptr, n_scales));
  RETORT_CUDA_RETURN(cudaMalloc(&d_out.ptr, n_out * sizeof(float)));
  RETORT_CUDA_RETURN(cudaMemcpy(d_codes.ptr, codes, n_codes, cudaMemcpyHostToDevice));
  RETORT_CUDA_RETURN(cudaMemcpy(d_scales.ptr, scales, n_scales, cudaMemcpyHostToDevice));
  const int threads = 256;
  const int blocks = static_cast<int>((n_out + threads - 1) / threads);
  DecodeMxFp4Kernel<<<blocks, threads>>>(static_cast<unsigned char*>(d_codes.ptr),
                                         static_cast<unsigned char*>(d_scales.ptr), rows, cols,
                                         static_cast<float*>(d_out.ptr));
  RETORT_CUDA_RETURN(cudaGetLastError());
  RETORT_CUDA_RETURN(cudaMemcpy(out, d_out.ptr, n_out * sizeof(float), cudaMemcpyDeviceToHost));
  return absl::OkStatus();
}

}  // namespace retort::cuda
