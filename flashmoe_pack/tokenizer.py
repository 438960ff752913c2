"""Tokenizer, streaming detokenizer and chat template of a model directory.

Only the `tokenizers` library and jinja2 are needed: transformers is not
imported at run time. The chat template is rendered the way transformers
renders it (same jinja2 environment, filters and globals), so a prompt built
here is the prompt the model was trained on.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

# The named special tokens transformers passes to every chat template.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")
# Older names for a message's reasoning; templates read `reasoning_content` (transformers aliases them too).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as a string or as a serialized AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` tag and render its body unchanged.

    transformers uses it only to mark assistant tokens for training masks; without
    the extension such templates would not even compile here.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters and sorts keys; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore-prefixed names, as transformers' does (sandbox hardening)."""

    def __init__(*args, **kwargs):  # jinja's own signature trick, so that namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                "Chat templates cannot store underscore-prefixed attributes on a namespace, "
                f"but got {name!r}. Please rename the attribute."
            )


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses (sandboxed, trim/lstrip blocks)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _normalize_messages(messages: list[dict]) -> list[dict]:
    # As transformers does: drop None-valued keys (OpenAI clients send content=None with tool calls) and
    # fill `reasoning_content` from its older names. Copies, so the caller's messages are never touched.
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"chat messages must be dicts, got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


class Tokenizer:
    """A model's tokenizer: text <-> ids, end-of-sequence ids and chat template.

    Build it with `Tokenizer.from_dir(model_dir)`.
    """

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        eos_ids: list[int],
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        source: str = "<memory>",
    ):
        self._tok = tokenizer
        self.eos_ids = list(eos_ids)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.source = source
        self._compiled: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json, generation_config.json and the chat template of `path`.

        Raises FileNotFoundError naming the file when tokenizer.json is missing.
        """
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: not found (a fast tokenizer file is required)")
        tok = _HFTokenizer.from_file(str(tok_file))
        tok_cfg = _read_json(path / "tokenizer_config.json")
        gen_cfg = _read_json(path / "generation_config.json")

        special = {k: c for k in _SPECIAL_TOKEN_KEYS if (c := _token_content(tok_cfg.get(k))) is not None}

        # End of sequence: the generation config is what generate() honours; the tokenizer's eos_token is
        # added because chat models often end turns with a token (<|im_end|>) that only one file names.
        eos: list[int] = []
        candidates = gen_cfg.get("eos_token_id")
        if candidates is None:  # fall back to the model config (text_config for multimodal layouts)
            cfg = _read_json(path / "config.json")
            candidates = cfg.get("eos_token_id", cfg.get("text_config", {}).get("eos_token_id"))
        for i in candidates if isinstance(candidates, list) else [candidates]:
            if isinstance(i, int) and i not in eos:
                eos.append(i)
        i = tok.token_to_id(special["eos_token"]) if "eos_token" in special else None
        if i is not None and i not in eos:
            eos.append(i)

        template = None
        if (path / "chat_template.jinja").is_file():  # transformers v5 prefers the separate file
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        else:
            t = tok_cfg.get("chat_template")
            if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
                t = next((d["template"] for d in t if d.get("name") == "default"), None)
            template = t if isinstance(t, str) else None
        return cls(tok, eos, template, special, source=str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (like <|im_start|>) become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Invalid UTF-8 (an incomplete character) decodes to U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (vocabulary entry or added token), or None."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary string of an id, or None."""
        return self._tok.id_to_token(token_id)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental detokenizer for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` (and JSON-schema `tools`) into the prompt text, as transformers would.

        Extra keywords (e.g. `enable_thinking=False`) are passed to the template; they override the
        special tokens (bos_token, eos_token, ...) that are always passed.
        """
        if self.chat_template is None:
            raise ValueError(
                f"{self.source}: no chat template (expected chat_template.jinja or a 'chat_template' "
                "entry in tokenizer_config.json)"
            )
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        return self._compiled.render(
            messages=_normalize_messages(messages),
            tools=tools,
            documents=kwargs.pop("documents", None),
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs},
        )


class StreamDecoder:
    """Turn generated ids, one at a time, into text pieces that are safe to print.

    A byte-level token may hold only part of a UTF-8 character; such a tail is held
    back until the character is complete, so U+FFFD is never emitted mid-stream
    (only `flush()` can return it, for bytes that never became valid UTF-8).
    Only a short window of ids is re-decoded per step, so a step costs O(1) in
    the length of the sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        # ids[:_prefix] are done; ids[_prefix:_read] were emitted and are re-decoded only as context, because
        # some decoders (Metaspace, cleanup) render a token differently at the start of a string.
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def step(self, token_id: int) -> str:
        """Add one id; return the newly completed text ('' while a character is still incomplete)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        # Keep only the context window, so memory does not grow with the sequence.
        self._ids = self._ids[self._read :]
        self._prefix, self._read = 0, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever is still held back (at the end of generation) and reset."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(prefix_text) :]
