// Byte-level BPE from a Hugging Face tokenizer.json (see tokenizer.h). Each
// stage mirrors the `tokenizers` library (v0.19–0.21 sources): added-token
// extraction (added_vocabulary.rs), normalizer, pre-tokenizer pipeline
// (pre_tokenizers/*.rs, normalizer.rs `split`), BPE merges (models/bpe/word.rs
// merge_all) and decoders (decoders/byte_level.rs).
#include "model/tokenizer/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <deque>
#include <fstream>
#include <queue>
#include <sstream>
#include <utility>
#include <variant>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "model/base/logging.h"
#include "model/base/status_macros.h"
#include "model/tokenizer/internal/utf8.h"
#include "nlohmann/json.hpp"

#ifdef RETORT_TOKENIZER_HAVE_ICU
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>
#endif

namespace retort::tokenizer {
namespace internal {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------------------
// PCRE2 regex: compiled once (UTF + UCP, JIT), matched from any thread with
// per-thread match data and JIT stack.

class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(const std::string& pattern,
                                                        const std::string& where) {
    int err = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code =
        pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                      PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": regex '", pattern, "' does not compile (PCRE2, at offset ", offset,
                       "): ", reinterpret_cast<const char*>(msg)));
    }
    auto re = std::unique_ptr<Regex>(new Regex(code));
    re->jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
    return re;
  }
  ~Regex() { pcre2_code_free(code_); }

  // Calls fn(start, end) for each non-empty match in s, left to right, non
  // overlapping (an empty match advances one character, like onig's find_iter).
  template <typename Fn>
  void ForEachMatch(std::string_view s, Fn&& fn) const {
    ThreadState& ts = State();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t start = 0;
    while (start <= s.size()) {
      int rc = jit_ ? pcre2_jit_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK, ts.match,
                                      ts.context)
                    : pcre2_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK, ts.match,
                                  ts.context);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      CHECK(rc >= 0) << "PCRE2 match failed with code " << rc;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(ts.match);
      size_t ms = ov[0], me = ov[1];
      if (me == ms) {
        if (ms >= s.size()) break;
        // Advance one UTF-8 character.
        size_t next = ms + 1;
        while (next < s.size() && (static_cast<unsigned char>(s[next]) & 0xC0) == 0x80) ++next;
        start = next;
        continue;
      }
      fn(ms, me);
      start = me;
    }
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  struct ThreadState {
    ThreadState() {
      match = pcre2_match_data_create(1, nullptr);
      jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
      context = pcre2_match_context_create(nullptr);
      pcre2_jit_stack_assign(context, nullptr, jit_stack);
    }
    ~ThreadState() {
      pcre2_match_data_free(match);
      pcre2_match_context_free(context);
      pcre2_jit_stack_free(jit_stack);
    }
    pcre2_match_data* match;
    pcre2_jit_stack* jit_stack;
    pcre2_match_context* context;
  };
  static ThreadState& State() {
    thread_local ThreadState state;
    return state;
  }
  pcre2_code* code_;
  bool jit_ = false;
};

std::string EscapeRegex(const std::string& literal) {
  std::string out;
  for (char c : literal) {
    if (std::string_view("\\^$.|?*+()[]{}-/#&~ ").find(c) != std::string_view::npos)
      out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

// ---------------------------------------------------------------------------
// GPT-2 byte <-> unicode table used by ByteLevel.

struct ByteLevelTable {
  std::array<char32_t, 256> byte_to_cp;
  std::array<std::string, 256> byte_to_utf8;
  absl::flat_hash_map<char32_t, uint8_t> cp_to_byte;
  ByteLevelTable() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_to_cp[b] = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      AppendUtf8(byte_to_cp[b], &byte_to_utf8[b]);
      cp_to_byte[byte_to_cp[b]] = static_cast<uint8_t>(b);
    }
  }
};
const ByteLevelTable& ByteTable() {
  static const ByteLevelTable* table = new ByteLevelTable();
  return *table;
}

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

bool IsWhitespace(char32_t c) {  // Rust char::is_whitespace (White_Space).
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Code points of a valid UTF-8 string with their byte offsets.
std::vector<std::pair<size_t, char32_t>> CodePoints(std::string_view s) {
  std::vector<std::pair<size_t, char32_t>> out;
  size_t i = 0;
  while (i < s.size()) {
    Utf8Char c = ReadUtf8(reinterpret_cast<const unsigned char*>(s.data()) + i, s.size() - i);
    CHECK(c.kind == Utf8Char::kValid) << "text was validated as UTF-8";
    out.emplace_back(i, c.cp);
    i += c.len;
  }
  return out;
}

// ---------------------------------------------------------------------------
// Pipeline pieces.

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct SplitStep {
  std::unique_ptr<Regex> regex;
  SplitBehavior behavior;
  bool invert;
};
struct ByteLevelStep {
  bool add_prefix_space;
  std::unique_ptr<Regex> regex;  // null when use_regex is false
};
using PreTokenizerStep = std::variant<SplitStep, ByteLevelStep>;

// Splits `s` per `step` (normalizer.rs `split`), appending non-empty pieces.
void ApplySplit(const Regex& regex, SplitBehavior behavior, bool invert, std::string_view s,
                std::vector<std::string_view>* out) {
  struct Seg {
    size_t start, end;
    bool match;
  };
  // Reused per thread: this runs once per piece per Split step.
  thread_local std::vector<Seg> segs;
  segs.clear();
  size_t prev = 0;
  regex.ForEachMatch(s, [&](size_t ms, size_t me) {
    if (prev != ms) segs.push_back({prev, ms, false});
    segs.push_back({ms, me, true});
    prev = me;
  });
  if (prev != s.size()) segs.push_back({prev, s.size(), false});
  if (invert)
    for (Seg& g : segs) g.match = !g.match;

  thread_local std::vector<Seg> res;
  res.clear();
  switch (behavior) {
    case SplitBehavior::kRemoved:
      for (const Seg& g : segs)
        if (!g.match) res.push_back(g);
      break;
    case SplitBehavior::kIsolated:
      res.swap(segs);
      break;
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const Seg& g : segs) {
        if (g.match && !previous_match && !res.empty()) {
          res.back().end = g.end;
        } else {
          res.push_back(g);
        }
        previous_match = g.match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->match && !previous_match && !res.empty()) {
          res.back().start = it->start;
        } else {
          res.push_back(*it);
        }
        previous_match = it->match;
      }
      std::reverse(res.begin(), res.end());
      break;
    }
    case SplitBehavior::kContiguous: {
      bool previous_match = false;
      for (const Seg& g : segs) {
        if (g.match == previous_match && !res.empty()) {
          res.back().end = g.end;
        } else {
          res.push_back(g);
        }
        previous_match = g.match;
      }
      break;
    }
  }
  for (const Seg& g : res)
    if (g.end > g.start) out->push_back(s.substr(g.start, g.end - g.start));
}

// ---------------------------------------------------------------------------
// Added tokens: a byte trie, matched leftmost-longest like aho-corasick's
// MatchKind::LeftmostLongest.

struct AddedToken {
  TokenId id;
  std::string content;
  bool special = false, single_word = false, lstrip = false, rstrip = false, normalized = false;
};

class AddedTokenMatcher {
 public:
  void Add(const AddedToken* token) {
    if (token->content.empty()) return;
    int node = 0;
    for (unsigned char b : token->content) {
      int child = Child(node, b);
      if (child < 0) {
        child = static_cast<int>(nodes_.size());
        nodes_[node].children.emplace_back(b, child);
        nodes_.emplace_back();
      }
      node = child;
    }
    nodes_[node].token = token;
    first_byte_[static_cast<unsigned char>(token->content[0])] = true;
    empty_ = false;
  }
  bool empty() const { return empty_; }

  // Longest token starting at s[pos], or null.
  const AddedToken* LongestAt(std::string_view s, size_t pos, size_t* end) const {
    if (!first_byte_[static_cast<unsigned char>(s[pos])]) return nullptr;
    int node = 0;
    const AddedToken* best = nullptr;
    for (size_t i = pos; i < s.size(); ++i) {
      node = Child(node, static_cast<unsigned char>(s[i]));
      if (node < 0) break;
      if (nodes_[node].token != nullptr) {
        best = nodes_[node].token;
        *end = i + 1;
      }
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int>> children;
    const AddedToken* token = nullptr;
  };
  int Child(int node, unsigned char b) const {
    for (const auto& [c, n] : nodes_[node].children)
      if (c == b) return n;
    return -1;
  }
  std::vector<Node> nodes_ = std::vector<Node>(1);
  std::array<bool, 256> first_byte_{};
  bool empty_ = true;
};

bool IsWordChar(char32_t c) {
  // Rust's char::is_alphanumeric || '_' (approximated for non-ASCII: any
  // non-ASCII code point that is not whitespace counts as a word character).
  if (c < 0x80)
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  return !IsWhitespace(c);
}

struct Segment {
  const AddedToken* token;  // null: plain text
  std::string_view text;
};

// added_vocabulary.rs find_matches: splits `s` into added tokens and gaps.
void SplitAddedTokens(const AddedTokenMatcher& matcher, std::string_view s, bool match_special,
                      std::vector<Segment>* out) {
  if (matcher.empty() || s.empty()) {
    if (!s.empty()) out->push_back({nullptr, s});
    return;
  }
  size_t start_offset = 0;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t stop = 0;
    const AddedToken* tok = matcher.LongestAt(s, pos, &stop);
    if (tok == nullptr) {
      ++pos;
      continue;
    }
    size_t start = pos;
    pos = stop;  // the automaton resumes after the raw match
    if (tok->special && !match_special) continue;
    if (tok->single_word) {
      bool start_space = true, stop_space = true;
      if (start > 0) {
        auto cps = CodePoints(s.substr(0, start));  // only the last one matters
        start_space = !IsWordChar(cps.back().second);
      }
      if (stop < s.size()) {
        Utf8Char c =
            ReadUtf8(reinterpret_cast<const unsigned char*>(s.data()) + stop, s.size() - stop);
        stop_space = !IsWordChar(c.cp);
      }
      if (!start_space || !stop_space) continue;
    }
    if (tok->lstrip) {
      size_t new_start = start;
      auto cps = CodePoints(s.substr(0, start));
      for (auto it = cps.rbegin(); it != cps.rend() && IsWhitespace(it->second); ++it)
        new_start = it->first;
      start = std::max(new_start, start_offset);
    }
    if (tok->rstrip) {
      while (stop < s.size()) {
        Utf8Char c =
            ReadUtf8(reinterpret_cast<const unsigned char*>(s.data()) + stop, s.size() - stop);
        if (!IsWhitespace(c.cp)) break;
        stop += c.len;
      }
    }
    if (start_offset < start)
      out->push_back({nullptr, s.substr(start_offset, start - start_offset)});
    out->push_back({tok, s.substr(start, stop - start)});
    start_offset = stop;
  }
  if (start_offset < s.size()) out->push_back({nullptr, s.substr(start_offset)});
}

uint64_t PairKey(TokenId a, TokenId b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

}  // namespace

// ---------------------------------------------------------------------------

struct TokenizerImpl {
  // Model (BPE).
  absl::flat_hash_map<std::string, TokenId> vocab;                    // vocab + added tokens
  absl::flat_hash_map<uint64_t, std::pair<int32_t, TokenId>> merges;  // pair -> (rank, merged id)
  std::optional<TokenId> unk_id;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  std::array<TokenId, 256> byte_fallback_ids;  // "<0xXX>" ids, -1 if absent

  // Pipeline.
  bool normalize_nfc = false;
  std::vector<PreTokenizerStep> pre_tokenizers;
  // When ByteLevel is the last pre-tokenizer its byte->char mapping is
  // deferred to the model: pieces stay raw bytes and each byte maps straight
  // to the id of its byte-level character (byte_ids).
  bool deferred_byte_level = false;
  std::array<TokenId, 256> byte_ids;

  // Added tokens (owned here; matchers point into it).
  std::deque<AddedToken> added;
  AddedTokenMatcher raw_matcher;         // normalized == false
  AddedTokenMatcher normalized_matcher;  // normalized == true

  // Decoding.
  enum class DecoderKind { kByteLevel, kJoinWithSpace } decoder = DecoderKind::kJoinWithSpace;
  std::vector<std::string> id_to_token;  // "" where no token
  std::vector<std::string> token_bytes;  // what each id contributes to decoded text
  std::vector<bool> is_special;
  std::vector<bool> known;

  // Config.
  std::optional<TokenId> bos, eos, pad;
  bool add_bos = false, add_eos = false;

  // Pre-token cache: raw piece bytes -> ids. Sharded to keep lock contention
  // low; each shard stops growing at kCacheShardCapacity (like the library's
  // bounded cache) so memory stays bounded.
  static constexpr int kCacheShards = 16;
  static constexpr size_t kCacheShardCapacity = 1 << 14;
  static constexpr size_t kMaxCachedPieceBytes = 256;
  struct CacheShard {
    absl::Mutex mu;
    absl::flat_hash_map<std::string, std::vector<TokenId>> map;
  };
  mutable std::array<CacheShard, kCacheShards> cache;

  std::string Normalize(std::string_view s) const;
  void PreTokenize(std::string_view s, std::deque<std::string>* storage,
                   std::vector<std::string_view>* pieces) const;
  void EncodePiece(std::string_view piece, std::vector<TokenId>* out) const;
  void BpePiece(std::string_view piece, std::vector<TokenId>* out) const;
};

std::string TokenizerImpl::Normalize(std::string_view s) const {
  if (!normalize_nfc) return std::string(s);
#ifdef RETORT_TOKENIZER_HAVE_ICU
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(status);
  CHECK(U_SUCCESS(status)) << "ICU NFC instance unavailable";
  icu::UnicodeString in =
      icu::UnicodeString::fromUTF8(icu::StringPiece(s.data(), static_cast<int32_t>(s.size())));
  icu::UnicodeString normalized = nfc->normalize(in, status);
  CHECK(U_SUCCESS(status)) << "ICU NFC failed";
  std::string out;
  normalized.toUTF8String(out);
  return out;
#else
  LOG(FATAL) << "NFC requested without ICU; Load should have refused";
  return {};
#endif
}

void TokenizerImpl::PreTokenize(std::string_view s, std::deque<std::string>* storage,
                                std::vector<std::string_view>* pieces) const {
  pieces->clear();
  pieces->push_back(s);
  std::vector<std::string_view> next;
  const ByteLevelTable& table = ByteTable();
  for (size_t k = 0; k < pre_tokenizers.size(); ++k) {
    next.clear();
    const PreTokenizerStep& step = pre_tokenizers[k];
    if (const auto* split = std::get_if<SplitStep>(&step)) {
      for (std::string_view p : *pieces)
        ApplySplit(*split->regex, split->behavior, split->invert, p, &next);
    } else {
      const auto& bl = std::get<ByteLevelStep>(step);
      const bool last = k + 1 == pre_tokenizers.size();
      for (std::string_view p : *pieces) {
        if (bl.add_prefix_space && (p.empty() || p[0] != ' ')) {
          storage->push_back(absl::StrCat(" ", absl::string_view(p.data(), p.size())));
          p = storage->back();
        }
        std::vector<std::string_view> split_pieces;
        if (bl.regex != nullptr) {
          ApplySplit(*bl.regex, SplitBehavior::kIsolated, false, p, &split_pieces);
        } else {
          split_pieces.push_back(p);
        }
        for (std::string_view q : split_pieces) {
          if (last && deferred_byte_level) {
            next.push_back(q);
          } else {
            std::string mapped;
            for (unsigned char b : q) mapped += table.byte_to_utf8[b];
            storage->push_back(std::move(mapped));
            next.push_back(storage->back());
          }
        }
      }
    }
    pieces->swap(next);
  }
}

// models/bpe/word.rs merge_all, on a doubly linked list of symbols with a
// min-heap of candidate merges ordered by (rank, position): O(n log n).
void TokenizerImpl::BpePiece(std::string_view piece, std::vector<TokenId>* out) const {
  struct Symbol {
    TokenId id;
    int prev, next;
    int len;  // 0: merged into its left neighbour
  };
  std::vector<Symbol> symbols;
  symbols.reserve(piece.size());
  const ByteLevelTable& table = ByteTable();
  std::string
      mapped;  // the piece as model input (byte-level chars) for ignore_merges / unk lookups

  auto push_symbol = [&](TokenId id, int len) {
    int idx = static_cast<int>(symbols.size());
    symbols.push_back({id, idx - 1, -1, len});
    if (idx > 0) symbols[idx - 1].next = idx;
  };
  // Pending unknown symbol handling (fuse_unk merges consecutive unknowns).
  bool last_was_unk = false;
  auto push_unknown = [&](std::string_view ch) {
    if (byte_fallback) {
      bool all = true;
      for (unsigned char b : ch) all = all && byte_fallback_ids[b] >= 0;
      if (all) {
        for (unsigned char b : ch) push_symbol(byte_fallback_ids[b], 1);
        last_was_unk = false;
        return;
      }
    }
    if (!unk_id.has_value()) return;  // the library drops the character
    if (fuse_unk && last_was_unk) {
      symbols.back().len += static_cast<int>(ch.size());
    } else {
      push_symbol(*unk_id, static_cast<int>(ch.size()));
    }
    last_was_unk = true;
  };

  if (deferred_byte_level) {
    if (ignore_merges) {
      for (unsigned char b : piece) mapped += table.byte_to_utf8[b];
      auto it = vocab.find(mapped);
      if (it != vocab.end()) {
        out->push_back(it->second);
        return;
      }
    }
    for (unsigned char b : piece) {
      if (byte_ids[b] >= 0) {
        push_symbol(byte_ids[b], 1);
        last_was_unk = false;
      } else {
        push_unknown(table.byte_to_utf8[b]);
      }
    }
  } else {
    if (ignore_merges) {
      auto it = vocab.find(absl::string_view(piece.data(), piece.size()));
      if (it != vocab.end()) {
        out->push_back(it->second);
        return;
      }
    }
    size_t i = 0;
    while (i < piece.size()) {
      Utf8Char c =
          ReadUtf8(reinterpret_cast<const unsigned char*>(piece.data()) + i, piece.size() - i);
      int len = c.kind == Utf8Char::kValid ? c.len : 1;
      std::string_view ch = piece.substr(i, len);
      auto it = vocab.find(absl::string_view(ch.data(), ch.size()));
      if (it != vocab.end()) {
        push_symbol(it->second, len);
        last_was_unk = false;
      } else {
        push_unknown(ch);
      }
      i += len;
    }
  }
  if (symbols.empty()) return;

  struct Merge {
    int32_t rank;
    int pos;
    TokenId new_id;
    bool operator>(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Merge, std::vector<Merge>, std::greater<Merge>> queue;
  auto find_merge = [&](TokenId a, TokenId b) -> const std::pair<int32_t, TokenId>* {
    auto it = merges.find(PairKey(a, b));
    return it == merges.end() ? nullptr : &it->second;
  };
  for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) {
    if (const auto* m = find_merge(symbols[i].id, symbols[i + 1].id))
      queue.push({m->first, i, m->second});
  }
  while (!queue.empty()) {
    Merge top = queue.top();
    queue.pop();
    Symbol& cur = symbols[top.pos];
    if (cur.len == 0 || cur.next < 0) continue;
    const int next_pos = cur.next;
    const Symbol right = symbols[next_pos];
    const auto* m = find_merge(cur.id, right.id);
    if (m == nullptr || m->second != top.new_id) continue;  // stale entry
    cur.id = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    symbols[next_pos].len = 0;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const auto* pm = find_merge(symbols[cur.prev].id, cur.id))
        queue.push({pm->first, cur.prev, pm->second});
    }
    if (cur.next >= 0) {
      if (const auto* nm = find_merge(cur.id, symbols[cur.next].id))
        queue.push({nm->first, top.pos, nm->second});
    }
  }
  for (int i = 0; i >= 0; i = symbols[i].next) out->push_back(symbols[i].id);
}

void TokenizerImpl::EncodePiece(std::string_view piece, std::vector<TokenId>* out) const {
  if (deferred_byte_level && piece.size() == 1 &&
      byte_ids[static_cast<unsigned char>(piece[0])] >= 0) {
    out->push_back(byte_ids[static_cast<unsigned char>(piece[0])]);
    return;
  }
  if (piece.size() > kMaxCachedPieceBytes) {
    BpePiece(piece, out);
    return;
  }
  CacheShard& shard =
      cache[absl::HashOf(absl::string_view(piece.data(), piece.size())) % kCacheShards];
  {
    absl::ReaderMutexLock lock(&shard.mu);
    auto it = shard.map.find(absl::string_view(piece.data(), piece.size()));
    if (it != shard.map.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<TokenId> ids;
  BpePiece(piece, &ids);
  out->insert(out->end(), ids.begin(), ids.end());
  absl::MutexLock lock(&shard.mu);
  if (shard.map.size() < kCacheShardCapacity) shard.map.emplace(std::string(piece), std::move(ids));
}

// ---------------------------------------------------------------------------
// Loading.

namespace {

absl::Status Bad(const std::string& origin, const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(origin, ": ", field, ": ", what));
}

absl::StatusOr<SplitBehavior> ParseBehavior(const json& j, const std::string& origin,
                                            const std::string& field) {
  if (!j.is_string()) return Bad(origin, field, "expected a string");
  const std::string s = j.get<std::string>();
  if (s == "Removed") return SplitBehavior::kRemoved;
  if (s == "Isolated") return SplitBehavior::kIsolated;
  if (s == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (s == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (s == "Contiguous") return SplitBehavior::kContiguous;
  return Bad(origin, field, absl::StrCat("unknown split behavior '", s, "'"));
}

bool BoolOr(const json& j, const char* key, bool dflt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  return it->is_boolean() ? it->get<bool>() : dflt;
}

absl::Status ParsePreTokenizer(const json& j, const std::string& origin, const std::string& field,
                               std::vector<PreTokenizerStep>* steps) {
  if (j.is_null()) return absl::OkStatus();
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    return Bad(origin, field, "expected an object with a string 'type'");
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence") {
    if (!j.contains("pretokenizers") || !j["pretokenizers"].is_array())
      return Bad(origin, field + ".pretokenizers", "expected an array");
    for (size_t i = 0; i < j["pretokenizers"].size(); ++i)
      RETURN_IF_ERROR(ParsePreTokenizer(j["pretokenizers"][i], origin,
                                        absl::StrCat(field, ".pretokenizers[", i, "]"), steps));
    return absl::OkStatus();
  }
  if (type == "Split") {
    if (!j.contains("pattern") || !j["pattern"].is_object())
      return Bad(origin, field + ".pattern", "missing");
    const json& p = j["pattern"];
    std::string pattern;
    if (p.contains("Regex") && p["Regex"].is_string()) {
      pattern = p["Regex"].get<std::string>();
    } else if (p.contains("String") && p["String"].is_string()) {
      pattern = EscapeRegex(p["String"].get<std::string>());
    } else {
      return Bad(origin, field + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    SplitStep step;
    ASSIGN_OR_RETURN(step.regex,
                     Regex::Compile(pattern, absl::StrCat(origin, ": ", field, ".pattern")));
    if (!j.contains("behavior")) return Bad(origin, field + ".behavior", "missing");
    ASSIGN_OR_RETURN(step.behavior, ParseBehavior(j["behavior"], origin, field + ".behavior"));
    step.invert = BoolOr(j, "invert", false);
    steps->push_back(std::move(step));
    return absl::OkStatus();
  }
  if (type == "ByteLevel") {
    ByteLevelStep step;
    step.add_prefix_space = BoolOr(j, "add_prefix_space", true);
    if (BoolOr(j, "use_regex", true)) {
      ASSIGN_OR_RETURN(step.regex, Regex::Compile(kGpt2Pattern, origin + ": " + field));
    }
    steps->push_back(std::move(step));
    return absl::OkStatus();
  }
  if (type == "Digits") {
    SplitStep step;
    ASSIGN_OR_RETURN(step.regex, Regex::Compile(R"(\p{N})", origin + ": " + field));
    step.behavior = BoolOr(j, "individual_digits", false) ? SplitBehavior::kIsolated
                                                          : SplitBehavior::kContiguous;
    step.invert = false;
    steps->push_back(std::move(step));
    return absl::OkStatus();
  }
  return absl::UnimplementedError(
      absl::StrCat(origin, ": ", field, ": pre-tokenizer type '", type,
                   "' is not supported (Sequence, Split, ByteLevel, Digits are)"));
}

absl::Status ParseNormalizer(const json& j, const std::string& origin, const std::string& field,
                             bool* nfc) {
  if (j.is_null()) return absl::OkStatus();
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    return Bad(origin, field, "expected an object with a string 'type'");
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence") {
    if (!j.contains("normalizers") || !j["normalizers"].is_array())
      return Bad(origin, field + ".normalizers", "expected an array");
    for (size_t i = 0; i < j["normalizers"].size(); ++i)
      RETURN_IF_ERROR(ParseNormalizer(j["normalizers"][i], origin,
                                      absl::StrCat(field, ".normalizers[", i, "]"), nfc));
    return absl::OkStatus();
  }
  if (type == "NFC") {
#ifdef RETORT_TOKENIZER_HAVE_ICU
    *nfc = true;
    return absl::OkStatus();
#else
    return absl::UnimplementedError(
        absl::StrCat(origin, ": ", field, ": NFC needs ICU, not built in"));
#endif
  }
  return absl::UnimplementedError(absl::StrCat(origin, ": ", field, ": normalizer type '", type,
                                               "' is not supported (NFC, Sequence are)"));
}

absl::Status ParseDecoder(const json& j, const std::string& origin, const std::string& field,
                          TokenizerImpl::DecoderKind* kind) {
  if (j.is_null()) return absl::OkStatus();
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    return Bad(origin, field, "expected an object with a string 'type'");
  const std::string type = j["type"].get<std::string>();
  if (type == "ByteLevel") {
    *kind = TokenizerImpl::DecoderKind::kByteLevel;
    return absl::OkStatus();
  }
  if (type == "Sequence" && j.contains("decoders") && j["decoders"].is_array() &&
      j["decoders"].size() == 1)
    return ParseDecoder(j["decoders"][0], origin, field + ".decoders[0]", kind);
  return absl::UnimplementedError(absl::StrCat(origin, ": ", field, ": decoder type '", type,
                                               "' is not supported (ByteLevel is)"));
}

std::optional<std::string> ConfigToken(const json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  return std::nullopt;
}

absl::StatusOr<std::unique_ptr<TokenizerImpl>> BuildImpl(const json& root, const json& cfg,
                                                         const std::string& origin) {
  auto impl = std::make_unique<TokenizerImpl>();
  if (!root.is_object()) return Bad(origin, "(root)", "expected a JSON object");

  // Model.
  if (!root.contains("model") || !root["model"].is_object()) return Bad(origin, "model", "missing");
  const json& model = root["model"];
  if (model.contains("type") &&
      !(model["type"].is_string() && model["type"].get<std::string>() == "BPE"))
    return absl::UnimplementedError(
        absl::StrCat(origin, ": model.type: only BPE is supported, got ", model["type"].dump()));
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && !model[key].is_null() &&
        !(model[key].is_string() && model[key].get<std::string>().empty()))
      return absl::UnimplementedError(absl::StrCat(origin, ": model.", key, " is not supported"));
  }
  if (model.contains("dropout") && model["dropout"].is_number() &&
      model["dropout"].get<double>() > 0)
    return absl::UnimplementedError(absl::StrCat(origin, ": model.dropout is not supported"));
  if (!model.contains("vocab") || !model["vocab"].is_object())
    return Bad(origin, "model.vocab", "missing");
  int32_t max_id = -1;
  absl::flat_hash_map<TokenId, std::string> id_owner;
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    if (!it.value().is_number_integer())
      return Bad(origin, "model.vocab[\"" + it.key() + "\"]", "id is not an integer");
    const int64_t id = it.value().get<int64_t>();
    if (id < 0 || id > (1 << 30))
      return Bad(origin, "model.vocab[\"" + it.key() + "\"]", "id out of range");
    auto [owner, inserted] = id_owner.emplace(static_cast<TokenId>(id), it.key());
    if (!inserted)
      return Bad(origin, "model.vocab",
                 absl::StrCat("duplicate id ", id, " for tokens '", owner->second, "' and '",
                              it.key(), "'"));
    impl->vocab[it.key()] = static_cast<TokenId>(id);
    max_id = std::max<int32_t>(max_id, static_cast<int32_t>(id));
  }
  impl->ignore_merges = BoolOr(model, "ignore_merges", false);
  impl->fuse_unk = BoolOr(model, "fuse_unk", false);
  impl->byte_fallback = BoolOr(model, "byte_fallback", false);
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto it = impl->vocab.find(model["unk_token"].get<std::string>());
    if (it == impl->vocab.end())
      return Bad(origin, "model.unk_token",
                 "'" + model["unk_token"].get<std::string>() + "' is not in the vocab");
    impl->unk_id = it->second;
  }
  if (!model.contains("merges") || !model["merges"].is_array())
    return Bad(origin, "model.merges", "missing");
  const json& merges = model["merges"];
  impl->merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string field = absl::StrCat("model.merges[", i, "]");
    std::string a, b;
    if (merges[i].is_string()) {
      const std::string s = merges[i].get<std::string>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        return Bad(origin, field, "'" + s + "' is not two tokens separated by one space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (merges[i].is_array() && merges[i].size() == 2 && merges[i][0].is_string() &&
               merges[i][1].is_string()) {
      a = merges[i][0].get<std::string>();
      b = merges[i][1].get<std::string>();
    } else {
      return Bad(origin, field, "expected \"a b\" or [\"a\", \"b\"]");
    }
    auto ia = impl->vocab.find(a);
    if (ia == impl->vocab.end()) return Bad(origin, field, "names unknown token '" + a + "'");
    auto ib = impl->vocab.find(b);
    if (ib == impl->vocab.end()) return Bad(origin, field, "names unknown token '" + b + "'");
    auto iab = impl->vocab.find(a + b);
    if (iab == impl->vocab.end())
      return Bad(origin, field, "merged token '" + a + b + "' is not in the vocab");
    // A pair listed twice: the library collects the ranked list into a
    // HashMap, so the last occurrence wins; so does this.
    impl->merges[PairKey(ia->second, ib->second)] = {static_cast<int32_t>(i), iab->second};
  }

  // Added tokens.
  if (root.contains("added_tokens") && !root["added_tokens"].is_null()) {
    if (!root["added_tokens"].is_array()) return Bad(origin, "added_tokens", "expected an array");
    absl::flat_hash_map<TokenId, std::string> added_ids;
    for (size_t i = 0; i < root["added_tokens"].size(); ++i) {
      const json& t = root["added_tokens"][i];
      const std::string field = absl::StrCat("added_tokens[", i, "]");
      if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() ||
          !t.contains("content") || !t["content"].is_string())
        return Bad(origin, field, "expected an object with integer 'id' and string 'content'");
      AddedToken tok;
      const int64_t id = t["id"].get<int64_t>();
      if (id < 0 || id > (1 << 30)) return Bad(origin, field + ".id", "out of range");
      tok.id = static_cast<TokenId>(id);
      tok.content = t["content"].get<std::string>();
      tok.special = BoolOr(t, "special", false);
      tok.single_word = BoolOr(t, "single_word", false);
      tok.lstrip = BoolOr(t, "lstrip", false);
      tok.rstrip = BoolOr(t, "rstrip", false);
      tok.normalized = BoolOr(t, "normalized", !tok.special);
      if (auto [it, inserted] = added_ids.emplace(tok.id, tok.content); !inserted)
        return Bad(origin, field,
                   absl::StrCat("duplicate id ", tok.id, " (also '", it->second, "')"));
      if (auto it = id_owner.find(tok.id); it != id_owner.end() && it->second != tok.content)
        return Bad(origin, field,
                   absl::StrCat("id ", tok.id, " of '", tok.content,
                                "' already belongs to vocab token '", it->second, "'"));
      if (auto it = impl->vocab.find(tok.content); it != impl->vocab.end() && it->second != tok.id)
        return Bad(origin, field,
                   absl::StrCat("'", tok.content, "' has id ", tok.id, " but the vocab gives it ",
                                it->second));
      impl->vocab[tok.content] = tok.id;
      max_id = std::max(max_id, tok.id);
      impl->added.push_back(std::move(tok));
    }
    for (const AddedToken& tok : impl->added) {
      (tok.normalized ? impl->normalized_matcher : impl->raw_matcher).Add(&tok);
    }
  }

  // Pipeline.
  RETURN_IF_ERROR(ParseNormalizer(root.value("normalizer", json()), origin, "normalizer",
                                  &impl->normalize_nfc));
  RETURN_IF_ERROR(ParsePreTokenizer(root.value("pre_tokenizer", json()), origin, "pre_tokenizer",
                                    &impl->pre_tokenizers));
  impl->deferred_byte_level = !impl->pre_tokenizers.empty() &&
                              std::holds_alternative<ByteLevelStep>(impl->pre_tokenizers.back());
  RETURN_IF_ERROR(ParseDecoder(root.value("decoder", json()), origin, "decoder", &impl->decoder));
  if (root.contains("post_processor") && !root["post_processor"].is_null()) {
    // Post-processors only act with add_special_tokens in the library; retort
    // adds BOS/EOS from tokenizer_config.json instead (EncodeOptions).
  }

  const ByteLevelTable& table = ByteTable();
  for (int b = 0; b < 256; ++b) {
    auto it = impl->vocab.find(table.byte_to_utf8[b]);
    impl->byte_ids[b] = it == impl->vocab.end() ? -1 : it->second;
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    auto fb = impl->vocab.find(name);
    impl->byte_fallback_ids[b] = fb == impl->vocab.end() ? -1 : fb->second;
  }

  // Decoding tables.
  const size_t n = static_cast<size_t>(max_id + 1);
  impl->id_to_token.assign(n, "");
  impl->token_bytes.assign(n, "");
  impl->is_special.assign(n, false);
  impl->known.assign(n, false);
  for (const auto& [tok, id] : impl->vocab) {
    impl->id_to_token[id] = tok;
    impl->known[id] = true;
  }
  for (const AddedToken& tok : impl->added) impl->is_special[tok.id] = tok.special;
  for (size_t id = 0; id < n; ++id) {
    if (!impl->known[id]) continue;
    const std::string& tok = impl->id_to_token[id];
    if (impl->decoder == TokenizerImpl::DecoderKind::kByteLevel) {
      // decoders/byte_level.rs: every char through the byte table, or the
      // token's own bytes if any char is outside it.
      std::string bytes;
      bool all = true;
      size_t i = 0;
      while (i < tok.size()) {
        Utf8Char c =
            ReadUtf8(reinterpret_cast<const unsigned char*>(tok.data()) + i, tok.size() - i);
        if (c.kind != Utf8Char::kValid) {
          all = false;
          break;
        }
        auto it = table.cp_to_byte.find(c.cp);
        if (it == table.cp_to_byte.end()) {
          all = false;
          break;
        }
        bytes.push_back(static_cast<char>(it->second));
        i += c.len;
      }
      impl->token_bytes[id] = all ? bytes : tok;
    } else {
      impl->token_bytes[id] = tok;
    }
  }

  // Config.
  if (cfg.is_object()) {
    auto lookup = [&](const char* key, std::optional<TokenId>* out) -> absl::Status {
      std::optional<std::string> s = ConfigToken(cfg, key);
      if (!s.has_value()) return absl::OkStatus();
      auto it = impl->vocab.find(*s);
      if (it == impl->vocab.end())
        return Bad("tokenizer_config.json", key, "'" + *s + "' is not a token of " + origin);
      *out = it->second;
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(lookup("bos_token", &impl->bos));
    RETURN_IF_ERROR(lookup("eos_token", &impl->eos));
    RETURN_IF_ERROR(lookup("pad_token", &impl->pad));
    impl->add_bos = BoolOr(cfg, "add_bos_token", false);
    impl->add_eos = BoolOr(cfg, "add_eos_token", false);
    if (impl->add_bos && !impl->bos)
      return Bad("tokenizer_config.json", "add_bos_token", "true but no bos_token");
    if (impl->add_eos && !impl->eos)
      return Bad("tokenizer_config.json", "add_eos_token", "true but no eos_token");
  }
  return impl;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace
}  // namespace internal

// ---------------------------------------------------------------------------
// Public API.

std::optional<size_t> FindInvalidUtf8(absl::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t i = 0;
  while (i < bytes.size()) {
    // ASCII fast path, 8 bytes at a time.
    while (i + 8 <= bytes.size()) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ULL) break;
      i += 8;
    }
    if (i >= bytes.size()) break;
    internal::Utf8Char c = internal::ReadUtf8(p + i, bytes.size() - i);
    if (c.kind != internal::Utf8Char::kValid) return i;
    i += c.len;
  }
  return std::nullopt;
}

std::string Utf8Lossy(absl::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t i = 0;
  while (i < bytes.size()) {
    internal::Utf8Char c = internal::ReadUtf8(p + i, bytes.size() - i);
    if (c.kind == internal::Utf8Char::kValid) {
      out.append(bytes.data() + i, c.len);
    } else {
      out += "\xEF\xBF\xBD";
    }
    i += c.len;
  }
  return out;
}

Tokenizer::Tokenizer(std::unique_ptr<internal::TokenizerImpl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(absl::string_view tokenizer_json,
                                                               absl::string_view config_json,
                                                               absl::string_view origin) {
  const std::string org(origin);
  nlohmann::json root, cfg;
  try {
    root = nlohmann::json::parse(tokenizer_json.begin(), tokenizer_json.end());
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(org, ": not valid JSON: ", e.what()));
  }
  if (!config_json.empty()) {
    try {
      cfg = nlohmann::json::parse(config_json.begin(), config_json.end());
    } catch (const nlohmann::json::exception& e) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer_config.json: not valid JSON: ", e.what()));
    }
  }
  absl::StatusOr<std::unique_ptr<internal::TokenizerImpl>> impl;
  try {
    impl = internal::BuildImpl(root, cfg, org);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(org, ": unexpected structure: ", e.what()));
  }
  if (!impl.ok()) return impl.status();
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl).value()));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::LoadDir(const std::string& dir) {
  const std::string tok_path = dir + "/tokenizer.json";
  ASSIGN_OR_RETURN(std::string tok, internal::ReadFile(tok_path));
  std::string cfg;
  absl::StatusOr<std::string> cfg_or = internal::ReadFile(dir + "/tokenizer_config.json");
  if (cfg_or.ok()) cfg = std::move(cfg_or).value();
  return FromJson(tok, cfg, tok_path);
}

absl::StatusOr<std::vector<TokenId>> Tokenizer::Encode(absl::string_view text,
                                                       const EncodeOptions& options) const {
  if (std::optional<size_t> bad = FindInvalidUtf8(text)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Encode: input is not valid UTF-8 at byte offset ", *bad, " of ", text.size(),
                     " (retort rejects invalid UTF-8; it does not repair it)"));
  }
  const internal::TokenizerImpl& im = *impl_;
  std::vector<TokenId> ids;
  ids.reserve(text.size() / 3 + 2);
  if (options.add_special_tokens && im.add_bos) ids.push_back(*im.bos);

  std::vector<internal::Segment> raw_segments;
  internal::SplitAddedTokens(im.raw_matcher, std::string_view(text.data(), text.size()),
                             options.match_special_tokens, &raw_segments);
  std::deque<std::string> storage;
  std::vector<std::string_view> pieces;
  std::vector<internal::Segment> segments;
  for (const internal::Segment& rs : raw_segments) {
    if (rs.token != nullptr) {
      ids.push_back(rs.token->id);
      continue;
    }
    std::string_view normalized = rs.text;
    if (im.normalize_nfc) {
      storage.push_back(im.Normalize(rs.text));
      normalized = storage.back();
    }
    segments.clear();
    internal::SplitAddedTokens(im.normalized_matcher, normalized, options.match_special_tokens,
                               &segments);
    for (const internal::Segment& seg : segments) {
      if (seg.token != nullptr) {
        ids.push_back(seg.token->id);
        continue;
      }
      im.PreTokenize(seg.text, &storage, &pieces);
      for (std::string_view p : pieces) im.EncodePiece(p, &ids);
    }
  }
  if (options.add_special_tokens && im.add_eos) ids.push_back(*im.eos);
  return ids;
}

const std::string& Tokenizer::TokenBytes(TokenId id) const {
  static const std::string* empty = new std::string();
  if (id < 0 || static_cast<size_t>(id) >= impl_->token_bytes.size()) return *empty;
  return impl_->token_bytes[id];
}

std::string Tokenizer::Decode(const std::vector<TokenId>& ids, bool skip_special_tokens) const {
  const internal::TokenizerImpl& im = *impl_;
  std::string bytes;
  bool first = true;
  for (TokenId id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= im.known.size() || !im.known[id]) continue;
    if (skip_special_tokens && im.is_special[id]) continue;
    if (im.decoder == internal::TokenizerImpl::DecoderKind::kJoinWithSpace && !first)
      bytes.push_back(' ');
    bytes += im.token_bytes[id];
    first = false;
  }
  return Utf8Lossy(bytes);
}

std::optional<TokenId> Tokenizer::TokenToId(absl::string_view token) const {
  auto it = impl_->vocab.find(token);
  if (it == impl_->vocab.end()) return std::nullopt;
  return it->second;
}

std::optional<std::string> Tokenizer::IdToToken(TokenId id) const {
  if (id < 0 || static_cast<size_t>(id) >= impl_->known.size() || !impl_->known[id])
    return std::nullopt;
  return impl_->id_to_token[id];
}

bool Tokenizer::IsSpecial(TokenId id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->is_special.size() && impl_->is_special[id];
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->known.size()); }
std::optional<TokenId> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<TokenId> Tokenizer::eos_id() const { return impl_->eos; }
std::optional<TokenId> Tokenizer::pad_id() const { return impl_->pad; }
bool Tokenizer::add_bos_token() const { return impl_->add_bos; }
bool Tokenizer::add_eos_token() const { return impl_->add_eos; }

std::string StreamDecoder::Push(TokenId id) {
  if (skip_special_tokens_ && tokenizer_->IsSpecial(id)) return "";
  // The join-with-space decoder (no decoder in tokenizer.json) is not
  // streamed with separators; byte-level tokenizers are the supported case.
  pending_ += tokenizer_->TokenBytes(id);
  std::string out;
  const auto* p = reinterpret_cast<const unsigned char*>(pending_.data());
  size_t i = 0;
  while (i < pending_.size()) {
    internal::Utf8Char c = internal::ReadUtf8(p + i, pending_.size() - i);
    if (c.kind == internal::Utf8Char::kIncomplete) break;
    if (c.kind == internal::Utf8Char::kValid) {
      out.append(pending_, i, c.len);
    } else {
      out += "\xEF\xBF\xBD";
    }
    i += c.len;
  }
  pending_.erase(0, i);
  return out;
}

std::string StreamDecoder::Finish() {
  std::string out = Utf8Lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace retort::tokenizer
