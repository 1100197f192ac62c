// CUDA kernels against their CPU twins. Needs a GPU: skips cleanly without one.
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "model/kernels/cpu/cpu_kernels.h"
#include "model/kernels/cuda/cuda_runtime.cuh"

namespace retort {
namespace {

TEST(CudaParityTest, MxFp4DecodeMatchesCpuExactly) {
  if (cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  std::printf("device: %s\n", cuda::DeviceDescription(0)->c_str());
  const uint64_t seed = 7;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> byte(0, 255), sc(100, 150);
  for (int rows : {1, 7, 19, 111, 989}) {
    const int cols = 96;
    std::vector<uint8_t> codes(rows * cols / 2), scales(rows * cols / 32);
    for (auto& c : codes) c = static_cast<uint8_t>(byte(rng));
    for (auto& s : scales) s = static_cast<uint8_t>(sc(rng));
    std::vector<float> gpu(rows * cols), cpu(rows * cols);
    ASSERT_TRUE(cuda::DecodeMxFp4OnDevice(codes.data(), scales.data(), rows, cols, gpu.data()).ok());
    cpu::DequantizeMxFp4(codes.data(), scales.data(), rows, cols, cpu.data());
    for (size_t i = 0; i < gpu.size(); ++i) ASSERT_EQ(gpu[i], cpu[i]) << "seed " << seed << " rows " << rows << " i " << i;
  }
}

}  // namespace
}  // namespace retort
