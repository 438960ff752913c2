"""From API messages to prompt ids: template messages, tool choice, reuse checkpoints, thinking state.

Shared by the OpenAI and Anthropic endpoints and by `flashmoe-pack chat`; no web imports here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class PromptError(ValueError):
    """A request whose messages or tools cannot become a prompt (the server answers 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Prompt:
    ids: list[int]
    text: str
    checkpoints: list[int] = field(default_factory=list)  # positions worth a state snapshot
    reasoning: bool = False  # the generation starts inside <think>
    tools: list[dict] | None = None  # the tools the template was given (after tool_choice)
    parse_tools: bool = True  # False with tool_choice "none": tool-call markup stays content


def _text(content, where: str) -> str | None:
    """OpenAI content (a string or a list of parts) -> str; only text parts are supported."""
    if content is None or isinstance(content, str):
        return content
    out = []
    for p in content:
        if p.get("type") not in ("text", "input_text", "output_text"):
            raise PromptError(f"only text content is supported, got a {p.get('type')!r} part", where)
        out.append(p.get("text") or "")
    return "".join(out)


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages -> the dicts chat templates expect (developer -> system, text parts joined,
    tool-call arguments parsed from their JSON string into a mapping)."""
    out = []
    for i, m in enumerate(messages):
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("role") == "developer":
            m["role"] = "system"
        if "content" in m:
            m["content"] = _text(m["content"], f"messages[{i}].content")
        calls = []
        for j, tc in enumerate(m.get("tool_calls") or []):
            f = dict(tc.get("function") or {})
            args = f.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    raise PromptError(
                        "tool call arguments are not valid JSON",
                        f"messages[{i}].tool_calls[{j}].function.arguments",
                    ) from None
            if not isinstance(args, dict):
                raise PromptError(
                    "tool call arguments must be a JSON object",
                    f"messages[{i}].tool_calls[{j}].function.arguments",
                )
            calls.append({**tc, "type": "function", "function": {**f, "arguments": args}})
        if calls:
            m["tool_calls"] = calls
        out.append(m)
    return out


def choose_tools(tools: list[dict] | None, tool_choice) -> tuple[list[dict] | None, bool]:
    """Apply tool_choice: (tools for the template, whether to parse tool calls from the output).

    "none": no tools in the prompt and no parsing; "auto"/"required"/None: all tools (required is
    not enforced); {"type": "function", "function": {"name": N}}: only tool N in the prompt.
    """
    if not tools:
        return None, True
    if tool_choice == "none":
        return None, False
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        picked = [t for t in tools if t.get("function", {}).get("name") == name]
        if not picked:
            raise PromptError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return picked, True
    return tools, True


def _render(tok, messages, tools, gen: bool, kw: dict) -> str:
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, **kw)


def _prefix_len(tok, full: list[int], messages, tools, kw) -> int | None:
    """Token count of the rendering of `messages` without a generation prompt, if it prefixes `full`."""
    try:
        ids = tok.encode(_render(tok, messages, tools, False, kw))
    except Exception:  # some templates refuse partial conversations (e.g. no user message yet)
        return None
    return len(ids) if ids and full[: len(ids)] == ids else None


def build_chat_prompt(
    tokenizer,
    messages: list[dict],
    tools: list[dict] | None = None,
    tool_choice=None,
    template_kwargs: dict | None = None,
) -> Prompt:
    """Render and tokenize a chat request, with checkpoints at the end of the leading system turn and of
    the last message: the next turn of the same conversation starts with both."""
    msgs = template_messages(messages)
    tools_in, parse = choose_tools(tools, tool_choice)
    kw = dict(template_kwargs or {})
    try:
        text = _render(tokenizer, msgs, tools_in, True, kw)
    except Exception as e:  # jinja TemplateError from raise_exception, or a malformed message
        raise PromptError(f"the chat template rejected the messages: {e}", "messages") from None
    ids = tokenizer.encode(text)
    checkpoints = []
    system = [m for m in msgs[:1] if m.get("role") == "system"]
    if system or tools_in:
        checkpoints.append(_prefix_len(tokenizer, ids, system, tools_in, kw))
    checkpoints.append(_prefix_len(tokenizer, ids, msgs, tools_in, kw))
    tail = text.rstrip()
    return Prompt(ids, text, sorted({c for c in checkpoints if c}), tail.endswith("<think>"), tools_in, parse)


def continuation_ids(
    tokenizer, messages: list[dict], new: list[dict], tools=None, template_kwargs=None
) -> list[int]:
    """Ids that append the `new` messages (and a generation prompt) to a conversation already in a
    state, as `flashmoe-pack chat` does: the template's text for the new turns only, computed as the
    rendering of (leading system + new) minus the rendering of the leading system turn alone."""
    kw = dict(template_kwargs or {})
    system = [m for m in template_messages(messages[:1]) if m.get("role") == "system"]
    base = _render(tokenizer, system, tools, False, kw) if system or tools else ""
    full = _render(tokenizer, system + template_messages(new), tools, True, kw)
    if not full.startswith(base):
        raise PromptError("the chat template does not render new turns as a suffix")
    return tokenizer.encode(full[len(base) :])
