"""OpenAI response bodies and SSE streams for /v1/chat/completions and /v1/completions.

Generated text goes through chat/toolcalls.StreamParser, which splits it into content, reasoning
(`reasoning_content`, as vLLM and DeepSeek name it) and tool calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .prompts import Prompt, build_chat_prompt
from .worker import Job, job_events


@dataclass
class Meta:
    id: str
    created: int
    model: str


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(gen) -> dict:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": gen.cached_tokens},
    }


def error_body(exc: Exception) -> dict:
    return {
        "error": {
            "message": f"generation failed: {type(exc).__name__}: {exc}",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


class GenerationError(Exception):
    """The worker raised while generating: the app answers 500."""


def chat_prompt(tokenizer, req) -> Prompt:
    msgs = [m.model_dump(exclude_none=True) for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    return build_chat_prompt(tokenizer, msgs, tools, req.tool_choice, req.chat_template_kwargs)


class OutputParser:
    """StreamParser for a prompt; with tool parsing off (tool_choice "none") calls are given back as text."""

    def __init__(self, prompt: Prompt):
        from ..chat.toolcalls import StreamParser

        self._p = StreamParser("auto", reasoning=prompt.reasoning, tools=prompt.tools)
        self._tools = prompt.parse_tools

    def _fix(self, deltas):
        if self._tools:
            return deltas
        from ..chat.toolcalls import Delta

        return [
            Delta("content", text=tool_call_text(d.tool_call)) if d.kind == "tool_call" else d for d in deltas
        ]

    def feed(self, text: str):
        return self._fix(self._p.feed(text))

    def finish(self):
        return self._fix(self._p.finish())


def tool_call_text(tc) -> str:
    return f'<tool_call>\n{{"name": {json.dumps(tc.name)}, "arguments": {tc.arguments}}}\n</tool_call>'


def tool_call_dict(tc, index: int | None = None) -> dict:
    d = {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments}}
    return d if index is None else {"index": index, **d}


def finish_reason(gen, tool_calls: int) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if gen.finish_reason == "length" else "stop"


async def _collect(job: Job, request, feed):
    """Run a non-streaming job to its end, feed(text) per piece: the generation, None if the client left."""
    async for kind, value in job_events(job, request.is_disconnected):
        if kind == "text":
            feed(value)
        elif kind == "error":
            raise GenerationError(str(value)) from value
        else:
            return value
    return None


async def chat_response(job: Job, request, prompt: Prompt, meta: Meta) -> dict:
    parser, deltas = OutputParser(prompt), []
    gen = await _collect(job, request, lambda t: deltas.extend(parser.feed(t)))
    if gen is None:
        return {}
    deltas += parser.finish()
    content = "".join(d.text for d in deltas if d.kind == "content")
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    calls = [d.tool_call for d in deltas if d.kind == "tool_call"]
    message = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [tool_call_dict(tc) for tc in calls]
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason(gen, len(calls)),
            }
        ],
        "usage": usage(gen),
    }


async def chat_stream(job: Job, request, prompt: Prompt, meta: Meta, include_usage: bool):
    parser, n_calls = OutputParser(prompt), 0
    head = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model}

    def chunk(delta: dict, finish: str | None = None) -> str:
        return sse(
            {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        )

    yield chunk({"role": "assistant", "content": ""})
    async for kind, value in job_events(job, request.is_disconnected):
        if kind == "error":
            yield sse(error_body(value))
            return
        deltas = parser.feed(value) if kind == "text" else parser.finish()
        for d in deltas:
            if d.kind == "content" and d.text:
                yield chunk({"content": d.text})
            elif d.kind == "reasoning" and d.text:
                yield chunk({"reasoning_content": d.text})
            elif d.kind == "tool_call":
                yield chunk({"tool_calls": [tool_call_dict(d.tool_call, n_calls)]})
                n_calls += 1
        if kind == "done":
            if value is None:
                return
            yield chunk({}, finish_reason(value, n_calls))
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(value)})
            yield "data: [DONE]\n\n"


async def completion_response(job: Job, request, meta: Meta, echo: str) -> dict:
    parts = [echo]
    gen = await _collect(job, request, parts.append)
    if gen is None:
        return {}
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {"text": "".join(parts), "index": 0, "logprobs": None, "finish_reason": finish_reason(gen, 0)}
        ],
        "usage": usage(gen),
    }


async def completion_stream(job: Job, request, meta: Meta, echo: str, include_usage: bool):
    head = {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model}

    def chunk(text: str, finish: str | None = None) -> str:
        return sse(
            {**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        )

    if echo:
        yield chunk(echo)
    async for kind, value in job_events(job, request.is_disconnected):
        if kind == "text":
            yield chunk(value)
        elif kind == "error":
            yield sse(error_body(value))
            return
        elif value is not None:
            yield chunk("", finish_reason(value, 0))
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(value)})
            yield "data: [DONE]\n\n"
