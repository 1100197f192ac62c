// Element types of retort tensors and exact scalar conversions between them.
//
// Low-precision formats follow the OCP MX / FP8 definitions:
//   f8_e4m3 : 1 sign, 4 exponent (bias 7), 3 mantissa; no infinities, 0x7f/0xff NaN; max 448.
//   e8m0    : an unsigned power-of-two exponent, value 2^(byte-127); 0xff is NaN.
//   mxfp4   : e2m1 codes (values 0,.5,1,1.5,2,3,4,6 and negatives), two per byte,
//             the LOW nibble holding the even (first) element. The per-32 E8M0
//             scales live in a separate e8m0 tensor.
// All conversions to f32 are exact. Thread-safe (pure functions).
#ifndef RETORT_MODEL_TENSOR_DTYPE_H_
#define RETORT_MODEL_TENSOR_DTYPE_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>

namespace retort {

enum class DType : uint8_t {
  kF32,
  kBF16,
  kF16,
  kF8E4M3,
  kE8M0,
  kMxFp4,  // packed e2m1 pairs; a logical element is half a byte
  kI8,
  kU8,
  kI32,
  kI64,
  kBool,
};

// Lower-case name used in messages and CLI output ("f32", "bf16", "mxfp4", ...).
std::string_view DTypeName(DType t);
// Parses DTypeName()'s output.
std::optional<DType> DTypeFromName(std::string_view name);
// Safetensors dtype strings ("F32", "BF16", "F8_E4M3", "F8_E8M0", "I8", ...).
// MXFP4 has no safetensors name: it is stored as I8/U8 and reinterpreted.
std::string_view SafetensorsDTypeName(DType t);
std::optional<DType> DTypeFromSafetensors(std::string_view name);

// Bytes holding `numel` logical elements (mxfp4: numel/2, rounded up).
int64_t DTypeBytes(DType t, int64_t numel);

// ---- exact scalar conversions ----------------------------------------------

inline float BitsToF32(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint32_t F32ToBits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float Bf16ToF32(uint16_t v) { return BitsToF32(static_cast<uint32_t>(v) << 16); }
// Round to nearest even; NaN stays NaN.
inline uint16_t F32ToBf16(float f) {
  uint32_t b = F32ToBits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40);
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

float F16ToF32(uint16_t v);
uint16_t F32ToF16(float f);  // round to nearest even, overflow to inf

namespace internal {
// All 256 e4m3 values, computed once (exactly) from the bit layout.
const float* E4M3Table();
}  // namespace internal

inline float E4M3ToF32(uint8_t v) { return internal::E4M3Table()[v]; }
// Round to nearest even, saturating to +-448 (the OCP "satfinite" convention).
uint8_t F32ToE4M3(float f);

inline float E8M0ToF32(uint8_t v) {
  if (v == 0xff) return std::numeric_limits<float>::quiet_NaN();
  if (v == 0) return BitsToF32(0x00400000u);  // 2^-127, an fp32 subnormal
  return BitsToF32(static_cast<uint32_t>(v) << 23);  // exponent field = v: 2^(v-127)
}

// e2m1 code (0..15) -> value.
inline float E2M1ToF32(uint8_t code) {
  static constexpr float kValues[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                        -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  return kValues[code & 0xf];
}
// Nearest e2m1 code to `x` (already divided by its scale); ties to even code, saturating at 6.
uint8_t F32ToE2M1(float x);

}  // namespace retort

#endif  // RETORT_MODEL_TENSOR_DTYPE_H_
