// Safetensors checkpoints: read (mmap, zero-copy, every header field checked)
// and write (atomic), single files and sharded directories.
//
// Format: 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...,
//  "__metadata__": {str: str}}, then the data region; offsets are relative to
// the data region. A file is accepted only if every tensor's bytes equal
// shape x dtype, offsets are inside the data region, and no two tensors
// overlap. Any violation is a DataLoss / InvalidArgument status naming the
// file and the tensor; a hostile file never causes an out-of-bounds read.
//
// Ownership: tensors returned by Get() are read-only views into the mapping
// and keep it alive (a tensor whose bytes are not aligned to its element size
// is copied into aligned memory instead). Thread-safety: a SafetensorsFile /
// Checkpoint is immutable after Open and may be read from many threads.
#ifndef RETORT_MODEL_IO_SAFETENSORS_H_
#define RETORT_MODEL_IO_SAFETENSORS_H_

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/tensor/tensor.h"

namespace retort::io {

struct TensorEntry {
  DType dtype;
  Shape shape;
  size_t begin = 0;  // byte offsets into the data region
  size_t end = 0;
};

class SafetensorsFile {
 public:
  // Maps `path` read-only and validates the whole header.
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool Has(const std::string& name) const { return entries_.count(name) > 0; }
  // A zero-copy view; NotFound naming the file when absent.
  [[nodiscard]] absl::StatusOr<Tensor> Get(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  std::map<std::string, TensorEntry> entries_;
  std::map<std::string, std::string> metadata_;
  std::shared_ptr<const void> mapping_;  // munmap on last release
  const uint8_t* data_ = nullptr;        // start of the data region
  size_t data_size_ = 0;
};

// Where a model's named tensors come from: a checkpoint on disk, or tensors
// received in memory (e.g. a weight push to a rollout worker).
class TensorSource {
 public:
  virtual ~TensorSource() = default;
  virtual std::vector<std::string> TensorNames() const = 0;  // sorted
  virtual bool Has(const std::string& name) const = 0;
  [[nodiscard]] virtual absl::StatusOr<TensorEntry> Entry(const std::string& name) const = 0;
  [[nodiscard]] virtual absl::StatusOr<Tensor> Get(const std::string& name) const = 0;
  // Where `name` lives, for error messages (a file path, or a description).
  virtual std::string FileOf(const std::string& name) const = 0;
  virtual std::string Describe() const = 0;
};

// Tensors held in memory under their names.
class TensorMap final : public TensorSource {
 public:
  explicit TensorMap(std::string description = "tensors in memory") : description_(std::move(description)) {}
  void Add(const std::string& name, Tensor t) { tensors_[name] = std::move(t); }
  std::vector<std::string> TensorNames() const override;
  bool Has(const std::string& name) const override { return tensors_.count(name) > 0; }
  absl::StatusOr<TensorEntry> Entry(const std::string& name) const override;
  absl::StatusOr<Tensor> Get(const std::string& name) const override;
  std::string FileOf(const std::string& name) const override { return description_; }
  std::string Describe() const override { return description_; }

 private:
  std::string description_;
  std::map<std::string, Tensor> tensors_;
};

// A checkpoint directory: `model.safetensors`, or `model.safetensors.index.json`
// whose weight_map names the shard of every tensor, or (fallback) every
// *.safetensors file in the directory. Tensor names must be unique across shards.
class Checkpoint final : public TensorSource {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  std::vector<std::string> TensorNames() const override;  // sorted
  bool Has(const std::string& name) const override { return where_.count(name) > 0; }
  // The entry (dtype, shape) without touching data; NotFound when absent.
  [[nodiscard]] absl::StatusOr<TensorEntry> Entry(const std::string& name) const override;
  [[nodiscard]] absl::StatusOr<Tensor> Get(const std::string& name) const override;
  // The shard file that holds `name` (for messages).
  std::string FileOf(const std::string& name) const override;
  std::string Describe() const override { return dir_; }
  int64_t TotalBytes() const;

 private:
  std::string dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, int> where_;  // tensor -> index into files_
};

// Writes `tensors` (any order; written sorted by name) to `path` atomically:
// a temporary file in the same directory, fsync, rename, fsync of the directory.
[[nodiscard]] absl::Status WriteSafetensors(const std::string& path,
                                            const std::vector<std::pair<std::string, Tensor>>& tensors,
                                            const std::map<std::string, std::string>& metadata = {});

}  // namespace retort::io

#endif  // RETORT_MODEL_IO_SAFETENSORS_H_
