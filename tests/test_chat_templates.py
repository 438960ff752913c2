"""Chat-template conformance: our Tokenizer renders real Qwen templates exactly as transformers does.

The templates in tests/fixtures/templates/ are hand-written reproductions of Qwen3's (Hermes JSON tool
calls) and Qwen3.5's (XML tool calls, vision content parts, thinking by default). Every conversation is
rendered with and without a generation prompt and with enable_thinking absent / True / False; the outputs,
or the template errors raised, must be identical.
"""

import copy
import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from flashmoe_pack.tokenizer import Tokenizer as FmTokenizer

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
TOK_CONFIG = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None,
              "add_bos_token": False, "errors": "replace", "model_max_length": 262144,
              "clean_up_tokenization_spaces": False, "split_special_tokens": False}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Météo d'une ville — température en °C",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "Nom de la ville, ex. « Zürich »"},
            "days": {"type": "integer", "minimum": 1}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "run_python", "description": "Run Python code and return stdout.",
        "parameters": {"type": "object", "properties": {
            "code": {"type": "string"}, "options": {"type": "object"}}, "required": ["code"]}}},
]
WEATHER_CALL = {"type": "function", "id": "call_1",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 3}}}
CODE_CALL = {"type": "function", "id": "call_2", "function": {"name": "run_python", "arguments": {
    "code": "for i in range(3):\n    print(i < 2, '東京')", "options": {"timeout": 1.5, "env": ["A", "B"]},
    "verbose": True}}}
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
USER = {"role": "user", "content": "What's the weather in Zürich?"}

CONVERSATIONS = {
    "user": [USER],
    "system_user": [SYSTEM, USER],
    "tools_no_system": ([USER], TOOLS),
    "tools_system": ([SYSTEM, USER], TOOLS),
    "tool_calls": ([SYSTEM, USER,
                    {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21, \"sky\": \"☀️\"}"},
                    {"role": "assistant", "content": "21 °C and sunny."}], TOOLS),
    "parallel_calls_with_content_and_reasoning": ([
        USER, {"role": "assistant", "content": "Let me check both.", "reasoning_content": "\nTwo tools.\n",
               "tool_calls": [WEATHER_CALL, CODE_CALL]},
        {"role": "tool", "content": "21"}, {"role": "tool", "content": "True 東京\nTrue 東京\nFalse 東京"}], TOOLS),
    "bare_function_calls": ([USER, {"role": "assistant", "content": "", "tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"role": "tool", "content": "rain"}], TOOLS),
    "multi_turn_reasoning": [
        SYSTEM, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Simple sum."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\n6"},
        {"role": "user", "content": "Thanks!"}],
    "reasoning_after_last_query": ([
        USER, {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
               "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "21"},
        {"role": "assistant", "content": "It is 21 °C.", "reasoning_content": "Got it."}], TOOLS),
    "reasoning_aliases": [USER, {"role": "assistant", "content": "Sunny.", "thinking": "Guessing."},
                          {"role": "user", "content": "Sure?"},
                          {"role": "assistant", "content": "Yes.", "reasoning": "Confident."}],
    "non_ascii": [{"role": "system", "content": "Réponds en français. 🙂"},
                  {"role": "user", "content": "東京と北京 — مرحبا — e\u0301\u00e9 \u200b<b>x</b> \\n"},
                  {"role": "assistant", "content": "Ça va 👍"}, {"role": "user", "content": "Ünïcödé?"}],
    "content_parts": [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                                                   {"type": "text", "text": " this."}]}],
    "image_parts": [{"role": "user", "content": [{"type": "image", "image": "file:///a.png"},
                                                 {"type": "text", "text": "What is it?"},
                                                 {"type": "video", "video": "file:///b.mp4"}]}],
    "string_arguments": ([USER, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}]}],
        TOOLS),
    "no_user_query": [SYSTEM],
    "system_not_first": [USER, SYSTEM],
    "unknown_role": [USER, {"role": "critic", "content": "meh"}],
}
KWARGS = [{}, {"enable_thinking": True}, {"enable_thinking": False}, {"add_vision_id": True}]


def _byte_level_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return tok


@pytest.fixture(scope="module", params=["qwen3", "qwen3_5"])
def tokenizers(request, tmp_path_factory):
    """(ours, transformers') for one template; the model dir stores it as chat_template.jinja."""
    d = tmp_path_factory.mktemp(request.param)
    _byte_level_tokenizer().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(TOK_CONFIG))
    template = (TEMPLATES / f"{request.param}.jinja").read_text(encoding="utf-8")
    (d / "chat_template.jinja").write_text(template, encoding="utf-8")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"),
                                              eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                              chat_template=template)
    return FmTokenizer.from_dir(d), hf


def _render(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # both sides must fail the same way
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_renders_like_transformers(tokenizers, name):
    ours, hf = tokenizers
    conv = CONVERSATIONS[name]
    messages, tools = conv if isinstance(conv, tuple) else (conv, None)
    before = copy.deepcopy(messages)
    for add_generation_prompt in (True, False):
        for kw in KWARGS:
            mine = _render(ours.apply_chat_template, messages, tools=tools,
                           add_generation_prompt=add_generation_prompt, **kw)
            theirs = _render(hf.apply_chat_template, messages, tools=tools, tokenize=False,
                             add_generation_prompt=add_generation_prompt, **kw)
            assert mine == theirs, (name, add_generation_prompt, kw)
            if not mine.startswith(("TemplateError", "UndefinedError", "TypeError")):
                assert ours.encode(mine) == hf(mine, add_special_tokens=False)["input_ids"]
    assert messages == before  # rendering never edits the caller's messages


def test_templates_render_what_they_claim(tokenizers):
    """Spot checks that the fixtures are the real formats, not just whatever both renderers agree on."""
    ours, _ = tokenizers
    text = ours.apply_chat_template(CONVERSATIONS["tool_calls"][0], tools=TOOLS)
    if "<function=" in ours.chat_template:  # Qwen3.5: XML calls, thinking opened by the generation prompt
        assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nZürich\n</parameter>\n" \
               "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call><|im_end|>" in text
        assert text.endswith("<|im_start|>assistant\n<think>\n")
        assert "\n</IMPORTANT>\n\nYou are a terse assistant.<|im_end|>" in text
    else:  # Qwen3: Hermes JSON calls
        call = '{"name": "get_weather", "arguments": {"city": "Zürich", "days": 3}}'
        assert f"<tool_call>\n{call}\n</tool_call>" in text
        assert text.endswith("<|im_start|>assistant\n")
        assert text.startswith("<|im_start|>system\nYou are a terse assistant.\n\n# Tools\n")
    result = '{"temp": 21, "sky": "☀️"}'
    assert f"<|im_start|>user\n<tool_response>\n{result}\n</tool_response><|im_end|>" in text
    off = ours.apply_chat_template([USER], enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_template_from_tokenizer_config(tmp_path):
    """Older layout: the template is a string, or a list of named templates, inside tokenizer_config.json."""
    _byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    template = (TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                              eos_token="<|im_end|>", chat_template=template)
    want = hf.apply_chat_template(CONVERSATIONS["tool_calls"][0], tools=TOOLS, tokenize=False,
                                  add_generation_prompt=True)
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    for stored in (template, named):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**TOK_CONFIG, "chat_template": stored}))
        ours = FmTokenizer.from_dir(tmp_path)
        assert ours.apply_chat_template(CONVERSATIONS["tool_calls"][0], tools=TOOLS) == want


EDGE_TEMPLATES = [
    "{% set ns = namespace(_x=1) %}{{ ns._x }}",  # transformers refuses underscore names on a namespace
    "{% set ns = namespace(a=1) %}{% set ns._y = 2 %}{{ ns.a }}",
    "{% set ns = namespace(a=1, b=[]) %}{% set ns.a = ns.a + 1 %}{{ ns.a }}{{ ns.b | length }}",
    "{{ dict(a=1) | tojson }}{{ {'b': 'é<>&', 'a': [1]} | tojson(indent=2, sort_keys=true) }}",
    "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
    "{% generation %}{{ messages[0].content }}{% endgeneration %}",
    "{{ messages[0].missing is defined }}|{{ messages[0].content | trim }}|{{ bos_token }}|{{ eos_token }}",
    "{% for k, v in messages[0] | items %}{{ k }}={{ v }};{% endfor %}",
    "{{ tools is none }}{{ documents is none }}{{ add_generation_prompt }}",
    "{{ messages[0].__class__ }}",
]


@pytest.mark.parametrize("source", EDGE_TEMPLATES)
def test_environment_like_transformers(tmp_path, source):
    """The jinja environment itself: globals, filters, extensions, sandbox, special-token variables."""
    tok = _byte_level_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                              eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ours = FmTokenizer(tok, [], source, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    messages = [{"role": "user", "content": " hi ", "name": None}, {"role": "assistant", "content": "yo"}]
    mine = _render(ours.apply_chat_template, messages, add_generation_prompt=False)
    theirs = _render(hf.apply_chat_template, messages, chat_template=source, tokenize=False)
    assert mine == theirs
