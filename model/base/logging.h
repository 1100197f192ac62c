// Logging and invariant checks.
//
// CHECK(cond) << "message" aborts with file:line when a *retort bug* breaks an
// invariant. Bad input from a caller is never a CHECK: it is an absl::Status
// (see status_macros.h). LOG(INFO|WARNING|ERROR) writes one line to stderr.
// Thread-safe: each message is assembled privately and written with one call.
#ifndef RETORT_MODEL_BASE_LOGGING_H_
#define RETORT_MODEL_BASE_LOGGING_H_

#include <sstream>
#include <string>

namespace retort::internal {

enum class LogSeverity { kInfo, kWarning, kError, kFatal };

// Minimum severity printed; messages below it are dropped. Default: kInfo,
// or the value of RETORT_LOG_LEVEL (0..3) in the environment.
LogSeverity MinLogSeverity();
void SetMinLogSeverity(LogSeverity s);

class LogMessage {
 public:
  LogMessage(const char* file, int line, LogSeverity severity);
  ~LogMessage();  // writes the line; aborts for kFatal
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  const char* file_;
  int line_;
  LogSeverity severity_;
  std::ostringstream stream_;
};

// Swallows the stream expression when a CHECK passes or a level is off.
struct LogVoidify {
  void operator&(std::ostream&) {}
};

}  // namespace retort::internal

#define RETORT_LOG_INFO ::retort::internal::LogSeverity::kInfo
#define RETORT_LOG_WARNING ::retort::internal::LogSeverity::kWarning
#define RETORT_LOG_ERROR ::retort::internal::LogSeverity::kError
#define RETORT_LOG_FATAL ::retort::internal::LogSeverity::kFatal

#define LOG(level)                                                          \
  !(RETORT_LOG_##level >= ::retort::internal::MinLogSeverity())             \
      ? (void)0                                                             \
      : ::retort::internal::LogVoidify() &                                  \
            ::retort::internal::LogMessage(__FILE__, __LINE__, RETORT_LOG_##level).stream()

#define CHECK(cond)                                                                     \
  (cond) ? (void)0                                                                      \
         : ::retort::internal::LogVoidify() &                                           \
               ::retort::internal::LogMessage(__FILE__, __LINE__, RETORT_LOG_FATAL).stream() \
                   << "CHECK failed: " #cond " "

#define CHECK_OP_(a, b, op) CHECK((a)op(b)) << "(" << (a) << " vs " << (b) << ") "
#define CHECK_EQ(a, b) CHECK_OP_(a, b, ==)
#define CHECK_NE(a, b) CHECK_OP_(a, b, !=)
#define CHECK_LT(a, b) CHECK_OP_(a, b, <)
#define CHECK_LE(a, b) CHECK_OP_(a, b, <=)
#define CHECK_GT(a, b) CHECK_OP_(a, b, >)
#define CHECK_GE(a, b) CHECK_OP_(a, b, >=)
#define CHECK_OK(expr)                                          \
  do {                                                          \
    const ::absl::Status retort_check_status_ = (expr);         \
    CHECK(retort_check_status_.ok()) << retort_check_status_;   \
  } while (0)

#endif  // RETORT_MODEL_BASE_LOGGING_H_
