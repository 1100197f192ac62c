#include "model/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "model/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace retort::io {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Headers larger than this are rejected before allocation (the format's own
// reference implementation uses 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

absl::Status Corrupt(const std::string& path, const std::string& what) {
  return absl::DataLossError(absl::StrCat(path, ": ", what));
}

struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr != nullptr && addr != MAP_FAILED) munmap(addr, size);
  }
};

absl::StatusOr<TensorEntry> ParseEntry(const std::string& path, const std::string& name,
                                       const json& v, size_t data_size) {
  auto bad = [&](const std::string& why) { return Corrupt(path, absl::StrCat("tensor '", name, "': ", why)); };
  if (!v.is_object()) return bad("header entry is not an object");
  if (!v.contains("dtype") || !v["dtype"].is_string()) return bad("missing string 'dtype'");
  if (!v.contains("shape") || !v["shape"].is_array()) return bad("missing array 'shape'");
  if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
    return bad("'data_offsets' must be [begin, end]");
  TensorEntry e;
  const std::string dt = v["dtype"].get<std::string>();
  auto dtype = DTypeFromSafetensors(dt);
  if (!dtype) return bad(absl::StrCat("unknown dtype '", dt, "'"));
  e.dtype = *dtype;
  // Element count with overflow checks: dims are non-negative integers and the
  // product must fit comfortably in the data region's size type.
  unsigned __int128 numel = 1;
  for (const auto& d : v["shape"]) {
    if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0))
      return bad("shape entries must be non-negative integers");
    const uint64_t dim = d.get<uint64_t>();
    numel *= dim;
    // 2^56 elements x 64 bits still fits DTypeBytes' int64 arithmetic.
    if (numel > (static_cast<unsigned __int128>(1) << 56)) return bad("shape too large");
    e.shape.push_back(static_cast<int64_t>(dim));
  }
  for (const auto& o : v["data_offsets"])
    if (!o.is_number_unsigned() && !(o.is_number_integer() && o.get<int64_t>() >= 0))
      return bad("data_offsets must be non-negative integers");
  const uint64_t begin = v["data_offsets"][0].get<uint64_t>();
  const uint64_t end = v["data_offsets"][1].get<uint64_t>();
  if (begin > end) return bad(absl::StrCat("data_offsets [", begin, ", ", end, "] are reversed"));
  if (end > data_size)
    return bad(absl::StrCat("data_offsets end ", end, " is beyond the data region (", data_size, " bytes)"));
  const uint64_t want = static_cast<uint64_t>(DTypeBytes(e.dtype, static_cast<int64_t>(numel)));
  if (end - begin != want)
    return bad(absl::StrCat("shape ", ShapeString(e.shape), " x ", dt, " needs ", want, " bytes but data_offsets span ",
                            end - begin));
  e.begin = begin;
  e.end = end;
  return e;
}

}  // namespace

SafetensorsFile::~SafetensorsFile() = default;

absl::StatusOr<std::shared_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  // O_NONBLOCK: a FIFO planted under a shard's name must not block the open.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::PermissionDeniedError(absl::StrCat(path, ": ", std::strerror(errno)));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": fstat: ", std::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Corrupt(path, "not a regular file");
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return Corrupt(path, absl::StrCat("file is ", size, " bytes, shorter than the 8-byte header length"));
  }
  auto mapping = std::make_shared<Mapping>();
  mapping->size = size;
  mapping->addr = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (mapping->addr == MAP_FAILED) {
    mapping->addr = nullptr;
    return absl::InternalError(absl::StrCat(path, ": mmap: ", std::strerror(errno)));
  }
  const uint8_t* base = static_cast<const uint8_t*>(mapping->addr);
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian host (x86-64, aarch64)
  if (header_len > kMaxHeaderBytes)
    return Corrupt(path, absl::StrCat("header length ", header_len, " exceeds the ", kMaxHeaderBytes, "-byte limit"));
  if (header_len > size - 8)
    return Corrupt(path, absl::StrCat("header length ", header_len, " runs past the end of the file (", size,
                                      " bytes): truncated?"));
  json header = json::parse(base + 8, base + 8 + header_len, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) return Corrupt(path, "header is not valid JSON");
  if (!header.is_object()) return Corrupt(path, "header is not a JSON object");

  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->data_ = base + 8 + header_len;
  file->data_size_ = size - 8 - header_len;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object()) return Corrupt(path, "__metadata__ is not an object");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string()) return Corrupt(path, absl::StrCat("__metadata__ '", m.key(), "' is not a string"));
        file->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    ASSIGN_OR_RETURN(TensorEntry e, ParseEntry(path, it.key(), it.value(), file->data_size_));
    file->entries_.emplace(it.key(), std::move(e));
  }
  // No two tensors may share bytes (zero-sized tensors occupy nothing).
  std::vector<std::pair<const std::string*, const TensorEntry*>> by_offset;
  for (const auto& [name, e] : file->entries_)
    if (e.end > e.begin) by_offset.emplace_back(&name, &e);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i].second->begin < by_offset[i - 1].second->end)
      return Corrupt(path, absl::StrCat("tensors '", *by_offset[i - 1].first, "' and '", *by_offset[i].first,
                                        "' overlap in the data region"));
  }
  file->mapping_ = mapping;
  return file;
}

absl::StatusOr<Tensor> SafetensorsFile::Get(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat(path_, ": no tensor '", name, "'"));
  const TensorEntry& e = it->second;
  auto storage = BorrowedStorage(mapping_, data_ + e.begin, e.end - e.begin);
  Tensor view = Tensor::FromStorage(std::move(storage), 0, e.dtype, e.shape);
  // The format does not align tensors; kernels read typed elements, so a
  // tensor whose bytes are not aligned to its element size is copied.
  const size_t align = static_cast<size_t>(std::max<int64_t>(1, DTypeBytes(e.dtype, 1)));
  if (reinterpret_cast<uintptr_t>(data_ + e.begin) % align != 0) return view.Clone();
  return view;
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return absl::NotFoundError(absl::StrCat(dir, ": not a checkpoint directory"));
  auto ckpt = std::make_unique<Checkpoint>();
  ckpt->dir_ = dir;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  auto add_file = [&](const fs::path& p) -> absl::StatusOr<int> {
    ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open(p.string()));
    ckpt->files_.push_back(std::move(f));
    return static_cast<int>(ckpt->files_.size()) - 1;
  };
  auto add_all = [&](int idx) -> absl::Status {
    for (const auto& [name, e] : ckpt->files_[idx]->entries()) {
      auto [it, inserted] = ckpt->where_.emplace(name, idx);
      if (!inserted)
        return absl::DataLossError(absl::StrCat(dir, ": tensor '", name, "' appears in both ",
                                                ckpt->files_[it->second]->path(), " and ",
                                                ckpt->files_[idx]->path()));
    }
    return absl::OkStatus();
  };
  if (fs::exists(index_path, ec)) {
    std::ifstream in(index_path);
    json index = json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded() || !index.is_object())
      return absl::DataLossError(absl::StrCat(index_path.string(), ": not valid JSON"));
    if (!index.contains("weight_map") || !index["weight_map"].is_object())
      return absl::DataLossError(absl::StrCat(index_path.string(), ": missing object 'weight_map'"));
    std::map<std::string, int> shard_ids;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        return absl::DataLossError(absl::StrCat(index_path.string(), ": weight_map['", it.key(), "'] is not a string"));
      const std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos || shard == ".." )
        return absl::DataLossError(absl::StrCat(index_path.string(), ": shard name '", shard, "' is not a file name"));
      if (!shard_ids.count(shard)) {
        const fs::path sp = fs::path(dir) / shard;
        if (!fs::exists(sp, ec))
          return absl::NotFoundError(absl::StrCat(index_path.string(), " names shard '", shard, "' (for tensor '",
                                                  it.key(), "'), which is absent"));
        ASSIGN_OR_RETURN(int idx, add_file(sp));
        shard_ids[shard] = idx;
        RETURN_IF_ERROR(add_all(idx));
      }
      auto w = ckpt->where_.find(it.key());
      if (w == ckpt->where_.end() || ckpt->files_[w->second]->path() != (fs::path(dir) / shard).string())
        return absl::DataLossError(absl::StrCat(index_path.string(), ": tensor '", it.key(), "' is not in shard '",
                                                shard, "'"));
    }
    if (ckpt->where_.size() != index["weight_map"].size()) {
      for (const auto& [name, idx] : ckpt->where_)
        if (!index["weight_map"].contains(name))
          return absl::DataLossError(absl::StrCat(ckpt->files_[idx]->path(), ": tensor '", name,
                                                  "' is not listed in model.safetensors.index.json"));
    }
  } else if (fs::exists(single, ec)) {
    ASSIGN_OR_RETURN(int idx, add_file(single));
    RETURN_IF_ERROR(add_all(idx));
  } else {
    std::vector<fs::path> shards;
    for (const auto& de : fs::directory_iterator(dir, ec))
      if (de.path().extension() == ".safetensors" && de.path().filename() != "expected.safetensors")
        shards.push_back(de.path());
    if (shards.empty())
      return absl::NotFoundError(absl::StrCat(dir, ": no model.safetensors, index or *.safetensors shards"));
    std::sort(shards.begin(), shards.end());
    for (const auto& p : shards) {
      ASSIGN_OR_RETURN(int idx, add_file(p));
      RETURN_IF_ERROR(add_all(idx));
    }
  }
  return ckpt;
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(where_.size());
  for (const auto& [n, i] : where_) names.push_back(n);
  return names;
}

absl::StatusOr<TensorEntry> Checkpoint::Entry(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) return absl::NotFoundError(absl::StrCat(dir_, ": missing tensor '", name, "'"));
  return files_[it->second]->entries().at(name);
}

absl::StatusOr<Tensor> Checkpoint::Get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) return absl::NotFoundError(absl::StrCat(dir_, ": missing tensor '", name, "'"));
  return files_[it->second]->Get(name);
}

std::string Checkpoint::FileOf(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? dir_ : files_[it->second]->path();
}

int64_t Checkpoint::TotalBytes() const {
  int64_t total = 0;
  for (const auto& f : files_)
    for (const auto& [n, e] : f->entries()) total += static_cast<int64_t>(e.end - e.begin);
  return total;
}

std::vector<std::string> TensorMap::TensorNames() const {
  std::vector<std::string> names;
  for (const auto& [n, t] : tensors_) names.push_back(n);
  return names;
}

absl::StatusOr<TensorEntry> TensorMap::Entry(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return absl::NotFoundError(absl::StrCat(description_, ": missing tensor '", name, "'"));
  TensorEntry e;
  e.dtype = it->second.dtype();
  e.shape = it->second.shape();
  e.end = it->second.nbytes();
  return e;
}

absl::StatusOr<Tensor> TensorMap::Get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return absl::NotFoundError(absl::StrCat(description_, ": missing tensor '", name, "'"));
  return it->second;
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<const std::pair<std::string, Tensor>*> sorted;
  for (const auto& t : tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->first < b->first; });
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    const auto& [name, t] = *sorted[i];
    if (i > 0 && sorted[i - 1]->first == name)
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' given twice"));
    if (t.device() != Device::kCpu)
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' is not on the CPU"));
    const std::string dt(SafetensorsDTypeName(t.dtype()));
    if (dt.empty())
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' has dtype ",
                                                     std::string(DTypeName(t.dtype())),
                                                     ", which safetensors cannot store (write mxfp4 as I8 codes)"));
    header[name] = {{"dtype", dt}, {"shape", t.shape()}, {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h.push_back(' ');  // align the data region to 8 bytes
  const fs::path target(path);
  const fs::path tmp = target.parent_path() / (target.filename().string() + ".tmp." + std::to_string(getpid()));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::PermissionDeniedError(absl::StrCat(tmp.string(), ": ", std::strerror(errno)));
  auto write_all = [&](const void* p, size_t n) -> bool {
    const uint8_t* c = static_cast<const uint8_t*>(p);
    while (n > 0) {
      ssize_t w = ::write(fd, c, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return false;
      c += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  };
  const uint64_t len = h.size();
  bool ok = write_all(&len, 8) && write_all(h.data(), h.size());
  for (size_t i = 0; ok && i < sorted.size(); ++i) ok = write_all(sorted[i]->second.raw(), sorted[i]->second.nbytes());
  ok = ok && ::fsync(fd) == 0;
  const int saved = errno;
  ::close(fd);
  if (!ok) {
    ::unlink(tmp.c_str());
    return absl::DataLossError(absl::StrCat(path, ": write failed: ", std::strerror(saved)));
  }
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    return absl::DataLossError(absl::StrCat(path, ": rename: ", std::strerror(e)));
  }
  const std::string parent = target.parent_path().empty() ? "." : target.parent_path().string();
  const int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

}  // namespace retort::io
