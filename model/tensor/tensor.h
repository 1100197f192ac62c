// Tensor: a typed, shaped, contiguous view into reference-counted storage.
//
// Storage is CPU memory aligned to 64 bytes, a read-only mmap of a file region
// (checkpoints are loaded zero-copy), or, with the CUDA backend, device memory
// (same interface; Device says where). A Tensor is a cheap handle: copies share
// storage. Views (Slice along dim 0, Reshape) share storage too. Row-major and
// contiguous always: retort kernels never see strided tensors.
//
// Thread-safety: handles may be copied across threads; writing the same
// elements from two threads is the caller's race.
#ifndef RETORT_MODEL_TENSOR_TENSOR_H_
#define RETORT_MODEL_TENSOR_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/base/logging.h"
#include "model/tensor/dtype.h"

namespace retort {

enum class Device : uint8_t { kCpu, kCuda };
std::string_view DeviceName(Device d);

using Shape = std::vector<int64_t>;
std::string ShapeString(absl::Span<const int64_t> shape);
int64_t NumElements(absl::Span<const int64_t> shape);

// Owns bytes. Subclasses: aligned heap memory, a mapped file, device memory.
class Storage {
 public:
  virtual ~Storage() = default;
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  Device device() const { return device_; }
  bool writable() const { return writable_; }

 protected:
  Storage(uint8_t* data, size_t size, Device device, bool writable)
      : data_(data), size_(size), device_(device), writable_(writable) {}
  uint8_t* data_;
  size_t size_;
  Device device_;
  bool writable_;
};

// 64-byte aligned, zero-initialised CPU memory.
std::shared_ptr<Storage> AllocateCpuStorage(size_t bytes);
// Storage that keeps `owner` alive and points into it (e.g. an mmap region).
std::shared_ptr<Storage> BorrowedStorage(std::shared_ptr<const void> owner, const uint8_t* data,
                                         size_t size);

class Tensor {
 public:
  Tensor() = default;  // an empty handle: !defined()

  // Fresh zero-filled CPU tensor.
  static Tensor Zeros(DType dtype, Shape shape);
  // A tensor over existing storage at byte `offset`; CHECKs that it fits.
  static Tensor FromStorage(std::shared_ptr<Storage> storage, size_t offset, DType dtype, Shape shape);
  // Copies `values` into a new f32 / i64 / i32 tensor of `shape`.
  static Tensor FromF32(absl::Span<const float> values, Shape shape);
  static Tensor FromI64(absl::Span<const int64_t> values, Shape shape);
  static Tensor FromI32(absl::Span<const int32_t> values, Shape shape);

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::kCpu; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.size() + i : i]; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return NumElements(shape_); }
  size_t nbytes() const { return static_cast<size_t>(DTypeBytes(dtype_, numel())); }
  bool writable() const { return storage_ && storage_->writable(); }

  const uint8_t* raw() const { return storage_->data() + offset_; }
  uint8_t* mutable_raw() {
    CHECK(writable()) << "writing a read-only tensor";
    return storage_->data() + offset_;
  }
  template <typename T>
  const T* data() const {
    return reinterpret_cast<const T*>(raw());
  }
  template <typename T>
  T* mutable_data() {
    return reinterpret_cast<T*>(mutable_raw());
  }

  // Rows [begin, end) along dim 0: a view sharing storage.
  Tensor Slice(int64_t begin, int64_t end) const;
  // Same elements, new shape (numel must match): a view.
  Tensor Reshape(Shape shape) const;
  // Deep copy into fresh CPU memory.
  Tensor Clone() const;
  // A new f32 tensor with every element converted exactly (bf16, f16, f8_e4m3,
  // e8m0, i*, u8). mxfp4 needs its scales: see DequantizeMxFp4 in kernels.
  absl::StatusOr<Tensor> ToF32() const;

  std::string DebugString() const;  // "bf16[4, 8]"

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;
  DType dtype_ = DType::kF32;
  Shape shape_;
};

}  // namespace retort

#endif  // RETORT_MODEL_TENSOR_TENSOR_H_
