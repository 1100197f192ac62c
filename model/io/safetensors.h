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
// and keep it alive. Thread-safety: a SafetensorsFile / Checkpoint is
// immutable after Open and may be read from many threads.
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

// A checkpoint directory: `model.safetensors`, or `model.safetensors.index.json`
// whose weight_map names the shard of every tensor, or (fallback) every
// *.safetensors file in the directory. Tensor names must be unique across shards.
class Checkpoint {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  std::vector<std::string> TensorNames() const;  // sorted
  bool Has(const std::string& name) const { return where_.count(name) > 0; }
  // The entry (dtype, shape) without touching data; NotFound when absent.
  [[nodiscard]] absl::StatusOr<TensorEntry> Entry(const std::string& name) const;
  [[nodiscard]] absl::StatusOr<Tensor> Get(const std::string& name) const;
  // The shard file that holds `name` (for messages).
  std::string FileOf(const std::string& name) const;
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
