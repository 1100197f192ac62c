// Tokenizer tests: golden cases made by the Hugging Face `tokenizers` library
// (tests/fixtures/tokenizer), round trips on random UTF-8, the invalid-UTF-8
// policy, streaming decode, pre-tokenizer behaviours on small hand-built
// tokenizers, and malformed tokenizer.json files.
#include "model/tokenizer/tokenizer.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "model/tokenizer/internal/utf8.h"
#include "nlohmann/json.hpp"

namespace retort::tokenizer {
namespace {

using json = nlohmann::json;

std::string FixtureDir() {
  const char* root = std::getenv("RETORT_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/tests/fixtures/tokenizer";
}

std::string ReadText(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

const Tokenizer& Fixture() {
  static const Tokenizer* tok = [] {
    auto t = Tokenizer::LoadDir(FixtureDir());
    if (!t.ok()) {
      ADD_FAILURE() << t.status();
      std::abort();
    }
    return t->release();
  }();
  return *tok;
}

TEST(TokenizerGolden, EveryCaseEncodesAndDecodesExactly) {
  std::ifstream f(FixtureDir() + "/cases.jsonl");
  ASSERT_TRUE(f) << "missing cases.jsonl";
  std::string line;
  int n = 0;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    json c = json::parse(line);
    const std::string text = c["text"];
    const std::vector<TokenId> want = c["ids"].get<std::vector<TokenId>>();
    const std::string decoded = c["decoded"];
    auto got = Fixture().Encode(text);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, want) << "case " << n << ": " << json(text).dump();
    EXPECT_EQ(Fixture().Decode(want), decoded) << "case " << n << ": " << json(text).dump();
    ++n;
  }
  EXPECT_EQ(n, 150);
}

TEST(TokenizerConfig, SpecialIdsAndLookup) {
  const Tokenizer& t = Fixture();
  EXPECT_EQ(t.bos_id(), 0);
  EXPECT_EQ(t.eos_id(), 1);
  EXPECT_EQ(t.pad_id(), 2);
  EXPECT_TRUE(t.add_bos_token());
  EXPECT_FALSE(t.add_eos_token());
  EXPECT_EQ(t.TokenToId("<｜User｜>"), 3);
  EXPECT_EQ(t.TokenToId("<｜Assistant｜>"), 4);
  EXPECT_EQ(t.TokenToId("</think>"), 6);
  EXPECT_EQ(t.TokenToId("no such token"), std::nullopt);
  EXPECT_EQ(t.IdToToken(5), "<think>");
  EXPECT_EQ(t.IdToToken(-1), std::nullopt);
  EXPECT_EQ(t.IdToToken(t.vocab_size()), std::nullopt);
  EXPECT_TRUE(t.IsSpecial(1));
  EXPECT_FALSE(t.IsSpecial(100));
  EXPECT_EQ(t.vocab_size(), 8000);

  auto plain = t.Encode("Hello world");
  EncodeOptions with;
  with.add_special_tokens = true;
  auto special = t.Encode("Hello world", with);
  ASSERT_TRUE(plain.ok() && special.ok());
  ASSERT_EQ(special->size(), plain->size() + 1);
  EXPECT_EQ((*special)[0], 0);
  EXPECT_EQ(std::vector<TokenId>(special->begin() + 1, special->end()), *plain);
}

TEST(TokenizerDecode, SkipSpecialTokens) {
  const Tokenizer& t = Fixture();
  auto ids = t.Encode("<｜begin▁of▁sentence｜><think>a</think>b<｜end▁of▁sentence｜>");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->front(), 0);
  EXPECT_EQ(ids->back(), 1);
  EXPECT_EQ(t.Decode(*ids, /*skip_special_tokens=*/true), "ab");
  EXPECT_EQ(t.Decode(*ids), "<｜begin▁of▁sentence｜><think>a</think>b<｜end▁of▁sentence｜>");
  // Unknown ids are skipped, like the library.
  EXPECT_EQ(t.Decode({-5, 99999, 0}, false), "<｜begin▁of▁sentence｜>");
}

TEST(TokenizerEncode, SpecialTokensAsPlainTextWhenNotMatched) {
  const Tokenizer& t = Fixture();
  EncodeOptions no_special;
  no_special.match_special_tokens = false;
  auto ids = t.Encode("A<｜User｜>B", no_special);
  ASSERT_TRUE(ids.ok());
  for (TokenId id : *ids) EXPECT_FALSE(t.IsSpecial(id)) << id;
  EXPECT_EQ(t.Decode(*ids), "A<｜User｜>B");
}

// Random valid UTF-8 drawn from ranges where tokenizers go wrong: ASCII,
// whitespace runs, digits, Latin with combining marks, CJK, kana, Hangul,
// emoji (4-byte), any scalar value, and the special-token strings.
std::string RandomText(std::mt19937_64& rng) {
  static const std::vector<std::string> kSpecial = {"<｜User｜>", "<think>", "</think>",
                                                    "<｜end▁of▁sentence｜>"};
  std::uniform_int_distribution<int> len_dist(0, 40), kind_dist(0, 10);
  const int n = len_dist(rng);
  std::string s;
  for (int i = 0; i < n; ++i) {
    char32_t cp = 0;
    switch (kind_dist(rng)) {
      case 0:
        cp = std::uniform_int_distribution<int>(0x20, 0x7E)(rng);
        break;
      case 1:
        cp = " \t\n\r\v\f"[std::uniform_int_distribution<int>(0, 5)(rng)];
        break;
      case 2:
        cp = '0' + std::uniform_int_distribution<int>(0, 9)(rng);
        break;
      case 3:
        cp = std::uniform_int_distribution<int>(0xC0, 0x24F)(rng);
        break;
      case 4:
        cp = std::uniform_int_distribution<int>(0x300, 0x36F)(rng);
        break;
      case 5:
        cp = std::uniform_int_distribution<int>(0x4E00, 0x9FA5)(rng);
        break;
      case 6:
        cp = std::uniform_int_distribution<int>(0x3040, 0x30FF)(rng);
        break;
      case 7:
        cp = std::uniform_int_distribution<int>(0xAC00, 0xD7A3)(rng);
        break;
      case 8:
        cp = std::uniform_int_distribution<int>(0x1F300, 0x1FAFF)(rng);
        break;
      case 9:
        do {
          cp = std::uniform_int_distribution<uint32_t>(0, 0x10FFFF)(rng);
        } while (cp >= 0xD800 && cp <= 0xDFFF);
        break;
      default:
        s += kSpecial[std::uniform_int_distribution<size_t>(0, kSpecial.size() - 1)(rng)];
        continue;
    }
    internal::AppendUtf8(cp, &s);
  }
  return s;
}

TEST(TokenizerRoundTrip, TenThousandRandomStrings) {
  const uint64_t seed = 20240611;
  std::mt19937_64 rng(seed);
  const Tokenizer& t = Fixture();
  for (int i = 0; i < 10000; ++i) {
    const std::string s = RandomText(rng);
    auto ids = t.Encode(s);
    ASSERT_TRUE(ids.ok()) << "seed " << seed << " case " << i << ": " << ids.status();
    ASSERT_EQ(t.Decode(*ids), s) << "seed " << seed << " case " << i << ": " << json(s).dump();
  }
}

TEST(TokenizerRoundTrip, LongWordWithoutQuadraticMerging) {
  // One 200 KB pre-token (letters only): the heap-based merge is O(n log n);
  // a quadratic loop would take minutes here.
  std::string s(200000, 'a');
  for (size_t i = 0; i < s.size(); i += 7) s[i] = 'b' + (i % 5);
  auto start = std::chrono::steady_clock::now();
  auto ids = Fixture().Encode(s);
  auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(Fixture().Decode(*ids), s);
  EXPECT_LT(secs, 10.0);
}

TEST(TokenizerUtf8, InvalidInputIsRejectedWithOffset) {
  const std::vector<std::pair<std::string, size_t>> cases = {
      {"ab\x80", 2},            // lone continuation byte
      {"\xC0\x80", 0},          // overlong NUL
      {"x\xED\xA0\x80", 1},     // UTF-16 surrogate
      {"abc\xE4\xB8", 3},       // truncated 3-byte sequence
      {"\xF5\x80\x80\x80", 0},  // beyond U+10FFFF
      {"ok \xFF", 3},
  };
  for (const auto& [text, offset] : cases) {
    auto ids = Fixture().Encode(text);
    ASSERT_FALSE(ids.ok());
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(ids.status().message()).find("offset " + std::to_string(offset)),
              std::string::npos)
        << ids.status();
    EXPECT_EQ(FindInvalidUtf8(text), offset);
  }
  EXPECT_EQ(FindInvalidUtf8("héllo 🙂"), std::nullopt);
}

TEST(TokenizerUtf8, LossyReplacesMaximalSubparts) {
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(Utf8Lossy("a\x80"
                      "b"),
            "a" + r + "b");
  EXPECT_EQ(Utf8Lossy("\xF0\x9F\x98"), r);  // one truncated char: one U+FFFD
  EXPECT_EQ(Utf8Lossy("\xF0\x9F\x98"
                      "A"),
            r + "A");
  EXPECT_EQ(Utf8Lossy("\xE0\x80"), r + r);          // E0 80 is not a valid prefix
  EXPECT_EQ(Utf8Lossy("\xED\xA0\x80"), r + r + r);  // surrogate
  EXPECT_EQ(Utf8Lossy("ok"), "ok");
}

TEST(TokenizerStream, MatchesDecodeAndNeverSplitsCharacters) {
  const uint64_t seed = 7;
  std::mt19937_64 rng(seed);
  const Tokenizer& t = Fixture();
  for (int i = 0; i < 500; ++i) {
    const std::string s = RandomText(rng);
    auto ids = t.Encode(s);
    ASSERT_TRUE(ids.ok());
    StreamDecoder stream(&t);
    std::string joined;
    for (TokenId id : *ids) {
      std::string chunk = stream.Push(id);
      ASSERT_EQ(FindInvalidUtf8(chunk), std::nullopt) << "seed " << seed << " case " << i;
      joined += chunk;
    }
    joined += stream.Finish();
    ASSERT_EQ(joined, s) << "seed " << seed << " case " << i;
  }
  // Arbitrary id sequences (bytes that may not form UTF-8) agree with Decode.
  std::uniform_int_distribution<TokenId> id_dist(10, t.vocab_size() - 1);
  for (int i = 0; i < 500; ++i) {
    std::vector<TokenId> ids(std::uniform_int_distribution<int>(0, 12)(rng));
    for (TokenId& id : ids) id = id_dist(rng);
    StreamDecoder stream(&t);
    std::string joined;
    for (TokenId id : ids) joined += stream.Push(id);
    joined += stream.Finish();
    ASSERT_EQ(joined, t.Decode(ids)) << "seed " << seed << " random ids case " << i;
  }
}

TEST(TokenizerStream, SkipsSpecialTokensWhenAsked) {
  const Tokenizer& t = Fixture();
  auto ids = t.Encode("<think>x</think>y");
  ASSERT_TRUE(ids.ok());
  StreamDecoder stream(&t, /*skip_special_tokens=*/true);
  std::string joined;
  for (TokenId id : *ids) joined += stream.Push(id);
  joined += stream.Finish();
  EXPECT_EQ(joined, "xy");
}

// ---------------------------------------------------------------------------
// Small hand-built tokenizers. Every listed piece gets a chain of prefix
// merges, so a pre-token that equals a piece encodes to exactly one token and
// the token strings show the pre-tokenization.

json TinyTokenizer(const std::vector<std::string>& pieces, const json& pre_tokenizer) {
  json vocab = json::object();
  json merges = json::array();
  int next_id = 0;
  // Every byte-level character, so any ASCII text encodes.
  auto add = [&](const std::string& tok) {
    if (!vocab.contains(tok)) vocab[tok] = next_id++;
  };
  for (int c = 0x21; c <= 0x7E; ++c) add(std::string(1, static_cast<char>(c)));
  add("Ġ");  // byte-level space
  for (const std::string& p : pieces) {
    // Pieces are written in byte-level form (Ġ for space); split by chars.
    std::vector<std::string> chars;
    for (size_t i = 0; i < p.size();) {
      size_t len = (static_cast<unsigned char>(p[i]) < 0x80) ? 1 : 2;
      chars.push_back(p.substr(i, len));
      i += len;
    }
    std::string prefix = chars[0];
    for (size_t k = 1; k < chars.size(); ++k) {
      if (!vocab.contains(prefix + chars[k])) {
        merges.push_back(prefix + " " + chars[k]);
        add(prefix + chars[k]);
      }
      prefix += chars[k];
    }
  }
  json j;
  j["version"] = "1.0";
  j["added_tokens"] = json::array();
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = pre_tokenizer;
  j["decoder"] = {{"type", "ByteLevel"}};
  j["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}};
  return j;
}

json SplitThenByteLevel(const std::string& regex, const std::string& behavior, bool invert) {
  return {{"type", "Sequence"},
          {"pretokenizers",
           {{{"type", "Split"},
             {"pattern", {{"Regex", regex}}},
             {"behavior", behavior},
             {"invert", invert}},
            {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
}

std::vector<std::string> TokenStrings(const Tokenizer& t, const std::string& text) {
  auto ids = t.Encode(text);
  EXPECT_TRUE(ids.ok()) << ids.status();
  std::vector<std::string> out;
  if (ids.ok())
    for (TokenId id : *ids) out.push_back(*t.IdToToken(id));
  return out;
}

std::unique_ptr<Tokenizer> Build(const json& j) {
  auto t = Tokenizer::FromJson(j.dump(), "", "tiny");
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(t).value() : nullptr;
}

TEST(TokenizerPreTokenizer, SplitBehaviorsLikeTheLibraryDocs) {
  // The library's documented example: "the-final--countdown" split on "-".
  // "-final" and "-countdown" first: their merges must outrank "f i" etc.
  const std::vector<std::string> pieces = {"-final",    "-countdown", "the",  "final",
                                           "countdown", "--",         "the-", "final-"};
  using V = std::vector<std::string>;
  const std::string text = "the-final--countdown";
  auto tok = [&](const char* behavior, bool invert = false) {
    return Build(TinyTokenizer(pieces, SplitThenByteLevel("-", behavior, invert)));
  };
  EXPECT_EQ(TokenStrings(*tok("Removed"), text), (V{"the", "final", "countdown"}));
  EXPECT_EQ(TokenStrings(*tok("Isolated"), text), (V{"the", "-", "final", "-", "-", "countdown"}));
  EXPECT_EQ(TokenStrings(*tok("MergedWithPrevious"), text),
            (V{"the-", "final-", "-", "countdown"}));
  EXPECT_EQ(TokenStrings(*tok("MergedWithNext"), text), (V{"the", "-final", "-", "-countdown"}));
  EXPECT_EQ(TokenStrings(*tok("Contiguous"), text), (V{"the", "-", "final", "--", "countdown"}));
  // invert: the words are the matches, so Removed keeps only the dashes.
  EXPECT_EQ(TokenStrings(*tok("Removed", true), text), (V{"-", "-", "-"}));
}

TEST(TokenizerPreTokenizer, DigitsIndividualAndContiguous) {
  const std::vector<std::string> pieces = {"1234", "ab"};
  json individual = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Digits"}, {"individual_digits", true}},
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  json contiguous = individual;
  contiguous["pretokenizers"][0]["individual_digits"] = false;
  using V = std::vector<std::string>;
  EXPECT_EQ(TokenStrings(*Build(TinyTokenizer(pieces, individual)), "ab1234"),
            (V{"ab", "1", "2", "3", "4"}));
  EXPECT_EQ(TokenStrings(*Build(TinyTokenizer(pieces, contiguous)), "ab1234"), (V{"ab", "1234"}));
}

TEST(TokenizerPreTokenizer, ByteLevelRegexAndPrefixSpace) {
  const std::vector<std::string> pieces = {"Ġhello", "Ġworld", "hello", "ĠĠ"};
  json bl = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  auto t = Build(TinyTokenizer(pieces, bl));
  using V = std::vector<std::string>;
  EXPECT_EQ(TokenStrings(*t, "hello world"), (V{"Ġhello", "Ġworld"}));
  // GPT-2's \s+(?!\S): of three spaces before a word, the last joins the word.
  EXPECT_EQ(TokenStrings(*t, "hello   world"), (V{"Ġhello", "ĠĠ", "Ġworld"}));
  bl["add_prefix_space"] = false;
  EXPECT_EQ(TokenStrings(*Build(TinyTokenizer(pieces, bl)), "hello world"), (V{"hello", "Ġworld"}));
}

TEST(TokenizerAddedTokens, LstripRstripSingleWord) {
  json j = TinyTokenizer({"ab"},
                         {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}});
  const int mask_id = 1000, word_id = 1001;
  j["added_tokens"] = {{{"id", mask_id},
                        {"content", "<mask>"},
                        {"special", true},
                        {"lstrip", true},
                        {"rstrip", true},
                        {"single_word", false},
                        {"normalized", false}},
                       {{"id", word_id},
                        {"content", "xy"},
                        {"special", false},
                        {"lstrip", false},
                        {"rstrip", false},
                        {"single_word", true},
                        {"normalized", true}}};
  auto t = Build(j);
  ASSERT_NE(t, nullptr);
  auto ids = t->Encode("ab  <mask>  ab");
  ASSERT_TRUE(ids.ok());
  // The spaces on both sides belong to the added token.
  EXPECT_EQ(*ids, (std::vector<TokenId>{*t->TokenToId("ab"), mask_id, *t->TokenToId("ab")}));
  // single_word: matched alone, not inside a word.
  auto alone = t->Encode("ab xy ab");
  ASSERT_TRUE(alone.ok());
  EXPECT_NE(std::find(alone->begin(), alone->end(), word_id), alone->end());
  auto inside = t->Encode("abxyab");
  ASSERT_TRUE(inside.ok());
  EXPECT_EQ(std::find(inside->begin(), inside->end(), word_id), inside->end());
}

// ---------------------------------------------------------------------------
// Malformed tokenizer.json.

json FixtureJson() { return json::parse(ReadText(FixtureDir() + "/tokenizer.json")); }

void ExpectLoadError(const json& j, const std::string& needle) {
  auto t = Tokenizer::FromJson(j.dump(), "", "bad/tokenizer.json");
  ASSERT_FALSE(t.ok()) << "loaded although it should fail with '" << needle << "'";
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
  EXPECT_NE(std::string(t.status().message()).find(needle), std::string::npos) << t.status();
  EXPECT_NE(std::string(t.status().message()).find("bad/tokenizer.json"), std::string::npos)
      << t.status();
}

TEST(TokenizerMalformed, MissingModel) {
  json j = FixtureJson();
  j.erase("model");
  ExpectLoadError(j, "model");
}

TEST(TokenizerMalformed, MergeNamesUnknownToken) {
  json j = FixtureJson();
  j["model"]["merges"].push_back(json::array({"Ġ", "no-such-token"}));
  ExpectLoadError(j, "unknown token 'no-such-token'");
}

TEST(TokenizerMalformed, BadRegex) {
  json j = FixtureJson();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "[a-";
  ExpectLoadError(j, "pre_tokenizer.pretokenizers[0].pattern");
}

TEST(TokenizerMalformed, DuplicateVocabIds) {
  json j = FixtureJson();
  j["model"]["vocab"]["zzz-duplicate"] = 17;
  ExpectLoadError(j, "duplicate id 17");
}

TEST(TokenizerMalformed, DuplicateAddedTokenIds) {
  json j = FixtureJson();
  j["added_tokens"][1]["id"] = 0;
  ExpectLoadError(j, "duplicate id 0");
}

TEST(TokenizerMalformed, NotJsonAndMissingFile) {
  auto t = Tokenizer::FromJson("{not json", "", "bad/tokenizer.json");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  auto missing = Tokenizer::LoadDir("/nonexistent/dir");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  // Unsupported component types are named.
  json j = FixtureJson();
  j["pre_tokenizer"] = {{"type", "Metaspace"}};
  auto meta = Tokenizer::FromJson(j.dump(), "", "bad/tokenizer.json");
  ASSERT_FALSE(meta.ok());
  EXPECT_NE(std::string(meta.status().message()).find("Metaspace"), std::string::npos);
}

TEST(TokenizerMalformed, ConfigNamesUnknownToken) {
  auto t = Tokenizer::FromJson(ReadText(FixtureDir() + "/tokenizer.json"),
                               R"({"bos_token": "<nope>"})", "tokenizer.json");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(std::string(t.status().message()).find("bos_token"), std::string::npos) << t.status();
}

}  // namespace
}  // namespace retort::tokenizer

namespace retort::tokenizer {
namespace {

TEST(TokenizerRoundTrip, HugeRunsOfOneCharacterClass) {
  // Long runs stress the regex engine (JIT stack) and the merge loop.
  for (const std::string& unit :
       {std::string(" "), std::string("\n"), std::string(" \t"), std::string("7"),
        std::string("中"), std::string("🙂"), std::string("!")}) {
    std::string s;
    while (s.size() < 1000000) s += unit;
    auto ids = Fixture().Encode(s);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(Fixture().Decode(*ids), s) << "unit " << unit;
  }
}

}  // namespace
}  // namespace retort::tokenizer

namespace retort::tokenizer {
namespace {

TEST(TokenizerThreads, ConcurrentEncodeMatchesSequential) {
  // One tokenizer (shared pre-token cache) used from four threads at once.
  auto fresh = Tokenizer::LoadDir(FixtureDir());
  ASSERT_TRUE(fresh.ok());
  const Tokenizer& t = **fresh;
  const uint64_t seed = 99;
  std::mt19937_64 rng(seed);
  std::vector<std::string> texts;
  for (int i = 0; i < 2000; ++i) texts.push_back(RandomText(rng));
  std::vector<std::vector<TokenId>> want;
  for (const std::string& s : texts) want.push_back(*Fixture().Encode(s));
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (size_t i = k; i < texts.size() + k; ++i) {
        const size_t j = i % texts.size();
        auto ids = t.Encode(texts[j]);
        if (!ids.ok() || *ids != want[j]) ++mismatches[k];
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int k = 0; k < 4; ++k) EXPECT_EQ(mismatches[k], 0) << "thread " << k << " seed " << seed;
}

}  // namespace
}  // namespace retort::tokenizer
