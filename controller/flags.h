// Flags shared by several `retort` subcommands (defined once in flags.cc).
#ifndef RETORT_CONTROLLER_FLAGS_H_
#define RETORT_CONTROLLER_FLAGS_H_

#include <cstdint>
#include <string>

#include "absl/flags/declare.h"

ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(std::string, device);
ABSL_DECLARE_FLAG(std::string, numerics);
ABSL_DECLARE_FLAG(std::string, tokenizer);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(int32_t, threads);
ABSL_DECLARE_FLAG(std::string, input);
ABSL_DECLARE_FLAG(std::string, output);

#endif  // RETORT_CONTROLLER_FLAGS_H_
