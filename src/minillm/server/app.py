"""The HTTP API (FastAPI): OpenAI's /v1/completions, /v1/chat/completions, /v1/responses, /v1/embeddings and
/v1/models, Anthropic's /v1/messages, llama.cpp's /tokenize and /detokenize, /health and /metrics, and a chat
page at / (web_ui.py). This process tokenizes, shapes responses (responses.py and each API's format) and
streams; the continuous-batching engine runs in its own process (engine_core.py), reached through `EngineClient`."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..loading import ModelLoadError, load_tokenizer
from .bounds import longest_token_bytes
from .engine_client import EngineClient
from .formats import ChatFormat, CompletionFormat
from .guard import Guard
from .prepare import chat_job, completion_job, prepare
from .anthropic_api import MessagesFormat, count_tokens, messages_job
from .embeddings import embed, embeddings_job
from .protocol import APIError, error_shape, validation_error
from .responses import respond
from .responses_api import ResponsesFormat, responses_job
from .state import ServerState
from .tokens import detokenize, tokenize
from .web_ui import WEB_UI_PATHS, add_web_ui


def create_app(model: str | None, model_name: str, llm_options: dict | None = None, api_key: str | None = None,
               public_metrics: bool = False, max_body_bytes: int = 16 << 20, stream_timeout: float = 30.0,
               read_timeout: float = 30.0, engine_timeout: float = 60.0,
               max_queue_wait: float | None = None, web_ui: bool = True) -> FastAPI:
    """Serve `model` (a path; None: the bundled model), loaded with `LLM(model, **llm_options)` in the engine's
    own process at start-up; /health says 503 until it is ready, and again if that process dies.
    With `api_key`, every path but /health (and /metrics if `public_metrics`, and the chat page's files if
    `web_ui`: the page asks for the key itself) answers 401 without it.
    A stream whose client reads nothing for `stream_timeout` seconds once its buffer is full is aborted; a
    body not all there `read_timeout` seconds after its request's head gets 408 (the head's own deadline is
    the connection's: connection.py). An engine process that dies or answers no ping for `engine_timeout`
    seconds is restarted (engine_client.py). A request that waits more than `max_queue_wait` seconds for the
    engine to start it gets 503."""
    state = ServerState(model_name)
    app = FastAPI(title="MiniLLM", lifespan=_lifespan(state, model, llm_options, stream_timeout, engine_timeout,
                                                                 max_queue_wait))
    app.state.minillm = state
    public = {"/health"} | ({"/metrics"} if public_metrics else set()) | (WEB_UI_PATHS if web_ui else set())
    app.add_middleware(Guard, api_key=api_key, public=public, max_body_bytes=max_body_bytes, body_timeout=read_timeout)
    _add_error_handlers(app)
    _add_info_routes(app, state)
    _add_completion_routes(app, state)
    _add_agent_routes(app, state)
    _add_token_routes(app, state)
    if web_ui:
        add_web_ui(app)
    return app


def _lifespan(state: ServerState, model: str | None, llm_options: dict | None, stream_timeout: float,
              engine_timeout: float, max_queue_wait: float | None) -> Callable[[FastAPI], AsyncIterator[None]]:
    """Start the engine process and load the tokenizer beside it, so /health answers at once."""
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine = EngineClient(model, llm_options or {}, stall_timeout=stream_timeout,
                                    engine_timeout=engine_timeout, max_queue_wait=max_queue_wait)
        threading.Thread(target=_load_tokenizer, args=(state, model, (llm_options or {}).get("chat_template")),
                         name="minillm-tokenizer", daemon=True).start()
        yield
        state.workers.shutdown(wait=False, cancel_futures=True)
        state.engine.close()

    return lifespan


def _load_tokenizer(state: ServerState, model: str | None, chat_template: str | None) -> None:
    try:
        tokenizer, _ = load_tokenizer(model, chat_template)  # the template LLM(chat_template=...) uses too
        if tokenizer is None:
            raise ModelLoadError(f"{model} has no tokenizer (tokenizer.json); the server needs one")
        state.longest_token = longest_token_bytes(tokenizer)
        state.tokenizer = tokenizer
    except Exception as err:  # reported by /health
        state.load_error = f"{type(err).__name__}: {err}"


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in the called API's shape (Anthropic's under /v1/messages, else OpenAI's): ours, pydantic's
    refusals of a body, and Starlette's 404 and 405."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(error_shape(request.url.path)), status_code=err.status)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return await _api_error(request, validation_error(err.errors()))


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    message = f"no route {request.method} {request.url.path}" if err.status_code == 404 else str(err.detail)
    return await _api_error(request, APIError(err.status_code, message, kind=kind))


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        try:
            state.ready()
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
        state.ready()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "minillm"}]}


def _add_completion_routes(app: FastAPI, state: ServerState) -> None:
    """Each body is parsed, checked and tokenized in a worker thread (prepare.py), never on the event loop."""
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await respond(request, state, await prepare(state, request, completion_job), CompletionFormat)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await respond(request, state, await prepare(state, request, chat_job), ChatFormat)


def _add_agent_routes(app: FastAPI, state: ServerState) -> None:
    """The APIs agents and SDKs speak beside chat completions, each translated into a chat request
    (responses_api.py, anthropic_api.py) and then served as one."""
    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await respond(request, state, await prepare(state, request, responses_job), ResponsesFormat)

    @app.get("/v1/responses/{response_id}")
    async def stored_response(response_id: str) -> dict:
        return state.responses.get(response_id).response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict:
        state.responses.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await respond(request, state, await prepare(state, request, messages_job), MessagesFormat)

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(request: Request) -> dict:
        return await prepare(state, request, count_tokens)


def _add_token_routes(app: FastAPI, state: ServerState) -> None:
    """Tokens without generating: llama.cpp's /tokenize and /detokenize, and embeddings."""
    @app.post("/tokenize")
    async def tokenize_text(request: Request) -> dict:
        return await prepare(state, request, tokenize)

    @app.post("/detokenize")
    async def detokenize_ids(request: Request) -> dict:
        return await prepare(state, request, detokenize)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        body, prompts = await prepare(state, request, embeddings_job)
        return await embed(state, body, prompts)
