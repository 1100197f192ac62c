// UTF-8 helpers shared by the tokenizer and the chat template (internal).
#ifndef RETORT_MODEL_TOKENIZER_INTERNAL_UTF8_H_
#define RETORT_MODEL_TOKENIZER_INTERNAL_UTF8_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace retort::tokenizer::internal {

// Result of looking at the character starting at p[0] (avail >= 1 bytes).
struct Utf8Char {
  enum Kind { kValid, kInvalid, kIncomplete } kind;
  // kValid: bytes of the character. kInvalid: bytes of the maximal invalid
  // subpart (>= 1, Unicode's "substitution of maximal subparts", as Rust's
  // from_utf8_lossy). kIncomplete: bytes that form a valid prefix and run to
  // the end of the buffer.
  int len;
  char32_t cp;  // kValid only
};

inline Utf8Char ReadUtf8(const unsigned char* p, size_t avail) {
  const unsigned char b0 = p[0];
  if (b0 < 0x80) return {Utf8Char::kValid, 1, b0};
  int need;
  unsigned char lo = 0x80, hi = 0xBF;
  char32_t cp;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
    cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    cp = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    cp = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return {Utf8Char::kInvalid, 1, 0};
  }
  for (int i = 1; i <= need; ++i) {
    if (static_cast<size_t>(i) >= avail) return {Utf8Char::kIncomplete, i, 0};
    const unsigned char b = p[i];
    if (b < lo || b > hi) return {Utf8Char::kInvalid, i, 0};
    lo = 0x80;
    hi = 0xBF;
    cp = (cp << 6) | (b & 0x3F);
  }
  return {Utf8Char::kValid, need + 1, cp};
}

inline void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace retort::tokenizer::internal

#endif  // RETORT_MODEL_TOKENIZER_INTERNAL_UTF8_H_
