"""The OpenAI-compatible server, live on 127.0.0.1, driven by the real `openai` client and httpx.

The built-in tiny model writes gibberish, so the tool-call path is tested with a scripted session
that streams fixed text through the same worker, parser and response code.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn

import flashmoe_pack
from flashmoe_pack.engine.session import Session
from flashmoe_pack.server import create_app

MSG = [{"role": "user", "content": "What is the weather like today?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
# What the model writes after a prompt that opened "<think>\n".
CALL_TEXT = (
    "I should call the tool.\n</think>\n\n<tool_call>\n<function=get_weather>\n"
    "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
)


class _ScriptedGeneration:
    """Generation look-alike: yields fixed pieces (with a delay), honours cancel."""

    def __init__(self, pieces, delay, cancel, n_prompt):
        self.pieces, self.delay, self.cancel = pieces, delay, cancel
        self.prompt_tokens, self.cached_tokens, self.token_ids, self.finish_reason = n_prompt, 0, [], None

    @property
    def completion_tokens(self):
        return len(self.token_ids)

    def __iter__(self):
        for p in self.pieces:
            if self.cancel is not None and self.cancel.is_set():
                self.finish_reason = "cancelled"
                return
            time.sleep(self.delay)
            self.token_ids.append(0)
            yield p
        self.finish_reason = "stop"


class ScriptedSession(Session):
    """A real Session, unless `script` is set: then generations stream the scripted pieces."""

    script: list[str] | None = None
    delay = 0.0

    def generate(
        self, ids, max_tokens=64, sampling=None, stop=(), stop_ids=None, cancel=None, checkpoints=(), **kw
    ):
        if self.script is None:
            return super().generate(ids, max_tokens, sampling, stop, stop_ids, cancel, checkpoints, **kw)
        return _ScriptedGeneration(list(self.script), self.delay, cancel, len(ids))


@contextmanager
def live_server(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and t.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)


@pytest.fixture(scope="module")
def srv():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from 2 threads, and loses much on a busy box
    session = ScriptedSession(flashmoe_pack.load())
    app = create_app(session=session, max_queue=4)
    try:
        with live_server(app) as url:
            yield url, session, app.state.server
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def script(srv):
    _, session, _ = srv

    def set_script(pieces, delay=0.0):
        session.script, session.delay = pieces, delay

    yield set_script
    session.script, session.delay = None, 0.0


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv[0] + "/v1", api_key="unused", max_retries=0)


def _alive(url):
    r = httpx.post(url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
    assert r.status_code == 200, r.text


def _wait_idle(st, timeout=20.0):
    deadline = time.time() + timeout
    while st.worker.pending:
        assert time.time() < deadline, "the worker is still busy"
        time.sleep(0.02)


def test_models_and_health(srv, client):
    assert [m.id for m in client.models.list().data] == ["default-v1"]
    h = httpx.get(srv[0] + "/health").json()
    assert h["status"] == "ok" and h["model"] == "default-v1"


def test_chat_streaming_matches_non_streaming_and_seed_reproduces(client):
    kw = dict(
        model="default-v1",
        messages=MSG,
        max_tokens=12,
        temperature=0.9,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    msg = a.choices[0].message
    text = (getattr(msg, "reasoning_content", None) or "") + (msg.content or "")
    assert (
        a.usage.completion_tokens == 12
        and a.usage.prompt_tokens > 0
        and a.choices[0].finish_reason == "length"
    )
    assert b.choices[0].message == msg  # same seed, same text (the second one reuses the prompt's state)
    assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(
        (getattr(c.choices[0].delta, "reasoning_content", None) or "") + (c.choices[0].delta.content or "")
        for c in chunks
        if c.choices
    )
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"
    other = client.chat.completions.create(**{**kw, "seed": 8})
    assert other.choices[0].message != msg


def test_tool_calls_reach_the_response(client, script):
    script([CALL_TEXT[i : i + 5] for i in range(0, len(CALL_TEXT), 5)])
    r = client.chat.completions.create(model="default-v1", messages=MSG, tools=[WEATHER])
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.reasoning_content == "I should call the tool."
    assert m.tool_calls[0].function.name == "get_weather"
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris"}
    chunks = list(
        client.chat.completions.create(model="default-v1", messages=MSG, tools=[WEATHER], stream=True)
    )
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(
        model="default-v1", messages=MSG, tools=[WEATHER], tool_choice="none"
    )
    assert none.choices[0].message.tool_calls is None and "get_weather" in none.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="default-v1",
            messages=MSG,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )


def test_tool_results_in_history_and_prefix_reuse(srv, client):
    _, session, _ = srv
    first = [{"role": "system", "content": "You are a helpful assistant."}, *MSG]
    client.chat.completions.create(model="default-v1", messages=first, tools=[WEATHER], max_tokens=4)
    history = first + [
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "I should call the tool.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    before = session.total_prefilled_tokens
    r = client.chat.completions.create(model="default-v1", messages=history, tools=[WEATHER], max_tokens=4)
    prefilled = session.total_prefilled_tokens - before
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    assert 0 < prefilled < r.usage.prompt_tokens  # only the new turns were prefilled
    assert prefilled == r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens


def test_completions_and_stop_strings(client):
    kw = dict(model="default-v1", prompt="The quick brown fox", max_tokens=16, temperature=0.9, seed=3)
    r = client.completions.create(**kw, extra_body={"ignore_eos": True})
    text = r.choices[0].text
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length" and len(text) > 8
    stop = text[6:9]
    cut = text[: text.index(stop)]
    r = client.completions.create(**kw, stop=[stop, "never"], extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**kw, stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_errors_and_server_keeps_serving(srv):
    url, _, st = srv
    post = lambda body, **kw: httpx.post(url + "/v1/chat/completions", **({"json": body} | kw))  # noqa: E731
    cases = [
        (httpx.post(url + "/v1/chat/completions", content=b"{not json"), 400, None),
        (post({"model": "gpt-4o", "messages": MSG}), 404, "model"),
        (post({"messages": MSG, "temperature": -1}), 400, "temperature"),
        (post({"messages": MSG, "n": 2}), 400, "n"),
        (post({"messages": MSG, "max_tokens": "many"}), 400, "max_tokens"),
        (post({"messages": []}), 400, "messages"),
        (httpx.get(url + "/v1/nothing"), 404, None),
    ]
    for r, status, param in cases:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]

    def broken(*a, **kw):
        raise RuntimeError("expert record checksum mismatch")

    st.session.generate = broken
    try:
        for stream in (False, True):
            r = post({"messages": MSG, "stream": stream})
            assert (r.status_code == 500) != stream and "checksum mismatch" in r.text
    finally:
        del st.session.generate
    old, st.max_context = st.max_context, 64
    try:
        r = post({"messages": [{"role": "user", "content": "word " * 100}]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "context_length_exceeded"
    finally:
        st.max_context = old
    _alive(url)


def test_queue_full_is_503(srv, script):
    url, _, st = srv
    script(["x"] * 20, delay=0.05)
    st.worker.max_queue = 0
    try:
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json={"messages": MSG, "stream": True}
        ) as first:
            lines = first.iter_lines()
            next(lines)
            r = httpx.post(url + "/v1/chat/completions", json={"messages": MSG})
            assert (
                r.status_code == 503
                and r.headers["retry-after"]
                and r.json()["error"]["code"] == "queue_full"
            )
            assert sum(1 for line in lines if line.startswith("data:")) > 10
    finally:
        st.worker.max_queue = 4
    _wait_idle(st)
    _alive(url)


def test_disconnect_cancels_generation(srv, script):
    url, _, st = srv
    body = {"messages": MSG, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:  # the real model
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    _wait_idle(st)
    gen = st.worker.finished[-1]
    assert gen.finish_reason == "cancelled" and gen.completion_tokens < 400
    script(["x"] * 200, delay=0.02)  # non-streaming: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={"messages": MSG}, timeout=0.5)
    _wait_idle(st)
    assert (
        st.worker.finished[-1].finish_reason == "cancelled" and st.worker.finished[-1].completion_tokens < 150
    )


def test_anthropic_messages(srv, script):
    url = srv[0]
    script([CALL_TEXT])
    body = {
        "model": "default-v1",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],
    }
    r = httpx.post(url + "/v1/messages", json=body).json()
    assert [b["type"] for b in r["content"]] == ["thinking", "tool_use"] and r["stop_reason"] == "tool_use"
    assert r["content"][1]["input"] == {"city": "Paris"}
    text = httpx.post(url + "/v1/messages", json={**body, "stream": True}).text
    events = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events
