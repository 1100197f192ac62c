// The DeepSeek-V4 chat format (V4_SPEC.md §7), as DeepSeek's
// encoding/encoding_dsv4.py renders and parses it (no Jinja):
//
//   BOS [effort text] [system text ["\n\n## Tools..." block]]
//   "<｜User｜>" user "<｜Assistant｜>" ("<think>" | "</think>")
//   [reasoning "</think>"] content ["\n\n<｜DSML｜tool_calls>...</｜DSML｜tool_calls>"] EOS ...
//
// - ReasoningMode::kNone is the library's chat mode (the assistant turn opens
//   with "</think>"); kHigh is thinking mode (opens with "<think>"); kMax is
//   thinking mode with the fixed reasoning-effort instruction prepended to
//   the first message.
// - In thinking mode without tools, assistant turns before the last user turn
//   lose their reasoning and are rendered "<｜Assistant｜></think>content EOS".
//   With tools every turn keeps its reasoning.
// - There is no tool role in the format: tool results (and consecutive user
//   messages) merge into one user turn as "<tool_result>…</tool_result>"
//   blocks joined by "\n\n", ordered like the calls of the preceding
//   assistant turn.
// - Tool schemas (ChatOptions::tools_json) are rendered after the system
//   text; with no system message an empty one is put first to carry them.
//
// Thread-safety: free functions on values; safe to call concurrently.
#ifndef RETORT_MODEL_TOKENIZER_CHAT_TEMPLATE_H_
#define RETORT_MODEL_TOKENIZER_CHAT_TEMPLATE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "model/tokenizer/tokenizer.h"

namespace retort::tokenizer {

enum class ReasoningMode { kNone, kHigh, kMax };
// "none" | "high" | "max" <-> enum; InvalidArgument for anything else.
[[nodiscard]] absl::StatusOr<ReasoningMode> ParseReasoningMode(absl::string_view name);
const char* ReasoningModeName(ReasoningMode mode);

enum class Role { kSystem, kUser, kAssistant, kTool };

struct ToolCall {
  std::string id;  // optional; orders tool results (Message::tool_call_id)
  std::string name;
  std::string arguments;  // a JSON object as text, e.g. {"city": "Paris"}
};

struct Message {
  Role role = Role::kUser;
  std::string content;
  std::string reasoning;             // assistant: text inside <think>…</think>
  std::vector<ToolCall> tool_calls;  // assistant
  std::string tool_call_id;          // tool: the call this result answers
};

struct ChatOptions {
  ReasoningMode reasoning = ReasoningMode::kNone;  // Default: non-think.
  // Tool schemas: "" (no tools) or a JSON array whose items are either
  // OpenAI-style {"type": "function", "function": {...}} or the function
  // objects themselves. Default: "".
  std::string tools_json;
  bool add_bos = true;        // Default: true (start of a conversation).
  bool drop_thinking = true;  // Default: true (the format's default).
};

// Renders `messages` to prompt text. If the last message is a user or tool
// turn the text ends with the generation prompt ("<｜Assistant｜>" plus
// "<think>"/"</think>"); if it is an assistant turn, that turn is rendered
// complete (with EOS), as for a training sample. InvalidArgument for bad
// tools_json or tool-call arguments that are JSON but not an object.
[[nodiscard]] absl::StatusOr<std::string> RenderChat(const std::vector<Message>& messages,
                                                     const ChatOptions& options);

// RenderChat, then Encode with special tokens matched (as the reference
// encodes the rendered string). Note that special-token strings inside
// message text are matched too, exactly like the reference.
[[nodiscard]] absl::StatusOr<std::vector<TokenId>> RenderChatIds(
    const Tokenizer& tokenizer, const std::vector<Message>& messages, const ChatOptions& options);

enum class CompletionStatus {
  kComplete,   // well formed and ended with EOS
  kTruncated,  // well formed so far but ended early (no EOS, open <think>, cut tool call)
  kMalformed,  // violates the format; fields hold the best-effort split
};
const char* CompletionStatusName(CompletionStatus status);

struct ParsedCompletion {
  CompletionStatus status = CompletionStatus::kComplete;
  std::string error;  // why, when status != kComplete
  std::string reasoning;
  std::string content;
  std::vector<ToolCall> tool_calls;  // arguments as JSON object text; ids empty
};

// Splits generated text (everything after the prompt, decoded with special
// tokens kept, so EOS appears as its string) into reasoning, content and tool
// calls. `mode` must be the mode the prompt was rendered with (kHigh/kMax
// expect reasoning first, closed by "</think>"). Never fails: problems are
// reported through `status` and `error`.
ParsedCompletion ParseCompletion(absl::string_view text, ReasoningMode mode);

}  // namespace retort::tokenizer

#endif  // RETORT_MODEL_TOKENIZER_CHAT_TEMPLATE_H_
