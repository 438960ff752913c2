"""`flashmoe-pack chat` through a pseudo-terminal, and its tool loop with a scripted model."""

from __future__ import annotations

import builtins
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

import flashmoe_pack
from flashmoe_pack.commands.chat import SHELL_TOOL, Conversation, _converse
from flashmoe_pack.engine.sampler import SamplingParams


class Term:
    """A child process on a pty: send keys, wait for output."""

    def __init__(self, args, env):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True, start_new_session=True
        )
        os.close(slave)
        self.fd, self.out, self.pos = master, "", 0

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        """Wait for `pattern` in the output after the previous match."""
        deadline = time.time() + timeout
        while True:
            m = re.compile(pattern, re.S).search(self.out, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.time()
            assert left > 0 and self.proc.poll() is None or select.select([self.fd], [], [], 0)[0], (
                f"timed out waiting for {pattern!r}; output:\n{self.out[-2000:]}"
            )
            if select.select([self.fd], [], [], min(max(left, 0), 0.5))[0]:
                try:
                    self.out += os.read(self.fd, 65536).decode("utf-8", "replace").replace("\r\n", "\n")
                except OSError:  # EIO: the child closed the terminal
                    raise AssertionError(
                        f"the chat exited waiting for {pattern!r}; output:\n{self.out[-2000:]}"
                    ) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.fd)


STATS = r"prompt (\d+) tokens, (\d+) reused, (\d+) prefilled.*?\n> "


def test_chat_in_a_terminal(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm"}
    args = [
        sys.executable,
        "-c",
        "from flashmoe_pack.cli import app; app()",
        "chat",
        "--max-tokens",
        "6",
        "--seed",
        "1",
        "--history",
        str(tmp_path / "history"),
    ]
    t = Term(args, env)
    try:
        t.expect(r"/help for commands.*?> ")
        t.send("Hello there\r")
        t.expect(r"Hello there.*?\n> ")
        t.send("/stats\r")
        prompt1, reused1, _ = map(int, t.expect(r"last reply: \d+ tokens, [\d.]+ tok/s.*?" + STATS).groups())
        assert reused1 == 0 and prompt1 > 0
        t.send("And what about tomorrow?\r")
        t.expect(r"tomorrow\?.*?\n> ")
        t.send("/stats\r")
        prompt2, reused2, prefilled2 = map(int, t.expect(STATS).groups())
        assert (
            reused2 >= prompt1 and prefilled2 == prompt2 - reused2 and prefilled2 < 40
        )  # history not prefilled
        t.send("/reset\r")
        t.expect(r"\[conversation reset\].*?> ")
        t.send("/exit\r")
        assert t.proc.wait(30) == 0
        assert "Hello there" in (tmp_path / "history").read_text()
    finally:
        t.close()


class _Scripted:
    """A session look-alike: each generate() streams the next scripted reply; records the prompts."""

    def __init__(self, model, replies):
        self.model, self.replies, self.prompts = model, list(replies), []

    def generate(self, ids, max_tokens, sampling, cancel=None, checkpoints=()):
        self.prompts.append(self.model.tokenizer.decode(ids))
        text, eos = self.replies.pop(0), self.model.eos_ids[-1]

        class Gen:
            token_ids = self.model.tokenizer.encode(text) + [eos]
            context_ids = list(ids) + token_ids
            finish_reason = "stop"

            def __iter__(self):
                yield text

        return Gen()


CALL = (
    "Let me look.\n</think>\n\n<tool_call>\n<function={name}>\n<parameter={key}>\n{value}\n</parameter>\n"
    "</function>\n</tool_call>"
)


@pytest.fixture(scope="module")
def model():
    return flashmoe_pack.load()


@pytest.mark.parametrize("answer,expected", [("y", "exit status 0\nflashmoe-ok"), ("n", "The user declined")])
def test_shell_tool_asks_before_running(model, monkeypatch, capsys, answer, expected):
    session = _Scripted(
        model, [CALL.format(name="shell", key="command", value="echo flashmoe-ok"), "Done.</think>ok"]
    )
    conv = Conversation(session, None, [SHELL_TOOL], True, SamplingParams(0.0), 16, 4096)
    asked = []
    monkeypatch.setattr(builtins, "input", lambda q="": asked.append(q) or answer)
    _converse(conv, [{"role": "user", "content": "list files"}], set())
    assert asked == ["run `echo flashmoe-ok`? [y/N] "]
    assert "[tool call] shell" in capsys.readouterr().out
    second = session.prompts[1]
    assert second.startswith(session.prompts[0])  # the same conversation, extended: no re-render of history
    assert f"<tool_response>\n{expected}" in second and second.endswith("<|im_start|>assistant\n<think>\n")


def test_user_tool_result_is_typed(model, monkeypatch):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    session = _Scripted(model, [CALL.format(name="get_weather", key="city", value="Paris"), "</think>Sunny."])
    conv = Conversation(session, "Be brief.", [weather], True, SamplingParams(0.0), 16, 4096)
    monkeypatch.setattr(builtins, "input", lambda q="": "21 C and sunny")
    _converse(conv, [{"role": "user", "content": "weather?"}], {"get_weather"})
    assert "<tool_response>\n21 C and sunny\n</tool_response>" in session.prompts[1]
    assert len(session.prompts) == 2 and conv.context[-1] in model.eos_ids
