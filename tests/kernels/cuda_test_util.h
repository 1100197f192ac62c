// Helpers for the CUDA parity tests: device skip, upload/download with ASSERTs,
// and an error-bound comparison that reports the seed and the worst element.
#ifndef RETORT_TESTS_KERNELS_CUDA_TEST_UTIL_H_
#define RETORT_TESTS_KERNELS_CUDA_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/kernels/cuda/cuda_runtime.cuh"

#define RETORT_SKIP_WITHOUT_CUDA() \
  if (::retort::cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device"

namespace retort::testing {

template <typename T>
cuda::DeviceBuffer Up(const std::vector<T>& v) {
  auto b = cuda::Upload(v);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(*b) : cuda::DeviceBuffer();
}
template <typename T>
std::vector<T> Down(const cuda::DeviceBuffer& b, size_t n) {
  auto v = cuda::Download<T>(b.get(), n);
  EXPECT_TRUE(v.ok()) << v.status();
  return v.ok() ? *v : std::vector<T>(n);
}
inline cuda::DeviceBuffer Zeros(size_t bytes) {
  auto b = cuda::DeviceBuffer::Allocate(bytes);
  EXPECT_TRUE(b.ok()) << b.status();
  if (b.ok() && bytes) {
    EXPECT_EQ(cudaMemset(b->get(), 0, bytes), cudaSuccess);
  }
  return b.ok() ? std::move(*b) : cuda::DeviceBuffer();
}

inline std::vector<float> RandomFloats(std::mt19937_64& rng, size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// |got - want| <= atol + rtol * |want| everywhere; reports the worst element.
inline ::testing::AssertionResult AllClose(const std::vector<float>& got, const std::vector<float>& want, float atol,
                                           float rtol, uint64_t seed, const std::string& what) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": size " << got.size() << " vs " << want.size();
  size_t worst = 0;
  double worst_excess = -1.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    const double bound = atol + rtol * std::fabs(static_cast<double>(want[i]));
    if (!(err <= bound) && (err - bound > worst_excess || std::isnan(err))) {
      worst_excess = std::isnan(err) ? 1e30 : err - bound;
      worst = i;
    }
  }
  if (worst_excess < 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << " (seed " << seed << "): element " << worst << " got " << got[worst]
                                       << " want " << want[worst] << " (atol " << atol << ", rtol " << rtol << ")";
}

}  // namespace retort::testing

#endif  // RETORT_TESTS_KERNELS_CUDA_TEST_UTIL_H_
