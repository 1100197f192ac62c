// CUDA runtime pieces for retort: device discovery, errors as absl::Status
// naming the failing call, file and line, RAII handles (device buffer, stream,
// event), a caching device allocator and host<->device copies. The kernels in
// this folder build on these. Compiles without a GPU; every entry point
// reports "no device" cleanly when none is present (DeviceCount() == 0).
//
// Ownership: DeviceBuffer, Stream and Event own their handle and release it in
// the destructor; they are move-only. Thread-safety: the handles are
// thread-compatible; CachingAllocator is thread-safe.
#ifndef RETORT_MODEL_KERNELS_CUDA_CUDA_RUNTIME_CUH_
#define RETORT_MODEL_KERNELS_CUDA_CUDA_RUNTIME_CUH_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace retort::cuda {

// OkStatus for cudaSuccess, else Internal "<call> failed at <file>:<line>: <reason>".
absl::Status CudaStatus(cudaError_t err, const char* call, const char* file, int line);

#define RETORT_CUDA_RETURN(call)                                                            \
  do {                                                                                      \
    ::absl::Status retort_cuda_s_ = ::retort::cuda::CudaStatus((call), #call, __FILE__, __LINE__); \
    if (!retort_cuda_s_.ok()) return retort_cuda_s_;                                        \
  } while (0)

// Checks the last kernel launch.
#define RETORT_CUDA_LAUNCH_CHECK() RETORT_CUDA_RETURN(::cudaGetLastError())

// Number of usable CUDA devices; 0 (not an error) when there is no driver or GPU.
int DeviceCount();

// "NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB" for device `index`.
absl::StatusOr<std::string> DeviceDescription(int index);

// Owns `bytes` of device memory from cudaMalloc (or nothing). Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr, o.bytes_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  [[nodiscard]] static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Owns `bytes` of page-locked host memory from cudaMallocHost (staging for
// asynchronous copies and CUDA-graph memcpy nodes). Move-only.
class PinnedHostBuffer {
 public:
  PinnedHostBuffer() = default;
  ~PinnedHostBuffer();
  PinnedHostBuffer(PinnedHostBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr, o.bytes_ = 0; }
  PinnedHostBuffer& operator=(PinnedHostBuffer&& o) noexcept;
  PinnedHostBuffer(const PinnedHostBuffer&) = delete;
  PinnedHostBuffer& operator=(const PinnedHostBuffer&) = delete;
  [[nodiscard]] static absl::StatusOr<PinnedHostBuffer> Allocate(size_t bytes);
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Owns a non-blocking cudaStream_t. Move-only.
class Stream {
 public:
  Stream() = default;
  ~Stream();
  Stream(Stream&& o) noexcept : s_(o.s_) { o.s_ = nullptr; }
  Stream& operator=(Stream&& o) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  [[nodiscard]] static absl::StatusOr<Stream> Create();
  cudaStream_t get() const { return s_; }
  [[nodiscard]] absl::Status Synchronize() const;

 private:
  cudaStream_t s_ = nullptr;
};

// Owns a cudaEvent_t (timing enabled). Move-only.
class Event {
 public:
  Event() = default;
  ~Event();
  Event(Event&& o) noexcept : e_(o.e_) { o.e_ = nullptr; }
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  [[nodiscard]] static absl::StatusOr<Event> Create();
  cudaEvent_t get() const { return e_; }
  [[nodiscard]] absl::Status Record(cudaStream_t stream) const;
  [[nodiscard]] absl::Status Synchronize() const;
  // Milliseconds from `start` to this event (both recorded and complete).
  [[nodiscard]] absl::StatusOr<float> ElapsedMsSince(const Event& start) const;

 private:
  cudaEvent_t e_ = nullptr;
};

// A caching allocator over plain cudaMalloc: requests are rounded up to a size
// class (512 B granularity below 1 MiB, then 2 MiB granularity), freed blocks
// go to the free list of their class and are reused by later requests of the
// same class. Memory returns to the driver only in EmptyCache() or the
// destructor. Thread-safe (one mutex). Blocks are stream-agnostic: the caller
// must ensure work using a block has finished (or is ordered on the same
// stream as the next user) before Free().
class CachingAllocator {
 public:
  CachingAllocator() = default;
  ~CachingAllocator();
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // Returns a device pointer to at least `bytes` (nullptr for 0 bytes).
  [[nodiscard]] absl::StatusOr<void*> Allocate(size_t bytes);
  // Returns `ptr` (from Allocate) to its free list; CHECKs that it is ours.
  void Free(void* ptr);
  // cudaFree()s every cached (free) block.
  [[nodiscard]] absl::Status EmptyCache();

  static size_t SizeClass(size_t bytes);
  size_t bytes_in_use() const;
  size_t bytes_cached() const;  // held in free lists
  int64_t driver_allocations() const;  // cudaMalloc calls so far

 private:
  mutable std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;  // size class -> free blocks
  std::map<void*, size_t> live_;               // in-use block -> size class
  size_t in_use_ = 0, cached_ = 0;
  int64_t mallocs_ = 0;
};

// Synchronous copies (pageable host memory).
[[nodiscard]] absl::Status CopyToDevice(void* dst, const void* src, size_t bytes);
[[nodiscard]] absl::Status CopyToHost(void* dst, const void* src, size_t bytes);
// Stream-ordered copies; host memory should be pinned for true asynchrony.
[[nodiscard]] absl::Status CopyToDeviceAsync(void* dst, const void* src, size_t bytes, cudaStream_t stream);
[[nodiscard]] absl::Status CopyToHostAsync(void* dst, const void* src, size_t bytes, cudaStream_t stream);

// Allocates a device buffer holding a copy of `v`.
template <typename T>
absl::StatusOr<DeviceBuffer> Upload(const std::vector<T>& v) {
  auto b = DeviceBuffer::Allocate(v.size() * sizeof(T));
  if (!b.ok()) return b.status();
  if (!v.empty()) {
    absl::Status s = CopyToDevice(b->get(), v.data(), v.size() * sizeof(T));
    if (!s.ok()) return s;
  }
  return b;
}
// Copies `n` elements of device memory into a new vector.
template <typename T>
absl::StatusOr<std::vector<T>> Download(const void* src, size_t n) {
  std::vector<T> v(n);
  if (n) {
    absl::Status s = CopyToHost(v.data(), src, n * sizeof(T));
    if (!s.ok()) return s;
  }
  return v;
}

// Element-wise MXFP4 decode on the device: codes [rows, cols/2] packed e2m1
// (low nibble first), scales [rows, cols/32] E8M0 -> out [rows, cols] f32.
// Host pointers in, host pointers out (a self-contained check of the device
// path against the CPU decoder; the real kernels keep weights resident).
absl::Status DecodeMxFp4OnDevice(const unsigned char* codes, const unsigned char* scales,
                                 int rows, int cols, float* out);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_CUDA_RUNTIME_CUH_
