#include "model/base/logging.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <ctime>

namespace retort::internal {
namespace {

LogSeverity InitialSeverity() {
  const char* env = std::getenv("RETORT_LOG_LEVEL");
  if (env == nullptr) return LogSeverity::kInfo;
  int v = std::atoi(env);
  if (v <= 0) return LogSeverity::kInfo;
  if (v == 1) return LogSeverity::kWarning;
  if (v == 2) return LogSeverity::kError;
  return LogSeverity::kFatal;
}

std::atomic<int>& MinSeverityStorage() {
  static std::atomic<int> s{static_cast<int>(InitialSeverity())};
  return s;
}

char SeverityLetter(LogSeverity s) {
  switch (s) {
    case LogSeverity::kInfo: return 'I';
    case LogSeverity::kWarning: return 'W';
    case LogSeverity::kError: return 'E';
    case LogSeverity::kFatal: return 'F';
  }
  return '?';
}

}  // namespace

LogSeverity MinLogSeverity() { return static_cast<LogSeverity>(MinSeverityStorage().load()); }
void SetMinLogSeverity(LogSeverity s) { MinSeverityStorage().store(static_cast<int>(s)); }

LogMessage::LogMessage(const char* file, int line, LogSeverity severity)
    : file_(file), line_(line), severity_(severity) {}

LogMessage::~LogMessage() {
  const char* base = file_;
  for (const char* p = file_; *p; ++p) {
    if (*p == '/') base = p + 1;
  }
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%H:%M:%S", &tm);
  std::string line = std::string(1, SeverityLetter(severity_)) + stamp + " " + base + ":" +
                     std::to_string(line_) + "] " + stream_.str() + "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
  if (severity_ == LogSeverity::kFatal) {
    std::fflush(stderr);
    std::abort();
  }
}

}  // namespace retort::internal
