"""Tool-call / reasoning parser: every format, every chunking, split tags, false alarms, malformed input.

Fuzz oracle: `_reference`, a plain non-streaming scan of the whole text applying the documented rules (tags
switch mode; whitespace next to a recognized tag is dropped; a call that does not parse, or never ends, is
content verbatim). For ANY text and ANY chunking the streamed deltas must equal the oracle's pieces exactly.
"""

import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmoe_pack.chat import Delta, StreamParser, ToolCall, parse
from flashmoe_pack.tokenizer import compile_chat_template

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"


def _merge(deltas: list[Delta]) -> list[tuple]:
    """Deltas as comparable items, adjacent text of one kind joined."""
    out: list[tuple] = []
    for d in deltas:
        assert isinstance(d, Delta) and d.kind in ("content", "reasoning", "tool_call")
        if d.kind == "tool_call":
            assert d.text == "" and re.fullmatch(r"call_[0-9a-f]{24}", d.tool_call.id)
            out.append(("tool_call", d.tool_call.name, json.loads(d.tool_call.arguments)))
        elif out and out[-1][0] == d.kind:
            out[-1] = (d.kind, out[-1][1] + d.text)
        else:
            assert d.text  # never an empty text delta
            out.append((d.kind, d.text))
    return out


def _stream(text: str, cuts, **kw) -> list[tuple]:
    p, deltas, prev = StreamParser(**kw), [], 0
    for c in [*sorted(cuts), len(text)]:
        deltas += p.feed(text[prev:c])
        prev = c
    return _merge(deltas + p.finish())


def _chunkings(text: str, rng: random.Random):
    yield []  # the whole text at once
    yield range(1, len(text))  # one character at a time
    for _ in range(3):  # random chunk sizes
        yield rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))) if len(text) > 1 else []


def check(text: str, **kw) -> list[tuple]:
    """The streamed result, asserted identical for whole / per-character / random / every two-way chunking."""
    want = _stream(text, [], **kw)
    for cuts in [*_chunkings(text, random.Random(text)), *([i] for i in range(1, min(len(text), 200)))]:
        assert _stream(text, cuts, **kw) == want, (text, list(cuts))
    content, reasoning, calls = parse(text, **kw)
    assert content == "".join(i[1] for i in want if i[0] == "content")
    assert reasoning == "".join(i[1] for i in want if i[0] == "reasoning")
    assert [("tool_call", c.name, json.loads(c.arguments)) for c in calls] == [i for i in want
                                                                               if i[0] == "tool_call"]
    return want


def _reference(text: str, tool_format="auto", reasoning=False, tools=None) -> list[tuple]:
    body_parser = StreamParser(tool_format, tools=tools)._parse_call  # its grammar is tested on its own
    out, mode, pos, strip = [], "reasoning" if reasoning else "content", 0, reasoning

    def emit(kind, s):
        if s:
            out.append(Delta(kind, s))

    while True:
        tags = ["</think>"] if mode == "reasoning" else ["<think>", "<tool_call>"]
        i, tag = min([(i, t) for t in tags if (i := text.find(t, pos)) >= 0], default=(len(text), None))
        seg = text[pos:i].lstrip() if strip else text[pos:i]
        if tag is None:
            emit(mode, seg)
            return _merge(out)
        if tag == "<tool_call>":
            end = text.find("</tool_call>", i)
            call = body_parser(text[i + 11 : end]) if end >= 0 else None
            if call is None:  # content verbatim, with the whitespace before it
                pos, strip = (end + 12 if end >= 0 else len(text)), False
                emit(mode, seg)
                emit("content", text[i:pos])
            else:
                pos, strip = end + 12, True
                emit(mode, seg.rstrip())
                out.append(Delta("tool_call", tool_call=call))
            continue
        emit(mode, seg.rstrip())
        mode, pos, strip = ("reasoning" if tag == "<think>" else "content"), i + len(tag), True


def hermes(name, args):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'


def xml(name, args):
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


# --- plain text, false alarms, prompt emission ----------------------------------------------------------
@pytest.mark.parametrize("text", [
    "Hello, world!", "a < b and b > c", "x<y", "<", "<<", "a <", "<tool", "<tool_", "<tool_call", "< think>",
    "<thinking>", "<tool_calls>", "<b>bold</b> <br/>", "</think> stray", "if (a<b) { return x<<2; }",
    "東京 🙂 <東>", " \n lead & trail \n "])
def test_text_without_tags_is_content_verbatim(text):
    assert check(text) == [("content", text)]
    if "</think>" not in text:  # reasoning=True: the prompt opened <think>, whose newline is layout
        assert check(text, reasoning=True) == [("reasoning", text.lstrip())]


def test_lt_comes_out_once_it_cannot_be_a_tag():
    p = StreamParser()
    assert _merge(p.feed("a < b")) == [("content", "a < b")]
    assert _merge(p.feed(" if x <")) == [("content", " if x")]  # " <" is undecided
    assert _merge(p.feed("= y")) == [("content", " <= y")]
    assert _merge(p.feed(" <tool_")) == []
    assert _merge(p.feed("box>")) == [("content", " <tool_box>")]
    assert _merge(p.feed("<thi")) == []
    assert _merge(p.finish()) == [("content", "<thi")]


# --- reasoning ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, kw, want", [
    ("<think>\nLet me see.\n</think>\n\n4", {}, [("reasoning", "Let me see."), ("content", "4")]),
    ("Let me see.\n</think>\n\n4", {"reasoning": True}, [("reasoning", "Let me see."), ("content", "4")]),
    ("<think>\n\n</think>\n\nHi", {}, [("content", "Hi")]),
    ("A <think>mid</think> B", {}, [("content", "A"), ("reasoning", "mid"), ("content", "B")]),
    ("<think>never closed <tool_call>x", {}, [("reasoning", "never closed <tool_call>x")]),
    ("a <think> b", {"reasoning": True}, [("reasoning", "a <think> b")]),
    ("<think>x</think><think>y</think>z", {}, [("reasoning", "xy"), ("content", "z")]),
])
def test_think_blocks(text, kw, want):
    assert check(text, **kw) == want


# --- Hermes JSON (Qwen3) --------------------------------------------------------------------------------
def test_hermes_calls_with_content_around():
    calc = '<tool_call>\n{"name": "calc", "arguments": "{\\"expr\\": \\"1 < 2\\"}"}\n</tool_call>'
    text = ("<think>\nWeather first.\n</think>\n\nLet me check.\n" + hermes("get_weather", {"city": "Zürich"})
            + "\n" + calc + "\nDone.")
    assert check(text, tool_format="hermes") == check(text) == [
        ("reasoning", "Weather first."), ("content", "Let me check."),
        ("tool_call", "get_weather", {"city": "Zürich"}), ("tool_call", "calc", {"expr": "1 < 2"}),
        ("content", "Done.")]
    assert parse(text)[2][0].arguments == '{"city":"Zürich"}'  # compact, not ASCII-escaped


@pytest.mark.parametrize("body, args", [
    ('{"name": "f"}', {}), ('{"name": "f", "arguments": null}', {}),
    ('{"arguments": {"a": [1, {"b": null}]}, "name": "f"}', {"a": [1, {"b": None}]}),
    ('  {"name": " f ", "arguments": {"ü": "🙂\\n"}}  ', {"ü": "🙂\n"}),
    ("<function=f>\n<parameter=a>\n1\n<parameter=b>\nx\n</function>", {"a": 1, "b": "x"}),  # no </parameter>
    ("\n<function=f>\n<parameter=a>\n1\n</parameter>\n", {"a": 1}),  # no </function>
    ("<function= f >\n<parameter= a >\n1\n</parameter>\n<parameter=a>\n2\n</parameter>\n", {"a": 2}),
])
def test_call_forms(body, args):
    assert check(f"<tool_call>{body}</tool_call>") == [("tool_call", "f", args)]


@pytest.mark.parametrize("body", [
    '{"name": "f", "arguments": {"a": 1}', '{"arguments": {}}', '{"name": "", "arguments": {}}',
    '{"name": 3}', '["f", {}]', '{"name": "f", "arguments": [1]}', '{"name": "f", "arguments": "{not json"}',
    '{"name": "f", "arguments": {"x": NaN}}', '{"name": "f"} {"name": "g"}', "", "call f(1)",
    '<tool_call>{"name": "f"}', "<function=>\n</function>", "<function=f>\njunk\n</function>",
    "<function=f>\n</function>\ntrailing", "<function>f</function>", "<parameter=a>1"])
def test_malformed_calls_are_content_verbatim(body):
    text = f"Before\n\n<tool_call>{body}</tool_call>\n\nafter <"
    assert check(text) == [("content", text)]


def test_unterminated_call_is_content_verbatim():
    for text in ["Ok:\n" + hermes("f", {"a": 1})[:-5], "Ok:\n" + xml("f", {"a": 1})[:-12], "x\n<tool_call>"]:
        assert check(text) == [("content", text)]


# --- XML (Qwen3.5, Qwen3-Coder) -------------------------------------------------------------------------
def test_xml_calls_and_values():
    code = "for i in x:\n    print(i < 2)\n"
    values = {"n": "42", "f": "-1.5e3", "t": "true", "obj": '{"a": [1, 2]}', "arr": '[1, "x"]', "nul": "null",
              "s": "hello", "q": '"quoted"', "zip": "007", "py": "True", "inf": "-Infinity", "code": code,
              "lead": "\n\nindented", "uni": "東京 🙂", "empty": ""}
    want = {**values, "n": 42, "f": -1500.0, "t": True, "obj": {"a": [1, 2]}, "arr": [1, "x"], "nul": None}
    text = "I'll run it.\n\n" + xml("run", values) + "\n" + xml("noop", {})
    assert check(text, tool_format="xml") == check(text) == [
        ("content", "I'll run it."), ("tool_call", "run", want), ("tool_call", "noop", {})]


def test_xml_schema_keeps_declared_strings():
    props = {"zip": {"type": "string"}, "flag": {"type": "boolean"}, "maybe": {"type": ["string", "null"]},
             "n": {"type": "integer"}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"properties": props}}}]
    text = xml("f", {"zip": "12345", "flag": "True", "maybe": "[1]", "n": "7"})
    want = {"zip": "12345", "flag": True, "maybe": "[1]", "n": 7}
    assert check(text, tools=tools) == [("tool_call", "f", want)]
    assert check(text) == [("tool_call", "f", {"zip": 12345, "flag": "True", "maybe": [1], "n": 7})]
    assert parse(text, tools=[{"function": "junk"}, 3, {"name": "f", "parameters": []}])[2][0].name == "f"


def test_forced_format_rejects_the_other():
    h, x = hermes("f", {"a": 1}), xml("f", {"a": "1"})
    assert check(h, tool_format="xml") == [("content", h)]
    assert check(x, tool_format="hermes") == [("content", x)]
    assert check(h + x) == [("tool_call", "f", {"a": 1})] * 2
    with pytest.raises(ValueError):
        StreamParser(tool_format="json")


def test_tool_call_object():
    calls = parse(hermes("f", {}) + hermes("f", {}))[2]
    assert calls[0].id != calls[1].id
    function = {"name": "f", "arguments": "{}"}
    assert calls[0].to_openai() == {"id": calls[0].id, "type": "function", "function": function}
    assert re.fullmatch(r"call_[0-9a-f]{24}", ToolCall("g", "{}").id)


# --- round trip through the real templates --------------------------------------------------------------
@pytest.mark.parametrize("template", ["qwen3", "qwen3_5"])
def test_template_round_trip(template):
    """What a template writes for an assistant turn parses back into its reasoning, content and calls."""
    props = {"code": {"type": "string"}, "n": {"type": "integer"}, "opts": {"type": "object"},
             "ok": {"type": "boolean"}, "id": {"type": "string"}}
    tools = [{"type": "function", "function": {"name": "run", "parameters": {"properties": props}}}]
    args = [{"code": "print(1 < 2)\nprint('東')", "n": 3, "opts": {"a": [1, None]}, "ok": False, "id": "0042"},
            {"code": "", "n": -7}]
    calls = [{"type": "function", "function": {"name": "run", "arguments": a}} for a in args]
    assistant = {"role": "assistant", "content": "Running it 🙂", "reasoning_content": "Two runs < one.",
                 "tool_calls": calls}
    source = (TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    text = compile_chat_template(source).render(messages=[{"role": "user", "content": "go"}, assistant],
                                                tools=tools)
    turn = text.split("<|im_start|>assistant\n")[-1].removesuffix("<|im_end|>\n")
    assert turn.startswith("<think>\n")
    for reasoning in (False, True):  # the model opens <think> itself, or the prompt did
        got = check(turn[len("<think>\n"):] if reasoning else turn, reasoning=reasoning, tools=tools)
        assert got == [("reasoning", "Two runs < one."), ("content", "Running it 🙂")] + [
            ("tool_call", "run", a) for a in args]


# --- fuzz -----------------------------------------------------------------------------------------------
FRAGMENTS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<", ">", "/", "<tool", "<thi", "</",
             "</th", "think", "_call", "\n", " ", "  \n", "a", "b c", "東", "🙂", '{"name": "g"', "{", "}", '"',
             '{"name": "f", "arguments": {"x": 1}}', "<function=g>", "<parameter=p>", "\n1\n", "</parameter>",
             "</function>", hermes("f", {"x": [1, "<"]}), xml("g", {"p": "a < b", "q": "2"}),
             "\n\n" + xml("h", {})]


def _fuzz_one(text: str, cuts, reasoning: bool, fmt: str):
    kw = {"reasoning": reasoning, "tool_format": fmt}
    got = _stream(text, cuts, **kw)
    assert got == _stream(text, [], **kw) == _reference(text, **kw), (text, cuts)
    if "<" not in text:  # nothing to parse: the text itself
        want = text.lstrip() if reasoning else text
        assert got == ([("reasoning" if reasoning else "content", want)] if want else [])


def test_fuzz_seeded():
    rng = random.Random(1234)
    for _ in range(600):
        text = "".join(rng.choice(FRAGMENTS) if rng.random() < 0.8 else chr(rng.randint(32, 0x2FFF))
                       for _ in range(rng.randint(0, 40)))
        for cuts in _chunkings(text, rng):
            _fuzz_one(text, cuts, rng.random() < 0.3, rng.choice(["auto", "hermes", "xml"]))


def _squash(items: list[tuple]) -> list[tuple]:
    """Whitespace removed from texts, then empty texts dropped and adjacent texts of one kind joined."""
    keep = [i if i[0] == "tool_call" else (i[0], "".join(i[1].split())) for i in items]
    return _merge([Delta(i[0], tool_call=ToolCall(i[1], json.dumps(i[2]))) if i[0] == "tool_call"
                   else Delta(*i) for i in keep if i[0] == "tool_call" or i[1]])


def test_fuzz_structured_calls():
    """Random content, reasoning and well-formed calls of both formats, interleaved: all of it comes back."""
    rng = random.Random(99)

    def word():  # no ">": plain text can never form a tag
        return "".join(rng.choice('ab c<{}"=/:\n 東🙂') for _ in range(rng.randint(0, 12)))

    schema = [{"name": "x", "parameters": {"properties": {f"p{i}": {"type": "string"} for i in range(4)}}}]
    for _ in range(150):
        text, want = "", []
        for _ in range(rng.randint(0, 6)):
            kind, w = rng.choice(["content", "think", "hermes", "xml"]), word()
            if kind == "content":
                text, want = text + w, want + [("content", w)]
            elif kind == "think":
                text, want = text + f"<think>{w}</think>", want + [("reasoning", w)]
            else:
                args = {f"p{i}": word().replace("<", "") for i in range(rng.randint(0, 4))}
                text += (hermes if kind == "hermes" else xml)("x", args)
                want.append(("tool_call", "x", args))
        got = check(text, tools=schema)
        assert _squash(got) == _squash(want)  # exact up to the layout whitespace dropped next to tags
        assert got == _reference(text, tools=schema)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=30),
       st.lists(st.integers(min_value=0, max_value=400), max_size=8), st.booleans(),
       st.sampled_from(["auto", "hermes", "xml"]))
def test_fuzz_hypothesis(parts, cuts, reasoning, fmt):
    text = "".join(parts)
    _fuzz_one(text, [c for c in cuts if c <= len(text)], reasoning, fmt)
