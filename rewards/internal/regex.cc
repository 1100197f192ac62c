// PCRE2 wrapper for the rewards (see regex.h).
#define PCRE2_CODE_UNIT_WIDTH 8
#include "rewards/internal/regex.h"

#include <pcre2.h>

#include "absl/strings/str_cat.h"
#include "model/base/logging.h"

namespace retort::rewards::internal {

struct Regex::Code {
  pcre2_code* code = nullptr;
  ~Code() { pcre2_code_free(code); }
};

absl::StatusOr<Regex> Regex::Compile(absl::string_view pattern, unsigned flags) {
  // UTF mode so that '.' and classes step over whole characters; invalid
  // UTF-8 in a subject is matched bytewise (PCRE2_MATCH_INVALID_UTF).
  uint32_t options = PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | PCRE2_UCP;
  if (flags & kIgnoreCase) options |= PCRE2_CASELESS;
  if (flags & kMultiline) options |= PCRE2_MULTILINE;
  if (flags & kDotAll) options |= PCRE2_DOTALL;
  int error = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   options, &error, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    return absl::InvalidArgumentError(absl::StrCat("regex '", std::string(pattern), "' at offset ",
                                                   offset, ": ",
                                                   reinterpret_cast<const char*>(message)));
  }
  auto holder = std::make_shared<Code>();
  holder->code = code;
  return Regex(std::move(holder));
}

Regex Regex::CompileOrDie(absl::string_view pattern, unsigned flags) {
  auto re = Compile(pattern, flags);
  CHECK(re.ok()) << re.status().ToString();
  return *std::move(re);
}

std::vector<RegexMatch> Regex::FindAll(absl::string_view subject) const {
  std::vector<RegexMatch> out;
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_->code, nullptr);
  CHECK(md != nullptr);
  size_t start = 0;
  while (start <= subject.size()) {
    const int rc = pcre2_match(code_->code, reinterpret_cast<PCRE2_SPTR>(subject.data()),
                               subject.size(), start, 0, md, nullptr);
    if (rc < 0) break;  // PCRE2_ERROR_NOMATCH, or a matching limit: no more matches
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    RegexMatch m;
    m.begin = ov[0];
    m.end = ov[1];
    for (int g = 0; g < rc; ++g) {
      if (ov[2 * g] == PCRE2_UNSET) {
        m.groups.emplace_back();
      } else {
        m.groups.emplace_back(subject.substr(ov[2 * g], ov[2 * g + 1] - ov[2 * g]));
      }
    }
    const uint32_t count = pcre2_get_ovector_count(md);
    while (m.groups.size() < count) m.groups.emplace_back();
    out.push_back(std::move(m));
    if (ov[1] == ov[0]) {
      // Empty match: step one character (UTF-8 lead byte to the next lead byte).
      size_t next = ov[1] + 1;
      while (next < subject.size() && (static_cast<unsigned char>(subject[next]) & 0xC0) == 0x80)
        ++next;
      start = next;
    } else {
      start = ov[1];
    }
  }
  pcre2_match_data_free(md);
  return out;
}

bool Regex::Search(absl::string_view subject) const {
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_->code, nullptr);
  CHECK(md != nullptr);
  const int rc = pcre2_match(code_->code, reinterpret_cast<PCRE2_SPTR>(subject.data()),
                             subject.size(), 0, 0, md, nullptr);
  pcre2_match_data_free(md);
  return rc >= 0;
}

std::string Regex::Replace(absl::string_view subject, absl::string_view replacement) const {
  std::string out(subject.size() + 64, '\0');
  for (int attempt = 0; attempt < 2; ++attempt) {
    PCRE2_SIZE out_len = out.size();
    const int rc =
        pcre2_substitute(code_->code, reinterpret_cast<PCRE2_SPTR>(subject.data()), subject.size(),
                         0, PCRE2_SUBSTITUTE_GLOBAL | PCRE2_SUBSTITUTE_OVERFLOW_LENGTH, nullptr,
                         nullptr, reinterpret_cast<PCRE2_SPTR>(replacement.data()),
                         replacement.size(), reinterpret_cast<PCRE2_UCHAR*>(out.data()), &out_len);
    if (rc >= 0) {
      out.resize(out_len);
      return out;
    }
    CHECK_EQ(rc, PCRE2_ERROR_NOMEMORY) << "pcre2_substitute failed: " << rc;
    out.assign(out_len + 1, '\0');  // out_len is now the length needed
  }
  CHECK(false) << "pcre2_substitute: buffer still too small";
  return "";
}

std::vector<std::string> Regex::Split(absl::string_view subject) const {
  std::vector<std::string> out;
  size_t last = 0;
  for (const RegexMatch& m : FindAll(subject)) {
    out.emplace_back(subject.substr(last, m.begin - last));
    last = m.end;
  }
  out.emplace_back(subject.substr(last));
  return out;
}

}  // namespace retort::rewards::internal
