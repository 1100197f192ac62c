#include "model/tensor/dtype.h"

#include <array>
#include <limits>

namespace retort {
namespace {

struct DTypeInfo {
  DType type;
  std::string_view name;
  std::string_view safetensors;
  int bits;  // per logical element
};

// The one enum<->string table (STYLE: one table each).
constexpr std::array<DTypeInfo, 11> kDTypes = {{
    {DType::kF32, "f32", "F32", 32},
    {DType::kBF16, "bf16", "BF16", 16},
    {DType::kF16, "f16", "F16", 16},
    {DType::kF8E4M3, "f8_e4m3", "F8_E4M3", 8},
    {DType::kE8M0, "e8m0", "F8_E8M0", 8},
    {DType::kMxFp4, "mxfp4", "", 4},
    {DType::kI8, "i8", "I8", 8},
    {DType::kU8, "u8", "U8", 8},
    {DType::kI32, "i32", "I32", 32},
    {DType::kI64, "i64", "I64", 64},
    {DType::kBool, "bool", "BOOL", 8},
}};

const DTypeInfo& Info(DType t) { return kDTypes[static_cast<int>(t)]; }

}  // namespace

std::string_view DTypeName(DType t) { return Info(t).name; }

std::optional<DType> DTypeFromName(std::string_view name) {
  for (const auto& i : kDTypes)
    if (i.name == name) return i.type;
  return std::nullopt;
}

std::string_view SafetensorsDTypeName(DType t) { return Info(t).safetensors; }

std::optional<DType> DTypeFromSafetensors(std::string_view name) {
  for (const auto& i : kDTypes)
    if (!i.safetensors.empty() && i.safetensors == name) return i.type;
  return std::nullopt;
}

int64_t DTypeBytes(DType t, int64_t numel) { return (numel * Info(t).bits + 7) / 8; }

namespace internal {
const float* E4M3Table() {
  static const auto* table = [] {
    auto* t = new float[256];
    for (int v = 0; v < 256; ++v) {
      const int sign = v >> 7, exp = (v >> 3) & 0xf, man = v & 0x7;
      float out;
      if (exp == 0xf && man == 0x7) {
        out = std::numeric_limits<float>::quiet_NaN();
      } else if (exp == 0) {
        out = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
      } else {
        out = std::ldexp(1.0f + man / 8.0f, exp - 7);
      }
      t[v] = sign ? -out : out;
    }
    return t;
  }();
  return table;
}
}  // namespace internal

float F16ToF32(uint16_t v) {
  const uint32_t sign = (v >> 15) & 1u;
  const int exp = (v >> 10) & 0x1f;
  const uint32_t man = v & 0x3ffu;
  float out;
  if (exp == 0) {
    out = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    out = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    out = std::ldexp(1.0f + man / 1024.0f, exp - 15);
  }
  return sign ? -out : out;
}

uint16_t F32ToF16(float f) {
  const uint32_t b = F32ToBits(f);
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  if (std::isnan(f)) return sign | 0x7e00u;
  float a = std::fabs(f);
  if (a >= 65520.0f) return sign | 0x7c00u;  // rounds to inf
  if (a < std::ldexp(1.0f, -14)) {            // subnormal grid of 2^-24
    float q = std::nearbyint(a * 16777216.0f);  // default rounding: nearest even
    return sign | static_cast<uint16_t>(q);
  }
  int e;
  float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  float q = std::nearbyint(m * 2048.0f);  // 11 significant bits
  if (q >= 2048.0f) {
    q /= 2.0f;
    ++e;
  }
  const int exp = e - 1 + 15;
  if (exp >= 31) return sign | 0x7c00u;
  return sign | static_cast<uint16_t>(exp << 10) | static_cast<uint16_t>(static_cast<uint32_t>(q) - 1024u);
}

uint8_t F32ToE4M3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  float a = std::fabs(f);
  if (a >= 448.0f) return sign | 0x7e;  // saturate to the largest finite value
  // Find the nearest representable value by scanning the 127 magnitudes
  // (exact and branch-free enough for a reference; hot paths use their own).
  uint8_t best = 0;
  float best_err = std::numeric_limits<float>::infinity();
  for (uint8_t c = 0; c < 0x7f; ++c) {
    float v = E4M3ToF32(c);
    float err = std::fabs(v - a);
    if (err < best_err || (err == best_err && (c & 1) == 0)) {
      best = c;
      best_err = err;
    }
  }
  return sign | best;
}

uint8_t F32ToE2M1(float x) {
  const uint8_t sign = x < 0 ? 8 : 0;
  float a = std::fabs(x);
  uint8_t best = 0;
  float best_err = std::numeric_limits<float>::infinity();
  for (uint8_t c = 0; c < 8; ++c) {
    float err = std::fabs(E2M1ToF32(c) - a);
    if (err < best_err || (err == best_err && (c & 1) == 0)) {
      best = c;
      best_err = err;
    }
  }
  return best == 0 ? 0 : static_cast<uint8_t>(sign | best);
}

}  // namespace retort
