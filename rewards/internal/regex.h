// A small RAII wrapper over PCRE2 (8-bit, UTF mode) for the rewards: the
// answer pattern of the math reward and the IFEval checks, which are defined
// by Python `re` patterns that PCRE2 reads the same way.
//
// Thread-safety: a compiled Regex is immutable and may be matched from many
// threads at once (each call makes its own match data).
#ifndef RETORT_REWARDS_INTERNAL_REGEX_H_
#define RETORT_REWARDS_INTERNAL_REGEX_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace retort::rewards::internal {

struct RegexMatch {
  size_t begin = 0;  // byte offsets of the whole match in the subject
  size_t end = 0;
  std::vector<std::string> groups;  // groups[0] is the whole match; unset groups are ""
};

class Regex {
 public:
  enum Flags : unsigned { kNone = 0, kIgnoreCase = 1, kMultiline = 2, kDotAll = 4 };

  // InvalidArgument naming the pattern when PCRE2 rejects it.
  [[nodiscard]] static absl::StatusOr<Regex> Compile(absl::string_view pattern,
                                                     unsigned flags = kNone);
  // For patterns fixed in our own code: a bad one is a bug (CHECK).
  static Regex CompileOrDie(absl::string_view pattern, unsigned flags = kNone);

  // Every non-overlapping match, left to right (Python's re.finditer).
  std::vector<RegexMatch> FindAll(absl::string_view subject) const;
  bool Search(absl::string_view subject) const;
  // Python's re.sub(pattern, replacement, subject): every match replaced;
  // "$1" in `replacement` is group 1 (PCRE2 syntax, where Python writes \1).
  std::string Replace(absl::string_view subject, absl::string_view replacement) const;
  // Python's re.split (without capture groups in the result).
  std::vector<std::string> Split(absl::string_view subject) const;

 private:
  struct Code;
  explicit Regex(std::shared_ptr<const Code> code) : code_(std::move(code)) {}
  std::shared_ptr<const Code> code_;
};

}  // namespace retort::rewards::internal

#endif  // RETORT_REWARDS_INTERNAL_REGEX_H_
