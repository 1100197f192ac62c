// Hostile checkpoints and configs. Each test copies a fixture (a: one HF
// file; q: released layout, index + two shards, FP8 and MXFP4) into a temp
// dir, corrupts it and asserts that Model::Load returns a non-OK status of
// the right code whose message names the file and the tensor (or config
// field). Sweeps truncate and byte-flip the single-file fixture: Load must
// fail cleanly or, where a flip keeps the file valid, succeed. io_asan_test
// runs this file with the code under test built with ASan + UBSan, so an
// out-of-bounds read or undefined behaviour fails it too.
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/io/safetensors.h"
#include "model/io/v4_config.h"
#include "model/v4/model.h"
#include "nlohmann/json.hpp"

namespace retort::v4 {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::HasSubstr;

constexpr char kModel[] = "model.safetensors";
constexpr char kIndex[] = "model.safetensors.index.json";
constexpr char kShard1[] = "model-00001-of-00002.safetensors";
constexpr char kShard2[] = "model-00002-of-00002.safetensors";

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
  CHECK(out.good()) << "writing " << path;
}

// A writable copy of fixture `name` (config, weights, index; not the
// expected outputs) in a fresh temp dir, removed on destruction.
class FixtureCopy {
 public:
  explicit FixtureCopy(const std::string& name) {
    std::string tmpl = ::testing::TempDir() + "retort_hostile_XXXXXX";
    CHECK(mkdtemp(tmpl.data()) != nullptr) << "mkdtemp " << tmpl;
    dir_ = tmpl;
    for (const auto& e : fs::directory_iterator(FixtureDir(name)))
      if (e.path().filename() != "expected.safetensors")
        fs::copy_file(e.path(), fs::path(dir_) / e.path().filename());
  }
  ~FixtureCopy() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  FixtureCopy(const FixtureCopy&) = delete;
  FixtureCopy& operator=(const FixtureCopy&) = delete;

  const std::string& dir() const { return dir_; }
  std::string operator/(const std::string& file) const { return (fs::path(dir_) / file).string(); }

 private:
  std::string dir_;
};

// A safetensors file as its parsed header and its data region.
struct Parsed {
  json header;
  std::string data;
};

Parsed ParseFile(const std::string& path) {
  const std::string bytes = ReadBytes(path);
  uint64_t n = 0;
  CHECK(bytes.size() >= 8);
  std::memcpy(&n, bytes.data(), 8);
  Parsed p;
  p.header = json::parse(bytes.substr(8, n));
  p.data = bytes.substr(8 + n);
  return p;
}

// Writes a well-framed file: `header` serialised (padded so the data region
// stays 8-byte aligned), then `data`.
void WriteParsed(const std::string& path, const Parsed& p) {
  std::string h = p.header.dump();
  while ((8 + h.size()) % 8) h.push_back(' ');
  const uint64_t n = h.size();
  WriteBytes(path, std::string(reinterpret_cast<const char*>(&n), 8) + h + p.data);
}

void EditHeader(const std::string& path, const std::function<void(json&)>& edit) {
  Parsed p = ParseFile(path);
  edit(p.header);
  WriteParsed(path, p);
}

void EditJson(const std::string& path, const std::function<void(json&)>& edit) {
  json j = json::parse(ReadBytes(path));
  edit(j);
  WriteBytes(path, j.dump(1));
}

// The shard of `tensor` in a copy of fixture q.
std::string ShardOf(const FixtureCopy& q, const std::string& tensor) {
  return q / json::parse(ReadBytes(q / kIndex))["weight_map"][tensor].get<std::string>();
}

// Removes `tensor` from its shard's header and from the index.
void RemoveFromShards(const FixtureCopy& q, const std::string& tensor) {
  EditHeader(ShardOf(q, tensor), [&](json& h) { ASSERT_EQ(h.erase(tensor), 1u) << tensor; });
  EditJson(q / kIndex, [&](json& j) { j["weight_map"].erase(tensor); });
}

// The tensor whose bytes end last in a file.
std::string LastTensorByOffset(const json& header) {
  std::string last;
  uint64_t end = 0;
  for (const auto& [name, e] : header.items()) {
    if (name == "__metadata__") continue;
    if (e["data_offsets"][1].get<uint64_t>() >= end) {
      end = e["data_offsets"][1].get<uint64_t>();
      last = name;
    }
  }
  return last;
}

void ExpectError(const absl::Status& s, absl::StatusCode code,
                 const std::vector<std::string>& parts) {
  EXPECT_EQ(s.code(), code) << s;
  for (const auto& p : parts) EXPECT_THAT(std::string(s.message()), HasSubstr(p)) << s;
}

absl::Status Load(const FixtureCopy& f) { return Model::Load(f.dir()).status(); }

std::string Quoted(const std::string& tensor) { return "'" + tensor + "'"; }

constexpr absl::StatusCode kDataLoss = absl::StatusCode::kDataLoss;
constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
constexpr absl::StatusCode kNotFound = absl::StatusCode::kNotFound;

// ---- controls ---------------------------------------------------------------

TEST(HostileCheckpointTest, UnmodifiedCopiesLoad) {
  for (const char* name : {"a", "q"}) {
    FixtureCopy f(name);
    EXPECT_TRUE(Load(f).ok()) << name << ": " << Load(f);
  }
}

// ---- single file (fixture a) --------------------------------------------------

TEST(HostileCheckpointTest, TruncatedFile) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  const std::string bytes = ReadBytes(path);
  const std::string last = LastTensorByOffset(ParseFile(path).header);
  WriteBytes(path, bytes.substr(0, bytes.size() - 1));
  ExpectError(Load(f), kDataLoss, {path, Quoted(last), "beyond the data region"});
  for (size_t n : {0, 5, 7}) {
    WriteBytes(path, bytes.substr(0, n));
    ExpectError(Load(f), kDataLoss, {path, "shorter than the 8-byte header length"});
  }
}

TEST(HostileCheckpointTest, HeaderLengthBeyondTheFile) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  const std::string bytes = ReadBytes(path);
  auto with_length = [&](uint64_t n) {
    std::string b = bytes;
    std::memcpy(b.data(), &n, 8);
    WriteBytes(path, b);
  };
  with_length(bytes.size() - 7);
  ExpectError(Load(f), kDataLoss, {path, "runs past the end of the file"});
  with_length(std::numeric_limits<uint64_t>::max());
  ExpectError(Load(f), kDataLoss, {path, "exceeds the"});
  with_length(0);
  ExpectError(Load(f), kDataLoss, {path, "header is not valid JSON"});
}

TEST(HostileCheckpointTest, OffsetsOutsideTheData) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  const std::string t = "model.norm.weight";
  const uint64_t data_size = ParseFile(path).data.size();
  EditHeader(path, [&](json& h) { h[t]["data_offsets"] = {data_size, data_size + 256}; });
  ExpectError(Load(f), kDataLoss, {path, Quoted(t), "beyond the data region"});
  const uint64_t max = std::numeric_limits<uint64_t>::max();
  EditHeader(path, [&](json& h) { h[t]["data_offsets"] = {max - 256, max}; });
  ExpectError(Load(f), kDataLoss, {path, Quoted(t), "beyond the data region"});
}

TEST(HostileCheckpointTest, OverlappingOffsets) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  const std::string a = "model.layers.0.attn_norm.weight",
                    b = "model.layers.0.ffn_norm.weight";  // both f32 [64]
  const Parsed original = ParseFile(path);
  EditHeader(path, [&](json& h) { h[b]["data_offsets"] = h[a]["data_offsets"]; });
  ExpectError(Load(f), kDataLoss, {path, Quoted(a), Quoted(b), "overlap"});
  WriteParsed(path, original);
  EditHeader(path, [&](json& h) {
    const uint64_t begin = h[a]["data_offsets"][0].get<uint64_t>() + 4;
    h[b]["data_offsets"] = {begin, begin + 256};
  });
  ExpectError(Load(f), kDataLoss, {path, Quoted(a), Quoted(b), "overlap"});
}

TEST(HostileCheckpointTest, ReversedOffsets) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  const std::string t = "model.layers.2.attn_norm.weight";
  EditHeader(path, [&](json& h) {
    h[t]["data_offsets"] = {h[t]["data_offsets"][1], h[t]["data_offsets"][0]};
  });
  ExpectError(Load(f), kDataLoss, {path, Quoted(t), "reversed"});
}

TEST(HostileCheckpointTest, UnknownOrMissingDtype) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  const std::string t = "model.layers.1.hc_attn_fn";
  const Parsed original = ParseFile(path);
  for (const char* dt : {"F64", "f32", "F32 ", "", "MXFP4"}) {
    WriteParsed(path, original);
    EditHeader(path, [&](json& h) { h[t]["dtype"] = dt; });
    ExpectError(Load(f), kDataLoss, {path, Quoted(t), "unknown dtype '" + std::string(dt) + "'"});
  }
  WriteParsed(path, original);
  EditHeader(path, [&](json& h) { h[t]["dtype"] = 4; });
  ExpectError(Load(f), kDataLoss, {path, Quoted(t), "missing string 'dtype'"});
}

TEST(HostileCheckpointTest, ShapeTimesDtypeIsNotTheByteLength) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  const std::string t = "model.layers.4.ffn_norm.weight";  // f32 [64]: 256 bytes
  const Parsed original = ParseFile(path);
  struct Case {
    json shape;
    std::string dtype;
    std::string why;
  };
  const std::vector<Case> cases = {
      {{65}, "F32", "needs 260 bytes but data_offsets span 256"},
      {{64}, "BF16", "needs 128 bytes but data_offsets span 256"},
      {{64}, "I64", "needs 512 bytes"},
      {json::array(), "F32", "needs 4 bytes"},
      {{0}, "F32", "needs 0 bytes"},
      {{uint64_t{1} << 61}, "F32", "shape too large"},  // bytes would overflow int64
      {{uint64_t{1} << 40, uint64_t{1} << 40, 0}, "I8", "shape too large"},
      {{std::numeric_limits<uint64_t>::max()}, "I8", "shape too large"},
      {{-1, -64}, "F32", "non-negative integers"},
      {{64.0}, "F32", "non-negative integers"},
      {{"64"}, "F32", "non-negative integers"},
      {64, "F32", "missing array 'shape'"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.shape.dump() + " " + c.dtype);
    WriteParsed(path, original);
    EditHeader(path, [&](json& h) {
      h[t]["shape"] = c.shape;
      h[t]["dtype"] = c.dtype;
    });
    ExpectError(Load(f), kDataLoss, {path, Quoted(t), c.why});
  }
}

TEST(HostileCheckpointTest, MalformedHeader) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  const Parsed original = ParseFile(path);
  const std::string t = "model.layers.5.attn.attn_sink";
  struct Case {
    std::function<void(json&)> edit;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {[&](json& h) { h[t] = 5; }, {Quoted(t), "header entry is not an object"}},
      {[&](json& h) {
         h[t] = json::array({1, 2});
       },
       {Quoted(t), "header entry is not an object"}},
      {[&](json& h) {
         h[t] = {{"dtype", "F32"}, {"shape", {4}}};
       },
       {Quoted(t), "'data_offsets' must be [begin, end]"}},
      {[&](json& h) {
         h[t] = {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 8, 16}}};
       },
       {Quoted(t), "'data_offsets' must be [begin, end]"}},
      {[&](json& h) {
         h[t] = {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {-16, 0}}};
       },
       {Quoted(t), "data_offsets must be non-negative integers"}},
      {[&](json& h) {
         h[t] = {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0.0, 16.0}}};
       },
       {Quoted(t), "data_offsets must be non-negative integers"}},
      {[&](json& h) {
         h[t] = {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {"0", "16"}}};
       },
       {Quoted(t), "data_offsets must be non-negative integers"}},
      {[&](json& h) {
         h["__metadata__"] = {{"format", 1}};
       },
       {"__metadata__ 'format' is not a string"}},
      {[&](json& h) { h["__metadata__"] = "pt"; }, {"__metadata__ is not an object"}},
      {[&](json& h) { h = json::array({h}); }, {"header is not a JSON object"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "case " << i);
    WriteParsed(path, original);
    EditHeader(path, cases[i].edit);
    std::vector<std::string> parts = cases[i].parts;
    parts.push_back(path);
    ExpectError(Load(f), kDataLoss, parts);
  }
  // Bytes that are not JSON at all, and JSON cut short, in a well-framed file.
  for (const std::string& header :
       {std::string("\x00\xff garbage", 10), std::string("{\"a\": {\"dtype\": \"F3")}) {
    const uint64_t n = header.size();
    WriteBytes(path, std::string(reinterpret_cast<const char*>(&n), 8) + header + original.data);
    ExpectError(Load(f), kDataLoss, {path, "header is not valid JSON"});
  }
}

TEST(HostileCheckpointTest, MissingTensor) {
  FixtureCopy f("a");
  const std::string t = "model.layers.3.attn_norm.weight";
  EditHeader(f / kModel, [&](json& h) { h.erase(t); });  // its bytes stay: a gap is legal
  ExpectError(Load(f), kNotFound, {f.dir(), t, "missing tensor", "loading layer 3"});
}

TEST(HostileCheckpointTest, ExtraTensor) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  Parsed p = ParseFile(path);
  const uint64_t end = p.data.size();
  p.data.append(16, '\0');
  p.header["model.layers.0.attn.extra.weight"] = {
      {"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {end, end + 16}}};
  WriteParsed(path, p);
  ExpectError(Load(f), kInvalid, {path, "unexpected tensor 'model.layers.0.attn.extra.weight'"});
  // MTP-block tensors are the one exception: retort skips them.
  p.header.erase("model.layers.0.attn.extra.weight");
  p.header["mtp.0.norm.weight"] = {
      {"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {end, end + 16}}};
  WriteParsed(path, p);
  EXPECT_TRUE(Load(f).ok()) << Load(f);
}

TEST(HostileCheckpointTest, TensorOfTheWrongShapeOrDtype) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  const Parsed original = ParseFile(path);
  struct Case {
    std::string tensor;
    json shape;
    std::string dtype;
    std::string why;
  };
  // Every case keeps shape x dtype equal to the stored bytes, so the file is
  // valid and only the model can object.
  const std::vector<Case> cases = {
      {"model.layers.0.attn_norm.weight", {8, 8}, "F32", "has shape [8, 8], expected [64]"},
      {"model.embed_tokens.weight", {64, 320}, "F32", "has shape [64, 320], expected [320, 64]"},
      {"model.layers.2.ffn.experts.5.w2.weight",
       {32, 64},
       "F32",
       "has shape [32, 64], expected [64, 32]"},
      {"model.layers.1.ffn.gate.tid2eid", {320, 4}, "I32", "has shape [320, 4], expected [320, 2]"},
      {"model.layers.0.attn_norm.weight", {64}, "I32", "has dtype i32, expected f32"},
      {"model.layers.1.ffn.gate.tid2eid", {320, 2}, "F64", "unknown dtype"},
      {"model.layers.1.ffn.gate.tid2eid", {320, 4}, "F32", "has shape [320, 4]"},
      {"model.layers.1.ffn.gate.tid2eid", {320, 8}, "BF16", "has shape [320, 8]"},
      {"model.layers.4.attn.wq_a.weight",
       {32, 128},
       "BF16",
       "has shape [32, 128], expected [32, 64]"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.tensor + " " + c.shape.dump() + " " + c.dtype);
    WriteParsed(path, original);
    EditHeader(path, [&](json& h) {
      h[c.tensor]["shape"] = c.shape;
      h[c.tensor]["dtype"] = c.dtype;
    });
    const absl::Status s = Load(f);
    ExpectError(s, c.dtype == "F64" ? kDataLoss : kInvalid, {path, Quoted(c.tensor), c.why});
  }
}

TEST(HostileCheckpointTest, HashRoutingTableNamesAMissingExpert) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  const std::string t = "model.layers.1.ffn.gate.tid2eid";  // i64 [320, 2], 8 experts
  for (int64_t bad : {int64_t{8}, int64_t{-1}, int64_t{1} << 40}) {
    Parsed p = ParseFile(path);
    const uint64_t begin = p.header[t]["data_offsets"][0].get<uint64_t>();
    std::memcpy(p.data.data() + begin + 5 * sizeof(int64_t), &bad, sizeof(bad));
    WriteParsed(path, p);
    ExpectError(Load(f), kInvalid,
                {path, Quoted(t), "entry 5 names expert " + std::to_string(bad)});
  }
}

TEST(HostileCheckpointTest, ConfigContradictsTheWeights) {
  FixtureCopy f("a");
  EditJson(f / "config.json", [](json& c) { c["hidden_size"] = 128; });
  ExpectError(Load(f), kInvalid,
              {f / kModel, "'model.embed_tokens.weight'", "expected [320, 128]"});
  EditJson(f / "config.json", [](json& c) {
    c["hidden_size"] = 64;
    c["n_routed_experts"] = 7;
  });
  ExpectError(Load(f), kInvalid,
              {f / kModel, "'model.layers.0.ffn.gate.weight'", "expected [7, 64]"});
}

TEST(HostileCheckpointTest, MissingOrMalformedConfig) {
  FixtureCopy f("a");
  const std::string config = ReadBytes(f / "config.json");
  WriteBytes(f / "config.json", config.substr(0, config.size() / 2));
  ExpectError(Load(f), kInvalid, {f / "config.json", "not valid JSON"});
  fs::remove(f / "config.json");
  ExpectError(Load(f), kNotFound, {f / "config.json"});
}

TEST(HostileCheckpointTest, WeightsFileIsNotARegularFile) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  fs::remove(path);
  fs::create_directory(path);
  ExpectError(Load(f), kDataLoss, {path, "not a regular file"});
  fs::remove(path);
  ASSERT_EQ(mkfifo(path.c_str(), 0600), 0);  // opening it must not block
  ExpectError(Load(f), kDataLoss, {path, "not a regular file"});
  fs::remove(path);
  ExpectError(Load(f), kNotFound, {f.dir(), "no model.safetensors"});
}

// ---- index + shards (fixture q) --------------------------------------------------

TEST(HostileCheckpointTest, ShardNamedInTheIndexIsAbsent) {
  FixtureCopy q("q");
  // The index is read in key order: the first tensor of shard 2 is reported.
  const json index = json::parse(ReadBytes(q / kIndex));
  std::string first;
  for (const auto& [name, shard] : index["weight_map"].items())
    if (first.empty() && shard == kShard2) first = name;
  ASSERT_FALSE(first.empty());
  fs::remove(q / kShard2);
  ExpectError(Load(q), kNotFound, {q / kIndex, kShard2, Quoted(first), "absent"});
}

TEST(HostileCheckpointTest, MalformedIndex) {
  FixtureCopy q("q");
  const std::string index = ReadBytes(q / kIndex);
  WriteBytes(q / kIndex, index.substr(0, index.size() / 2));
  ExpectError(Load(q), kDataLoss, {q / kIndex, "not valid JSON"});
  WriteBytes(q / kIndex, "[]");
  ExpectError(Load(q), kDataLoss, {q / kIndex, "not valid JSON"});
  struct Case {
    std::function<void(json&)> edit;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {[](json& j) { j.erase("weight_map"); }, {"missing object 'weight_map'"}},
      {[](json& j) { j["weight_map"] = json::array(); }, {"missing object 'weight_map'"}},
      {[](json& j) { j["weight_map"]["head.weight"] = 2; },
       {"weight_map['head.weight'] is not a string"}},
      {[](json& j) { j["weight_map"]["head.weight"] = "../a/model.safetensors"; },
       {"is not a file name"}},
      {[](json& j) { j["weight_map"]["head.weight"] = ".."; }, {"is not a file name"}},
      {[](json& j) { j["weight_map"]["head.weight"] = ""; }, {"not a regular file"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "case " << i);
    WriteBytes(q / kIndex, index);
    EditJson(q / kIndex, cases[i].edit);
    std::vector<std::string> parts = cases[i].parts;
    parts.push_back(q.dir());
    ExpectError(Load(q), kDataLoss, parts);
  }
}

TEST(HostileCheckpointTest, IndexAndShardsDisagree) {
  FixtureCopy q("q");
  const std::string index = ReadBytes(q / kIndex);
  const std::string t = "layers.2.ffn.gate.bias";
  ASSERT_EQ(ShardOf(q, t), q / kShard2);
  EditJson(q / kIndex, [&](json& j) { j["weight_map"][t] = kShard1; });
  ExpectError(Load(q), kDataLoss,
              {q / kIndex, Quoted(t), "is not in shard 'model-00001-of-00002.safetensors'"});
  WriteBytes(q / kIndex, index);
  EditJson(q / kIndex, [&](json& j) { j["weight_map"].erase(t); });
  ExpectError(Load(q), kDataLoss,
              {q / kShard2, Quoted(t), "is not listed in model.safetensors.index.json"});
  WriteBytes(q / kIndex, index);
  EditJson(q / kIndex, [&](json& j) { j["weight_map"]["layers.9.ghost"] = kShard1; });
  ExpectError(Load(q), kDataLoss, {q / kIndex, "'layers.9.ghost'", "is not in shard"});
}

TEST(HostileCheckpointTest, TruncatedShard) {
  FixtureCopy q("q");
  const std::string path = q / kShard2;
  const std::string bytes = ReadBytes(path);
  const std::string last = LastTensorByOffset(ParseFile(path).header);
  WriteBytes(path, bytes.substr(0, bytes.size() - 100));
  ExpectError(Load(q), kDataLoss, {path, Quoted(last), "beyond the data region"});
  WriteBytes(path, bytes.substr(0, 4096));
  ExpectError(Load(q), kDataLoss, {path, "runs past the end of the file"});
}

TEST(HostileCheckpointTest, BareShardsWithoutIndex) {
  FixtureCopy q("q");
  fs::remove(q / kIndex);
  EXPECT_TRUE(Load(q).ok()) << Load(q);  // every *.safetensors is read
  fs::copy_file(q / kShard1, q / "model-copy.safetensors");
  ExpectError(Load(q), kDataLoss, {kShard1, "model-copy.safetensors", "appears in both"});
}

TEST(HostileCheckpointTest, Fp8WeightWithoutScaleOrWithABadOne) {
  const std::string w = "layers.0.attn.wq_a.weight",
                    s = "layers.0.attn.wq_a.scale";  // fp8 [64, 256], e8m0 [1, 2]
  {
    FixtureCopy q("q");
    RemoveFromShards(q, s);
    ExpectError(Load(q), kNotFound, {ShardOf(q, w), Quoted(w), "has no scale " + Quoted(s)});
  }
  {
    FixtureCopy q("q");
    EditHeader(ShardOf(q, s), [&](json& h) { h[s]["shape"] = {2, 1}; });
    ExpectError(Load(q), kInvalid, {ShardOf(q, s), Quoted(s), "has shape [2, 1], expected [1, 2]"});
  }
  {
    FixtureCopy q("q");
    EditHeader(ShardOf(q, s), [&](json& h) { h[s]["dtype"] = "I8"; });
    ExpectError(Load(q), kInvalid, {ShardOf(q, s), Quoted(s), "must be F8_E8M0 or F32"});
  }
  for (const std::string& target : {w, s}) {  // NaN: e4m3 0x7f, e8m0 0xff
    FixtureCopy q("q");
    Parsed p = ParseFile(ShardOf(q, target));
    p.data[p.header[target]["data_offsets"][0].get<uint64_t>()] = target == w ? '\x7f' : '\xff';
    WriteParsed(ShardOf(q, target), p);
    ExpectError(Load(q), kDataLoss, {ShardOf(q, w), Quoted(w), "non-finite"});
  }
}

TEST(HostileCheckpointTest, Mxfp4ExpertOfTheWrongShapeOrScale) {
  const std::string w = "layers.3.ffn.experts.6.w2.weight",
                    s = "layers.3.ffn.experts.6.w2.scale";  // i8 [256, 32]
  {
    FixtureCopy q("q");
    EditHeader(ShardOf(q, w), [&](json& h) { h[w]["shape"] = {32, 256}; });
    ExpectError(Load(q), kInvalid,
                {ShardOf(q, w), Quoted(w), "has shape [32, 256], expected [256, 32]"});
  }
  {
    FixtureCopy q("q");
    EditHeader(ShardOf(q, s), [&](json& h) { h[s]["dtype"] = "U8"; });
    ExpectError(Load(q), kInvalid, {ShardOf(q, s), Quoted(s), "must be F8_E8M0"});
  }
  {
    FixtureCopy q("q");
    RemoveFromShards(q, s);
    ExpectError(Load(q), kNotFound, {q.dir(), Quoted(s)});
  }
}

// ---- sweeps -----------------------------------------------------------------------

// Loads `f` and checks the outcome is OK or a clean failure naming the copy.
// Returns whether it failed.
bool LoadFailsCleanlyOrSucceeds(const FixtureCopy& f) {
  const absl::Status s = Load(f);
  if (s.ok()) return false;
  EXPECT_THAT(s.code(), ::testing::AnyOf(kDataLoss, kInvalid, kNotFound)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(f.dir())) << s;
  if (s.code() == kDataLoss) {
    EXPECT_THAT(std::string(s.message()), HasSubstr(kModel)) << s;
  }
  return true;
}

TEST(HostileCheckpointSweep, EveryTruncationFailsCleanly) {
  FixtureCopy f("a");
  const std::string path = f / kModel;
  const std::string bytes = ReadBytes(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  const size_t header_end = 8 + header_len;
  std::vector<size_t> cuts;
  for (size_t n = 0; n <= 9; ++n) cuts.push_back(n);
  for (size_t k = 1; k < 64; ++k) cuts.push_back(k * header_end / 64);
  for (size_t n : {header_end - 1, header_end, header_end + 1, header_end + 4096,
                   (header_end + bytes.size()) / 2, bytes.size() - 4096, bytes.size() - 1})
    cuts.push_back(n);
  for (size_t n : cuts) {
    SCOPED_TRACE(::testing::Message()
                 << "truncated to " << n << " of " << bytes.size() << " bytes");
    WriteBytes(path, bytes.substr(0, n));
    const absl::Status s = Load(f);
    ExpectError(s, kDataLoss, {path});  // the data region is packed: every cut loses bytes
  }
}

TEST(HostileCheckpointSweep, ByteFlipsInTheLengthAndHeaderFailCleanlyOrLoad) {
  // Deterministic; set RETORT_TEST_SEED to explore other flips.
  uint32_t seed = 77;
  if (const char* env = std::getenv("RETORT_TEST_SEED"))
    seed = static_cast<uint32_t>(std::strtoul(env, nullptr, 10));
  SCOPED_TRACE(::testing::Message() << "seed " << seed << " (RETORT_TEST_SEED)");
  FixtureCopy f("a");
  const std::string path = f / kModel;
  const std::string bytes = ReadBytes(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  struct Flip {
    size_t at;
    uint8_t mask;
  };
  std::vector<Flip> flips;
  for (size_t at = 0; at < 8; ++at)
    for (uint8_t mask : {0x01, 0x02, 0x10, 0x80, 0xff}) flips.push_back({at, mask});
  std::mt19937 rng(seed);
  std::uniform_int_distribution<size_t> where(8, 8 + header_len - 1);
  std::uniform_int_distribution<int> mask(1, 255);
  for (int i = 0; i < 160; ++i) flips.push_back({where(rng), static_cast<uint8_t>(mask(rng))});
  int failed = 0, loaded = 0;
  for (const Flip& flip : flips) {
    SCOPED_TRACE(::testing::Message()
                 << "byte " << flip.at << " ^= 0x" << std::hex << int{flip.mask});
    std::string b = bytes;
    b[flip.at] = static_cast<char>(static_cast<uint8_t>(b[flip.at]) ^ flip.mask);
    WriteBytes(path, b);
    (LoadFailsCleanlyOrSucceeds(f) ? failed : loaded)++;
  }
  RecordProperty("flips_loaded", loaded);
  // Most flips break the header (lengths, digits, names, syntax).
  EXPECT_GT(failed, static_cast<int>(flips.size()) / 2)
      << loaded << " of " << flips.size() << " loaded";
  // Flips inside the metadata value ("pt" -> "qt", "rt", ...) keep the file
  // valid, and the model must still load.
  const size_t pt = bytes.find("\"format\":\"pt\"");
  ASSERT_NE(pt, std::string::npos);
  for (size_t at = pt + 10; at < pt + 12; ++at) {
    for (uint8_t m : {0x01, 0x02, 0x04}) {
      SCOPED_TRACE(::testing::Message() << "metadata byte " << at << " ^= " << int{m});
      std::string b = bytes;
      b[at] = static_cast<char>(static_cast<uint8_t>(b[at]) ^ m);
      WriteBytes(path, b);
      EXPECT_TRUE(Load(f).ok()) << Load(f);
    }
  }
}

// ---- config.json ----------------------------------------------------------------

std::string ConfigText(const std::string& fixture) {
  return ReadBytes(FixtureDir(fixture) + "/config.json");
}

absl::Status ParseEdited(const std::string& fixture, const std::function<void(json&)>& edit) {
  json j = json::parse(ConfigText(fixture));
  edit(j);
  return io::ParseV4Config(j.dump(), "cfg/config.json").status();
}

TEST(HostileConfigTest, FixtureConfigsParse) {
  auto a = io::ParseV4Config(ConfigText("a"), "a");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->layout, io::CheckpointLayout::kHf);
  EXPECT_EQ(a->compress_ratio, (std::vector<int>{16, 4, 16, 4, 0, 4}));
  EXPECT_EQ(a->rope_dim, 8);
  auto q = io::ParseV4Config(ConfigText("q"), "q");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->layout, io::CheckpointLayout::kReleased);
  EXPECT_EQ(q->compress_ratio, (std::vector<int>{0, 4, 16, 4, 16}));
  EXPECT_TRUE(q->fp8_weights);
  EXPECT_EQ(q->expert_dtype, "fp4");
}

TEST(HostileConfigTest, MalformedJson) {
  const std::string text = ConfigText("a");
  for (const std::string& bad : {text.substr(0, text.size() / 2), std::string(""),
                                 std::string("{\"vocab_size\": 3,}"), std::string("\xff\xfe", 2)}) {
    const absl::Status s = io::ParseV4Config(bad, "cfg/config.json").status();
    ExpectError(s, kInvalid, {"cfg/config.json", "not valid JSON"});
  }
  ExpectError(io::ParseV4Config("[1, 2]", "cfg/config.json").status(), kInvalid,
              {"cfg/config.json", "not a JSON object"});
}

struct ConfigCase {
  std::string what;
  std::string fixture;
  std::function<void(json&)> edit;
  std::vector<std::string> parts;  // besides the source name
};

void ExpectConfigErrors(const std::vector<ConfigCase>& cases) {
  for (const auto& c : cases) {
    SCOPED_TRACE(c.fixture + ": " + c.what);
    std::vector<std::string> parts = c.parts;
    parts.push_back("cfg/config.json");
    ExpectError(ParseEdited(c.fixture, c.edit), kInvalid, parts);
  }
}

TEST(HostileConfigTest, MissingFields) {
  std::vector<ConfigCase> cases;
  for (const char* field :
       {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
        "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
        "moe_intermediate_size", "sliding_window"}) {
    for (const char* fixture : {"a", "q"}) {
      cases.push_back({std::string("no ") + field,
                       fixture,
                       [=](json& j) { j.erase(field); },
                       {"field '" + std::string(field) + "' is missing"}});
      cases.push_back({std::string("null ") + field,
                       fixture,
                       [=](json& j) { j[field] = nullptr; },
                       {"field '" + std::string(field) + "' is missing"}});
    }
  }
  cases.push_back({"no layer_types",
                   "a",
                   [](json& j) { j.erase("layer_types"); },
                   {"'layer_types' must be an array"}});
  cases.push_back({"no qk_rope_head_dim",
                   "q",
                   [](json& j) { j.erase("qk_rope_head_dim"); },
                   {"'qk_rope_head_dim' is missing"}});
  cases.push_back({"yarn without factor",
                   "q",
                   [](json& j) { j["rope_scaling"].erase("factor"); },
                   {"rope_scaling", "'factor' is missing"}});
  ExpectConfigErrors(cases);
}

TEST(HostileConfigTest, ContradictingSizes) {
  ExpectConfigErrors({
      {"layer_types shorter",
       "a",
       [](json& j) { j["layer_types"].erase(5); },
       {"layer types list has 5 entries for 6 layers"}},
      {"more layers than layer_types",
       "a",
       [](json& j) { j["num_hidden_layers"] = 7; },
       {"layer types list has 6 entries for 7 layers"}},
      {"mlp_layer_types longer",
       "a",
       [](json& j) { j["mlp_layer_types"].push_back("moe"); },
       {"mlp layer types list has 7 entries for 6 layers"}},
      {"heads vs o_groups",
       "a",
       [](json& j) { j["num_attention_heads"] = 5; },
       {"num_attention_heads (5) is not a multiple of o_groups (2)"}},
      {"heads vs o_groups",
       "q",
       [](json& j) { j["o_groups"] = 3; },
       {"num_attention_heads (4) is not a multiple of o_groups (3)"}},
      {"experts per token",
       "a",
       [](json& j) { j["num_experts_per_tok"] = 9; },
       {"num_experts_per_tok (9) must be in 1..n_routed_experts (8)"}},
      {"experts per token",
       "q",
       [](json& j) { j["n_routed_experts"] = 1; },
       {"num_experts_per_tok (2) must be in 1..n_routed_experts (1)"}},
      {"rope dims beyond head_dim",
       "a",
       [](json& j) {
         j.erase("partial_rotary_factor");
         j["qk_rope_head_dim"] = 40;
       },
       {"rope dims (40) must be even and within head_dim (32)"}},
      {"rope dims vs partial_rotary_factor",
       "a",
       [](json& j) { j["qk_rope_head_dim"] = 16; },
       {"'qk_rope_head_dim' (16) contradicts partial_rotary_factor"}},
      {"rope dims beyond head_dim",
       "q",
       [](json& j) { j["qk_rope_head_dim"] = 80; },
       {"rope dims (80) must be even and within head_dim (64)"}},
      {"odd rope dims",
       "q",
       [](json& j) { j["qk_rope_head_dim"] = 15; },
       {"rope dims (15) must be even"}},
      {"rope dims beyond index_head_dim",
       "q",
       [](json& j) { j["index_head_dim"] = 8; },
       {"rope dims (16) exceed index_head_dim (8)"}},
      {"compress_ratios short",
       "q",
       [](json& j) {
         j["compress_ratios"] = {0, 4, 16, 4};
       },
       {"'compress_ratios' has 4 entries; expected 5 layers"}},
      {"compress_ratios long",
       "q",
       [](json& j) { j["compress_ratios"].push_back(0); },
       {"'compress_ratios' has 7 entries"}},
      {"more layers than compress_ratios",
       "q",
       [](json& j) { j["num_hidden_layers"] = 7; },
       {"'compress_ratios' has 6 entries; expected 7 layers"}},
      {"hash layers beyond layers",
       "q",
       [](json& j) { j["num_hash_layers"] = 6; },
       {"'num_hash_layers' must be in 0..num_hidden_layers"}},
      {"negative compress rate",
       "a",
       [](json& j) { j["compress_rates"]["compressed_sparse_attention"] = -4; },
       {"layer 1 is compressed but its compress ratio is -4"}},
      {"CSA without indexer",
       "a",
       [](json& j) { j["index_topk"] = 0; },
       {"CSA layers need index_n_heads"}},
      {"fp4 experts need multiples of 32",
       "q",
       [](json& j) { j["moe_intermediate_size"] = 48; },
       {"moe_intermediate_size to be a multiple of 32"}},
      {"zero layers",
       "a",
       [](json& j) { j["num_hidden_layers"] = 0; },
       {"'num_hidden_layers' must be in 1..4096"}},
      {"negative vocab", "q", [](json& j) { j["vocab_size"] = -512; }, {"must be positive"}},
      {"two KV heads",
       "a",
       [](json& j) { j["num_key_value_heads"] = 2; },
       {"'num_key_value_heads' must be 1"}},
      {"weight blocks",
       "q",
       [](json& j) {
         j["quantization_config"]["weight_block_size"] = {64, 64};
       },
       {"'quantization_config.weight_block_size' must be [128, 128]"}},
  });
}

TEST(HostileConfigTest, WrongValueTypes) {
  ExpectConfigErrors({
      {"string for an integer",
       "a",
       [](json& j) { j["vocab_size"] = "320"; },
       {"'vocab_size' must be an integer, got \"320\""}},
      {"float for an integer",
       "q",
       [](json& j) { j["hidden_size"] = 256.5; },
       {"'hidden_size' must be an integer"}},
      {"bool for an integer",
       "a",
       [](json& j) { j["num_hidden_layers"] = true; },
       {"'num_hidden_layers' must be an integer, got true"}},
      {"array for an integer",
       "q",
       [](json& j) { j["head_dim"] = {64}; },
       {"'head_dim' must be an integer, got (array)"}},
      {"wrapping integer",
       "a",
       [](json& j) { j["num_hidden_layers"] = (int64_t{1} << 32) + 6; },
       {"'num_hidden_layers' is out of range"}},
      {"huge unsigned",
       "q",
       [](json& j) { j["n_routed_experts"] = std::numeric_limits<uint64_t>::max(); },
       {"'n_routed_experts' is out of range"}},
      {"string compress rate",
       "a",
       [](json& j) { j["compress_rates"]["compressed_sparse_attention"] = "4"; },
       {"compress_rates", "'compressed_sparse_attention' must be an integer"}},
      {"float compress rate",
       "a",
       [](json& j) { j["compress_rates"]["heavily_compressed_attention"] = 16.5; },
       {"compress_rates", "'heavily_compressed_attention' must be an integer"}},
      {"object compress rate",
       "a",
       [](json& j) { j["compress_rates"]["heavily_compressed_attention"] = json::object(); },
       {"compress_rates", "'heavily_compressed_attention' must be an integer, got (object)"}},
      {"compress_rates not an object",
       "a",
       [](json& j) {
         j["compress_rates"] = {4, 16};
       },
       {"'compress_rates' must be an object"}},
      {"string compress ratio",
       "q",
       [](json& j) { j["compress_ratios"][1] = "4"; },
       {"'compress_ratios' entries must be non-negative integers, entry 1 is \"4\""}},
      {"negative compress ratio",
       "q",
       [](json& j) { j["compress_ratios"][2] = -16; },
       {"'compress_ratios' entries must be non-negative integers"}},
      {"wrapping compress ratio",
       "q",
       [](json& j) { j["compress_ratios"][1] = (int64_t{1} << 32) + 4; },
       {"'compress_ratios' entries must be non-negative integers"}},
      {"compress_ratios not an array",
       "q",
       [](json& j) { j["compress_ratios"] = 4; },
       {"'compress_ratios' must be an array"}},
      {"number in layer_types",
       "a",
       [](json& j) { j["layer_types"][2] = 7; },
       {"'layer_types' has unknown entry 7"}},
      {"unknown layer type",
       "a",
       [](json& j) { j["layer_types"][0] = "full_attention"; },
       {"'layer_types' has unknown entry \"full_attention\""}},
      {"unknown mlp type",
       "a",
       [](json& j) {
         j["mlp_layer_types"][0] = {{"moe", 1}};
       },
       {"'mlp_layer_types' has unknown entry (object)"}},
      {"huge partial_rotary_factor",
       "a",
       [](json& j) { j["partial_rotary_factor"] = 1e300; },
       {"'partial_rotary_factor' must be in (0, 1]"}},
      {"negative partial_rotary_factor",
       "a",
       [](json& j) { j["partial_rotary_factor"] = -0.25; },
       {"'partial_rotary_factor' must be in (0, 1]"}},
      {"string rope theta",
       "a",
       [](json& j) { j["rope_theta"] = "1e4"; },
       {"'rope_theta' must be a number"}},
      {"string yarn factor",
       "q",
       [](json& j) { j["rope_scaling"]["factor"] = "16"; },
       {"rope_scaling", "'factor' must be a number"}},
      {"unknown rope type",
       "a",
       [](json& j) { j["rope_parameters"]["main"]["rope_type"] = "ntk"; },
       {"rope type 'ntk' is not supported"}},
      {"rope_scaling not an object",
       "q",
       [](json& j) {
         j["rope_scaling"] = {1, 2};
       },
       {"'rope_scaling' must be an object"}},
      {"other model", "a", [](json& j) { j["model_type"] = "llama"; }, {"model_type is \"llama\""}},
      {"unknown expert dtype",
       "q",
       [](json& j) { j["expert_dtype"] = "int3"; },
       {"'expert_dtype' must be fp4"}},
      {"other scoring",
       "q",
       [](json& j) { j["scoring_func"] = "softmax"; },
       {"'scoring_func' must be"}},
  });
}

TEST(HostileConfigTest, DeeplyNestedValuesGiveAnErrorNotAStackOverflow) {
  // nlohmann parses iteratively but copies and dumps recursively: a value
  // nested 400k deep (100k overflows an 8 MiB stack) must only ever be looked at, never copied.
  const std::string deep = std::string(400000, '[') + std::string(400000, ']');
  struct Case {
    std::string fixture, field;
    std::function<void(json&)> place;  // puts the string "DEEP" where the value goes
    std::string why;
  };
  const std::vector<Case> cases = {
      {"a", "model_type", [](json& j) { j["model_type"] = "DEEP"; }, "model_type is (array)"},
      {"a", "layer_types", [](json& j) { j["layer_types"][0] = "DEEP"; },
       "'layer_types' has unknown entry (array)"},
      {"a", "mlp_layer_types", [](json& j) { j["mlp_layer_types"][0] = "DEEP"; },
       "'mlp_layer_types' has unknown entry (array)"},
      {"a", "rope_parameters", [](json& j) { j["rope_parameters"] = "DEEP"; },
       "'rope_parameters' must be an object"},
      {"a", "rope_parameters.compress", [](json& j) { j["rope_parameters"]["compress"] = "DEEP"; },
       "'rope_parameters.compress' must be an object"},
      {"q", "rope_scaling", [](json& j) { j["rope_scaling"] = "DEEP"; },
       "'rope_scaling' must be an object"},
      {"q", "vocab_size", [](json& j) { j["vocab_size"] = "DEEP"; },
       "'vocab_size' must be an integer, got (array)"},
      {"q", "compress_ratios", [](json& j) { j["compress_ratios"][0] = "DEEP"; },
       "entry 0 is (array)"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.fixture + ": deep " + c.field);
    json j = json::parse(ConfigText(c.fixture));
    c.place(j);
    std::string text = j.dump();
    const size_t at = text.find("\"DEEP\"");
    ASSERT_NE(at, std::string::npos);
    text.replace(at, 6, deep);
    ExpectError(io::ParseV4Config(text, "cfg/config.json").status(), kInvalid,
                {"cfg/config.json", c.why});
  }
}

}  // namespace
}  // namespace retort::v4
