"""The OpenAI-compatible HTTP API (FastAPI): the routes /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics. This process tokenizes, shapes responses (responses.py) and streams; the
continuous-batching engine runs in its own process (engine_core.py), reached through `EngineClient`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation.guided import GuidedDecoding
from ..loading import ModelLoadError, load_tokenizer
from ..text.tokenizer import Tokenizer
from .engine_client import EngineClient
from .guard import Guard
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest
from .responses import respond
from .tools import template_messages


@dataclass
class ServerState:
    model_name: str
    tokenizer: Tokenizer | None = None
    engine: EngineClient | None = None
    load_error: str | None = None  # the tokenizer's (the engine process reports its own)
    metrics: Metrics = field(default_factory=Metrics)
    guided: GuidedDecoding | None = None

    def guided_decoding(self, vocab_size: int) -> GuidedDecoding:
        """Grammars compiled here too, so a bad schema is a 400 before the request reaches the engine."""
        if self.guided is None:
            self.guided = GuidedDecoding(self.tokenizer.backend, vocab_size, self.tokenizer.eos_token_ids)
        return self.guided

    @property
    def error(self) -> str | None:
        return self.load_error or (self.engine.error if self.engine else None)


def create_app(model: str | None, model_name: str, llm_options: dict | None = None, api_key: str | None = None,
               public_metrics: bool = False, max_body_bytes: int = 16 << 20, stream_timeout: float = 30.0) -> FastAPI:
    """Serve `model` (a path; None: the bundled model), loaded with `LLM(model, **llm_options)` in the engine's
    own process at start-up; /health says 503 until it is ready, and again if that process dies.
    With `api_key`, every path but /health (and /metrics if `public_metrics`) answers 401 without it.
    A stream whose client reads nothing for `stream_timeout` seconds once its buffer is full is aborted."""
    state = ServerState(model_name)

    def load_tokenizer_in_background() -> None:
        try:
            tokenizer, _ = load_tokenizer(model)
            if tokenizer is None:
                raise ModelLoadError(f"{model} has no tokenizer (tokenizer.json); the server needs one")
            state.tokenizer = tokenizer
        except Exception as err:  # reported by /health
            state.load_error = f"{type(err).__name__}: {err}"

    async def lifespan(app: FastAPI):
        state.engine = EngineClient(model, llm_options or {}, stall_timeout=stream_timeout)
        threading.Thread(target=load_tokenizer_in_background, name="minillm-tokenizer", daemon=True).start()
        yield
        state.engine.close()

    app = FastAPI(title="MiniLLM", lifespan=lifespan)
    app.state.minillm = state
    app.add_middleware(Guard, api_key=api_key, public={"/health"} | ({"/metrics"} if public_metrics else set()),
                       max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, "the request body is not valid JSON").body(), status_code=400)
        param = loc[0] if loc else None
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(APIError(400, message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if err.status_code == 404 else str(err.detail)
        return JSONResponse(APIError(err.status_code, message, kind=kind).body(), status_code=err.status_code)

    def ready() -> EngineClient:
        if state.error is not None or state.engine is None or not state.engine.ready or state.tokenizer is None:
            raise APIError(503, state.error or "the model is still loading", kind="service_unavailable")
        return state.engine

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                           "model", kind="not_found_error", code="model_not_found")

    @app.get("/health")
    async def health() -> Response:
        try:
            ready()
        except APIError:
            return JSONResponse({"status": "error" if state.error else "loading", "detail": state.error},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(state.engine.stats if state.engine else None),
                        media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        ready()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "minillm"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine = ready()
        body.check()
        check_model(body.model)
        prompts = _prompt_ids(body.prompt, state.tokenizer)
        return await respond(request, engine, state, body, prompts, chat=False, logprobs=body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        engine = ready()
        body.check()
        check_model(body.model)
        functions, tokenizer = body.tool_functions(), state.tokenizer
        native = tokenizer.template_renders_tools
        messages = template_messages([m.model_dump(exclude_none=True) for m in body.messages], functions,
                                     body.tool_choice, native)
        try:
            ids = tokenizer.encode_chat(messages, tools=[{"type": "function", "function": f} for f in functions]
                                        if functions and native else None)
        except ValueError as err:  # the template refused the conversation
            raise APIError(400, str(err), "messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        tool_calls = None if not functions else "forced" if body.constraint()[0] == "tools" else "auto"
        return await respond(request, engine, state, body, [ids], chat=True, logprobs=logprobs, tool_calls=tool_calls)

    return app


def _prompt_ids(prompt: Any, tokenizer: Tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be empty", "prompt")
    try:
        ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    except ValueError as err:
        raise APIError(400, str(err), "prompt") from None
    if any(not p for p in ids):
        raise APIError(400, "prompt must not be empty", "prompt")
    return ids
