"""The OpenAI request shapes we accept, and their translation into `SamplingParams`.

Unknown extra fields are accepted and ignored (clients send them); known OpenAI fields that MiniLLM
does not implement are refused with a 400 naming the field, never silently dropped.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..excerpt import excerpt
from ..sampling_params import SamplingParams
from ..text.chat_template import RESERVED
from ..text.unicode import find_invalid_text
from .tools import check_tools, forced_call_schema

MAX_CHOICES = 128  # prompts x n in one request
MAX_MESSAGE_CHARS = 1000  # an error message at most (any input it quotes is cut to ~200 characters before)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self, shape: str = "openai") -> dict[str, Any]:
        """The error's JSON in the called API's shape: "openai" or "anthropic" (its type named by the
        status, as Anthropic's SDK reads it; no param: the message names the field)."""
        message = _printable(excerpt(self.message, MAX_MESSAGE_CHARS))
        if shape == "anthropic":
            kind = ANTHROPIC_ERROR_TYPES.get(self.status,
                                             "api_error" if self.status >= 500 else "invalid_request_error")
            return {"type": "error", "error": {"type": kind, "message": message}}
        return {"error": {"message": message, "type": self.kind,
                          "param": None if self.param is None else _printable(self.param), "code": self.code}}

    def renamed(self, names: dict[str, str]) -> APIError:
        """The same error with the chat endpoint's field names replaced by another API's (`names`: chat's ->
        theirs), for the APIs whose requests are checked as chat requests (responses_api, anthropic_api)."""
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
        param = None if self.param is None else pattern.sub(lambda m: names[m.group()], self.param)
        return APIError(self.status, pattern.sub(lambda m: names[m.group()], self.message), param, self.kind,
                        self.code)


def error_shape(path: str) -> str:
    """The shape of errors on a path: Anthropic's for its Messages API, OpenAI's everywhere else."""
    return "anthropic" if path.startswith("/v1/messages") else "openai"


# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors)
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
                         429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """pydantic's first complaint about a body as a 400 naming the field (never FastAPI's 422)."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    return APIError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}", loc[0] if loc else None)


def _printable(text: str) -> str:
    """Error texts may quote the client's input; a lone surrogate in it must not break the response."""
    return text.encode("utf-8", "replace").decode()


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    user: str | None = None
    # OpenAI fields MiniLLM does not implement: refused when set to anything but their default.
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    # structured output, vLLM's names (response_format's json_object / json_schema become guided_json)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    def check(self) -> None:
        """Refusals that pydantic's types do not express: text that is not valid Unicode (checked
        first: nothing else may quote it), then fields MiniLLM does not implement."""
        bad = find_invalid_text(self.model_dump())
        if bad is not None:
            raise APIError(400, f"{bad} is not valid Unicode (it holds a lone surrogate such as \\ud800)",
                           bad.split(".", 1)[0])
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if self.functions:
            raise APIError(400, "functions (the legacy form) is not supported; use tools", "functions")
        self.response_schema()
        if not 1 <= self.n <= 16:
            raise APIError(400, f"n must be between 1 and 16, got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options needs stream=true", "stream_options")

    def response_schema(self) -> dict[str, Any] | None:
        """The JSON schema response_format asks for (json_object: any object), None for text."""
        fmt = self.response_format
        kind = (fmt or {}).get("type", "text")
        if kind == "text":
            return None
        if self.guided_json is not None or self.guided_regex is not None or self.guided_choice is not None:
            raise APIError(400, "response_format and guided_json / guided_regex / guided_choice exclude each other",
                           "response_format")
        if kind == "json_object":
            return {"type": "object"}
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else None
        if kind != "json_schema" or not isinstance(schema, dict):
            raise APIError(400, "response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                                "'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}", "response_format")
        return schema  # strict or not, the output follows the schema exactly

    def constraint(self) -> tuple[str, dict[str, Any] | None]:
        """The JSON schema the reply must follow and the field that asked for it (or guided_* / none)."""
        schema = self.response_schema()
        return ("response_format", schema) if schema is not None else ("guided_json", self.guided_json)

    def constrained(self) -> bool:
        """Whether a grammar shapes the output (response_format, guided_*, a forced tool call)."""
        return self.constraint()[1] is not None or self.guided_regex is not None or self.guided_choice is not None

    def guided_field(self) -> str:
        """The request field a grammar error is about."""
        field, schema = self.constraint()
        if schema is not None:
            return field
        return next(f for f in ("guided_json", "guided_regex", "guided_choice") if getattr(self, f) is not None)

    def sampling_params(self, max_tokens: int, logprobs: int | None, seed_offset: int = 0) -> SamplingParams:
        schema = self.constraint()[1]
        try:
            return SamplingParams(
                guided_json=schema, guided_regex=self.guided_regex,
                guided_choice=self.guided_choice,
                max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, stop=self.stop, ignore_eos=self.ignore_eos,
                seed=self.seed if self.seed is None or not seed_offset else (self.seed + seed_offset) % 2**64,
                logprobs=logprobs)
        except ValueError as err:  # its message starts with the field's name (guided_*: the field asking for it)
            message = str(err)
            name = re.match(r"\w*", message).group()
            raise APIError(400, message, self.guided_field() if name.startswith("guided_") else name) from None

    def requested_max_tokens(self) -> int | None:
        value = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if value is not None and value < 1:
            name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            raise APIError(400, f"{name} must be at least 1, got {value}", name)
        return value


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        super().check()
        if self.tools:
            raise APIError(400, "tools are for /v1/chat/completions", "tools")
        if self.echo:
            raise APIError(400, "echo is not supported", "echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of other than n is not supported", "best_of")


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI's: the arguments as a JSON text


class ToolCall(BaseModel):
    """An earlier call of the assistant's, checked here so that a malformed one is a 400 naming it."""

    model_config = ConfigDict(extra="allow", strict=True)
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # other fields (name, ...) pass through to the template
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None  # parts checked by ChatCompletionRequest.check
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tool_choice: Any = None
    # the chat template's own arguments (vLLM's and llama.cpp's field); enable_thinking alone: Qwen3's switch
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None

    def template_kwargs(self) -> dict[str, Any]:
        """The chat template's own arguments: enable_thinking, then chat_template_kwargs (which win)."""
        thinking = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        return {**thinking, **(self.chat_template_kwargs or {})}

    def tool_functions(self) -> list[dict[str, Any]]:
        """The functions shown to the model (none for tool_choice "none")."""
        try:
            functions = check_tools(self.tools, self.tool_choice)
        except ValueError as err:
            message = str(err)
            raise APIError(400, message, re.match(r"\w*", message).group()) from None
        return [] if self.tool_choice == "none" else functions

    def constraint(self) -> tuple[str, dict[str, Any] | None]:
        forced = forced_call_schema(self.tool_functions(), self.tool_choice)
        if forced is None:
            return super().constraint()
        if super().constraint()[1] is not None or self.guided_regex is not None or self.guided_choice is not None:
            raise APIError(400, f"tool_choice {excerpt(self.tool_choice)} forces a tool call; it excludes "
                                "response_format and guided_*", "tool_choice")
        return "tools", forced

    def check(self) -> None:
        super().check()
        self._check_parts()
        self.constraint()
        reserved = [name for name in RESERVED if name in (self.chat_template_kwargs or {})]
        if reserved:
            raise APIError(400, f"chat_template_kwargs cannot set {reserved[0]!r}; the server sets it",
                           "chat_template_kwargs")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise APIError(400, f"top_logprobs must be in [0, 20], got {self.top_logprobs}", "top_logprobs")

    def _check_parts(self) -> None:
        """Content parts: text only (the served models read no images, audio or files), refused by name."""
        for i, message in enumerate(self.messages):
            for j, part in enumerate(message.content if isinstance(message.content, list) else []):
                kind = part.get("type")
                if kind != "text":
                    what = (f"{excerpt(kind, 40)!r} content parts are" if isinstance(kind, str)
                            else "a part without a type is")
                    raise APIError(400, f"messages[{i}].content[{j}]: {what} not supported; this server's model reads "
                                        "text only ({'type': 'text', 'text': ...})", "messages")
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content[{j}].text must be a string", "messages")
