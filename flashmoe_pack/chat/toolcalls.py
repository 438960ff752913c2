"""Split generated text into content, reasoning and tool calls, incrementally while tokens stream.

Formats (what the Qwen chat templates teach the model to write):
- reasoning: `<think>...</think>`, opened by the model or by the prompt (`reasoning=True`);
- "hermes" (Qwen3):  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`;
- "xml" (Qwen3.5, Qwen3-Coder):
  `<tool_call>\\n<function=f>\\n<parameter=k>\\nvalue\\n</parameter>\\n</function>\\n</tool_call>`;
- "auto": per call, JSON if its body starts with "{", XML if with "<function=".

Whitespace right before or after a recognized tag is layout the templates write (`</think>\\n\\n`,
`content\\n\\n<tool_call>`), not text, and is dropped; everything else comes out verbatim: a malformed or
unterminated tool call, a stray `</think>`, and a "<" that turns out not to start a tag are content.
Text that could still be the start of a tag, and trailing whitespace, are held back until decided.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_TAGS = {"content": (THINK_OPEN, CALL_OPEN), "reasoning": (THINK_CLOSE,)}
_FORMATS = ("auto", "hermes", "xml")


def _new_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as a string, as OpenAI's API carries it
    id: str = field(default_factory=_new_id)  # "call_" + 24 random hex chars

    def to_openai(self) -> dict:
        """The call as an OpenAI chat-completions `tool_calls` entry."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass
class Delta:
    kind: str  # "content" | "reasoning" | "tool_call"
    text: str = ""  # for content / reasoning
    tool_call: ToolCall | None = None


def _dumps(args: dict) -> str:
    return json.dumps(args, ensure_ascii=False, separators=(",", ":"))


def _loads(text: str):
    """json.loads without NaN / Infinity, which would make the re-serialized arguments invalid JSON."""
    return json.loads(text, parse_constant=_reject_constant)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse_hermes(body: str) -> ToolCall | None:
    """`{"name": str, "arguments": object | JSON string}` (a missing or null `arguments` is {})."""
    try:
        obj = _loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"].strip():
        return None
    args = obj.get("arguments")
    if isinstance(args, str):
        try:
            args = _loads(args)
        except ValueError:
            return None
    args = {} if args is None else args
    return ToolCall(obj["name"].strip(), _dumps(args)) if isinstance(args, dict) else None


_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>\s*)?\Z", re.S)
# A value ends at its </parameter>, or (the tag forgotten) where the next parameter or the function ends.
_PARAM = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.S)
_JSON_SCALAR_OR_CONTAINER = re.compile(r"\s*[-\d\[{]|\s*(?:true|false|null)\s*\Z")


def _xml_value(raw: str, types: set[str]):
    # The templates write "<parameter=k>\n" + value + "\n</parameter>": one newline each side is layout.
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    if "string" in types:
        return value
    if types == {"boolean"} and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if _JSON_SCALAR_OR_CONTAINER.match(value):  # as Qwen3-Coder's parser: JSON if it is JSON, else the text
        try:
            return _loads(value)
        except ValueError:
            pass
    return value


def _parse_xml(body: str, schemas: dict[str, dict[str, set[str]]]) -> ToolCall | None:
    m = _FUNCTION.match(body)
    if m is None or not m.group(1).strip():
        return None
    name, inner, args, pos = m.group(1).strip(), m.group(2), {}, 0
    types = schemas.get(name, {})
    while pos < len(inner):
        p = _PARAM.match(inner, pos)
        if p is None:
            if inner[pos:].strip():  # text that is not a parameter: not a call we understand
                return None
            break
        key = p.group(1).strip()
        args[key] = _xml_value(p.group(2), types.get(key, set()))
        pos = p.end()
    return ToolCall(name, _dumps(args))


def _schemas(tools: list[dict] | None) -> dict[str, dict[str, set[str]]]:
    """{function: {parameter: {json types}}} from OpenAI-style tool definitions (bare functions accepted)."""
    def get(d, key):
        return d.get(key) if isinstance(d, dict) else None

    out: dict[str, dict[str, set[str]]] = {}
    for tool in tools or []:
        fn = get(tool, "function") or tool
        props = get(get(fn, "parameters"), "properties")
        if isinstance(get(fn, "name"), str) and isinstance(props, dict):
            out[fn["name"]] = {k: {t for t in (ts if isinstance(ts, list) else [ts]) if isinstance(t, str)}
                               for k, v in props.items() if (ts := get(v, "type")) is not None}
    return out


class StreamParser:
    """Feed generated text in chunks of any size; get back content, reasoning and completed tool calls.

    `tool_format`: "hermes", "xml" or "auto". `reasoning=True`: the prompt ended inside a thinking block
    (`<think>\\n`), so the output is reasoning up to `</think>`. `tools` (optional, the request's tool
    definitions): XML parameters declared as strings stay strings instead of being read as JSON.
    The concatenated deltas of any chunking equal those of feeding the whole text at once.
    """

    def __init__(self, tool_format: str = "auto", reasoning: bool = False, tools: list[dict] | None = None):
        if tool_format not in _FORMATS:
            raise ValueError(f"tool_format must be one of {_FORMATS}, got {tool_format!r}")
        self.tool_format = tool_format
        self._schemas = _schemas(tools)
        self._mode = "reasoning" if reasoning else "content"  # or "call"
        self._buf = ""  # undecided text: a possible tag prefix, or a tool call's body so far
        self._ws = ""  # whitespace held back at the end of the current text
        self._strip = reasoning  # drop leading whitespace (just after a tag)
        self._call_ws = ""  # whitespace dropped before <tool_call>, given back if the call is malformed
        self._scanned = 0  # how much of a call body has been searched for CALL_CLOSE
        self._out: list[tuple[str, list[str] | ToolCall]] = []  # (kind, text pieces | call), kinds merged

    def feed(self, text: str) -> list[Delta]:
        """Add generated text; return the pieces that are now decided."""
        self._buf += text
        self._drain(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        """End of generation: flush everything held back (an unterminated call comes back as content)."""
        self._drain(final=True)
        self._emit(self._mode, self._ws)
        self._ws = ""
        return self._take()

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return [Delta(k, tool_call=v) if k == "tool_call" else Delta(k, "".join(v)) for k, v in out]

    def _emit(self, kind: str, text: str) -> None:
        if not text:
            return
        if self._out and self._out[-1][0] == kind:
            self._out[-1][1].append(text)
        else:
            self._out.append((kind, [text]))

    def _text(self, s: str) -> None:
        """Emit text of the current mode; hold back trailing whitespace, drop leading ones after a tag."""
        if self._strip:
            s = s.lstrip()
            self._strip = not s
        s = self._ws + s
        body = s.rstrip()
        self._ws = s[len(body):]
        self._emit(self._mode, body)

    def _parse_call(self, body: str) -> ToolCall | None:
        head = body.lstrip()
        if head.startswith("{") and self.tool_format in ("auto", "hermes"):
            return _parse_hermes(body)
        if head.startswith("<function=") and self.tool_format in ("auto", "xml"):
            return _parse_xml(head, self._schemas)
        return None

    def _drain(self, final: bool) -> None:
        while self._buf or (final and self._mode == "call"):  # a call may end right at <tool_call>
            if self._mode == "call":
                if not self._drain_call(final):
                    return
            elif not self._drain_text(final):
                return

    def _drain_call(self, final: bool) -> bool:
        """Close the tool call if its end tag has arrived; False while it has not."""
        end = self._buf.find(CALL_CLOSE, max(0, self._scanned - len(CALL_CLOSE) + 1))
        if end < 0:
            self._scanned = len(self._buf)
            if final:  # unterminated: the model's text, verbatim
                self._mode, self._strip = "content", False
                self._emit("content", self._call_ws + CALL_OPEN + self._buf)
                self._buf = ""
            return False
        body, self._buf, self._scanned = self._buf[:end], self._buf[end + len(CALL_CLOSE):], 0
        call = self._parse_call(body)
        self._mode, self._strip = "content", call is not None
        if call is None:
            self._emit("content", self._call_ws + CALL_OPEN + body + CALL_CLOSE)
        else:
            self._out.append(("tool_call", call))
        return True

    def _drain_text(self, final: bool) -> bool:
        """Emit text up to a tag and switch mode (True), or emit/hold all of it (False)."""
        buf, pos, tags = self._buf, 0, _TAGS[self._mode]
        while (lt := buf.find("<", pos)) >= 0:
            self._text(buf[pos:lt])
            tag = next((t for t in tags if buf.startswith(t, lt)), None)
            if tag is not None:
                self._buf, ws, self._ws = buf[lt + len(tag):], self._ws, ""  # drop whitespace before a tag
                if tag == CALL_OPEN:
                    self._mode, self._call_ws, self._strip = "call", ws, False
                else:
                    self._mode, self._strip = ("reasoning" if tag == THINK_OPEN else "content"), True
                return True
            maybe_tag = len(buf) - lt < max(map(len, tags)) and any(t.startswith(buf[lt:]) for t in tags)
            if maybe_tag and not final:
                self._buf = buf[lt:]  # wait for more text
                return False
            self._text("<")
            pos = lt + 1
        self._text(buf[pos:])
        self._buf = ""
        return False


def parse(text: str, tool_format: str = "auto", reasoning: bool = False,
          tools: list[dict] | None = None) -> tuple[str, str, list[ToolCall]]:
    """(content, reasoning, tool_calls) of a whole generated text; the same as streaming it."""
    p = StreamParser(tool_format, reasoning, tools)
    deltas = p.feed(text) + p.finish()
    content = "".join(d.text for d in deltas if d.kind == "content")
    thought = "".join(d.text for d in deltas if d.kind == "reasoning")
    return content, thought, [d.tool_call for d in deltas if d.kind == "tool_call"]
