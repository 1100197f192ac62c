// DeepSeek-V4 chat template and completion parser tests. Expected prompts are
// written out by hand from encoding_dsv4.py's templates.
#include "model/tokenizer/chat_template.h"

#include <cstdlib>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace retort::tokenizer {
namespace {

const std::string kBos = "<｜begin▁of▁sentence｜>";
const std::string kEos = "<｜end▁of▁sentence｜>";
const std::string kUser = "<｜User｜>";
const std::string kAsst = "<｜Assistant｜>";
const std::string kMaxEffort =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
    "adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n";

Message Sys(std::string c) { return {Role::kSystem, std::move(c), "", {}, ""}; }
Message User(std::string c) { return {Role::kUser, std::move(c), "", {}, ""}; }
Message Asst(std::string c, std::string r = "", std::vector<ToolCall> calls = {}) {
  return {Role::kAssistant, std::move(c), std::move(r), std::move(calls), ""};
}
Message Tool(std::string c, std::string id = "") {
  return {Role::kTool, std::move(c), "", {}, std::move(id)};
}

std::string Render(const std::vector<Message>& m, ReasoningMode mode,
                   const std::string& tools = "") {
  ChatOptions o;
  o.reasoning = mode;
  o.tools_json = tools;
  auto s = RenderChat(m, o);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : "";
}

TEST(ChatTemplate, ReasoningModes) {
  const std::vector<Message> m = {Sys("Be brief."), User("Hi")};
  EXPECT_EQ(Render(m, ReasoningMode::kNone),
            kBos + "Be brief." + kUser + "Hi" + kAsst + "</think>");
  EXPECT_EQ(Render(m, ReasoningMode::kHigh), kBos + "Be brief." + kUser + "Hi" + kAsst + "<think>");
  EXPECT_EQ(Render(m, ReasoningMode::kMax),
            kBos + kMaxEffort + "Be brief." + kUser + "Hi" + kAsst + "<think>");
  // Without a system message the effort text leads the first user turn.
  EXPECT_EQ(Render({User("Hi")}, ReasoningMode::kMax),
            kBos + kMaxEffort + kUser + "Hi" + kAsst + "<think>");
  ChatOptions no_bos;
  no_bos.add_bos = false;
  EXPECT_EQ(*RenderChat({User("x")}, no_bos), kUser + "x" + kAsst + "</think>");
}

TEST(ChatTemplate, ParseReasoningModeNames) {
  EXPECT_EQ(*ParseReasoningMode("none"), ReasoningMode::kNone);
  EXPECT_EQ(*ParseReasoningMode("high"), ReasoningMode::kHigh);
  EXPECT_EQ(*ParseReasoningMode("max"), ReasoningMode::kMax);
  EXPECT_FALSE(ParseReasoningMode("low").ok());
  for (ReasoningMode m : {ReasoningMode::kNone, ReasoningMode::kHigh, ReasoningMode::kMax})
    EXPECT_EQ(*ParseReasoningMode(ReasoningModeName(m)), m);
}

TEST(ChatTemplate, MultiTurnWithoutToolsDropsEarlierReasoning) {
  const std::vector<Message> m = {User("Q1"), Asst("A1", "R1"), User("Q2")};
  EXPECT_EQ(Render(m, ReasoningMode::kHigh), kBos + kUser + "Q1" + kAsst + "</think>" + "A1" +
                                                 kEos + kUser + "Q2" + kAsst + "<think>");
  EXPECT_EQ(Render(m, ReasoningMode::kNone), kBos + kUser + "Q1" + kAsst + "</think>" + "A1" +
                                                 kEos + kUser + "Q2" + kAsst + "</think>");
  // A final assistant turn (a training sample) keeps its reasoning.
  const std::vector<Message> sample = {User("Q1"), Asst("A1", "R1"), User("Q2"), Asst("A2", "R2")};
  EXPECT_EQ(Render(sample, ReasoningMode::kHigh), kBos + kUser + "Q1" + kAsst + "</think>" + "A1" +
                                                      kEos + kUser + "Q2" + kAsst + "<think>" +
                                                      "R2</think>A2" + kEos);
}

TEST(ChatTemplate, MultiTurnWithToolsKeepsReasoningAndMergesResults) {
  const std::string tools =
      R"([{"type": "function", "function": {"name": "get_weather", "description": "Weather now",)"
      R"( "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])";
  const std::vector<Message> m = {
      Sys("S"),
      User("Weather in Paris and Rome?"),
      Asst("", "need tools",
           {{"c1", "get_weather", R"({"city": "Paris"})"},
            {"c2", "get_weather", R"({"city": "Rome", "days": 2})"}}),
      Tool("rain", "c2"),  // out of call order: sorted back to c1, c2
      Tool("sun", "c1"),
  };
  const std::string got = Render(m, ReasoningMode::kHigh, tools);
  const std::string schema =
      R"({"name": "get_weather", "description": "Weather now", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}})";
  const std::string expected_tools_tail =
      "### Available Tool Schemas\n\n" + schema +
      "\n\nYou MUST strictly follow the above defined tool name and parameter "
      "schemas to invoke tool calls.\n";
  const std::string calls =
      "\n\n<｜DSML｜tool_calls>\n"
      "<｜DSML｜invoke name=\"get_weather\">\n"
      "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n"
      "<｜DSML｜invoke name=\"get_weather\">\n"
      "<｜DSML｜parameter name=\"city\" string=\"true\">Rome</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n"
      "</｜DSML｜tool_calls>";
  const std::string tail = kUser + "Weather in Paris and Rome?" + kAsst + "<think>" +
                           "need tools</think>" + calls + kEos + kUser +
                           "<tool_result>sun</tool_result>\n\n<tool_result>rain</tool_result>" +
                           kAsst + "<think>";
  ASSERT_EQ(got.rfind(kBos + "S\n\n## Tools\n\nYou have access to a set of tools", 0), 0u) << got;
  const size_t tools_end = got.find(expected_tools_tail);
  ASSERT_NE(tools_end, std::string::npos) << got;
  EXPECT_EQ(got.substr(tools_end + expected_tools_tail.size()), tail);

  // With tools, earlier reasoning is kept even after a later user turn.
  std::vector<Message> more = m;
  more.push_back(Asst("Sun in Paris, rain in Rome.", "summarise"));
  more.push_back(User("Thanks"));
  const std::string got2 = Render(more, ReasoningMode::kHigh, tools);
  EXPECT_NE(got2.find(kAsst + "<think>need tools</think>"), std::string::npos);
  EXPECT_NE(got2.find("<think>summarise</think>Sun in Paris, rain in Rome." + kEos + kUser +
                      "Thanks" + kAsst + "<think>"),
            std::string::npos)
      << got2;
  // Tools without a system message: an empty system turn carries them.
  const std::string got3 = Render({User("hi")}, ReasoningMode::kNone, tools);
  EXPECT_EQ(got3.rfind(kBos + "\n\n## Tools", 0), 0u);
}

TEST(ChatTemplate, ToolResultsMergeIntoUserTurnWithoutTools) {
  // Even without schemas, tool messages become <tool_result> blocks of one
  // user turn, followed by any user text.
  const std::vector<Message> m = {User("Q"), Asst("", "", {{"", "f", "{}"}}), Tool("r1"),
                                  User("and?")};
  EXPECT_EQ(Render(m, ReasoningMode::kNone),
            kBos + kUser + "Q" + kAsst + "</think>" +
                "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\n" +
                "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + kEos + kUser +
                "<tool_result>r1</tool_result>\n\nand?" + kAsst + "</think>");
}

TEST(ChatTemplate, BadToolsAreErrors) {
  ChatOptions o;
  o.tools_json = "{not json";
  EXPECT_FALSE(RenderChat({User("x")}, o).ok());
  o.tools_json = R"({"name": "f"})";
  EXPECT_FALSE(RenderChat({User("x")}, o).ok());
  EXPECT_FALSE(RenderChat({User("x"), Asst("", "", {{"", "f", "[1, 2]"}})}, {}).ok());
  // Non-JSON arguments fall back to one "arguments" string, like the reference.
  auto s = RenderChat({User("x"), Asst("", "", {{"", "f", "ls -l"}})}, {});
  ASSERT_TRUE(s.ok());
  EXPECT_NE(
      s->find("<｜DSML｜parameter name=\"arguments\" string=\"true\">ls -l</｜DSML｜parameter>"),
      std::string::npos);
}

TEST(ChatTemplate, IdsUseSpecialTokens) {
  const char* root = std::getenv("RETORT_SOURCE_DIR");
  auto tok = Tokenizer::LoadDir(std::string(root ? root : ".") + "/tests/fixtures/tokenizer");
  ASSERT_TRUE(tok.ok()) << tok.status();
  ChatOptions o;
  o.reasoning = ReasoningMode::kHigh;
  auto ids = RenderChatIds(**tok, {User("Hi")}, o);
  ASSERT_TRUE(ids.ok());
  ASSERT_GE(ids->size(), 4u);
  EXPECT_EQ((*ids)[0], 0);  // BOS
  EXPECT_EQ((*ids)[1], *(*tok)->TokenToId(kUser));
  EXPECT_EQ((*ids)[ids->size() - 2], *(*tok)->TokenToId(kAsst));
  EXPECT_EQ(ids->back(), *(*tok)->TokenToId("<think>"));
}

// ---------------------------------------------------------------------------
// Completion parser.

TEST(CompletionParser, WellFormed) {
  auto p = ParseCompletion("Let me think.</think>The answer is 4." + kEos, ReasoningMode::kHigh);
  EXPECT_EQ(p.status, CompletionStatus::kComplete) << p.error;
  EXPECT_EQ(p.reasoning, "Let me think.");
  EXPECT_EQ(p.content, "The answer is 4.");
  EXPECT_TRUE(p.tool_calls.empty());

  auto chat = ParseCompletion("Hello!" + kEos, ReasoningMode::kNone);
  EXPECT_EQ(chat.status, CompletionStatus::kComplete);
  EXPECT_EQ(chat.reasoning, "");
  EXPECT_EQ(chat.content, "Hello!");
}

TEST(CompletionParser, ToolCallsRoundTripThroughTheTemplate) {
  // Render an assistant turn with calls, cut it after the generation prompt,
  // parse it back.
  const std::vector<Message> m = {
      User("q"),
      Asst("Checking.", "plan",
           {{"", "search", R"({"query": "a \"quoted\"\nline", "limit": 3, "exact": true})"},
            {"", "noop", "{}"}})};
  ChatOptions o;
  o.reasoning = ReasoningMode::kMax;
  auto text = RenderChat(m, o);
  ASSERT_TRUE(text.ok());
  const std::string prefix = kAsst + "<think>";
  const std::string completion = text->substr(text->find(prefix) + prefix.size());
  auto p = ParseCompletion(completion, ReasoningMode::kMax);
  EXPECT_EQ(p.status, CompletionStatus::kComplete) << p.error;
  EXPECT_EQ(p.reasoning, "plan");
  EXPECT_EQ(p.content, "Checking.");
  ASSERT_EQ(p.tool_calls.size(), 2u);
  EXPECT_EQ(p.tool_calls[0].name, "search");
  EXPECT_EQ(p.tool_calls[0].arguments,
            R"({"query": "a \"quoted\"\nline", "limit": 3, "exact": true})");
  EXPECT_EQ(p.tool_calls[1].name, "noop");
  EXPECT_EQ(p.tool_calls[1].arguments, "{}");
}

TEST(CompletionParser, Truncated) {
  // Ran out of tokens inside the reasoning.
  auto a = ParseCompletion("I am still thinking", ReasoningMode::kHigh);
  EXPECT_EQ(a.status, CompletionStatus::kTruncated);
  EXPECT_EQ(a.reasoning, "I am still thinking");
  EXPECT_EQ(a.content, "");
  // Inside the answer (no EOS).
  auto b = ParseCompletion("r</think>partial ans", ReasoningMode::kHigh);
  EXPECT_EQ(b.status, CompletionStatus::kTruncated);
  EXPECT_EQ(b.reasoning, "r");
  EXPECT_EQ(b.content, "partial ans");
  // Inside a tool call: the finished call is kept.
  const std::string cut =
      "ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
      "<｜DSML｜parameter name=\"x\" string=\"false\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
      "<｜DSML｜invoke name=\"g\">\n<｜DSML｜parameter name=\"y\" string=\"true\">abc";
  auto c = ParseCompletion(cut, ReasoningMode::kNone);
  EXPECT_EQ(c.status, CompletionStatus::kTruncated) << c.error;
  EXPECT_EQ(c.content, "ok");
  ASSERT_EQ(c.tool_calls.size(), 1u);
  EXPECT_EQ(c.tool_calls[0].arguments, R"({"x": 1})");
  // Every prefix of a well-formed completion parses without crashing and is
  // either complete (the whole text) or truncated/malformed.
  const std::string full = "rr</think>cc" + std::string(cut.substr(2)) +
                           "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + kEos;
  auto whole = ParseCompletion(full, ReasoningMode::kHigh);
  EXPECT_EQ(whole.status, CompletionStatus::kComplete) << whole.error;
  EXPECT_EQ(whole.tool_calls.size(), 2u);
  for (size_t n = 0; n < full.size(); ++n) {
    auto p = ParseCompletion(full.substr(0, n), ReasoningMode::kHigh);
    EXPECT_NE(p.status, CompletionStatus::kComplete) << "prefix " << n;
  }
}

TEST(CompletionParser, Malformed) {
  // Special token inside the content.
  auto a = ParseCompletion("r</think>a<think>b" + kEos, ReasoningMode::kHigh);
  EXPECT_EQ(a.status, CompletionStatus::kMalformed);
  // Text after EOS.
  auto b = ParseCompletion("answer" + kEos + "more", ReasoningMode::kNone);
  EXPECT_EQ(b.status, CompletionStatus::kMalformed);
  EXPECT_EQ(b.content, "answer");
  // Bad parameter syntax.
  auto c = ParseCompletion(
      "x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter "
      "nam=\"q\">1</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" +
          kEos,
      ReasoningMode::kNone);
  EXPECT_EQ(c.status, CompletionStatus::kMalformed);
  EXPECT_NE(c.error.find("parameter"), std::string::npos) << c.error;
  // Duplicate parameter.
  auto d = ParseCompletion(
      "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
      "<｜DSML｜parameter name=\"q\" string=\"true\">1</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"q\" string=\"true\">2</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" +
          kEos,
      ReasoningMode::kNone);
  EXPECT_EQ(d.status, CompletionStatus::kMalformed);
  // Tool calls before </think> in thinking mode.
  auto e = ParseCompletion("r\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>" + kEos,
                           ReasoningMode::kHigh);
  EXPECT_EQ(e.status, CompletionStatus::kMalformed);
  EXPECT_EQ(e.reasoning, "r");
  // Text between the tool calls and EOS.
  auto f = ParseCompletion("\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>junk" + kEos,
                           ReasoningMode::kNone);
  EXPECT_EQ(f.status, CompletionStatus::kMalformed);
  // Garbage of every kind never crashes.
  for (const std::string& junk :
       {std::string(""), std::string("</think></think>"), kEos + kEos,
        std::string("\n\n<｜DSML｜tool_calls"), std::string("<｜DSML｜invoke name=")}) {
    for (ReasoningMode m : {ReasoningMode::kNone, ReasoningMode::kHigh}) {
      auto p = ParseCompletion(junk, m);
      EXPECT_FALSE(std::string(CompletionStatusName(p.status)).empty());
    }
  }
}

}  // namespace
}  // namespace retort::tokenizer
