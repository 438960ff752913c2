"""The OpenAI-compatible HTTP API over one model: create_app(model) -> FastAPI app.

POST /v1/chat/completions, POST /v1/completions, POST /v1/messages (Anthropic), GET /v1/models,
GET /health. Generations run one at a time on a worker thread (server/worker.py) over a Session
that reuses prompt prefixes; every error is an OpenAI-style body {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.sampler import SamplingParams
from ..engine.session import Session
from . import openai_api
from .prompts import PromptError
from .schemas import AnthropicRequest, ChatRequest, CompletionRequest
from .worker import QueueFull, Worker


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _generation_defaults(path: Path | None) -> dict:
    """temperature / top_p / top_k from the model's generation_config.json (OpenAI's defaults otherwise)."""
    out = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    cfg_file = Path(path) / "generation_config.json" if path is not None else None
    if cfg_file is not None and cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        out.update({k: cfg[k] for k in out if isinstance(cfg.get(k), (int, float))})
    return out


class ServerState:
    """What the handlers share: the session, the worker, the model's name and limits."""

    def __init__(self, session, name: str, max_queue: int, max_context: int | None):
        self.session, self.name = session, name
        self.tokenizer = session.model.tokenizer
        cfg_ctx = getattr(session.model.config, "max_position_embeddings", None)
        self.max_context = max_context or cfg_ctx or 32768
        self.defaults = _generation_defaults(getattr(session.model, "path", None))
        self.worker = Worker(max_queue)
        self.created = int(time.time())

    def check_model(self, requested: str | None) -> None:
        if requested and requested != self.name:
            raise APIError(
                404,
                f"The model '{requested}' does not exist; this server serves '{self.name}'.",
                param="model",
                code="model_not_found",
            )

    def sampling(self, req) -> SamplingParams:
        d = self.defaults
        temperature = d["temperature"] if req.temperature is None else req.temperature
        top_k = d["top_k"] if req.top_k is None else max(req.top_k, 0)
        return SamplingParams(
            temperature=temperature,
            top_p=d["top_p"] if req.top_p is None else req.top_p,
            top_k=top_k,
            seed=req.seed,
        )

    def budget(self, n_prompt: int, requested: int | None) -> int:
        """max_tokens for a prompt of n_prompt ids: 413 when the prompt alone fills the context."""
        room = self.max_context - n_prompt
        if room <= 0:
            raise APIError(
                413,
                f"This model's maximum context length is {self.max_context} tokens; the prompt "
                f"has {n_prompt} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        return min(requested or room, room)

    def submit(
        self,
        ids: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop: list[str],
        ignore_eos: bool = False,
        checkpoints=(),
    ):
        def make(cancel):
            return self.session.generate(
                ids,
                max_tokens,
                sampling,
                stop=stop,
                stop_ids=() if ignore_eos else None,
                cancel=cancel,
                checkpoints=checkpoints,
            )

        try:
            return self.worker.submit(make)
        except QueueFull as e:
            raise APIError(
                503,
                f"The server is busy: {e}. Retry later.",
                "server_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None


async def _body(request: Request, model_cls):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise APIError(
            400, f"Invalid value for '{param}': {err['msg']}", param=param, code="invalid_value"
        ) from None


def create_app(
    model=None,
    session: Session | None = None,
    name: str | None = None,
    max_queue: int = 16,
    max_context: int | None = None,
) -> FastAPI:
    """The API over `session` (or a new Session over `model`). name: what /v1/models lists and clients
    must ask for (default: the model folder's name). max_queue: requests that may wait behind the
    running one before 503. max_context: prompt + completion limit (default: the model config's)."""
    session = session or Session(model)
    path = getattr(session.model, "path", None)
    st = ServerState(session, name or (Path(path).name if path else "model"), max_queue, max_context)

    @asynccontextmanager
    async def lifespan(app):
        yield
        st.worker.close()

    app = FastAPI(title="flashmoe-pack", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = st

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return APIError(
            exc.status_code,
            str(exc.detail),
            code="not_found" if exc.status_code == 404 else None,
            type_="invalid_request_error",
        ).response()

    @app.exception_handler(openai_api.GenerationError)
    async def _gen_error(request, exc):
        return APIError(500, f"generation failed: {exc}", "server_error").response()

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return APIError(500, f"{type(exc).__name__}: {exc}", "server_error").response()

    @app.get("/health")
    async def health():
        s = st.session
        return {
            "status": "ok",
            "model": st.name,
            "running": min(st.worker.pending, 1),
            "waiting": st.worker.waiting,
            "max_queue": st.worker.max_queue,
            "tokens": {
                "prompt": s.total_prompt_tokens,
                "cached": s.total_cached_tokens,
                "prefilled": s.total_prefilled_tokens,
                "completion": s.total_completion_tokens,
            },
            "snapshots": len(s.cache),
            "snapshot_bytes": s.cache.bytes,
            "expert_cache_hit_rate": round(s.model.store.stats.hit_rate, 4),
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": st.name,
                    "object": "model",
                    "created": st.created,
                    "owned_by": "flashmoe-pack",
                    "max_model_len": st.max_context,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _body(request, ChatRequest)
        st.check_model(req.model)
        try:
            prompt = openai_api.chat_prompt(st.tokenizer, req)
        except PromptError as e:
            raise APIError(400, str(e), param=e.param) from None
        max_tokens = st.budget(len(prompt.ids), req.limit())
        job = st.submit(
            prompt.ids, max_tokens, st.sampling(req), req.stop_list(), req.ignore_eos, prompt.checkpoints
        )
        meta = openai_api.Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), st.name)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(openai_api.chat_stream(job, request, prompt, meta, include_usage))
        return await openai_api.chat_response(job, request, prompt, meta)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _body(request, CompletionRequest)
        st.check_model(req.model)
        p = req.prompt
        text = p if isinstance(p, str) else p[0] if isinstance(p[0], str) else None
        ids = st.tokenizer.encode(text) if text is not None else list(p)
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        max_tokens = st.budget(len(ids), req.limit() or 16)  # OpenAI's default for completions
        job = st.submit(ids, max_tokens, st.sampling(req), req.stop_list(), req.ignore_eos)
        meta = openai_api.Meta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), st.name)
        echo = (text if text is not None else st.tokenizer.decode(ids)) if req.echo else ""
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(openai_api.completion_stream(job, request, meta, echo, include_usage))
        return await openai_api.completion_response(job, request, meta, echo)

    @app.post("/v1/messages")
    async def messages(request: Request):
        from . import anthropic

        req = await _body(request, AnthropicRequest)
        st.check_model(req.model)
        try:
            prompt = anthropic.prompt(st.tokenizer, req)
        except PromptError as e:
            raise APIError(400, str(e), param=e.param) from None
        max_tokens = st.budget(len(prompt.ids), req.max_tokens)
        sampling = st.sampling(req.model_copy(update={"seed": None}))
        job = st.submit(prompt.ids, max_tokens, sampling, req.stop_sequences or [], False, prompt.checkpoints)
        meta = openai_api.Meta(f"msg_{uuid.uuid4().hex}", int(time.time()), st.name)
        if req.stream:
            return _sse(anthropic.stream(job, request, prompt, meta))
        return await anthropic.response(job, request, prompt, meta)

    return app


def _sse(events) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
