"""`flashmoe-pack chat`: interactive multi-turn chat in the terminal, with tools.

The conversation lives in one model state: each turn appends only its new tokens (the template's
text for the new messages) to the ids already generated, and the session resumes from the state
left by the previous turn, so history is never prefilled again. This is llama.cpp's interactive
mode: earlier turns stay in context exactly as generated (thinking included).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import typer

from flashmoe_pack.commands import RESIDENT_HELP

SHELL_TOOL = {
    "type": "function",
    "function": {
        "name": "shell",
        "description": "Run a shell command on the user's machine and return its output. "
        "The user confirms every command before it runs.",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "the command"}},
            "required": ["command"],
        },
    },
}
HELP = (
    "/reset  forget the conversation    /system TEXT  set the system prompt (and reset)\n"
    "/think on|off  let the model think (shown dimmed)    /stats  speed and cache numbers\n"
    "/exit  quit (or Ctrl-D); Ctrl-C stops a reply"
)
_MARK = "\x00flashmoe-mark\x00"


class Conversation:
    """Messages in, streamed deltas out, over one Session whose state holds the whole conversation."""

    def __init__(
        self,
        session,
        system: str | None,
        tools: list[dict] | None,
        think: bool,
        sampling,
        max_tokens: int,
        max_context: int,
    ):
        self.session, self.tok = session, session.model.tokenizer
        self.system, self.tools, self.think, self.sampling = system, tools, think, sampling
        self.max_tokens, self.max_context = max_tokens, max_context
        self.context: list[int] = []  # ids of the conversation so far (prompts and generated tokens)
        self.ended = True  # the last assistant turn was closed by an end-of-sequence token
        self.last = None
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}],
            add_generation_prompt=False,
        )
        # What closes an assistant turn ("<|im_end|>\n"): added after a reply before the next turn.
        self.turn_end = text[text.index(_MARK) + len(_MARK) :]

    def reset(self) -> None:
        self.context, self.ended = [], True

    def _prompt(self, new: list[dict]):
        from ..server.prompts import Prompt, build_chat_prompt, continuation_ids

        kw = {"enable_thinking": self.think}
        sys_msgs = [{"role": "system", "content": self.system}] if self.system else []
        if not self.context:
            return build_chat_prompt(self.tok, sys_msgs + new, self.tools, None, kw)
        close = self.turn_end
        eos = self.tok.decode([self.context[-1]]) if self.ended else ""
        if eos and close.startswith(eos):
            close = close[len(eos) :]  # the model wrote the end token itself
        more = continuation_ids(self.tok, sys_msgs, new, self.tools, kw)
        reasoning = self.tok.decode(more[-4:]).rstrip().endswith("<think>")  # the template opened thinking
        return Prompt(
            self.context + self.tok.encode(close) + more, "", [len(self.context)], reasoning, self.tools
        )

    def turn(self, new: list[dict], cancel: threading.Event):
        """Yield parser deltas of the reply to `new` messages; `self.last` holds the generation after."""
        from ..chat.toolcalls import StreamParser

        prompt = self._prompt(new)
        room = self.max_context - len(prompt.ids)
        if room <= 0:
            raise ValueError(f"the conversation fills the context ({self.max_context} tokens): /reset")
        gen = self.session.generate(
            prompt.ids,
            min(self.max_tokens, room),
            self.sampling,
            cancel=cancel,
            checkpoints=prompt.checkpoints,
        )
        self.last, parser = gen, StreamParser("auto", reasoning=prompt.reasoning, tools=self.tools)
        try:
            for text in gen:
                yield from parser.feed(text)
            yield from parser.finish()
        finally:
            self.context = gen.context_ids
            self.ended = bool(gen.token_ids) and gen.token_ids[-1] in self.session.model.eos_ids


def _stream(turn, out) -> list:
    """Print a turn's deltas as they come (generation on a thread, so Ctrl-C cancels it cleanly)."""
    q: queue.Queue = queue.Queue()
    cancel = threading.Event()

    def work():
        try:
            for d in turn(cancel):
                q.put(("delta", d))
            q.put(("done", None))
        except Exception as e:
            q.put(("error", e))

    threading.Thread(target=work, daemon=True).start()
    calls, mode, dim = [], None, out.isatty()
    while True:
        try:
            kind, d = q.get(timeout=0.1)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            cancel.set()
            out.write("\n[stopped]")
            continue
        if kind == "error":
            raise d
        if kind == "done":
            break
        if d.kind == "tool_call":
            calls.append(d.tool_call)
            out.write(f"\n[tool call] {d.tool_call.name}({d.tool_call.arguments})")
        elif d.kind == "reasoning":
            out.write(("\x1b[2m" if dim and mode != "reasoning" else "") + d.text)
        else:
            out.write(("\x1b[0m\n" if dim and mode == "reasoning" else "") + d.text)
        mode = d.kind
        out.flush()
    out.write(("\x1b[0m" if dim else "") + "\n")
    out.flush()
    return calls


def _ask(question: str) -> str:
    try:
        return input(question)
    except EOFError:
        return ""


def _run_tool(call, user_tools: set[str]) -> str:
    try:
        args = json.loads(call.arguments)
    except json.JSONDecodeError:
        args = {}
    if call.name == "shell" and "shell" not in user_tools:
        cmd = str(args.get("command", ""))
        if _ask(f"run `{cmd}`? [y/N] ").strip().lower() not in ("y", "yes"):
            return "The user declined to run this command."
        try:
            r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return "The command timed out after 120 s."
        out = (r.stdout + r.stderr)[-8000:]
        print(out, end="" if out.endswith("\n") else "\n")
        return f"exit status {r.returncode}\n{out}"
    return _ask(f"result of {call.name} (type it, Enter to send)> ")


def _stats(conv: Conversation, store) -> str:
    g, s = conv.last, conv.session
    lines = [
        f"context {len(conv.context)} tokens; snapshots {len(s.cache)} ({s.cache.bytes / 2**20:.1f} MiB)",
        f"expert cache hit rate {store.stats.hit_rate:.1%} overall, "
        f"{store.stats.bytes_read / 2**20:.1f} MiB read from disk",
    ]
    if g is not None:
        n = g.store_hits + g.store_misses
        lines.insert(
            0,
            f"last reply: {g.completion_tokens} tokens, {g.decode_tok_s:.1f} tok/s, first token "
            f"{g.ttft_s:.2f} s; prompt {g.prompt_tokens} tokens, {g.cached_tokens} reused, "
            f"{g.prefilled_tokens} prefilled; hit rate {g.store_hits / n if n else 0:.1%}",
        )
    return "\n".join(lines)


def _load_tools(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    tools = data.get("tools", data) if isinstance(data, dict) else data
    if not isinstance(tools, list) or not all(
        isinstance((t.get("function") or {}).get("name"), str) for t in tools
    ):
        raise ValueError(
            f"{path}: expected a list of OpenAI tools [{{'type': 'function', 'function': {{'name': ...}}}}]"
        )
    return tools


def _history(path: Path | None):
    try:
        import readline
    except ImportError:  # no line editing on this platform
        return lambda: None
    if path is not None and path.is_file():
        readline.read_history_file(path)

    def save():
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.set_history_length(1000)
            readline.write_history_file(path)

    return save


def chat(
    model: Path | None = typer.Argument(None, help="Packed model folder (default: the built-in tiny model)."),
    system: str | None = typer.Option(None, help="System prompt."),
    tools: Path | None = typer.Option(None, help="JSON file of OpenAI tools; you type their results."),
    shell: bool = typer.Option(True, help="Offer the built-in `shell` tool (asks y/N before each command)."),
    think: bool = typer.Option(True, help="Let the model think before answering (/think on|off)."),
    max_tokens: int = typer.Option(1024, help="Maximum new tokens per reply."),
    temperature: float | None = typer.Option(None, help="Default: the model's generation_config."),
    top_p: float | None = typer.Option(None),
    top_k: int | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    history: Path | None = typer.Option(None, help="Readline history file (default: in the cache dir)."),
    experts_per_token: int | None = typer.Option(None, "--experts-per-token", "-k"),
    expert_cache: str | None = typer.Option(None, "--expert-cache", "--host-expert-cache",
                                            help="Byte budget of the runtime's expert cache in RAM "
                                                 "(default 'auto': what memory leaves; on cuda the host tier)."),
    gpu_expert_cache: str = typer.Option("auto", help="cuda: byte budget of the VRAM expert tier."),
    device: str = typer.Option("cpu", help="cpu | cuda | mps."),
    resident: str = typer.Option("auto", help=RESIDENT_HELP),
    cpu_dot: str = typer.Option("auto", help="CPU decode arithmetic: auto (int8 activations with AVX-512 VNNI, "
                                             "else f32) | f32 | int8."),
):
    """Chat with a model in the terminal (streaming, history, tools)."""
    from ..cli import _fail, _user_errors, host_cache, set_cpu_dot

    with _user_errors():
        from .. import load
        from ..engine.sampler import SamplingParams
        from ..engine.session import Session
        from ..server.app import _generation_defaults

        set_cpu_dot(cpu_dot, device)
        m = load(model, device=device, expert_cache=host_cache(expert_cache, device),
                 experts_per_token=experts_per_token, gpu_expert_cache=gpu_expert_cache, resident=resident)
        if m.tokenizer is None or m.tokenizer.chat_template is None:
            _fail(f"{m.path}: chat needs the model's tokenizer and chat template")
        d = _generation_defaults(m.path)  # the model's generation_config, where an option is not given
        sampling = SamplingParams(
            d["temperature"] if temperature is None else temperature,
            d["top_p"] if top_p is None else top_p,
            max(d["top_k"] if top_k is None else top_k, 0),
            seed,
        )
        tool_list = ([SHELL_TOOL] if shell else []) + (_load_tools(tools) if tools else [])
        user_tools = {t["function"]["name"] for t in tool_list if t is not SHELL_TOOL}
        ctx = getattr(m.config, "max_position_embeddings", None) or 32768
        conv = Conversation(Session(m), system, tool_list or None, think, sampling, max_tokens, ctx)
        cache = Path(os.environ.get("FLASHMOE_PACK_CACHE", Path.home() / ".cache" / "flashmoe-pack"))
        save = _history(history or cache / "chat_history")
        print(f"flashmoe-pack chat: {m.path.name}. /help for commands.", flush=True)
        try:
            while True:
                try:
                    line = input("> ").strip()
                except EOFError:
                    print()
                    break
                except KeyboardInterrupt:
                    print()
                    continue
                if not line:
                    continue
                cmd, _, arg = line.partition(" ")
                if cmd in ("/exit", "/quit"):
                    break
                if cmd == "/help":
                    print(HELP)
                elif cmd == "/reset":
                    conv.reset()
                    print("[conversation reset]")
                elif cmd == "/system":
                    if arg:
                        conv.system = arg.strip()
                        conv.reset()
                    print(f"[system: {conv.system or '(none)'}]")
                elif cmd == "/think" and arg in ("on", "off"):
                    conv.think = arg == "on"
                    print(f"[thinking {arg}]")
                elif cmd == "/stats":
                    print(_stats(conv, m.store))
                elif cmd.startswith("/") and cmd[1:].isalpha():
                    print(f"unknown command {line!r}\n{HELP}")
                else:
                    _converse(conv, [{"role": "user", "content": line}], user_tools)
        finally:
            save()


def _converse(conv: Conversation, new: list[dict], user_tools: set[str], rounds: int = 8) -> None:
    """One user message, then tool rounds while the model calls tools."""
    for _ in range(rounds):
        try:
            calls = _stream(lambda cancel, new=new: conv.turn(new, cancel), sys.stdout)
        except ValueError as e:
            print(f"error: {e}")
            return
        if not calls or conv.last.finish_reason == "cancelled":
            return
        new = [
            {"role": "tool", "tool_call_id": c.id, "name": c.name, "content": _run_tool(c, user_tools)}
            for c in calls
        ]


def register(app: typer.Typer) -> None:
    app.command()(chat)
