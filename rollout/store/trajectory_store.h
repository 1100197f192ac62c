// Durable storage for the rollout worker, on RocksDB.
//
// TrajectoryStore: what learners read. Column families "prompts",
// "completions", "rewards" and "metadata"; keys are ordered by
// (experiment, step, group, sample) so a learner scans one step of one
// experiment as a contiguous range (see EncodeTrajectoryKey). Every write is a
// synced WriteBatch: when a Put returns OK the record survives a crash of the
// process and of the machine.
//
// TokenWal: the per-request write-ahead log of generated tokens. A request is
// logged (synced) when accepted; each engine step appends the tokens it
// produced in one WriteBatch (RocksDB's own WAL makes them survive kill -9;
// `sync_tokens` also fsyncs them); a finished sample's Completion replaces its
// token records. After a restart, Recover() returns every accepted request
// with its finished completions and the logged tokens of unfinished samples.
//
// Ownership: each store owns its RocksDB handle (closed in the destructor).
// Thread-safety: all methods are safe to call concurrently (RocksDB is).
#ifndef RETORT_ROLLOUT_STORE_TRAJECTORY_STORE_H_
#define RETORT_ROLLOUT_STORE_TRAJECTORY_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "retort/v1/rollout.pb.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
}  // namespace rocksdb

namespace retort::rollout {

// Keys sort by experiment (bytes, then a 0x00 separator), step (big-endian
// u64), group id (bytes, 0x00), sample (big-endian u32). Experiment and group
// ids must not contain 0x00. sample < 0 encodes the group prefix only.
std::string EncodeTrajectoryKey(const std::string& experiment, uint64_t step, const std::string& group_id,
                                int32_t sample = -1);

struct TrajectoryGroup {
  retort::v1::PromptRecord prompt;
  std::vector<retort::v1::Completion> completions;  // by sample index
  std::map<int32_t, retort::v1::RewardRecord> rewards;
};

class TrajectoryStore {
 public:
  // Opens (creating if missing) the store at `dir`.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<TrajectoryStore>> Open(const std::string& dir);
  ~TrajectoryStore();

  // InvalidArgument for empty experiment/group ids or ids containing 0x00.
  [[nodiscard]] absl::Status PutPrompt(const retort::v1::PromptRecord& prompt);
  [[nodiscard]] absl::Status PutCompletion(const std::string& experiment, uint64_t step,
                                           const retort::v1::Completion& completion);
  [[nodiscard]] absl::Status PutReward(const std::string& experiment, uint64_t step, const std::string& group_id,
                                       int32_t sample, const retort::v1::RewardRecord& reward);
  [[nodiscard]] absl::Status PutMetadata(const std::string& key, const std::string& value);
  [[nodiscard]] absl::StatusOr<std::string> GetMetadata(const std::string& key) const;  // NotFound if absent

  // Every group of `experiment` with step in [step_begin, step_end), in key order.
  [[nodiscard]] absl::StatusOr<std::vector<TrajectoryGroup>> ReadSteps(const std::string& experiment,
                                                                       uint64_t step_begin, uint64_t step_end) const;

 private:
  TrajectoryStore() = default;
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;  // default, prompts, completions, rewards, metadata
};

// One accepted request as recovered from the log.
struct RecoveredRequest {
  retort::v1::GenerateRequest request;            // prompt already token ids
  std::map<int32_t, retort::v1::Completion> finished;  // sample -> completion
  // sample -> logged tokens of an unfinished sample, as a partial Completion
  // (token_ids, logprobs, model_logprobs, weight_versions).
  std::map<int32_t, retort::v1::Completion> partial;
};

struct TokenWalOptions {
  bool sync_tokens = false;  // fsync every token batch too. Default: false (survives kill -9, not power loss).
};

class TokenWal {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<TokenWal>> Open(const std::string& dir,
                                                                      TokenWalOptions options = {});
  ~TokenWal();

  // Logs an accepted request (prompt as token ids), synced.
  [[nodiscard]] absl::Status Accept(const retort::v1::GenerateRequest& request);
  // The logged request with this id, or NotFound.
  [[nodiscard]] absl::StatusOr<retort::v1::GenerateRequest> FindRequest(const std::string& request_id) const;

  struct TokenRecord {
    std::string request_id;
    int32_t sample = 0;
    int32_t index = 0;  // position in the completion
    int64_t token = 0;
    float logprob = 0.0f;
    float model_logprob = 0.0f;
    int64_t weight_version = 0;
  };
  // Appends the tokens of one engine step in one batch.
  [[nodiscard]] absl::Status AppendTokens(const std::vector<TokenRecord>& tokens);
  // Stores a finished sample's completion and drops its token records (synced).
  [[nodiscard]] absl::Status Finish(const retort::v1::Completion& completion);
  [[nodiscard]] absl::StatusOr<retort::v1::Completion> FindFinished(const std::string& request_id,
                                                                    int32_t sample) const;
  // Forgets a request entirely (its request, tokens and completions).
  [[nodiscard]] absl::Status Forget(const std::string& request_id);

  // Every logged request, with finished samples and the tokens of unfinished ones.
  [[nodiscard]] absl::StatusOr<std::vector<RecoveredRequest>> Recover() const;

 private:
  TokenWal() = default;
  TokenWalOptions options_;
  std::unique_ptr<rocksdb::DB> db_;
};

}  // namespace retort::rollout

#endif  // RETORT_ROLLOUT_STORE_TRAJECTORY_STORE_H_
