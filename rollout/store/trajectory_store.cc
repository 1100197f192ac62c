// TrajectoryStore and TokenWal on RocksDB (see trajectory_store.h).
#include "rollout/store/trajectory_store.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/write_batch.h"

namespace retort::rollout {
namespace {

absl::Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat(what, ": ", s.ToString()));
  if (s.IsCorruption()) return absl::DataLossError(absl::StrCat(what, ": ", s.ToString()));
  if (s.IsInvalidArgument()) return absl::InvalidArgumentError(absl::StrCat(what, ": ", s.ToString()));
  return absl::InternalError(absl::StrCat(what, ": ", s.ToString()));
}

void PutBigEndian(std::string* out, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint64_t GetBigEndian(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

absl::Status CheckId(const std::string& id, const char* field) {
  if (id.empty()) return absl::InvalidArgumentError(absl::StrCat(field, " must not be empty"));
  if (id.find('\0') != std::string::npos) return absl::InvalidArgumentError(absl::StrCat(field, " contains a NUL byte"));
  return absl::OkStatus();
}

// Column families of the trajectory store, in handle order.
constexpr const char* kFamilies[] = {"default", "prompts", "completions", "rewards", "metadata"};
enum Family { kDefault = 0, kPrompts = 1, kCompletions = 2, kRewards = 3, kMetadata = 4 };

rocksdb::WriteOptions Synced() {
  rocksdb::WriteOptions w;
  w.sync = true;
  return w;
}

// WAL keys: 'r' rid 0x00 -> GenerateRequest; 't' rid 0x00 be32 sample be32 index
// -> token record; 'c' rid 0x00 be32 sample -> Completion.
std::string WalKey(char kind, const std::string& rid) { return absl::StrCat(std::string(1, kind), rid, std::string(1, '\0')); }
std::string WalKey(char kind, const std::string& rid, int32_t sample) {
  std::string k = WalKey(kind, rid);
  PutBigEndian(&k, static_cast<uint32_t>(sample), 4);
  return k;
}

// Token record value: i64 token, f32 logprob, f32 model logprob, i64 version (little-endian host order).
constexpr size_t kTokenValueBytes = 8 + 4 + 4 + 8;

}  // namespace

std::string EncodeTrajectoryKey(const std::string& experiment, uint64_t step, const std::string& group_id,
                                int32_t sample) {
  std::string k = experiment;
  k.push_back('\0');
  PutBigEndian(&k, step, 8);
  k += group_id;
  k.push_back('\0');
  if (sample >= 0) PutBigEndian(&k, static_cast<uint32_t>(sample), 4);
  return k;
}

absl::StatusOr<std::unique_ptr<TrajectoryStore>> TrajectoryStore::Open(const std::string& dir) {
  rocksdb::DBOptions options;
  options.create_if_missing = true;
  options.create_missing_column_families = true;
  std::vector<rocksdb::ColumnFamilyDescriptor> families;
  for (const char* f : kFamilies) families.emplace_back(f, rocksdb::ColumnFamilyOptions());
  std::unique_ptr<TrajectoryStore> store(new TrajectoryStore());
  rocksdb::DB* db = nullptr;
  absl::Status s = FromRocks(rocksdb::DB::Open(options, dir, families, &store->handles_, &db),
                             absl::StrCat("opening trajectory store ", dir));
  if (!s.ok()) return s;
  store->db_.reset(db);
  return store;
}

TrajectoryStore::~TrajectoryStore() {
  for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
  handles_.clear();
}

absl::Status TrajectoryStore::PutPrompt(const retort::v1::PromptRecord& prompt) {
  if (auto s = CheckId(prompt.experiment(), "experiment"); !s.ok()) return s;
  if (auto s = CheckId(prompt.group_id(), "group_id"); !s.ok()) return s;
  return FromRocks(db_->Put(Synced(), handles_[kPrompts],
                            EncodeTrajectoryKey(prompt.experiment(), prompt.step(), prompt.group_id()),
                            prompt.SerializeAsString()),
                   "trajectory store: put prompt");
}

absl::Status TrajectoryStore::PutCompletion(const std::string& experiment, uint64_t step,
                                            const retort::v1::Completion& completion) {
  if (auto s = CheckId(experiment, "experiment"); !s.ok()) return s;
  if (auto s = CheckId(completion.group_id(), "group_id"); !s.ok()) return s;
  return FromRocks(db_->Put(Synced(), handles_[kCompletions],
                            EncodeTrajectoryKey(experiment, step, completion.group_id(), completion.sample_index()),
                            completion.SerializeAsString()),
                   "trajectory store: put completion");
}

absl::Status TrajectoryStore::PutReward(const std::string& experiment, uint64_t step, const std::string& group_id,
                                        int32_t sample, const retort::v1::RewardRecord& reward) {
  if (auto s = CheckId(experiment, "experiment"); !s.ok()) return s;
  if (auto s = CheckId(group_id, "group_id"); !s.ok()) return s;
  if (sample < 0) return absl::InvalidArgumentError(absl::StrCat("reward: sample must be >= 0, got ", sample));
  return FromRocks(db_->Put(Synced(), handles_[kRewards], EncodeTrajectoryKey(experiment, step, group_id, sample),
                            reward.SerializeAsString()),
                   "trajectory store: put reward");
}

absl::Status TrajectoryStore::PutMetadata(const std::string& key, const std::string& value) {
  return FromRocks(db_->Put(Synced(), handles_[kMetadata], key, value), "trajectory store: put metadata");
}

absl::StatusOr<std::string> TrajectoryStore::GetMetadata(const std::string& key) const {
  std::string v;
  absl::Status s = FromRocks(db_->Get(rocksdb::ReadOptions(), handles_[kMetadata], key, &v),
                             absl::StrCat("trajectory store: metadata '", key, "'"));
  if (!s.ok()) return s;
  return v;
}

absl::StatusOr<std::vector<TrajectoryGroup>> TrajectoryStore::ReadSteps(const std::string& experiment,
                                                                        uint64_t step_begin,
                                                                        uint64_t step_end) const {
  if (auto s = CheckId(experiment, "experiment"); !s.ok()) return s;
  std::string begin = experiment + std::string(1, '\0'), end = begin;
  PutBigEndian(&begin, step_begin, 8);
  PutBigEndian(&end, step_end, 8);
  std::vector<TrajectoryGroup> groups;
  std::map<std::string, size_t> by_prefix;  // group key prefix -> index in groups
  {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handles_[kPrompts]));
    for (it->Seek(begin); it->Valid() && it->key().compare(end) < 0; it->Next()) {
      TrajectoryGroup g;
      if (!g.prompt.ParseFromArray(it->value().data(), static_cast<int>(it->value().size())))
        return absl::DataLossError("trajectory store: unparsable prompt record");
      by_prefix[it->key().ToString()] = groups.size();
      groups.push_back(std::move(g));
    }
    if (!it->status().ok()) return FromRocks(it->status(), "trajectory store: scan prompts");
  }
  for (Family f : {kCompletions, kRewards}) {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handles_[f]));
    for (it->Seek(begin); it->Valid() && it->key().compare(end) < 0; it->Next()) {
      const std::string key = it->key().ToString();
      if (key.size() < 4) return absl::DataLossError("trajectory store: short key");
      const std::string prefix = key.substr(0, key.size() - 4);
      const int32_t sample = static_cast<int32_t>(GetBigEndian(key.data() + key.size() - 4, 4));
      auto g = by_prefix.find(prefix);
      if (g == by_prefix.end()) continue;  // a completion whose prompt was not recorded
      TrajectoryGroup& group = groups[g->second];
      if (f == kCompletions) {
        retort::v1::Completion c;
        if (!c.ParseFromArray(it->value().data(), static_cast<int>(it->value().size())))
          return absl::DataLossError("trajectory store: unparsable completion");
        group.completions.push_back(std::move(c));
      } else {
        retort::v1::RewardRecord r;
        if (!r.ParseFromArray(it->value().data(), static_cast<int>(it->value().size())))
          return absl::DataLossError("trajectory store: unparsable reward");
        group.rewards[sample] = std::move(r);
      }
    }
    if (!it->status().ok()) return FromRocks(it->status(), "trajectory store: scan");
  }
  return groups;
}

// ---------------------------------------------------------------- TokenWal

absl::StatusOr<std::unique_ptr<TokenWal>> TokenWal::Open(const std::string& dir, TokenWalOptions options) {
  rocksdb::Options o;
  o.create_if_missing = true;
  std::unique_ptr<TokenWal> wal(new TokenWal());
  wal->options_ = options;
  rocksdb::DB* db = nullptr;
  absl::Status s = FromRocks(rocksdb::DB::Open(o, dir, &db), absl::StrCat("opening token WAL ", dir));
  if (!s.ok()) return s;
  wal->db_.reset(db);
  return wal;
}

TokenWal::~TokenWal() = default;

absl::Status TokenWal::Accept(const retort::v1::GenerateRequest& request) {
  if (auto s = CheckId(request.request_id(), "request_id"); !s.ok()) return s;
  return FromRocks(db_->Put(Synced(), WalKey('r', request.request_id()), request.SerializeAsString()),
                   "token WAL: accept");
}

absl::StatusOr<retort::v1::GenerateRequest> TokenWal::FindRequest(const std::string& request_id) const {
  std::string v;
  absl::Status s = FromRocks(db_->Get(rocksdb::ReadOptions(), WalKey('r', request_id), &v),
                             absl::StrCat("token WAL: request '", request_id, "'"));
  if (!s.ok()) return s;
  retort::v1::GenerateRequest r;
  if (!r.ParseFromString(v)) return absl::DataLossError(absl::StrCat("token WAL: request '", request_id, "' unparsable"));
  return r;
}

absl::Status TokenWal::AppendTokens(const std::vector<TokenRecord>& tokens) {
  if (tokens.empty()) return absl::OkStatus();
  rocksdb::WriteBatch batch;
  for (const TokenRecord& t : tokens) {
    std::string k = WalKey('t', t.request_id, t.sample);
    PutBigEndian(&k, static_cast<uint32_t>(t.index), 4);
    char v[kTokenValueBytes];
    std::memcpy(v, &t.token, 8);
    std::memcpy(v + 8, &t.logprob, 4);
    std::memcpy(v + 12, &t.model_logprob, 4);
    std::memcpy(v + 16, &t.weight_version, 8);
    batch.Put(k, rocksdb::Slice(v, sizeof(v)));
  }
  rocksdb::WriteOptions w;
  w.sync = options_.sync_tokens;
  return FromRocks(db_->Write(w, &batch), "token WAL: append");
}

absl::Status TokenWal::Finish(const retort::v1::Completion& completion) {
  rocksdb::WriteBatch batch;
  batch.Put(WalKey('c', completion.request_id(), completion.sample_index()), completion.SerializeAsString());
  const std::string from = WalKey('t', completion.request_id(), completion.sample_index());
  batch.DeleteRange(from, WalKey('t', completion.request_id(), completion.sample_index() + 1));
  return FromRocks(db_->Write(Synced(), &batch), "token WAL: finish");
}

absl::StatusOr<retort::v1::Completion> TokenWal::FindFinished(const std::string& request_id, int32_t sample) const {
  std::string v;
  absl::Status s = FromRocks(db_->Get(rocksdb::ReadOptions(), WalKey('c', request_id, sample), &v),
                             absl::StrCat("token WAL: completion '", request_id, "' #", sample));
  if (!s.ok()) return s;
  retort::v1::Completion c;
  if (!c.ParseFromString(v)) return absl::DataLossError("token WAL: unparsable completion");
  return c;
}

absl::Status TokenWal::Forget(const std::string& request_id) {
  rocksdb::WriteBatch batch;
  batch.Delete(WalKey('r', request_id));
  for (char kind : {'t', 'c'}) {
    std::string end = WalKey(kind, request_id);
    end.back() = '\x01';
    batch.DeleteRange(WalKey(kind, request_id), end);
  }
  return FromRocks(db_->Write(Synced(), &batch), "token WAL: forget");
}

absl::StatusOr<std::vector<RecoveredRequest>> TokenWal::Recover() const {
  std::vector<RecoveredRequest> out;
  std::map<std::string, size_t> index;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  // 'c' < 'r' < 't': read requests first, then completions and tokens.
  for (it->Seek("r"); it->Valid() && it->key().starts_with("r"); it->Next()) {
    RecoveredRequest r;
    if (!r.request.ParseFromArray(it->value().data(), static_cast<int>(it->value().size())))
      return absl::DataLossError("token WAL: unparsable request record");
    index[r.request.request_id()] = out.size();
    out.push_back(std::move(r));
  }
  auto split = [](const rocksdb::Slice& key, std::string* rid, const char** rest) {
    const char* p = key.data() + 1;
    const char* nul = static_cast<const char*>(std::memchr(p, 0, key.size() - 1));
    if (nul == nullptr) return false;
    *rid = std::string(p, nul);
    *rest = nul + 1;
    return true;
  };
  for (it->Seek("c"); it->Valid() && it->key().starts_with("c"); it->Next()) {
    std::string rid;
    const char* rest;
    if (!split(it->key(), &rid, &rest)) return absl::DataLossError("token WAL: bad completion key");
    auto r = index.find(rid);
    if (r == index.end()) continue;
    retort::v1::Completion c;
    if (!c.ParseFromArray(it->value().data(), static_cast<int>(it->value().size())))
      return absl::DataLossError("token WAL: unparsable completion");
    out[r->second].finished[c.sample_index()] = std::move(c);
  }
  for (it->Seek("t"); it->Valid() && it->key().starts_with("t"); it->Next()) {
    std::string rid;
    const char* rest;
    if (!split(it->key(), &rid, &rest) || it->value().size() != kTokenValueBytes)
      return absl::DataLossError("token WAL: bad token record");
    auto r = index.find(rid);
    if (r == index.end()) continue;
    const int32_t sample = static_cast<int32_t>(GetBigEndian(rest, 4));
    const int32_t pos = static_cast<int32_t>(GetBigEndian(rest + 4, 4));
    if (out[r->second].finished.count(sample)) continue;
    retort::v1::Completion& c = out[r->second].partial[sample];
    if (pos != c.token_ids_size())
      return absl::DataLossError(absl::StrCat("token WAL: request '", rid, "' sample ", sample, " has a gap at token ", c.token_ids_size()));
    int64_t token, version;
    float lp, mlp;
    const char* v = it->value().data();
    std::memcpy(&token, v, 8);
    std::memcpy(&lp, v + 8, 4);
    std::memcpy(&mlp, v + 12, 4);
    std::memcpy(&version, v + 16, 8);
    c.set_request_id(rid);
    c.set_sample_index(sample);
    c.add_token_ids(token);
    c.add_logprobs(lp);
    c.add_model_logprobs(mlp);
    c.add_weight_versions(version);
  }
  if (!it->status().ok()) return FromRocks(it->status(), "token WAL: recover");
  return out;
}

}  // namespace retort::rollout
