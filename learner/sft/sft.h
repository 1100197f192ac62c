// Supervised fine-tuning: the config, the JSONL reader, sequence packing and
// the loop that drives a Trainer (learner/trainer) with prompt tokens masked.
//
// Config: protobuf text of retort.v1.SftLearnerConfig (proto/retort/v1/
// config.proto documents every field with its unit and default; see
// configs/sft_tiny.textproto). Syntax errors and unknown fields are
// InvalidArgument "<file>:<line>:<column>: ..."; bad values name the field.
// The data the config points at:
//   data         JSONL, one record a line, one of:
//                  {"prompt_ids": [..], "completion_ids": [..]}
//                  {"prompt": "text", "completion": "text"}   (needs a tokenizer)
//                  {"messages": [{"role": "user"|"system"|"assistant", "content": ".."}, ..]}
//                text records are rendered with the V4 chat template; the last
//                assistant turn is the completion
//   With anticipatory_routing_delay the loop prefetches each batch that many
//   steps ahead; parameter groups are the V4 defaults (optim::DefaultV4Rules).
//
// Packing: examples (prompt + completion ids) are placed whole, in file order,
// greedily into rows of seq_len tokens, padded with token 0. An example longer
// than seq_len is an error naming its line. Position t of a row is scored on
// token t+1 when that token is a completion token of the same example; the
// loss is the mean cross-entropy over the scored positions of a batch. Rows
// are visited in a per-epoch permutation drawn from the seed, so the data
// position (batches consumed) alone restores the order on resume. Each packed
// example is a sequence of its own to the model (v4::TokenBatch::documents:
// positions from 0, no attention or compressor state across examples);
// padding is not run. Batch and token accounting stay per row.
//
// Thread-safety: RunSft is a blocking call on the caller's thread.
#ifndef RETORT_LEARNER_SFT_SFT_H_
#define RETORT_LEARNER_SFT_SFT_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "learner/trainer/trainer.h"
#include "model/tokenizer/tokenizer.h"

namespace retort::sft {

struct SftOptions {
  std::string model_dir;
  std::string data_path;
  std::string output_dir;
  int64_t batch_size = 4;  // rows per step. Default: 4
  int64_t seq_len = 128;   // tokens per row. Default: 128
  int64_t steps = 100;  // updates to run in total (a resumed run counts earlier ones). Default: 100
  int64_t checkpoint_every = 0;  // steps between checkpoints; 0: only at the end. Default: 0
  bool resume = false;           // continue from <output_dir>/checkpoint. Default: false
  bool tensorboard =
      true;  // scalars to <output_dir>/tensorboard/events.out.tfevents.*. Default: true
  trainer::TrainerOptions trainer;
};

// Parses protobuf text (see the header comment) and validates it into
// SftOptions; `source` names it in errors. Relative paths stay relative to
// the working directory. LoadSftConfig reads a file (NotFound if missing).
[[nodiscard]] absl::StatusOr<SftOptions> ParseSftConfig(const std::string& textproto,
                                                        const std::string& source);
[[nodiscard]] absl::StatusOr<SftOptions> LoadSftConfig(const std::string& path);

struct SftExample {
  std::vector<int64_t> prompt;
  std::vector<int64_t> completion;
};

// Reads `path` (JSONL). `tokenizer` may be null, in which case only id records
// are accepted. Ids must lie in [0, vocab_size). Errors name path:line.
[[nodiscard]] absl::StatusOr<std::vector<SftExample>> ReadSftData(
    const std::string& path, const tokenizer::Tokenizer* tokenizer, int64_t vocab_size);

// Rows of `seq_len` tokens with per-position targets (-1: not scored) and
// documents (the example's index within its row; -1: padding).
struct PackedRows {
  int64_t seq_len = 0;
  std::vector<std::vector<int64_t>> tokens, targets;
  std::vector<std::vector<int32_t>> documents;
};
[[nodiscard]] absl::StatusOr<PackedRows> PackExamples(const std::vector<SftExample>& examples,
                                                      int64_t seq_len);

// The batch of data position `position` (0-based): rows of the per-epoch
// permutation, targets weighted 1/(scored positions in the batch).
struct SftBatch {
  std::vector<int64_t> tokens, targets;
  std::vector<float> weights;
  std::vector<int32_t> documents;
  int64_t B = 0, T = 0;
  v4::TokenBatch view() const { return {tokens, targets, weights, B, T, {}, 0.0f, documents}; }
};
SftBatch MakeBatch(const PackedRows& rows, int64_t batch_size, int64_t position, uint64_t seed);

struct SftStepReport {
  trainer::StepResult result;
  int64_t total_steps = 0;
  double elapsed_s = 0;
  double tokens_per_s = 0;  // scored + context tokens processed per second
};

// Runs the loop: each step's metrics line goes to <output_dir>/metrics.jsonl
// (appended on resume) and, with `tensorboard`, to a new event file; a
// progress line to stderr; and `on_step` (when set)
// sees every report. Returns the last step's report.
[[nodiscard]] absl::StatusOr<SftStepReport> RunSft(
    const SftOptions& options, const std::function<void(const SftStepReport&)>& on_step = {});

}  // namespace retort::sft

#endif  // RETORT_LEARNER_SFT_SFT_H_
