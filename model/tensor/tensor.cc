#include "model/tensor/tensor.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace retort {
namespace {

class AlignedStorage final : public Storage {
 public:
  explicit AlignedStorage(size_t bytes)
      : Storage(Allocate(bytes), bytes, Device::kCpu, /*writable=*/true) {}
  ~AlignedStorage() override { std::free(data_); }

 private:
  static uint8_t* Allocate(size_t bytes) {
    size_t rounded = ((bytes + 63) / 64) * 64;
    if (rounded == 0) rounded = 64;
    void* p = std::aligned_alloc(64, rounded);
    CHECK(p != nullptr) << "out of memory allocating " << bytes << " bytes";
    std::memset(p, 0, rounded);
    return static_cast<uint8_t*>(p);
  }
};

class Borrowed final : public Storage {
 public:
  Borrowed(std::shared_ptr<const void> owner, const uint8_t* data, size_t size)
      : Storage(const_cast<uint8_t*>(data), size, Device::kCpu, /*writable=*/false),
        owner_(std::move(owner)) {}

 private:
  std::shared_ptr<const void> owner_;
};

}  // namespace

std::string_view DeviceName(Device d) {
  switch (d) {
    case Device::kCpu: return "cpu";
    case Device::kCuda: return "cuda";
  }
  return "?";
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

int64_t NumElements(absl::Span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::shared_ptr<Storage> AllocateCpuStorage(size_t bytes) {
  return std::make_shared<AlignedStorage>(bytes);
}

std::shared_ptr<Storage> BorrowedStorage(std::shared_ptr<const void> owner, const uint8_t* data,
                                         size_t size) {
  return std::make_shared<Borrowed>(std::move(owner), data, size);
}

Tensor Tensor::Zeros(DType dtype, Shape shape) {
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  for (int64_t d : t.shape_) CHECK_GE(d, 0);
  t.storage_ = AllocateCpuStorage(t.nbytes());
  return t;
}

Tensor Tensor::FromStorage(std::shared_ptr<Storage> storage, size_t offset, DType dtype,
                           Shape shape) {
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.offset_ = offset;
  CHECK_LE(offset + t.nbytes(), storage->size()) << "tensor " << t.DebugString() << " past storage";
  t.storage_ = std::move(storage);
  return t;
}

Tensor Tensor::FromF32(absl::Span<const float> values, Shape shape) {
  Tensor t = Zeros(DType::kF32, std::move(shape));
  CHECK_EQ(static_cast<int64_t>(values.size()), t.numel());
  std::memcpy(t.mutable_raw(), values.data(), values.size() * sizeof(float));
  return t;
}

Tensor Tensor::FromI64(absl::Span<const int64_t> values, Shape shape) {
  Tensor t = Zeros(DType::kI64, std::move(shape));
  CHECK_EQ(static_cast<int64_t>(values.size()), t.numel());
  std::memcpy(t.mutable_raw(), values.data(), values.size() * sizeof(int64_t));
  return t;
}

Tensor Tensor::FromI32(absl::Span<const int32_t> values, Shape shape) {
  Tensor t = Zeros(DType::kI32, std::move(shape));
  CHECK_EQ(static_cast<int64_t>(values.size()), t.numel());
  std::memcpy(t.mutable_raw(), values.data(), values.size() * sizeof(int32_t));
  return t;
}

Tensor Tensor::Slice(int64_t begin, int64_t end) const {
  CHECK(rank() >= 1);
  CHECK(0 <= begin && begin <= end && end <= shape_[0]) << begin << ".." << end << " of " << shape_[0];
  const int64_t row = NumElements(absl::MakeConstSpan(shape_).subspan(1));
  CHECK(dtype_ != DType::kMxFp4 || row % 2 == 0);
  Tensor t = *this;
  t.offset_ = offset_ + DTypeBytes(dtype_, begin * row);
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::Reshape(Shape shape) const {
  CHECK_EQ(NumElements(shape), numel()) << ShapeString(shape) << " vs " << ShapeString(shape_);
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::Clone() const {
  Tensor t = Zeros(dtype_, shape_);
  std::memcpy(t.mutable_raw(), raw(), nbytes());
  return t;
}

absl::StatusOr<Tensor> Tensor::ToF32() const {
  Tensor out = Zeros(DType::kF32, shape_);
  float* o = out.mutable_data<float>();
  const int64_t n = numel();
  switch (dtype_) {
    case DType::kF32: std::memcpy(o, raw(), n * 4); break;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) o[i] = Bf16ToF32(data<uint16_t>()[i]);
      break;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) o[i] = F16ToF32(data<uint16_t>()[i]);
      break;
    case DType::kF8E4M3:
      for (int64_t i = 0; i < n; ++i) o[i] = E4M3ToF32(raw()[i]);
      break;
    case DType::kE8M0:
      for (int64_t i = 0; i < n; ++i) o[i] = E8M0ToF32(raw()[i]);
      break;
    case DType::kI8:
      for (int64_t i = 0; i < n; ++i) o[i] = data<int8_t>()[i];
      break;
    case DType::kU8:
    case DType::kBool:
      for (int64_t i = 0; i < n; ++i) o[i] = raw()[i];
      break;
    case DType::kI32:
      for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(data<int32_t>()[i]);
      break;
    case DType::kI64:
      for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(data<int64_t>()[i]);
      break;
    case DType::kMxFp4:
      return absl::InvalidArgumentError("mxfp4 tensors need their scales to convert to f32");
  }
  return out;
}

std::string Tensor::DebugString() const { return absl::StrCat(std::string(DTypeName(dtype_)), ShapeString(shape_)); }

}  // namespace retort
