// DeepSeek-V4 chat rendering and completion parsing (chat_template.h),
// following encoding_dsv4.py: merge_tool_messages, sort_tool_results_by_call_order,
// _drop_thinking_messages, render_message and parse_message_from_completion_text.
#include "model/tokenizer/chat_template.h"

#include <algorithm>
#include <optional>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace retort::tokenizer {
namespace {

using ojson = nlohmann::ordered_json;

constexpr absl::string_view kBos = "<｜begin▁of▁sentence｜>";
constexpr absl::string_view kEos = "<｜end▁of▁sentence｜>";
constexpr absl::string_view kThinkStart = "<think>";
constexpr absl::string_view kThinkEnd = "</think>";
constexpr absl::string_view kDsml = "｜DSML｜";
constexpr absl::string_view kUserToken = "<｜User｜>";
constexpr absl::string_view kAssistantToken = "<｜Assistant｜>";

// encoding_dsv4.py REASONING_EFFORT_MAX, verbatim.
constexpr absl::string_view kReasoningEffortMax =
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

std::string ToolsBlock(const std::string& schemas) {
  const std::string d(kDsml);
  return absl::StrCat(
      "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can "
      "invoke tools by "
      "writing a \"<",
      d, "tool_calls>\" block like the following:\n\n<", d, "tool_calls>\n<", d,
      "invoke name=\"$TOOL_NAME\">\n<", d,
      "parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</", d,
      "parameter>\n...\n</", d, "invoke>\n<", d, "invoke name=\"$TOOL_NAME2\">\n...\n</", d,
      "invoke>\n</", d,
      "tool_calls>\n\nString parameters should be specified as is and set `string=\"true\"`. For "
      "all other types "
      "(numbers, booleans, arrays, objects), pass the value in JSON format and set "
      "`string=\"false\"`.\n\nIf "
      "thinking_mode is enabled (triggered by ",
      kThinkStart, "), you MUST output your complete reasoning inside ", kThinkStart, "...",
      kThinkEnd, " BEFORE any tool calls or final response.\n\nOtherwise, output directly after ",
      kThinkEnd, " with tool calls or final response.\n\n### Available Tool Schemas\n\n", schemas,
      "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
      "tool calls.\n");
}

// Python json.dumps(s, ensure_ascii=False) for a string.
void PyQuote(absl::string_view s, std::string* out) {
  out->push_back('"');
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        *out += "\\\"";
        break;
      case '\\':
        *out += "\\\\";
        break;
      case '\n':
        *out += "\\n";
        break;
      case '\r':
        *out += "\\r";
        break;
      case '\t':
        *out += "\\t";
        break;
      case '\b':
        *out += "\\b";
        break;
      case '\f':
        *out += "\\f";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          *out += buf;
        } else {
          out->push_back(ch);
        }
    }
  }
  out->push_back('"');
}

// Python json.dumps(v, ensure_ascii=False): ", " and ": " separators, keys in
// insertion order.
void PyDump(const ojson& v, std::string* out) {
  switch (v.type()) {
    case ojson::value_t::object: {
      out->push_back('{');
      bool first = true;
      for (auto it = v.begin(); it != v.end(); ++it) {
        if (!first) *out += ", ";
        first = false;
        PyQuote(it.key(), out);
        *out += ": ";
        PyDump(it.value(), out);
      }
      out->push_back('}');
      return;
    }
    case ojson::value_t::array: {
      out->push_back('[');
      for (size_t i = 0; i < v.size(); ++i) {
        if (i > 0) *out += ", ";
        PyDump(v[i], out);
      }
      out->push_back(']');
      return;
    }
    case ojson::value_t::string:
      PyQuote(v.get_ref<const std::string&>(), out);
      return;
    case ojson::value_t::boolean:
      *out += v.get<bool>() ? "true" : "false";
      return;
    case ojson::value_t::null:
      *out += "null";
      return;
    default:
      *out += v.dump();  // numbers: shortest round-trip, like Python's repr
      return;
  }
}

std::string PyDumps(const ojson& v) {
  std::string out;
  PyDump(v, &out);
  return out;
}

absl::StatusOr<ojson> ParseJson(absl::string_view text, absl::string_view what) {
  try {
    return ojson::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not valid JSON: ", e.what()));
  }
}

// encode_arguments_to_dsml.
absl::StatusOr<std::string> ArgumentsToDsml(const ToolCall& call) {
  ojson args;
  try {
    args = ojson::parse(call.arguments);
  } catch (const nlohmann::json::exception&) {
    args = ojson::object({{"arguments", call.arguments}});  // the reference's fallback
  }
  if (!args.is_object())
    return absl::InvalidArgumentError(absl::StrCat(
        "tool call '", call.name, "': arguments must be a JSON object, got ", call.arguments));
  std::vector<std::string> params;
  for (auto it = args.begin(); it != args.end(); ++it) {
    const bool is_str = it.value().is_string();
    params.push_back(absl::StrCat(
        "<", kDsml, "parameter name=\"", it.key(), "\" string=\"", is_str ? "true" : "false", "\">",
        is_str ? it.value().get<std::string>() : PyDumps(it.value()), "</", kDsml, "parameter>"));
  }
  return absl::StrJoin(params, "\n");
}

// A message after merge_tool_messages.
struct Turn {
  Role role;  // kSystem, kUser or kAssistant
  std::string content;
  struct Block {
    bool tool_result;
    std::string text;
    std::string tool_use_id;
  };
  std::vector<Block> blocks;  // user
  std::optional<std::string> reasoning;
  std::vector<ToolCall> tool_calls;
  bool tools = false;  // system turn carrying the tool schemas
};

}  // namespace

absl::StatusOr<ReasoningMode> ParseReasoningMode(absl::string_view name) {
  if (name == "none") return ReasoningMode::kNone;
  if (name == "high") return ReasoningMode::kHigh;
  if (name == "max") return ReasoningMode::kMax;
  return absl::InvalidArgumentError(
      absl::StrCat("reasoning mode must be none, high or max, got '", name, "'"));
}

const char* ReasoningModeName(ReasoningMode mode) {
  switch (mode) {
    case ReasoningMode::kNone:
      return "none";
    case ReasoningMode::kHigh:
      return "high";
    case ReasoningMode::kMax:
      return "max";
  }
  return "?";
}

const char* CompletionStatusName(CompletionStatus status) {
  switch (status) {
    case CompletionStatus::kComplete:
      return "complete";
    case CompletionStatus::kTruncated:
      return "truncated";
    case CompletionStatus::kMalformed:
      return "malformed";
  }
  return "?";
}

absl::StatusOr<std::string> RenderChat(const std::vector<Message>& messages,
                                       const ChatOptions& options) {
  // Tool schemas.
  std::string schemas;
  if (!options.tools_json.empty()) {
    ASSIGN_OR_RETURN(ojson tools, ParseJson(options.tools_json, "ChatOptions.tools_json"));
    if (!tools.is_array())
      return absl::InvalidArgumentError("ChatOptions.tools_json: expected a JSON array");
    std::vector<std::string> lines;
    for (const ojson& t : tools) {
      const ojson& fn = (t.is_object() && t.contains("function")) ? t["function"] : t;
      if (!fn.is_object())
        return absl::InvalidArgumentError(
            "ChatOptions.tools_json: each tool must be a JSON object");
      lines.push_back(PyDumps(fn));
    }
    if (!lines.empty()) schemas = absl::StrJoin(lines, "\n");
  }
  const bool has_tools = !schemas.empty();

  // merge_tool_messages: tool results and consecutive user messages fold into
  // one user turn.
  std::vector<Turn> turns;
  for (const Message& m : messages) {
    switch (m.role) {
      case Role::kTool:
      case Role::kUser: {
        Turn::Block block{m.role == Role::kTool, m.content, m.tool_call_id};
        if (!turns.empty() && turns.back().role == Role::kUser) {
          turns.back().blocks.push_back(std::move(block));
        } else {
          Turn t{Role::kUser, "", {std::move(block)}, std::nullopt, {}, false};
          turns.push_back(std::move(t));
        }
        break;
      }
      case Role::kSystem:
        turns.push_back(Turn{Role::kSystem, m.content, {}, std::nullopt, {}, false});
        break;
      case Role::kAssistant: {
        Turn t{Role::kAssistant, m.content, {}, m.reasoning, m.tool_calls, false};
        turns.push_back(std::move(t));
        break;
      }
    }
  }
  if (has_tools) {
    auto sys = std::find_if(turns.begin(), turns.end(),
                            [](const Turn& t) { return t.role == Role::kSystem; });
    if (sys == turns.end())
      sys = turns.insert(turns.begin(), Turn{Role::kSystem, "", {}, std::nullopt, {}, false});
    sys->tools = true;
  }

  // sort_tool_results_by_call_order (stable, unknown ids rank 0).
  absl::flat_hash_map<std::string, int> call_order;
  for (Turn& t : turns) {
    if (t.role == Role::kAssistant && !t.tool_calls.empty()) {
      call_order.clear();
      for (size_t i = 0; i < t.tool_calls.size(); ++i)
        if (!t.tool_calls[i].id.empty()) call_order[t.tool_calls[i].id] = static_cast<int>(i);
    } else if (t.role == Role::kUser && !call_order.empty()) {
      std::vector<Turn::Block> results;
      for (const auto& b : t.blocks)
        if (b.tool_result) results.push_back(b);
      if (results.size() > 1) {
        std::stable_sort(
            results.begin(), results.end(), [&](const Turn::Block& a, const Turn::Block& b) {
              auto ia = call_order.find(a.tool_use_id), ib = call_order.find(b.tool_use_id);
              return (ia == call_order.end() ? 0 : ia->second) <
                     (ib == call_order.end() ? 0 : ib->second);
            });
        size_t k = 0;
        for (auto& b : t.blocks)
          if (b.tool_result) b = results[k++];
      }
    }
  }

  const bool thinking = options.reasoning != ReasoningMode::kNone;
  const bool drop = options.drop_thinking && !has_tools;
  auto last_user_index = [&]() {
    for (int i = static_cast<int>(turns.size()) - 1; i >= 0; --i)
      if (turns[i].role == Role::kUser) return i;
    return -1;
  };
  // _drop_thinking_messages: reasoning of assistant turns before the last
  // user turn is removed.
  if (thinking && drop) {
    const int last_user = last_user_index();
    for (int i = 0; i < last_user; ++i)
      if (turns[i].role == Role::kAssistant) turns[i].reasoning.reset();
  }
  const int last_user = last_user_index();

  std::string prompt = options.add_bos ? std::string(kBos) : "";
  for (int idx = 0; idx < static_cast<int>(turns.size()); ++idx) {
    const Turn& t = turns[idx];
    if (idx == 0 && options.reasoning == ReasoningMode::kMax)
      absl::StrAppend(&prompt, kReasoningEffortMax);
    switch (t.role) {
      case Role::kSystem:
        absl::StrAppend(&prompt, t.content);
        if (t.tools) absl::StrAppend(&prompt, "\n\n", ToolsBlock(schemas));
        break;
      case Role::kUser: {
        absl::StrAppend(&prompt, kUserToken);
        std::vector<std::string> parts;
        for (const auto& b : t.blocks)
          parts.push_back(b.tool_result ? absl::StrCat("<tool_result>", b.text, "</tool_result>")
                                        : b.text);
        absl::StrAppend(&prompt, absl::StrJoin(parts, "\n\n"));
        break;
      }
      case Role::kAssistant: {
        std::string tc;
        if (!t.tool_calls.empty()) {
          std::vector<std::string> invokes;
          for (const ToolCall& call : t.tool_calls) {
            ASSIGN_OR_RETURN(std::string args, ArgumentsToDsml(call));
            invokes.push_back(absl::StrCat("<", kDsml, "invoke name=\"", call.name, "\">\n", args,
                                           "\n</", kDsml, "invoke>"));
          }
          tc = absl::StrCat("\n\n<", kDsml, "tool_calls>\n", absl::StrJoin(invokes, "\n"), "\n</",
                            kDsml, "tool_calls>");
        }
        std::string thinking_part;
        if (thinking && (!drop || idx > last_user))
          thinking_part = absl::StrCat(t.reasoning.value_or(""), kThinkEnd);
        absl::StrAppend(&prompt, thinking_part, t.content, tc, kEos);
        break;
      }
      case Role::kTool:
        return absl::InternalError("tool turn survived merging");
    }
    // Transition to the next turn.
    if (idx + 1 < static_cast<int>(turns.size()) && turns[idx + 1].role != Role::kAssistant)
      continue;
    if (t.role == Role::kUser) {
      absl::StrAppend(&prompt, kAssistantToken,
                      thinking && (!drop || idx >= last_user) ? kThinkStart : kThinkEnd);
    }
  }
  return prompt;
}

absl::StatusOr<std::vector<TokenId>> RenderChatIds(const Tokenizer& tokenizer,
                                                   const std::vector<Message>& messages,
                                                   const ChatOptions& options) {
  ASSIGN_OR_RETURN(std::string text, RenderChat(messages, options));
  EncodeOptions enc;
  enc.match_special_tokens = true;
  enc.add_special_tokens = false;  // BOS is in the text already
  return tokenizer.Encode(text, enc);
}

// ---------------------------------------------------------------------------
// Parsing.

namespace {

struct Cut {
  size_t next;  // index after the stop string (or text end)
  absl::string_view before;
  int stop;  // index into the stop list, or -1 at end of text
};

// _read_until_stop: earliest of `stops` at or after `from`.
Cut ReadUntil(absl::string_view text, size_t from, std::initializer_list<absl::string_view> stops) {
  size_t best = absl::string_view::npos;
  int which = -1, k = 0;
  for (absl::string_view s : stops) {
    size_t pos = text.find(s, from);
    if (pos != absl::string_view::npos && pos < best) {
      best = pos;
      which = k;
    }
    ++k;
  }
  if (which < 0) return {text.size(), text.substr(from), -1};
  return {best + stops.begin()[which].size(), text.substr(from, best - from), which};
}

bool ConsumePrefix(absl::string_view* s, absl::string_view prefix) {
  if (s->substr(0, prefix.size()) != prefix) return false;
  s->remove_prefix(prefix.size());
  return true;
}

}  // namespace

ParsedCompletion ParseCompletion(absl::string_view text, ReasoningMode mode) {
  ParsedCompletion out;
  // The first problem is reported, except that malformed beats truncated.
  auto fail = [&](CompletionStatus status, std::string why) {
    if (out.status == CompletionStatus::kMalformed) return;
    if (status == CompletionStatus::kMalformed || out.status == CompletionStatus::kComplete) {
      out.status = status;
      out.error = std::move(why);
    }
  };
  const std::string tc_start = absl::StrCat("\n\n<", kDsml, "tool_calls");
  const std::string invoke_open = absl::StrCat("<", kDsml, "invoke");
  const std::string invoke_close = absl::StrCat("</", kDsml, "invoke");
  const std::string param_open = absl::StrCat("<", kDsml, "parameter");
  const std::string param_close = absl::StrCat("/", kDsml, "parameter");
  const std::string calls_close = absl::StrCat("</", kDsml, "tool_calls>");

  size_t idx = 0;
  bool tool_calling = false;
  if (mode != ReasoningMode::kNone) {
    Cut c = ReadUntil(text, idx, {kThinkEnd, tc_start});
    out.reasoning = std::string(c.before);
    if (c.stop < 0) {
      fail(CompletionStatus::kTruncated, "ended inside the reasoning (no </think>)");
      return out;
    }
    idx = c.next;
    if (c.stop == 1) {
      fail(CompletionStatus::kMalformed, "tool calls started before </think>");
      tool_calling = true;
    }
  }
  if (!tool_calling) {
    Cut c = ReadUntil(text, idx, {kEos, tc_start});
    out.content = std::string(c.before);
    idx = c.next;
    if (c.stop == 1) {
      tool_calling = true;
    } else if (c.stop < 0) {
      fail(CompletionStatus::kTruncated, "no end-of-sentence token");
    }
  }

  if (tool_calling) {
    // parse_tool_calls.
    bool closed = false;
    while (idx < text.size()) {
      Cut c = ReadUntil(text, idx, {invoke_open, calls_close});
      if (c.stop < 0) {
        fail(CompletionStatus::kTruncated, "ended inside the tool calls block");
        idx = text.size();
        break;
      }
      if (c.before != ">\n") {
        fail(CompletionStatus::kMalformed,
             absl::StrCat("tool calls: expected '>\\n', got '", c.before, "'"));
        idx = text.size();
        break;
      }
      idx = c.next;
      if (c.stop == 1) {
        closed = true;
        break;
      }
      Cut name_cut = ReadUntil(text, idx, {param_open, invoke_close});
      if (name_cut.stop < 0) {
        fail(CompletionStatus::kTruncated, "ended inside a tool invoke");
        idx = text.size();
        break;
      }
      absl::string_view nm = name_cut.before;
      // A call without parameters renders as name="f">\n\n</invoke> (its
      // empty argument list leaves a blank line); accept that form too.
      if (name_cut.stop == 1 && nm.size() >= 4 && nm.substr(nm.size() - 4) == "\">\n\n")
        nm.remove_suffix(1);
      while (!nm.empty() && (nm[0] == ' ' || nm[0] == '\n' || nm[0] == '\t' || nm[0] == '\r'))
        nm.remove_prefix(1);
      if (!ConsumePrefix(&nm, "name=\"") || nm.size() < 3 || nm.substr(nm.size() - 3) != "\">\n") {
        fail(CompletionStatus::kMalformed,
             absl::StrCat("tool name format error: '", name_cut.before, "'"));
        idx = text.size();
        break;
      }
      ToolCall call;
      call.name = std::string(nm.substr(0, nm.size() - 3));
      idx = name_cut.next;
      int stop = name_cut.stop;
      std::vector<std::string> arg_parts;
      absl::flat_hash_set<std::string> seen;
      bool ok = true;
      while (stop == 0) {  // a parameter
        Cut pc = ReadUntil(text, idx, {param_close});
        if (pc.stop < 0) {
          fail(CompletionStatus::kTruncated, "ended inside a tool parameter");
          ok = false;
          break;
        }
        absl::string_view p = pc.before;
        bool fmt = ConsumePrefix(&p, " name=\"") && !p.empty() && p.back() == '<';
        size_t t_pos = absl::string_view::npos, f_pos = absl::string_view::npos;
        if (fmt) {
          p.remove_suffix(1);
          t_pos = p.find("\" string=\"true\">");
          f_pos = p.find("\" string=\"false\">");
          fmt = t_pos != absl::string_view::npos || f_pos != absl::string_view::npos;
        }
        if (!fmt) {
          fail(CompletionStatus::kMalformed,
               absl::StrCat("parameter format error: '", pc.before, "'"));
          ok = false;
          break;
        }
        const bool is_true = t_pos < f_pos;
        const size_t pos = is_true ? t_pos : f_pos;
        const std::string key(p.substr(0, pos));
        const absl::string_view value = p.substr(pos + (is_true ? 16 : 17));
        if (!seen.insert(key).second) {
          fail(CompletionStatus::kMalformed, absl::StrCat("duplicate parameter name '", key, "'"));
          ok = false;
          break;
        }
        std::string part;
        PyQuote(key, &part);
        part += ": ";
        if (is_true) {
          PyQuote(value, &part);
        } else {
          absl::StrAppend(&part, value);
        }
        arg_parts.push_back(std::move(part));
        idx = pc.next;
        Cut after = ReadUntil(text, idx, {param_open, invoke_close});
        if (after.stop < 0) {
          fail(CompletionStatus::kTruncated, "ended inside a tool invoke");
          ok = false;
          break;
        }
        if (after.before != ">\n") {
          fail(CompletionStatus::kMalformed,
               absl::StrCat("parameter format error: expected '>\\n', got '", after.before, "'"));
          ok = false;
          break;
        }
        idx = after.next;
        stop = after.stop;
      }
      if (!ok) {
        idx = text.size();
        break;
      }
      call.arguments = absl::StrCat("{", absl::StrJoin(arg_parts, ", "), "}");
      out.tool_calls.push_back(std::move(call));
    }
    if (closed) {
      Cut c = ReadUntil(text, idx, {kEos});
      if (!c.before.empty()) {
        fail(CompletionStatus::kMalformed,
             absl::StrCat("unexpected text after tool calls: '", c.before, "'"));
      } else if (c.stop < 0) {
        fail(CompletionStatus::kTruncated, "no end-of-sentence token after the tool calls");
      }
      idx = c.next;
    } else if (out.status == CompletionStatus::kComplete) {
      fail(CompletionStatus::kTruncated, "ended inside the tool calls block");
    }
  }
  if (idx < text.size() && out.status != CompletionStatus::kMalformed)
    fail(CompletionStatus::kMalformed,
         absl::StrCat("text after the end-of-sentence token: '", text.substr(idx), "'"));
  for (absl::string_view sp : {kBos, kEos, kThinkStart, kThinkEnd, kDsml}) {
    if (absl::string_view(out.content).find(sp) != absl::string_view::npos ||
        absl::string_view(out.reasoning).find(sp) != absl::string_view::npos)
      fail(CompletionStatus::kMalformed,
           absl::StrCat("special token '", sp, "' inside reasoning or content"));
  }
  return out;
}

}  // namespace retort::tokenizer
