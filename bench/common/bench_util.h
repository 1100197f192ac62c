// Small helpers of the benchmark programs: exit with the status on failure.
#ifndef RETORT_BENCH_COMMON_BENCH_UTIL_H_
#define RETORT_BENCH_COMMON_BENCH_UTIL_H_

#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define BENCH_CHECK(expr)                                                               \
  do {                                                                                  \
    if (absl::Status s_ = (expr); !s_.ok()) {                                           \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, s_.ToString().c_str()); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

namespace retort::bench {

// The value, or exit(1) printing the status.
template <typename T>
T Value(absl::StatusOr<T> v) {
  if (!v.ok()) {
    std::fprintf(stderr, "%s\n", v.status().ToString().c_str());
    std::exit(1);
  }
  return *std::move(v);
}

}  // namespace retort::bench

#endif  // RETORT_BENCH_COMMON_BENCH_UTIL_H_
