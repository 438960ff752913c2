"""Chat support: turning generated text into OpenAI-style content, reasoning and tool calls."""

from flashmoe_pack.chat.toolcalls import Delta, StreamParser, ToolCall, parse

__all__ = ["Delta", "StreamParser", "ToolCall", "parse"]
