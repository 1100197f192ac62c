#include "controller/flags.h"

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, model, "", "checkpoint directory (config.json + safetensors)");
ABSL_FLAG(std::string, device, "cpu", "cpu or cuda");
ABSL_FLAG(std::string, numerics, "exact", "exact (the reference's fp32) or deployment");
ABSL_FLAG(std::string, tokenizer, "",
          "directory with tokenizer.json (+ tokenizer_config.json); default: --model");
ABSL_FLAG(uint64_t, seed, 0, "random seed");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0: RETORT_NUM_THREADS or all cores)");
ABSL_FLAG(std::string, input, "", "forward, grad: safetensors file with input_ids [B,T] (int64)");
ABSL_FLAG(std::string, output, "",
          "forward: safetensors file to write logits (and decode_logits) to; grad: loss and grad.<name>");
