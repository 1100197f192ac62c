// Safetensors files and checkpoint directories on well-formed input:
// WriteSafetensors -> SafetensorsFile::Open round trips for every dtype
// (empty and scalar tensors, metadata, awkward names), the atomic write, the
// three checkpoint layouts (single file, index + shards, bare shards) and the
// fixtures. Hostile input is hostile_checkpoint_test.cc's.
#include "model/io/safetensors.h"

#include <stdlib.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace retort::io {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::HasSubstr;

constexpr uint32_t kSeed = 20240611;

// A fresh directory under the test's temp dir, removed with its contents.
class ScopedTempDir {
 public:
  ScopedTempDir() {
    std::string tmpl = ::testing::TempDir() + "retort_io_XXXXXX";
    CHECK(mkdtemp(tmpl.data()) != nullptr) << "mkdtemp " << tmpl;
    path_ = tmpl;
  }
  ~ScopedTempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return (fs::path(path_) / name).string(); }

 private:
  std::string path_;
};

std::string FixtureDir(const std::string& name) {
  const char* root = std::getenv("RETORT_SOURCE_DIR");
  return (root != nullptr ? std::string(root) + "/" : std::string()) + "tests/fixtures/v4/" + name;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// A raw file: 8-byte length, `header` verbatim, then `data`.
std::string RawSafetensors(const std::string& header, const std::string& data) {
  const uint64_t n = header.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + header + data;
}

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

Tensor RandomTensor(DType dtype, Shape shape, std::mt19937& rng) {
  Tensor t = Tensor::Zeros(dtype, std::move(shape));
  uint8_t* p = t.mutable_raw();
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<uint8_t>(rng());
  return t;
}

bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() &&
         (a.nbytes() == 0 || std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0);
}

const DType kStorableDTypes[] = {DType::kF32,  DType::kBF16, DType::kF16, DType::kF8E4M3,
                                 DType::kE8M0, DType::kI8,   DType::kU8,  DType::kI32,
                                 DType::kI64,  DType::kBool};

TEST(SafetensorsTest, RoundTripsEveryDtypeWithEmptyAndScalarTensorsAndMetadata) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  std::mt19937 rng(kSeed);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (DType dt : kStorableDTypes) {
    const std::string name(DTypeName(dt));
    tensors.emplace_back(name + ".matrix", RandomTensor(dt, {3, 5}, rng));
    tensors.emplace_back(name + ".empty", RandomTensor(dt, {0}, rng));
    tensors.emplace_back(name + ".empty_inner", RandomTensor(dt, {2, 0, 3}, rng));
    tensors.emplace_back(name + ".scalar", RandomTensor(dt, {}, rng));
  }
  // Names that need JSON escaping; written in reverse of sorted order.
  tensors.emplace_back("z \"quoted\" \\ name \xc3\xbc", RandomTensor(DType::kF32, {7}, rng));
  tensors.emplace_back("a/with/slashes", RandomTensor(DType::kI64, {2, 2}, rng));
  const std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                       {"note", "line\nbreak \"q\""}};

  ScopedTempDir tmp;
  const std::string path = tmp / "model.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, tensors, metadata).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata(), metadata);
  EXPECT_EQ((*file)->entries().size(), tensors.size());
  for (const auto& [name, want] : tensors) {
    SCOPED_TRACE(name);
    ASSERT_TRUE((*file)->Has(name));
    auto got = (*file)->Get(name);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->dtype(), want.dtype());
    EXPECT_EQ(got->shape(), want.shape());
    EXPECT_TRUE(SameBytes(*got, want));
    EXPECT_FALSE(got->writable()) << "aligned tensors are zero-copy views of the mapping";
  }
  // The writer pads the header so the data region starts 8-byte aligned.
  const std::string bytes = ReadBytes(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ((8 + header_len) % 8, 0u);
  size_t data_bytes = 0;
  for (const auto& [name, t] : tensors) data_bytes += t.nbytes();
  EXPECT_EQ(bytes.size(), 8 + header_len + data_bytes);
}

TEST(SafetensorsTest, SafetensorsNamesRoundTripForEveryStorableDtype) {
  for (DType dt : kStorableDTypes) {
    const auto back = DTypeFromSafetensors(SafetensorsDTypeName(dt));
    ASSERT_TRUE(back.has_value()) << DTypeName(dt);
    EXPECT_EQ(*back, dt);
  }
  EXPECT_TRUE(SafetensorsDTypeName(DType::kMxFp4).empty());
}

TEST(SafetensorsTest, EmptyFileWithOnlyMetadataRoundTrips) {
  ScopedTempDir tmp;
  ASSERT_TRUE(WriteSafetensors(tmp / "m.safetensors", {}, {{"k", "v"}}).ok());
  auto file = SafetensorsFile::Open(tmp / "m.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->entries().empty());
  EXPECT_EQ((*file)->metadata().at("k"), "v");
  auto missing = (*file)->Get("nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("m.safetensors"));
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("'nope'"));
}

TEST(SafetensorsTest, WriteRejectsMxFp4AndDuplicateNamesAndLeavesNothingBehind) {
  ScopedTempDir tmp;
  std::mt19937 rng(kSeed);
  const std::string path = tmp / "m.safetensors";
  auto s = WriteSafetensors(path, {{"codes", RandomTensor(DType::kMxFp4, {4, 32}, rng)}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("'codes'"));
  s = WriteSafetensors(path, {{"x", RandomTensor(DType::kF32, {2}, rng)},
                              {"x", RandomTensor(DType::kF32, {2}, rng)}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("'x' given twice"));
  EXPECT_TRUE(ListDir(tmp.path()).empty());
}

TEST(SafetensorsTest, AtomicWriteReplacesTheFileAndLeavesNoTempFile) {
  ScopedTempDir tmp;
  std::mt19937 rng(kSeed);
  const std::string path = tmp / "model.safetensors";
  const Tensor first = RandomTensor(DType::kF32, {16}, rng);
  const Tensor second = RandomTensor(DType::kBF16, {3, 3}, rng);
  ASSERT_TRUE(WriteSafetensors(path, {{"w", first}}).ok());
  EXPECT_EQ(ListDir(tmp.path()), std::vector<std::string>{"model.safetensors"});
  // A reader holding the old file keeps seeing it after the rename.
  auto old_file = SafetensorsFile::Open(path);
  ASSERT_TRUE(old_file.ok()) << old_file.status();
  ASSERT_TRUE(WriteSafetensors(path, {{"w", second}}).ok());
  EXPECT_EQ(ListDir(tmp.path()), std::vector<std::string>{"model.safetensors"});
  EXPECT_TRUE(SameBytes(*(*old_file)->Get("w"), first));
  auto new_file = SafetensorsFile::Open(path);
  ASSERT_TRUE(new_file.ok()) << new_file.status();
  EXPECT_TRUE(SameBytes(*(*new_file)->Get("w"), second));
  EXPECT_EQ((*new_file)->Get("w")->dtype(), DType::kBF16);
  // A target in a missing directory fails and creates nothing.
  auto s = WriteSafetensors(tmp / "missing/model.safetensors", {{"w", first}});
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("missing/model.safetensors"));
  EXPECT_EQ(ListDir(tmp.path()), std::vector<std::string>{"model.safetensors"});
}

TEST(SafetensorsTest, ReadsTensorsStoredOutOfNameOrderAndZeroSizedAtAnyOffset) {
  // Data order need not follow name order; empty tensors occupy nothing, so
  // they may sit inside or at the end of another tensor's bytes.
  const float b_vals[2] = {1.5f, -2.0f};
  const int32_t a_vals[3] = {7, -8, 9};
  std::string data(reinterpret_cast<const char*>(b_vals), 8);
  data.append(reinterpret_cast<const char*>(a_vals), 12);
  const std::string header = R"({"a":{"dtype":"I32","shape":[3],"data_offsets":[8,20]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("e0":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                             R"("e1":{"dtype":"I64","shape":[2,0],"data_offsets":[20,20]}})";
  std::string padded = header;
  while ((8 + padded.size()) % 8) padded.push_back(' ');
  ScopedTempDir tmp;
  WriteBytes(tmp / "x.safetensors", RawSafetensors(padded, data));
  auto file = SafetensorsFile::Open(tmp / "x.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  auto a = (*file)->Get("a");
  auto b = (*file)->Get("b");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->data<int32_t>()[1], -8);
  EXPECT_EQ(a->data<int32_t>()[2], 9);
  EXPECT_EQ(b->data<float>()[0], 1.5f);
  EXPECT_EQ((*file)->Get("e1")->numel(), 0);
}

TEST(SafetensorsTest, GetCopiesTensorsWhoseBytesAreMisaligned) {
  // A header of odd length puts the data region at an odd address (the
  // mapping is page-aligned); typed reads of it would be misaligned, so Get
  // copies those tensors.
  const float f[3] = {0.25f, -1.0f, 3.0f};
  const int64_t i[2] = {-5, 1ll << 40};
  std::string data("\x11", 1);  // u8 at offset 0, then f32 at 1 and i64 at 13
  data.append(reinterpret_cast<const char*>(f), 12);
  data.append(reinterpret_cast<const char*>(i), 16);
  std::string header = R"({"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                       R"("f":{"dtype":"F32","shape":[3],"data_offsets":[1,13]},)"
                       R"("i":{"dtype":"I64","shape":[2],"data_offsets":[13,29]}})";
  while ((8 + header.size()) % 8 != 1) header.push_back(' ');  // f at 2 mod 4, i at 6 mod 8
  ScopedTempDir tmp;
  WriteBytes(tmp / "x.safetensors", RawSafetensors(header, data));
  auto file = SafetensorsFile::Open(tmp / "x.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  auto ft = (*file)->Get("f");
  auto it = (*file)->Get("i");
  ASSERT_TRUE(ft.ok() && it.ok());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(ft->raw()) % alignof(float), 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(it->raw()) % alignof(int64_t), 0u);
  EXPECT_EQ(ft->data<float>()[0], 0.25f);
  EXPECT_EQ(ft->data<float>()[2], 3.0f);
  EXPECT_EQ(it->data<int64_t>()[0], -5);
  EXPECT_EQ(it->data<int64_t>()[1], 1ll << 40);
  EXPECT_EQ((*file)->Get("u")->raw()[0], 0x11);
}

// Writes tensors "<prefix>.<k>" (k < n) to `path`; returns them.
std::vector<std::pair<std::string, Tensor>> WriteShard(const std::string& path,
                                                       const std::string& prefix, int n,
                                                       std::mt19937& rng) {
  std::vector<std::pair<std::string, Tensor>> ts;
  for (int k = 0; k < n; ++k)
    ts.emplace_back(prefix + "." + std::to_string(k), RandomTensor(DType::kF32, {k + 1, 4}, rng));
  EXPECT_TRUE(WriteSafetensors(path, ts).ok());
  return ts;
}

TEST(CheckpointTest, SingleFileTakesPrecedenceOverOtherShards) {
  ScopedTempDir tmp;
  std::mt19937 rng(kSeed);
  const auto main = WriteShard(tmp / "model.safetensors", "w", 3, rng);
  WriteShard(tmp / "stray.safetensors", "stray", 2, rng);
  auto ckpt = Checkpoint::Open(tmp.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->TensorNames(), (std::vector<std::string>{"w.0", "w.1", "w.2"}));
  EXPECT_FALSE((*ckpt)->Has("stray.0"));
  int64_t bytes = 0;
  for (const auto& [name, t] : main) {
    auto e = (*ckpt)->Entry(name);
    ASSERT_TRUE(e.ok());
    EXPECT_EQ(e->shape, t.shape());
    EXPECT_EQ(e->dtype, DType::kF32);
    EXPECT_TRUE(SameBytes(*(*ckpt)->Get(name), t));
    EXPECT_EQ((*ckpt)->FileOf(name), tmp / "model.safetensors");
    bytes += static_cast<int64_t>(t.nbytes());
  }
  EXPECT_EQ((*ckpt)->TotalBytes(), bytes);
  auto missing = (*ckpt)->Get("w.3");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("'w.3'"));
  EXPECT_EQ((*ckpt)->Entry("w.3").status().code(), absl::StatusCode::kNotFound);
}

TEST(CheckpointTest, IndexNamesTheShardOfEveryTensor) {
  ScopedTempDir tmp;
  std::mt19937 rng(kSeed);
  const auto s1 = WriteShard(tmp / "model-00001-of-00002.safetensors", "first", 2, rng);
  const auto s2 = WriteShard(tmp / "model-00002-of-00002.safetensors", "second", 3, rng);
  WriteShard(tmp / "unlisted.safetensors", "unlisted", 1, rng);  // not in the index: ignored
  json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
  for (const auto& [n, t] : s1) index["weight_map"][n] = "model-00001-of-00002.safetensors";
  for (const auto& [n, t] : s2) index["weight_map"][n] = "model-00002-of-00002.safetensors";
  WriteBytes(tmp / "model.safetensors.index.json", index.dump(1));
  auto ckpt = Checkpoint::Open(tmp.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->TensorNames().size(), 5u);
  EXPECT_FALSE((*ckpt)->Has("unlisted.0"));
  for (const auto& [n, t] : s1) {
    EXPECT_EQ((*ckpt)->FileOf(n), tmp / "model-00001-of-00002.safetensors");
    EXPECT_TRUE(SameBytes(*(*ckpt)->Get(n), t));
  }
  for (const auto& [n, t] : s2) {
    EXPECT_EQ((*ckpt)->FileOf(n), tmp / "model-00002-of-00002.safetensors");
    EXPECT_TRUE(SameBytes(*(*ckpt)->Get(n), t));
  }
}

TEST(CheckpointTest, BareShardsAreAllReadExceptExpectedOutputs) {
  ScopedTempDir tmp;
  std::mt19937 rng(kSeed);
  WriteShard(tmp / "part-a.safetensors", "a", 2, rng);
  WriteShard(tmp / "part-b.safetensors", "b", 2, rng);
  WriteShard(tmp / "expected.safetensors", "logits", 1, rng);
  WriteBytes(tmp / "notes.txt", "not a shard");
  auto ckpt = Checkpoint::Open(tmp.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->TensorNames(), (std::vector<std::string>{"a.0", "a.1", "b.0", "b.1"}));
  EXPECT_EQ((*ckpt)->FileOf("b.1"), tmp / "part-b.safetensors");
}

TEST(CheckpointTest, BareShardsMustNotRepeatATensor) {
  ScopedTempDir tmp;
  std::mt19937 rng(kSeed);
  WriteShard(tmp / "part-a.safetensors", "w", 2, rng);
  WriteShard(tmp / "part-b.safetensors", "w", 1, rng);
  auto ckpt = Checkpoint::Open(tmp.path());
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kDataLoss);
  const std::string msg(ckpt.status().message());
  EXPECT_THAT(msg, HasSubstr("'w.0'"));
  EXPECT_THAT(msg, HasSubstr("part-a.safetensors"));
  EXPECT_THAT(msg, HasSubstr("part-b.safetensors"));
}

TEST(CheckpointTest, DirectoryWithoutWeightsIsNotFound) {
  ScopedTempDir tmp;
  auto empty = Checkpoint::Open(tmp.path());
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(empty.status().message()), HasSubstr(tmp.path()));
  auto absent = Checkpoint::Open(tmp / "absent");
  EXPECT_EQ(absent.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(absent.status().message()), HasSubstr("absent"));
}

TEST(CheckpointTest, OpensTheFixturesInBothLayouts) {
  auto a = Checkpoint::Open(FixtureDir("a"));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE((*a)->Has("model.embed_tokens.weight"));
  const std::string a_bytes = ReadBytes(FixtureDir("a") + "/model.safetensors");
  uint64_t a_header = 0;
  std::memcpy(&a_header, a_bytes.data(), 8);
  EXPECT_EQ((*a)->TotalBytes(),
            static_cast<int64_t>(a_bytes.size() - 8 - a_header));  // packed, no gaps
  auto q = Checkpoint::Open(FixtureDir("q"));
  ASSERT_TRUE(q.ok()) << q.status();
  const json index = json::parse(ReadBytes(FixtureDir("q") + "/model.safetensors.index.json"));
  EXPECT_EQ((*q)->TensorNames().size(), index["weight_map"].size());
  EXPECT_EQ((*q)->TotalBytes(), index["metadata"]["total_size"].get<int64_t>());
  for (const auto& [name, shard] : index["weight_map"].items())
    EXPECT_EQ(fs::path((*q)->FileOf(name)).filename().string(), shard.get<std::string>()) << name;
}

}  // namespace
}  // namespace retort::io
