"""What the server's routes share: the served model's name, its tokenizer, the engine process's client,
the metrics, the Responses API's stored responses, and the checks every completion request passes before
it reaches the engine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..excerpt import excerpt
from ..generation.guided import GuidedDecoding
from ..text.tokenizer import Tokenizer
from .engine_client import EngineClient
from .metrics import Metrics
from .bounds import Bounds
from .protocol import APIError, ChatCompletionRequest, CompletionRequest
from .response_store import ResponseStore

PREPARE_WORKERS = 2  # requests parsed, tokenized and compiled at once; more queue (each is bounded in size)


@dataclass
class ServerState:
    model_name: str
    tokenizer: Tokenizer | None = None
    engine: EngineClient | None = None
    load_error: str | None = None  # the tokenizer's (the engine process reports its own)
    metrics: Metrics = field(default_factory=Metrics)
    guided: GuidedDecoding | None = None
    longest_token: int = 1  # bytes of the tokenizer's longest token, found when it loads
    responses: ResponseStore = field(default_factory=ResponseStore)  # the Responses API's stored responses
    workers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="minillm-prepare"))

    def guided_decoding(self, vocab_size: int) -> GuidedDecoding:
        """Grammars compiled here too, so a bad schema is a 400 before the request reaches the engine."""
        if self.guided is None:
            self.guided = GuidedDecoding(self.tokenizer, vocab_size, self.tokenizer.eos_token_ids)
        return self.guided

    @property
    def bounds(self) -> Bounds:
        """What a request's raw JSON must fit (once ready): the context and the KV cache."""
        limits = self.engine.limits
        return Bounds(limits.max_seq_len, limits.max_cached_tokens, self.longest_token)

    @property
    def error(self) -> str | None:
        return self.load_error or (self.engine.error if self.engine else None)

    def ready(self) -> EngineClient:
        """The engine, or a 503 while the model loads or after the engine process has died."""
        if self.error is not None or self.engine is None or not self.engine.ready or self.tokenizer is None:
            raise APIError(503, self.error or "the model is still loading", kind="service_unavailable")
        return self.engine

    def admit(self, body: CompletionRequest | ChatCompletionRequest) -> EngineClient:
        """The engine for a completion request, checked in this order: readiness, its fields, its model."""
        engine = self.ready()
        body.check()
        self.check_model(body.model)
        return engine

    def check_model(self, model: str | None) -> None:
        """A request may name the served model, or none."""
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {excerpt(repr(model))} does not exist; this server serves "
                                f"{self.model_name!r}",
                           "model", kind="not_found_error", code="model_not_found")
