// The CUDA runtime pieces: device buffers, streams/events, the caching
// allocator and copies. Needs a GPU: skips cleanly without one.
#include <cstring>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "tests/kernels/cuda_test_util.h"

namespace retort {
namespace {

TEST(CudaRuntimeTest, SizeClassesRoundUp) {
  // Pure host logic: runs without a device.
  EXPECT_EQ(cuda::CachingAllocator::SizeClass(1), 512u);
  EXPECT_EQ(cuda::CachingAllocator::SizeClass(512), 512u);
  EXPECT_EQ(cuda::CachingAllocator::SizeClass(513), 1024u);
  EXPECT_EQ(cuda::CachingAllocator::SizeClass(1 << 20), size_t{1} << 20);
  EXPECT_EQ(cuda::CachingAllocator::SizeClass((1 << 20) + 1), size_t{2} << 20);
  EXPECT_EQ(cuda::CachingAllocator::SizeClass((5 << 20) + 1), size_t{6} << 20);
}

TEST(CudaRuntimeTest, ErrorsNameCallFileAndLine) {
  const absl::Status s = cuda::CudaStatus(cudaErrorInvalidValue, "cudaFoo(x)", "bar.cu", 42);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_NE(s.message().find("cudaFoo(x) failed at bar.cu:42"), absl::string_view::npos) << s;
  EXPECT_TRUE(cuda::CudaStatus(cudaSuccess, "x", "y", 1).ok());
}

TEST(CudaRuntimeTest, BufferRoundTripAndAsyncCopiesOnStream) {
  RETORT_SKIP_WITHOUT_CUDA();
  std::vector<int32_t> host(1001);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<int32_t>(i * 7 - 3);
  auto buf = cuda::DeviceBuffer::Allocate(host.size() * 4);
  ASSERT_TRUE(buf.ok()) << buf.status();
  auto stream = cuda::Stream::Create();
  ASSERT_TRUE(stream.ok()) << stream.status();
  auto e0 = cuda::Event::Create(), e1 = cuda::Event::Create();
  ASSERT_TRUE(e0.ok() && e1.ok());
  ASSERT_TRUE(e0->Record(stream->get()).ok());
  ASSERT_TRUE(cuda::CopyToDeviceAsync(buf->get(), host.data(), host.size() * 4, stream->get()).ok());
  std::vector<int32_t> back(host.size(), 0);
  ASSERT_TRUE(cuda::CopyToHostAsync(back.data(), buf->get(), back.size() * 4, stream->get()).ok());
  ASSERT_TRUE(e1->Record(stream->get()).ok());
  ASSERT_TRUE(stream->Synchronize().ok());
  EXPECT_EQ(back, host);
  auto ms = e1->ElapsedMsSince(*e0);
  ASSERT_TRUE(ms.ok()) << ms.status();
  EXPECT_GE(*ms, 0.0f);
  // Moving transfers ownership.
  cuda::DeviceBuffer moved = std::move(*buf);
  EXPECT_EQ(buf->get(), nullptr);
  EXPECT_NE(moved.get(), nullptr);
}

TEST(CudaRuntimeTest, ImpossibleAllocationIsAStatusNamingTheCall) {
  RETORT_SKIP_WITHOUT_CUDA();
  auto buf = cuda::DeviceBuffer::Allocate(size_t{1} << 50);  // 1 PiB
  ASSERT_FALSE(buf.ok());
  EXPECT_NE(buf.status().message().find("cudaMalloc"), absl::string_view::npos) << buf.status();
  EXPECT_NE(buf.status().message().find("cuda_runtime.cu:"), absl::string_view::npos) << buf.status();
  // The error is not sticky: later calls work.
  EXPECT_TRUE(cuda::DeviceBuffer::Allocate(1024).ok());
}

TEST(CudaRuntimeTest, CachingAllocatorReusesFreedBlocksAcrossThreads) {
  RETORT_SKIP_WITHOUT_CUDA();
  cuda::CachingAllocator alloc;
  auto a = alloc.Allocate(1000);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(alloc.bytes_in_use(), 1024u);
  alloc.Free(*a);
  EXPECT_EQ(alloc.bytes_cached(), 1024u);
  auto b = alloc.Allocate(1020);  // same class: the same block comes back
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, *a);
  EXPECT_EQ(alloc.driver_allocations(), 1);
  alloc.Free(*b);
  // Concurrent users: every block is distinct while live, and data survives.
  std::vector<std::thread> threads;
  std::vector<int> failures(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int it = 0; it < 50; ++it) {
        const size_t n = 64 + 37 * ((t * 50 + it) % 11);
        auto p = alloc.Allocate(n * 4);
        if (!p.ok()) { ++failures[t]; continue; }
        std::vector<int32_t> v(n, t * 1000 + it), w(n);
        if (!cuda::CopyToDevice(*p, v.data(), n * 4).ok() || !cuda::CopyToHost(w.data(), *p, n * 4).ok() || v != w)
          ++failures[t];
        alloc.Free(*p);
      }
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(failures[t], 0) << "thread " << t;
  EXPECT_EQ(alloc.bytes_in_use(), 0u);
  EXPECT_LE(alloc.driver_allocations(), 1 + 4 * 11);  // at most one live block per class per thread
  ASSERT_TRUE(alloc.EmptyCache().ok());
  EXPECT_EQ(alloc.bytes_cached(), 0u);
}

}  // namespace
}  // namespace retort
