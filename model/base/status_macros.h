// Status helpers for retort: RETURN_IF_ERROR / ASSIGN_OR_RETURN (Debian's
// Abseil 20220623 predates absl's own), and small constructors that put the
// file, tensor or field a failure concerns into the message.
//
// Every module boundary in retort returns absl::Status or absl::StatusOr<T>;
// retort code does not throw. A broken invariant is a CHECK (logging.h).
#ifndef RETORT_MODEL_BASE_STATUS_MACROS_H_
#define RETORT_MODEL_BASE_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define RETORT_STATUS_CONCAT_INNER_(a, b) a##b
#define RETORT_STATUS_CONCAT_(a, b) RETORT_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the enclosing function
// when it is not OK.
#define RETURN_IF_ERROR(expr)                                          \
  do {                                                                 \
    ::absl::Status retort_status_ = (expr);                            \
    if (!retort_status_.ok()) return retort_status_;                   \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, MakeX());` evaluates an absl::StatusOr<T>; on
// error returns its status, otherwise moves the value into `lhs`.
#define ASSIGN_OR_RETURN(lhs, rexpr)                                            \
  ASSIGN_OR_RETURN_IMPL_(RETORT_STATUS_CONCAT_(retort_statusor_, __LINE__), lhs, \
                         rexpr)
#define ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                           \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

namespace retort {

// Prefixes a status message with context ("loading q/model.safetensors: ...")
// keeping its code, so a failure deep in a loader names what it concerns.
inline absl::Status Annotate(const absl::Status& s, absl::string_view context) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

}  // namespace retort

#endif  // RETORT_MODEL_BASE_STATUS_MACROS_H_
