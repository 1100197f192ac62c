#include "model/kernels/cuda/cuda_runtime.cuh"

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace retort::cuda {

absl::Status CudaStatus(cudaError_t err, const char* call, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(call, " failed at ", file, ":", line, ": ", cudaGetErrorString(err)));
}

namespace {

__device__ float E2M1Value(unsigned code) {
  const float mag[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  float v = mag[code & 7u];
  return (code & 8u) ? -v : v;
}

__global__ void DecodeMxFp4Kernel(const unsigned char* codes, const unsigned char* scales, int rows, int cols,
                                  float* out) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long>(rows) * cols) return;
  const int r = static_cast<int>(i / cols), c = static_cast<int>(i % cols);
  const unsigned byte = codes[static_cast<long>(r) * (cols / 2) + c / 2];
  const unsigned code = (c & 1) ? (byte >> 4) : (byte & 0xfu);
  const unsigned s = scales[static_cast<long>(r) * (cols / 32) + c / 32];
  out[i] = (s == 0xffu) ? __int_as_float(0x7fc00000) : E2M1Value(code) * exp2f(static_cast<float>(s) - 127.f);
}

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
  return absl::StrCat(p.name, ", sm_", p.major, p.minor, ", ", static_cast<double>(p.totalGlobalMem) / (1 << 30),
                      " GiB");
}

// ---- DeviceBuffer / Stream / Event -----------------------------------------

DeviceBuffer::~DeviceBuffer() {
  if (ptr_) cudaFree(ptr_);
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

PinnedHostBuffer::~PinnedHostBuffer() {
  if (ptr_) cudaFreeHost(ptr_);
}

PinnedHostBuffer& PinnedHostBuffer::operator=(PinnedHostBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFreeHost(ptr_);
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

absl::StatusOr<PinnedHostBuffer> PinnedHostBuffer::Allocate(size_t bytes) {
  PinnedHostBuffer b;
  if (bytes == 0) return b;
  RETORT_CUDA_RETURN(cudaMallocHost(&b.ptr_, bytes));
  b.bytes_ = bytes;
  return b;
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  DeviceBuffer b;
  if (bytes == 0) return b;
  RETORT_CUDA_RETURN(cudaMalloc(&b.ptr_, bytes));
  b.bytes_ = bytes;
  return b;
}

Stream::~Stream() {
  if (s_) cudaStreamDestroy(s_);
}
Stream& Stream::operator=(Stream&& o) noexcept {
  if (this != &o) {
    if (s_) cudaStreamDestroy(s_);
    s_ = o.s_;
    o.s_ = nullptr;
  }
  return *this;
}
absl::StatusOr<Stream> Stream::Create() {
  Stream s;
  RETORT_CUDA_RETURN(cudaStreamCreateWithFlags(&s.s_, cudaStreamNonBlocking));
  return s;
}
absl::Status Stream::Synchronize() const {
  RETORT_CUDA_RETURN(cudaStreamSynchronize(s_));
  return absl::OkStatus();
}

Event::~Event() {
  if (e_) cudaEventDestroy(e_);
}
Event& Event::operator=(Event&& o) noexcept {
  if (this != &o) {
    if (e_) cudaEventDestroy(e_);
    e_ = o.e_;
    o.e_ = nullptr;
  }
  return *this;
}
absl::StatusOr<Event> Event::Create() {
  Event e;
  RETORT_CUDA_RETURN(cudaEventCreate(&e.e_));
  return e;
}
absl::Status Event::Record(cudaStream_t stream) const {
  RETORT_CUDA_RETURN(cudaEventRecord(e_, stream));
  return absl::OkStatus();
}
absl::Status Event::Synchronize() const {
  RETORT_CUDA_RETURN(cudaEventSynchronize(e_));
  return absl::OkStatus();
}
absl::StatusOr<float> Event::ElapsedMsSince(const Event& start) const {
  float ms = 0.0f;
  RETORT_CUDA_RETURN(cudaEventElapsedTime(&ms, start.e_, e_));
  return ms;
}

// ---- CachingAllocator --------------------------------------------------------

CachingAllocator::~CachingAllocator() {
  for (auto& [cls, v] : free_)
    for (void* p : v) cudaFree(p);
  // Live blocks at destruction are the owner's leak; free them too so the
  // process does not hold device memory past the allocator's lifetime.
  for (auto& [p, cls] : live_) cudaFree(p);
}

size_t CachingAllocator::SizeClass(size_t bytes) {
  constexpr size_t kSmall = 512, kLarge = size_t{2} << 20, kSplit = size_t{1} << 20;
  if (bytes <= kSplit) return (bytes + kSmall - 1) / kSmall * kSmall;
  return (bytes + kLarge - 1) / kLarge * kLarge;
}

absl::StatusOr<void*> CachingAllocator::Allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  const size_t cls = SizeClass(bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(cls);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      live_[p] = cls;
      cached_ -= cls;
      in_use_ += cls;
      return p;
    }
  }
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, cls);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    // Out of memory: return the cache to the driver and try once more.
    absl::Status s = EmptyCache();
    if (!s.ok()) return s;
    err = cudaMalloc(&p, cls);
  }
  RETORT_CUDA_RETURN(err);
  std::lock_guard<std::mutex> lock(mu_);
  live_[p] = cls;
  in_use_ += cls;
  ++mallocs_;
  return p;
}

void CachingAllocator::Free(void* ptr) {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(ptr);
  if (it == live_.end()) {
    std::fprintf(stderr, "%s:%d: CachingAllocator::Free of a pointer it does not own\n", __FILE__, __LINE__);
    std::abort();
  }
  const size_t cls = it->second;
  live_.erase(it);
  free_[cls].push_back(ptr);
  in_use_ -= cls;
  cached_ += cls;
}

absl::Status CachingAllocator::EmptyCache() {
  std::map<size_t, std::vector<void*>> drop;
  {
    std::lock_guard<std::mutex> lock(mu_);
    drop.swap(free_);
    cached_ = 0;
  }
  absl::Status first;
  for (auto& [cls, v] : drop)
    for (void* p : v) {
      absl::Status s = CudaStatus(cudaFree(p), "cudaFree(p)", __FILE__, __LINE__);
      if (first.ok()) first = s;
    }
  return first;
}

size_t CachingAllocator::bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_use_;
}
size_t CachingAllocator::bytes_cached() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cached_;
}
int64_t CachingAllocator::driver_allocations() const {
  std::lock_guard<std::mutex> lock(mu_);
  return mallocs_;
}

// ---- copies ------------------------------------------------------------------

absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) {
  RETORT_CUDA_RETURN(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  return absl::OkStatus();
}
absl::Status CopyToHost(void* dst, const void* src, size_t bytes) {
  RETORT_CUDA_RETURN(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
  return absl::OkStatus();
}
absl::Status CopyToDeviceAsync(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  RETORT_CUDA_RETURN(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
  return absl::OkStatus();
}
absl::Status CopyToHostAsync(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  RETORT_CUDA_RETURN(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
  return absl::OkStatus();
}

absl::Status DecodeMxFp4OnDevice(const unsigned char* codes, const unsigned char* scales, int rows, int cols,
                                 float* out) {
  if (cols % 32 != 0) return absl::InvalidArgumentError("mxfp4 columns must be a multiple of 32");
  if (DeviceCount() == 0) return absl::FailedPreconditionError("no CUDA device");
  const size_t n_codes = static_cast<size_t>(rows) * cols / 2, n_scales = static_cast<size_t>(rows) * cols / 32;
  const size_t n_out = static_cast<size_t>(rows) * cols;
  auto d_codes = DeviceBuffer::Allocate(n_codes);
  if (!d_codes.ok()) return d_codes.status();
  auto d_scales = DeviceBuffer::Allocate(n_scales);
  if (!d_scales.ok()) return d_scales.status();
  auto d_out = DeviceBuffer::Allocate(n_out * sizeof(float));
  if (!d_out.ok()) return d_out.status();
  RETORT_CUDA_RETURN(cudaMemcpy(d_codes->get(), codes, n_codes, cudaMemcpyHostToDevice));
  RETORT_CUDA_RETURN(cudaMemcpy(d_scales->get(), scales, n_scales, cudaMemcpyHostToDevice));
  const int threads = 256;
  const int blocks = static_cast<int>((n_out + threads - 1) / threads);
  DecodeMxFp4Kernel<<<blocks, threads>>>(d_codes->as<unsigned char>(), d_scales->as<unsigned char>(), rows, cols,
                                         d_out->as<float>());
  RETORT_CUDA_LAUNCH_CHECK();
  RETORT_CUDA_RETURN(cudaMemcpy(out, d_out->get(), n_out * sizeof(float), cudaMemcpyDeviceToHost));
  return absl::OkStatus();
}

}  // namespace retort::cuda
