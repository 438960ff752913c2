"""One generation at a time: a worker thread behind a bounded queue, and the async side that reads it.

The model holds one state and streams experts from one disk, so requests are served one after
the other. `submit` refuses (QueueFull) once `max_queue` requests already wait behind the running
one; the app answers those with 503 and Retry-After. Every job carries a threading.Event that the
HTTP side sets when its client goes away, which stops the generation between two tokens (or skips
the job if it has not started).
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """make(cancel) runs on the worker thread and returns an iterable of text pieces with counters."""

    make: Callable[[threading.Event], object]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def put(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class Worker:
    def __init__(self, max_queue: int = 16):
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.pending = 0  # running + waiting
        self.finished: collections.deque = collections.deque(maxlen=64)  # recent generations (tests, /health)
        self._thread = threading.Thread(target=self._loop, name="flashmoe-generate", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return max(self.pending - 1, 0)

    def submit(self, make: Callable[[threading.Event], object]) -> Job:
        """Queue a job for the current event loop, or raise QueueFull."""
        with self._lock:
            if self.pending > self.max_queue:  # one runs, max_queue may wait
                raise QueueFull(f"{self.waiting} requests are already waiting (--max-queue {self.max_queue})")
            self.pending += 1
        job = Job(make, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def close(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            gen = None
            try:
                if job.cancel.is_set():  # the client left while waiting
                    job.put("done", None)
                    continue
                gen = job.make(job.cancel)
                for text in gen:
                    job.put("text", text)
                job.put("done", gen)
            except Exception as e:  # reported to this request only; the worker keeps serving
                job.put("error", e)
            finally:
                if gen is not None:
                    self.finished.append(gen)
                with self._lock:
                    self.pending -= 1


async def job_events(job: Job, is_disconnected: Callable, poll_s: float = 0.25) -> AsyncIterator[tuple]:
    """Yield the job's ("text", str) events, then one ("done", generation) or ("error", exc).

    Polls `is_disconnected()` while waiting, and cancels the job whenever the consumer stops early
    (client gone, response task cancelled), so an abandoned request never keeps the model busy.
    """
    getter, loop = None, asyncio.get_running_loop()
    checked = loop.time()
    try:
        while True:
            getter = getter or asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({getter}, timeout=poll_s)
            if (
                loop.time() - checked >= poll_s
            ):  # also while text flows: a non-streaming client sees none of it
                checked = loop.time()
                if await is_disconnected():
                    return
            if not done:
                continue
            kind, value = getter.result()
            getter = None
            yield kind, value
            if kind != "text":
                return
    finally:
        job.cancel.set()
        if getter is not None:
            getter.cancel()
