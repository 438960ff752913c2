"""POST /v1/messages: the Anthropic Messages API mapped onto the chat path (text, thinking, tool use)."""

from __future__ import annotations

import json

from .openai_api import GenerationError, Meta, OutputParser
from .prompts import Prompt, PromptError, build_chat_prompt
from .worker import Job, job_events


def _blocks(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])


def _texts(blocks, where: str) -> str:
    out = []
    for b in blocks:
        if b.get("type") != "text":
            raise PromptError(f"unsupported content block {b.get('type')!r}", where)
        out.append(b.get("text", ""))
    return "".join(out)


def to_openai_messages(req) -> list[dict]:
    out = [{"role": "system", "content": _texts(_blocks(req.system), "system")}] if req.system else []
    for i, m in enumerate(req.messages):
        role, blocks = m.get("role"), _blocks(m.get("content"))
        if role == "user":
            text = [b for b in blocks if b.get("type") != "tool_result"]
            for b in blocks:
                if b.get("type") == "tool_result":
                    c = b.get("content")
                    out.append(
                        {
                            "role": "tool",
                            "tool_call_id": b.get("tool_use_id"),
                            "content": c if isinstance(c, str) else _texts(_blocks(c), f"messages[{i}]"),
                        }
                    )
            if text:
                out.append({"role": "user", "content": _texts(text, f"messages[{i}].content")})
        elif role == "assistant":
            msg = {"role": "assistant", "content": _texts([b for b in blocks if b.get("type") == "text"], "")}
            thinking = "".join(b.get("thinking", "") for b in blocks if b.get("type") == "thinking")
            if thinking:
                msg["reasoning_content"] = thinking
            calls = [
                {
                    "id": b.get("id"),
                    "type": "function",
                    "function": {"name": b.get("name"), "arguments": b.get("input") or {}},
                }
                for b in blocks
                if b.get("type") == "tool_use"
            ]
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        else:
            raise PromptError(f"unknown role {role!r}", f"messages[{i}].role")
    return out


def prompt(tokenizer, req) -> Prompt:
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.get("name"),
                "description": t.get("description", ""),
                "parameters": t.get("input_schema", {}),
            },
        }
        for t in req.tools or []
    ]
    tc = req.tool_choice or {}
    choice = {"auto": "auto", "any": "required", "none": "none"}.get(tc.get("type"), None)
    if tc.get("type") == "tool":
        choice = {"type": "function", "function": {"name": tc.get("name")}}
    kw = {}
    if req.thinking is not None:
        kw["enable_thinking"] = req.thinking.get("type") == "enabled"
    return build_chat_prompt(tokenizer, to_openai_messages(req), tools or None, choice, kw)


def _stop_reason(gen, calls: int) -> str:
    return "tool_use" if calls else "max_tokens" if gen.finish_reason == "length" else "end_turn"


def _tool_block(tc) -> dict:
    return {"type": "tool_use", "id": tc.id, "name": tc.name, "input": json.loads(tc.arguments or "{}")}


async def response(job: Job, request, prompt: Prompt, meta: Meta) -> dict:
    parser, deltas, gen = OutputParser(prompt), [], None
    async for kind, value in job_events(job, request.is_disconnected):
        if kind == "text":
            deltas += parser.feed(value)
        elif kind == "error":
            raise GenerationError(str(value)) from value
        else:
            gen = value
    if gen is None:
        return {}
    deltas += parser.finish()
    content = []
    thinking = "".join(d.text for d in deltas if d.kind == "reasoning")
    if thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    text = "".join(d.text for d in deltas if d.kind == "content")
    if text:
        content.append({"type": "text", "text": text})
    calls = [d.tool_call for d in deltas if d.kind == "tool_call"]
    content += [_tool_block(tc) for tc in calls]
    return {
        "id": meta.id,
        "type": "message",
        "role": "assistant",
        "model": meta.model,
        "content": content,
        "stop_reason": _stop_reason(gen, len(calls)),
        "stop_sequence": None,
        "usage": {
            "input_tokens": gen.prompt_tokens,
            "output_tokens": gen.completion_tokens,
            "cache_read_input_tokens": gen.cached_tokens,
        },
    }


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"


async def stream(job: Job, request, prompt: Prompt, meta: Meta):
    parser, index, open_kind, calls = OutputParser(prompt), -1, None, 0
    yield _event(
        "message_start",
        {
            "message": {
                "id": meta.id,
                "type": "message",
                "role": "assistant",
                "model": meta.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": len(prompt.ids), "output_tokens": 0},
            }
        },
    )
    async for kind, value in job_events(job, request.is_disconnected):
        if kind == "error":
            yield _event("error", {"error": {"type": "api_error", "message": str(value)}})
            return
        for d in parser.feed(value) if kind == "text" else parser.finish():
            if d.kind != "tool_call" and not d.text:
                continue
            if d.kind != open_kind or d.kind == "tool_call":
                if open_kind is not None:
                    yield _event("content_block_stop", {"index": index})
                index, open_kind = index + 1, d.kind
                block = {
                    "content": {"type": "text", "text": ""},
                    "reasoning": {"type": "thinking", "thinking": ""},
                    "tool_call": {**_tool_block(d.tool_call), "input": {}} if d.tool_call else None,
                }[d.kind]
                yield _event("content_block_start", {"index": index, "content_block": block})
            if d.kind == "content":
                delta = {"type": "text_delta", "text": d.text}
            elif d.kind == "reasoning":
                delta = {"type": "thinking_delta", "thinking": d.text}
            else:
                delta, calls = {"type": "input_json_delta", "partial_json": d.tool_call.arguments}, calls + 1
            yield _event("content_block_delta", {"index": index, "delta": delta})
        if kind == "done":
            if value is None:
                return
            if open_kind is not None:
                yield _event("content_block_stop", {"index": index})
            yield _event(
                "message_delta",
                {
                    "delta": {"stop_reason": _stop_reason(value, calls), "stop_sequence": None},
                    "usage": {"output_tokens": value.completion_tokens},
                },
            )
            yield _event("message_stop", {})
