// Hugging Face `tokenizer.json` byte-level BPE, reproduced exactly: the ids
// Encode returns are the ids the `tokenizers` library returns for the same
// text (add_special_tokens=False), and Decode returns what its decode returns.
//
// Supported parts of tokenizer.json (anything else is a clear load error):
//   normalizer:    null, NFC, Sequence of these.
//   pre_tokenizer: null, Sequence, Split (Regex or String pattern; behaviors
//                  Isolated/Removed/MergedWithPrevious/MergedWithNext/
//                  Contiguous; invert), ByteLevel (use_regex, add_prefix_space),
//                  Digits (individual_digits).
//   model:         BPE (merges as "a b" strings or [a, b] pairs, ignore_merges,
//                  unk_token + fuse_unk, byte_fallback).
//   decoder:       ByteLevel, Sequence of ByteLevel, or null (tokens joined
//                  with " ", as the library does).
//   added_tokens:  special or not, single_word, lstrip, rstrip, normalized;
//                  matched in the text before pre-tokenization (leftmost-longest,
//                  non-normalized tokens first), as the library does.
// Regexes run on PCRE2 (UTF + UCP, JIT-compiled).
//
// Invalid UTF-8 policy: Encode rejects input that is not valid UTF-8
// (overlongs, surrogates and code points above U+10FFFF included) with
// InvalidArgument naming the byte offset; it never guesses a repair. Decode of
// ids whose bytes are not valid UTF-8 (e.g. half a character) replaces each
// maximal invalid subsequence with U+FFFD, exactly like the library
// (String::from_utf8_lossy). StreamDecoder holds incomplete characters back
// instead.
//
// Ownership / thread-safety: a Tokenizer is immutable after Load except for an
// internal, mutex-sharded cache of pre-token encodings; every const method is
// safe to call from many threads at once. StreamDecoder borrows the Tokenizer
// (which must outlive it) and is not thread-safe itself (one per stream).
#ifndef RETORT_MODEL_TOKENIZER_TOKENIZER_H_
#define RETORT_MODEL_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace retort::tokenizer {

using TokenId = int32_t;

namespace internal {
struct TokenizerImpl;
}  // namespace internal

struct EncodeOptions {
  // Match added tokens (special or not) inside the text, as the library does
  // by default. false: special tokens' strings are encoded as plain text
  // (the library's `encode_special_tokens=True`), so user text cannot inject
  // "<｜User｜>". Non-special added tokens are still matched. Default: true.
  bool match_special_tokens = true;
  // Prepend BOS / append EOS per tokenizer_config.json (add_bos_token,
  // add_eos_token). Default: false (the fixture cases are without them).
  bool add_special_tokens = false;
};

class Tokenizer {
 public:
  // Loads `dir`/tokenizer.json (required) and `dir`/tokenizer_config.json
  // (optional: without it there is no BOS/EOS/pad). Errors: NotFound when
  // tokenizer.json is missing; InvalidArgument naming the file and field for
  // anything malformed (missing model, merges naming unknown tokens, a regex
  // PCRE2 rejects, duplicate ids, unsupported component types...).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadDir(const std::string& dir);
  // Same from in-memory JSON texts; `config_json` may be empty. `origin`
  // names the source in error messages.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(
      absl::string_view tokenizer_json, absl::string_view config_json,
      absl::string_view origin = "tokenizer.json");

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Text -> ids. InvalidArgument if `text` is not valid UTF-8 (see policy).
  [[nodiscard]] absl::StatusOr<std::vector<TokenId>> Encode(
      absl::string_view text, const EncodeOptions& options = {}) const;

  // Ids -> text, as the library's decode. Ids outside the vocabulary are
  // skipped (library behaviour; check with IdToToken first when that matters).
  // skip_special_tokens drops added tokens marked special.
  std::string Decode(const std::vector<TokenId>& ids, bool skip_special_tokens = false) const;

  // Raw bytes one token contributes to decoded text (no UTF-8 repair); empty
  // for unknown ids. Concatenating these and repairing gives Decode.
  const std::string& TokenBytes(TokenId id) const;

  // Exact token string (vocab key or added-token content) <-> id.
  std::optional<TokenId> TokenToId(absl::string_view token) const;
  std::optional<std::string> IdToToken(TokenId id) const;
  bool IsSpecial(TokenId id) const;

  // One past the largest id known (vocab and added tokens).
  int32_t vocab_size() const;
  // From tokenizer_config.json; nullopt when absent there.
  std::optional<TokenId> bos_id() const;
  std::optional<TokenId> eos_id() const;
  std::optional<TokenId> pad_id() const;
  bool add_bos_token() const;  // Default: false when not in the config.
  bool add_eos_token() const;  // Default: false.

 private:
  explicit Tokenizer(std::unique_ptr<internal::TokenizerImpl> impl);
  std::unique_ptr<internal::TokenizerImpl> impl_;
};

// Incremental ids -> text for streaming output. Text is emitted only once it
// forms complete UTF-8 characters, so a character split across tokens is
// never printed half. With a ByteLevel decoder, concatenating every Push
// result and Finish equals Decode(all ids, same skip flag) for every id
// sequence: invalid bytes become U+FFFD as soon as they are known to be
// invalid, an unfinished character at the end becomes U+FFFD in Finish.
// (Tokenizers without a decoder, whose Decode joins tokens with " ", are not
// streamed with those separators.)
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer* tokenizer, bool skip_special_tokens = false)
      : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

  // Text that became complete with `id` (possibly empty).
  std::string Push(TokenId id);
  // Whatever is still held (an incomplete character) as U+FFFD; resets.
  std::string Finish();

 private:
  const Tokenizer* tokenizer_;  // not owned
  bool skip_special_tokens_;
  std::string pending_;  // at most 3 bytes: a valid prefix of one character
};

// Replaces each maximal invalid UTF-8 subsequence with U+FFFD (the
// library's / Rust's from_utf8_lossy).
std::string Utf8Lossy(absl::string_view bytes);
// Byte offset of the first invalid UTF-8 sequence, or nullopt if valid.
std::optional<size_t> FindInvalidUtf8(absl::string_view bytes);

}  // namespace retort::tokenizer

#endif  // RETORT_MODEL_TOKENIZER_TOKENIZER_H_
