import json

import jinja2
import pytest
from tokenizers.pre_tokenizers import ByteLevel

from flashmoe_pack.default_model import CHAT_TEMPLATE, build_tokenizer
from flashmoe_pack.tokenizer import Tokenizer

# A hand-written Qwen3-style ChatML template (JSON tool calls), different from the default model's,
# using namespace, loop controls, tojson on non-ASCII text and the eos_token special-token variable.
QWEN3_STYLE = r"""{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- '# Tools\n\n<tools>' }}
{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\n</tools><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(n_user=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% continue %}{% endif %}
    {%- if message.role == 'user' %}
        {%- set ns.n_user = ns.n_user + 1 %}
        {{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- if message.reasoning_content is defined %}
            {{- '<think>\n' + message.reasoning_content.strip() + '\n</think>\n\n' }}
        {%- endif %}
        {{- message.content }}
        {%- for tc in message.tool_calls | default([]) %}
            {{- '\n<tool_call>\n' + {'name': tc.function.name, 'arguments': tc.function.arguments} | tojson + '\n</tool_call>' }}
        {%- endfor %}
        {{- eos_token + '\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Météo d'une ville",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = [
    ([{"role": "user", "content": "Hello!"}], None, {}),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4", "reasoning_content": "simple sum"},
      {"role": "user", "content": "And 3+3?"}], None, {"enable_thinking": False}),
    ([{"role": "user", "content": "Weather in Zürich?"},
      {"role": "assistant", "content": None, "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
      {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "sunny"}], TOOLS, {}),
    ([{"role": "user", "content": "東京 🙂"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHi"},
      {"role": "user", "content": "again"}], TOOLS, {"enable_thinking": True}),
]


def _write_dir(path, template=None, tok_config=None, gen_config=None):
    build_tokenizer().save(str(path / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"} if tok_config is None else tok_config
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if gen_config is not None:
        (path / "generation_config.json").write_text(json.dumps(gen_config))
    if template is not None:
        (path / "chat_template.jinja").write_text(template)
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = _write_dir(tmp_path_factory.mktemp("tok"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"), eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.mark.parametrize("template", [QWEN3_STYLE, CHAT_TEMPLATE], ids=["qwen3-style", "default-model"])
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(tmp_path, hf_tokenizer, template, case):
    messages, tools, kw = CONVERSATIONS[case]
    ours = Tokenizer.from_dir(_write_dir(tmp_path, template)).apply_chat_template(messages, tools=tools, **kw)
    theirs = hf_tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=True, **kw)
    assert ours == theirs
    assert "\\u" not in ours  # tojson keeps non-ASCII text as is


def test_encode_matches_transformers(tmp_path, hf_tokenizer):
    tok = Tokenizer.from_dir(_write_dir(tmp_path))
    for text in ["Hello world, the experts are read from disk.", "<|im_start|>user\nCafé 東京 🙂<|im_end|>\n",
                 "<think>\n3.14 * 2025 = ?\n</think>\n\n", "  spaces\t\tand\n\n\nnewlines  "]:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"
    assert tok.vocab_size == len(hf_tokenizer)
    # The byte-level vocab puts byte b at id b (the streaming test below relies on it).
    assert all(tok.encode(chr(b)) == [b] for b in range(128))
    assert {tok.id_to_token(b) for b in range(256)} == set(ByteLevel.alphabet())


def test_stream_decoder_holds_back_split_characters(tmp_path):
    tok = Tokenizer.from_dir(_write_dir(tmp_path))
    text = "Grüße aus 東京 🙂👍! <think>ok</think> fin"
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.step(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some emoji/CJK bytes really were split across tokens and held back
    # Ids are one byte each here: the byte-level vocab puts byte b at id b.
    stream = tok.stream_decoder()
    assert [stream.step(b) for b in "🙂".encode()] == ["", "", "", "🙂"]
    assert stream.step(0xE4) == "" and stream.flush() == "\ufffd"  # a character that never completed


def test_stream_decoder_skips_special_tokens(tmp_path):
    tok = Tokenizer.from_dir(_write_dir(tmp_path))
    stream = tok.stream_decoder(skip_special_tokens=True)
    ids = tok.encode("<|im_start|>assistant\nhello<|im_end|>")
    assert "".join(stream.step(i) for i in ids) + stream.flush() == "assistant\nhello"


def test_eos_ids(tmp_path):
    tok = Tokenizer.from_dir(_write_dir(tmp_path, gen_config={"eos_token_id": 757}))
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert tok.eos_ids == [757] == [im_end]
    tok = Tokenizer.from_dir(_write_dir(tmp_path, tok_config={"eos_token": {"content": "<|im_end|>"}},
                                        gen_config={"eos_token_id": [eot, im_end]}))
    assert tok.eos_ids == [eot, im_end]


def test_template_from_tokenizer_config(tmp_path):
    cfg = {"eos_token": "<|im_end|>", "chat_template": [{"name": "tool_use", "template": "T"},
                                                        {"name": "default", "template": "D{{ eos_token }}"}]}
    tok = Tokenizer.from_dir(_write_dir(tmp_path, tok_config=cfg))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "D<|im_end|>"
    cfg["chat_template"] = "{{ messages[0].content }}{{ extra }}"
    tok = Tokenizer.from_dir(_write_dir(tmp_path, tok_config=cfg))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], extra="!") == "x!"


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    tok = Tokenizer.from_dir(_write_dir(tmp_path))
    with pytest.raises(ValueError, match=f"{tmp_path}.*chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok = Tokenizer.from_dir(_write_dir(tmp_path, CHAT_TEMPLATE))
    with pytest.raises(jinja2.TemplateError, match="Unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
