// IFEval checks, one test per constraint family, each with a response that
// follows the instruction and one that does not; plus loose scoring and the
// reward's aggregation.
#include "rewards/ifeval.h"

#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace retort::rewards {
namespace {

bool Strict(const std::string& id, const nlohmann::json& kwargs, const std::string& response) {
  auto r = CheckInstruction(IfEvalInstruction{id, kwargs}, response);
  EXPECT_TRUE(r.ok()) << id << ": " << r.status();
  return r.ok() && *r;
}

bool Loose(const std::string& id, const nlohmann::json& kwargs, const std::string& response) {
  auto r = CheckInstructionLoose(IfEvalInstruction{id, kwargs}, response);
  EXPECT_TRUE(r.ok()) << id << ": " << r.status();
  return r.ok() && *r;
}

const nlohmann::json kNone = nlohmann::json::object();

TEST(IfEvalTest, Keywords) {
  EXPECT_TRUE(Strict("keywords:existence", {{"keywords", {"Paris", "river"}}},
                     "The River Seine runs through paris."));
  EXPECT_FALSE(Strict("keywords:existence", {{"keywords", {"Paris", "tower"}}},
                      "The river runs through Paris."));
  const nlohmann::json at_least = {{"keyword", "cat"}, {"frequency", 2}, {"relation", "at least"}};
  EXPECT_TRUE(Strict("keywords:frequency", at_least, "A cat and a Cat."));
  EXPECT_FALSE(Strict("keywords:frequency", at_least, "One cat."));
  const nlohmann::json less = {{"keyword", "cat"}, {"frequency", 2}, {"relation", "less than"}};
  EXPECT_TRUE(Strict("keywords:frequency", less, "One cat."));
  EXPECT_FALSE(Strict("keywords:frequency", less, "cat cat"));
  const nlohmann::json forbidden = {{"forbidden_words", {"bad", "ugly"}}};
  EXPECT_TRUE(Strict("keywords:forbidden_words", forbidden, "A badge is fine; so is smuggly."));
  EXPECT_FALSE(Strict("keywords:forbidden_words", forbidden, "That was BAD."));
}

TEST(IfEvalTest, LetterFrequency) {
  const nlohmann::json kw = {{"letter", "z"}, {"let_frequency", 3}, {"let_relation", "at least"}};
  EXPECT_TRUE(Strict("keywords:letter_frequency", kw, "Zebras zigzag lazily."));
  EXPECT_FALSE(Strict("keywords:letter_frequency", kw, "A zebra."));
  const nlohmann::json few = {{"letter", "a"}, {"let_frequency", 2}, {"let_relation", "less than"}};
  EXPECT_TRUE(Strict("keywords:letter_frequency", few, "A dog."));
  EXPECT_FALSE(Strict("keywords:letter_frequency", few, "A cat ate."));
}

TEST(IfEvalTest, WordAndSentenceCounts) {
  const nlohmann::json words = {{"num_words", 5}, {"relation", "at least"}};
  EXPECT_TRUE(Strict("length_constraints:number_words", words, "one two three, four-five"));
  EXPECT_FALSE(Strict("length_constraints:number_words", words, "one two three four"));
  const nlohmann::json few = {{"num_words", 3}, {"relation", "less than"}};
  EXPECT_TRUE(Strict("length_constraints:number_words", few, "Hi there."));
  EXPECT_FALSE(Strict("length_constraints:number_words", few, "Hi there you."));
  const nlohmann::json sentences = {{"num_sentences", 3}, {"relation", "less than"}};
  // "Dr." and "3.5" do not end sentences.
  EXPECT_TRUE(Strict("length_constraints:number_sentences", sentences,
                     "Dr. Smith paid 3.5 dollars. Then he left!"));
  EXPECT_FALSE(Strict("length_constraints:number_sentences", sentences, "One. Two? Three!"));
  const nlohmann::json many = {{"num_sentences", 3}, {"relation", "at least"}};
  EXPECT_TRUE(Strict("length_constraints:number_sentences", many, "One. Two? Three!"));
}

TEST(IfEvalTest, Paragraphs) {
  const nlohmann::json two = {{"num_paragraphs", 2}};
  EXPECT_TRUE(
      Strict("length_constraints:number_paragraphs", two, "First part.\n***\nSecond part."));
  EXPECT_FALSE(Strict("length_constraints:number_paragraphs", two, "Only one."));
  EXPECT_FALSE(
      Strict("length_constraints:number_paragraphs", two, "A\n***\n***\nB"));  // empty middle
  const nlohmann::json nth = {{"num_paragraphs", 3}, {"nth_paragraph", 2}, {"first_word", "then"}};
  EXPECT_TRUE(Strict("length_constraints:nth_paragraph_first_word", nth,
                     "Intro.\n\n\"Then, more.\n\nEnd."));
  EXPECT_FALSE(
      Strict("length_constraints:nth_paragraph_first_word", nth, "Intro.\n\nAfter that.\n\nEnd."));
  EXPECT_FALSE(Strict("length_constraints:nth_paragraph_first_word", nth, "Intro.\n\nThen more."));
}

TEST(IfEvalTest, PlaceholdersAndPostscript) {
  EXPECT_TRUE(Strict("detectable_content:number_placeholders", {{"num_placeholders", 2}},
                     "Dear [name], at [address]."));
  EXPECT_FALSE(
      Strict("detectable_content:number_placeholders", {{"num_placeholders", 2}}, "Dear [name]."));
  EXPECT_TRUE(Strict("detectable_content:postscript", {{"postscript_marker", "P.S."}},
                     "Bye.\n\nP.S. see you"));
  EXPECT_FALSE(Strict("detectable_content:postscript", {{"postscript_marker", "P.S."}}, "Bye."));
  EXPECT_TRUE(Strict("detectable_content:postscript", {{"postscript_marker", "P.P.S"}},
                     "Bye.\nP.P.S more"));
}

TEST(IfEvalTest, FormatChecks) {
  EXPECT_TRUE(Strict("detectable_format:number_bullet_lists", {{"num_bullets", 2}},
                     "Items:\n* one\n- two"));
  EXPECT_FALSE(Strict("detectable_format:number_bullet_lists", {{"num_bullets", 2}},
                      "* one\n* two\n* three"));
  EXPECT_TRUE(Strict("detectable_format:constrained_response", kNone, "My answer is yes."));
  EXPECT_FALSE(Strict("detectable_format:constrained_response", kNone, "Yes."));
  EXPECT_TRUE(Strict("detectable_format:number_highlighted_sections", {{"num_highlights", 2}},
                     "*one* and **two**"));
  EXPECT_FALSE(Strict("detectable_format:number_highlighted_sections", {{"num_highlights", 2}},
                      "*one* and ** **"));
  const nlohmann::json sections = {{"section_spliter", "Section"}, {"num_sections", 2}};
  EXPECT_TRUE(
      Strict("detectable_format:multiple_sections", sections, "Section 1\nfoo\nSection 2\nbar"));
  EXPECT_FALSE(Strict("detectable_format:multiple_sections", sections, "Section 1\nfoo"));
  EXPECT_TRUE(Strict("detectable_format:title", kNone, "<<My Title>>\nbody"));
  EXPECT_FALSE(Strict("detectable_format:title", kNone, "<< >> body"));
}

TEST(IfEvalTest, JsonOutput) {
  EXPECT_TRUE(Strict("detectable_format:json_format", kNone, "```json\n{\"a\": [1, 2]}\n```"));
  EXPECT_TRUE(Strict("detectable_format:json_format", kNone, "  {\"a\": 1}  "));
  EXPECT_FALSE(Strict("detectable_format:json_format", kNone, "Here: {\"a\": 1}"));
  EXPECT_FALSE(Strict("detectable_format:json_format", kNone, "{'a': 1}"));
}

TEST(IfEvalTest, Combinations) {
  EXPECT_TRUE(Strict("combination:two_responses", kNone, "First answer.\n******\nSecond answer."));
  EXPECT_FALSE(Strict("combination:two_responses", kNone, "Same.\n******\nSame."));
  EXPECT_FALSE(Strict("combination:two_responses", kNone, "Only one."));
  const nlohmann::json repeat = {{"prompt_to_repeat", "Write a poem about cats."}};
  EXPECT_TRUE(
      Strict("combination:repeat_prompt", repeat, "write a poem about cats. Cats are soft."));
  EXPECT_FALSE(Strict("combination:repeat_prompt", repeat, "Cats are soft."));
}

TEST(IfEvalTest, StartEndAndQuotation) {
  const nlohmann::json end = {{"end_phrase", "Any other questions?"}};
  EXPECT_TRUE(Strict("startend:end_checker", end, "Hello. Any other questions?\n"));
  EXPECT_FALSE(Strict("startend:end_checker", end, "Any other questions? Bye."));
  EXPECT_TRUE(Strict("startend:quotation", kNone, "\"Quoted whole.\""));
  EXPECT_FALSE(Strict("startend:quotation", kNone, "\"Half quoted."));
}

TEST(IfEvalTest, CaseChecks) {
  const nlohmann::json caps = {{"capital_frequency", 2}, {"capital_relation", "at least"}};
  EXPECT_TRUE(Strict("change_case:capital_word_frequency", caps, "This is VERY IMPORTANT."));
  EXPECT_FALSE(Strict("change_case:capital_word_frequency", caps, "This is VERY important."));
  EXPECT_TRUE(Strict("change_case:english_capital", kNone, "ALL CAPS, 123!"));
  EXPECT_FALSE(Strict("change_case:english_capital", kNone, "ALL CAPS but one"));
  EXPECT_TRUE(Strict("change_case:english_lowercase", kNone, "all lower, 123."));
  EXPECT_FALSE(Strict("change_case:english_lowercase", kNone, "all lower but One."));
}

TEST(IfEvalTest, NoComma) {
  EXPECT_TRUE(Strict("punctuation:no_comma", kNone, "No commas here."));
  EXPECT_FALSE(Strict("punctuation:no_comma", kNone, "One, two."));
}

TEST(IfEvalTest, LooseForgivesAPreambleAndMarkdown) {
  // A chatty first line breaks "all lowercase" strictly, not loosely.
  const std::string preamble = "Sure! Here it is:\nall lower case text.";
  EXPECT_FALSE(Strict("change_case:english_lowercase", kNone, preamble));
  EXPECT_TRUE(Loose("change_case:english_lowercase", kNone, preamble));
  // Markdown bold around the quotation marks.
  EXPECT_FALSE(Strict("startend:quotation", kNone, "**\"quoted\"**"));
  EXPECT_TRUE(Loose("startend:quotation", kNone, "**\"quoted\"**"));
  // Loose is still a check: a comma in the body fails both.
  EXPECT_FALSE(Loose("punctuation:no_comma", kNone, "Title\nbody, with comma\nend"));
}

TEST(IfEvalTest, ConstraintListForms) {
  auto a = ParseIfEvalConstraints(nlohmann::json::parse(
      R"([{"id": "punctuation:no_comma"}, {"id": "length_constraints:number_words", "num_words": 3, "relation": "at least"}])"));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->size(), 2u);
  auto b = ParseIfEvalConstraints(nlohmann::json::parse(
      R"({"instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
          "kwargs": [{"keywords": null}, {"keywords": ["x"], "num_words": null}]})"));
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)[1].kwargs, nlohmann::json({{"keywords", {"x"}}}));
  // Errors name the entry and the field.
  auto missing = ParseIfEvalConstraints(
      nlohmann::json::parse(R"([{"id": "keywords:frequency", "keyword": "a"}])"));
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("constraints[0]"), std::string::npos)
      << missing.status();
  EXPECT_FALSE(ParseIfEvalConstraints(nlohmann::json::parse(R"([{"id": "no:such"}])")).ok());
  EXPECT_FALSE(
      ParseIfEvalConstraints(
          nlohmann::json::parse(
              R"([{"id": "keywords:frequency", "keyword": "a", "frequency": 1, "relation": "about"}])"))
          .ok());
  EXPECT_FALSE(
      ParseIfEvalConstraints(
          nlohmann::json::parse(R"([{"id": "language:response_language", "language": "en"}])"))
          .ok());
}

TEST(IfEvalRewardTest, StrictLooseAndAggregation) {
  const nlohmann::json record = {
      {"domain", "if"},
      {"constraints",
       nlohmann::json::parse(
           R"([{"id": "change_case:english_lowercase"}, {"id": "punctuation:no_comma"}])")}};
  const std::string completion = "thinking, with commas</think>Sure:\nall lower and no commas";
  auto strict_all = IfEvalReward::Create(nlohmann::json::object());
  auto loose_all = IfEvalReward::Create({{"mode", "loose"}});
  auto strict_frac = IfEvalReward::Create({{"aggregate", "fraction"}});
  ASSERT_TRUE(strict_all.ok() && loose_all.ok() && strict_frac.ok());
  auto s = (*strict_all)->Score(record, completion, {});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->score, 0.0) << s->diagnostics.dump();
  auto l = (*loose_all)->Score(record, completion, {});
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->score, 1.0) << l->diagnostics.dump();
  auto f = (*strict_frac)->Score(record, completion, {});
  ASSERT_TRUE(f.ok());
  EXPECT_DOUBLE_EQ(f->score, 0.5) << f->diagnostics.dump();
  EXPECT_FALSE(IfEvalReward::Create({{"mode", "lenient"}}).ok());
  EXPECT_EQ((*strict_all)->Score({{"domain", "if"}}, "x", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retort::rewards
