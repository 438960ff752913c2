"""Generation over a persistent model state with prompt-prefix reuse: the engine under `chat` and `serve`.

    session = Session(model)
    gen = session.generate(ids, max_tokens=64, sampling=SamplingParams(0.0), stop=["\\n\\n"], cancel=event)
    for text in gen: print(text, end="")
    gen.finish_reason, gen.prompt_tokens, gen.cached_tokens, gen.completion_tokens

A state cannot be cut back to an earlier position (the GatedDeltaNet layers keep one recurrent
matrix, not a per-token history), so reuse works on exact prefixes: the session keeps a small LRU of
snapshots keyed by the token ids they hold, taken at the checkpoints the caller names (turn
boundaries), after every prefill and after every generation. A new prompt starts from the longest
snapshot whose ids are a prefix of it and prefills only the rest.

Prefill is split at the checkpoints and on a fixed grid of `prefill_chunk` positions, so a prompt
prefilled from scratch and the same prompt resumed from a snapshot go through the same chunks and
give the same logits bit for bit: seeded sampling stays reproducible whatever the cache holds.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .sampler import SamplingParams, sample


def state_bytes(obj, _seen=None) -> int:
    """Bytes of the tensors reachable from a model state (dicts, lists and plain objects)."""
    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(state_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(state_bytes(v, seen) for v in vars(obj).values())
    return 0


@dataclass
class _Snapshot:
    state: object  # never run forward on it: restore() hands out clones
    logits: torch.Tensor  # float32 [V], the next-token logits after the last id
    nbytes: int


class PrefixCache:
    """LRU of model-state snapshots keyed by the token ids they hold, bounded in entries and bytes."""

    def __init__(self, max_entries: int = 8, max_bytes: int = 2 << 30):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[tuple[int, ...], _Snapshot] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, ids: tuple[int, ...], state, logits: torch.Tensor) -> None:
        if self.max_entries <= 0 or not ids:
            return
        if ids in self._items:
            self._items.move_to_end(ids)
            return
        snap = _Snapshot(state, logits, state_bytes(state) + logits.nbytes)
        if snap.nbytes > self.max_bytes:
            return
        self._items[ids] = snap
        self.bytes += snap.nbytes
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes

    def longest_prefix(self, ids: list[int]) -> tuple[tuple[int, ...], _Snapshot] | None:
        """The snapshot with the most ids that are a prefix of `ids` (marked recently used), or None."""
        best = None
        for key, snap in self._items.items():
            if (
                len(key) <= len(ids)
                and (best is None or len(key) > len(best[0]))
                and tuple(ids[: len(key)]) == key
            ):
                best = (key, snap)
        if best is not None:
            self._items.move_to_end(best[0])
        return best

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


class _StopStrings:
    """Cut generated text at the first stop string, holding back a tail that could still start one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """New text -> (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generation:
    """One generation: iterate it for text pieces; the counters are final once iteration ends.

    finish_reason: "stop" (end-of-sequence id or stop string), "length" (max_tokens) or "cancelled".
    context_ids: the ids of prompt and every generated token, i.e. what a next turn appended to this
    one starts with (reusing this generation's state).
    """

    def __init__(
        self,
        session: Session,
        ids: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop: Iterable[str],
        stop_ids: Iterable[int] | None,
        cancel: threading.Event | None,
        checkpoints: Iterable[int],
        skip_special_tokens: bool,
    ):
        if not ids:
            raise ValueError("the prompt is empty: nothing to condition on")
        self._session, self.prompt_ids = session, list(ids)
        self.max_tokens, self.sampling = max_tokens, sampling
        self._stops = _StopStrings(stop)
        model = session.model
        self._stop_ids = set(model.eos_ids if stop_ids is None else stop_ids)
        self._cancel = cancel or threading.Event()
        self._checkpoints = sorted({c for c in checkpoints if 0 < c < len(ids)})
        self._skip_special = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.prompt_tokens, self.cached_tokens, self.prefilled_tokens = len(ids), 0, 0
        self.ttft_s = self.decode_s = 0.0
        self.store_hits = self.store_misses = 0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_ids(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    @property
    def decode_tok_s(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def __iter__(self) -> Iterator[str]:
        s = self._session
        with s._lock:  # one generation at a time per session: the model state is not shareable
            store0 = s.model.store.stats.snapshot()
            try:
                yield from self._run()
            finally:
                st = s.model.store.stats
                self.store_hits, self.store_misses = st.hits - store0.hits, st.misses - store0.misses
                s.total_prompt_tokens += self.prompt_tokens
                s.total_cached_tokens += self.cached_tokens
                s.total_completion_tokens += self.completion_tokens
                if self.finish_reason is None:  # the consumer stopped iterating
                    self.finish_reason = "cancelled"

    def _prefill(self, state, start: int) -> torch.Tensor | None:
        """Feed prompt_ids[start:] in chunks split at checkpoints and the chunk grid; snapshot each
        checkpoint and the end. Returns the last logits, or None when cancelled."""
        s, ids, chunk = self._session, self.prompt_ids, self._session.prefill_chunk
        cuts = sorted(
            {c for c in self._checkpoints if c > start}
            | {len(ids)}
            | set(range((start // chunk + 1) * chunk, len(ids), chunk))
        )
        logits, pos = None, start
        for end in cuts:
            if self._cancel.is_set():
                return None
            logits = s.model.model.forward(torch.tensor(ids[pos:end], dtype=torch.long), state, last_only=True)[-1]
            self.prefilled_tokens += end - pos
            s.total_prefilled_tokens += end - pos
            pos = end
            if end in self._checkpoints or end == len(ids):
                s.cache.put(tuple(ids[:end]), state.clone(), logits)
        return logits

    def _run(self) -> Iterator[str]:
        s, ids = self._session, self.prompt_ids
        model = s.model
        t0 = time.perf_counter()
        hit = s.cache.longest_prefix(ids)
        if hit is not None:
            key, snap = hit
            state, logits, self.cached_tokens = snap.state.clone(), snap.logits, len(key)
        else:
            state, logits = model.model.new_state(), None
        if self.cached_tokens < len(ids):
            logits = self._prefill(state, self.cached_tokens)
            if logits is None:
                self.finish_reason = "cancelled"
                return
        fed = list(ids)  # the ids `state` holds
        gen = self.sampling.generator()
        dec = model.tokenizer.stream_decoder(skip_special_tokens=self._skip_special)
        t_first, broken = None, False
        try:
            while True:
                if self._cancel.is_set():
                    self.finish_reason = "cancelled"
                    return
                if len(self.token_ids) >= self.max_tokens:
                    self.finish_reason = "length"
                    break
                if self.token_ids:
                    tok = self.token_ids[-1]
                    logits = model.decode_step(tok, state)
                    fed.append(tok)
                p = self.sampling
                tok = sample(logits, p.temperature, p.top_p, p.top_k, gen)
                self.token_ids.append(tok)
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    self.ttft_s = now - t0
                self.decode_s = now - t_first
                if tok in self._stop_ids:
                    self.finish_reason = "stop"
                    break
                out, hit_stop = self._stops.feed(dec.step(tok))
                if out:
                    self.text += out
                    yield out
                if hit_stop:
                    self.finish_reason = "stop"
                    return
            out, _ = self._stops.feed(dec.flush())
            out += self._stops.flush()
            if out:
                self.text += out
                yield out
        except Exception:
            broken = True  # forward may have failed halfway through a token: the state is not `fed`
            raise
        finally:
            # The working state is no longer needed: keep it as the snapshot of what it holds.
            if len(fed) > len(ids) and not broken:
                s.cache.put(tuple(fed), state, logits)


class Session:
    """A model plus a prefix cache of states; `generate` runs one generation at a time."""

    def __init__(
        self, model, max_snapshots: int = 8, snapshot_bytes: int = 2 << 30, prefill_chunk: int = 512
    ):
        self.model = model
        self.cache = PrefixCache(max_snapshots, snapshot_bytes)
        self.prefill_chunk = prefill_chunk
        self._lock = threading.Lock()
        self.total_prompt_tokens = self.total_cached_tokens = self.total_prefilled_tokens = 0
        self.total_completion_tokens = 0

    def generate(
        self,
        ids: list[int],
        max_tokens: int = 64,
        sampling: SamplingParams | None = None,
        stop: Iterable[str] = (),
        stop_ids: Iterable[int] | None = None,
        cancel: threading.Event | None = None,
        checkpoints: Iterable[int] = (),
        skip_special_tokens: bool = True,
    ) -> Generation:
        """A generation of up to `max_tokens` after prompt `ids` (nothing runs until it is iterated).

        stop: strings that end generation (not included in the text); stop_ids: token ids that end it
        (default: the model's end-of-sequence ids, not included in the text either). cancel: set it
        from any thread to stop between two tokens (or two prefill chunks). checkpoints: prompt
        positions (e.g. the end of the previous turn) at which to keep a snapshot for later prompts.
        """
        return Generation(
            self,
            ids,
            max_tokens,
            sampling or SamplingParams(temperature=0.0),
            stop,
            stop_ids,
            cancel,
            checkpoints,
            skip_special_tokens,
        )

    def reset(self) -> None:
        """Forget every snapshot."""
        with self._lock:
            self.cache.clear()
