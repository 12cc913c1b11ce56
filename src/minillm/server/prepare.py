"""A request's body made ready for the engine in a worker thread, never on the event loop: parsed,
bounded, validated, tokenized (the chat template too), and every choice's limits and grammar checked.

Sizes come first, before anything costly: a body of more than `MAX_JSON_VALUES` values is refused
before it is parsed; then a prompt that cannot fit the model's context (more token ids than the
context, or more bytes of text than the context's worth of the longest token) before it is
tokenized. The Rust tokenizer and the grammar compiler release the GIL, and the Python work between
them yields it every few milliseconds, so /health and every stream keep being served meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..sampling_params import SamplingParams
from ..text.reasoning import Reasoning, reply_reasoning
from ..text.tokenizer import Tokenizer
from .bounds import Bounds
from .protocol import MAX_CHOICES, APIError, ChatCompletionRequest, CompletionRequest, validation_error
from .state import ServerState
from .tool_stream import ToolSyntax, tool_syntax
from .tools import template_messages

# json.loads holds the GIL throughout: ~0.1 s for 2**20 values here. Enough for 128 prompts of 8192 token ids.
MAX_JSON_VALUES = 1 << 20
PREPARE_TIMEOUT = 60.0  # seconds; compiling a grammar within the size limits takes well under one

RequestT = TypeVar("RequestT", CompletionRequest, ChatCompletionRequest)
ModelT = TypeVar("ModelT", bound=BaseModel)
ResultT = TypeVar("ResultT")


@dataclass
class Job:
    """A request ready for the engine: its body, its prompts as token ids, and each choice as (prompt, params)."""

    body: CompletionRequest | ChatCompletionRequest
    prompts: list[list[int]]
    logprobs: int | None  # top logprobs per token (0: the sampled token's alone); None: no logprobs
    runs: list[tuple[list[int], SamplingParams]] = field(default_factory=list)
    reasoning: Reasoning | None = None  # how a chat reply marks its reasoning (None: its template has none)
    tools: ToolSyntax | None = None  # how a chat reply writes tool calls (None: the request has no tools)
    api_body: Any = None  # the request in its own API's shape, where it was checked as a chat request


async def prepare(state: ServerState, request: Request, build: Callable[[ServerState, bytes], ResultT]) -> ResultT:
    """The body read here, the job (or a whole answer: count_tokens, /tokenize) built by `build` in a worker
    thread."""
    state.ready()
    raw = await request.body()
    future = asyncio.get_running_loop().run_in_executor(state.workers, build, state, raw)
    try:
        return await asyncio.wait_for(future, PREPARE_TIMEOUT)
    except asyncio.TimeoutError:
        raise APIError(503, f"the request could not be prepared within {PREPARE_TIMEOUT:g} s",
                       kind="service_unavailable") from None


def completion_job(state: ServerState, raw: bytes) -> Job:
    body = parse(raw, CompletionRequest, state.bounds)
    state.admit(body)
    job = Job(body, prompt_ids(body.prompt, state.tokenizer, state.bounds.max_seq_len), body.logprobs)
    return _planned(state, job, "prompt", default_max_tokens=lambda prompt_len, room: 16)


def chat_job(state: ServerState, raw: bytes) -> Job:
    return chat_body_job(state, parse(raw, ChatCompletionRequest, state.bounds))


def chat_body_job(state: ServerState, body: ChatCompletionRequest) -> Job:
    """A chat request's job; the Responses and Messages APIs' requests come here as chat requests too."""
    state.admit(body)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    ids = chat_prompt_ids(body, state.tokenizer)
    # read from the prompt's end (DeepSeek-R1's opens the section); a tag and its whitespace are a few tokens
    prompt_end = state.tokenizer.decode(ids[-32:], skip_special_tokens=False)
    tokenizer = state.tokenizer
    job = Job(body, [ids], logprobs, reasoning=reply_reasoning(tokenizer.chat_template, prompt_end),
              tools=tool_syntax(tokenizer.chat_template, tokenizer.template_renders_tools)
              if body.tool_functions() else None)
    # without max_tokens, a reply may fill the rest of its room (a completion gets 16 tokens, as OpenAI's)
    return _planned(state, job, "messages", default_max_tokens=lambda prompt_len, room: max(room - prompt_len, 1))


def parse(raw: bytes, model: type[RequestT], bounds: Bounds) -> RequestT:
    return validated(load_json(raw), model, bounds)


def load_json(raw: bytes) -> dict[str, Any]:
    """A body's JSON object, its size bounded before it is parsed."""
    if raw.count(b",") >= MAX_JSON_VALUES:
        raise APIError(413, f"the request body holds more than {MAX_JSON_VALUES} JSON values",
                       code="request_too_large")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def validated(data: dict[str, Any], model: type[ModelT], bounds: Bounds | None = None) -> ModelT:
    """`data` as a request `model`, its prompt's size checked first (`bounds`)."""
    if bounds is not None:
        bounds.check(data)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err.errors()) from None


def _planned(state: ServerState, job: Job, prompt_field: str,
             default_max_tokens: Callable[[int, int], int]) -> Job:
    """Every choice of every prompt with its params, each checked against the engine's limits and its
    grammar compiled, so that any refusal is a 400 before anything reaches the engine. A request's
    choices together may hold at most the whole KV cache (prompts plus max_tokens), so one request
    cannot claim the engine's whole capacity many times over; `default_max_tokens(prompt length, room)`
    is max_tokens when the request sets none, room being a choice's share of the context and the cache."""
    asked, n = job.body.requested_max_tokens(), job.body.n
    choices = len(job.prompts) * n
    if choices > MAX_CHOICES:
        raise APIError(400, f"{len(job.prompts)} prompts x n={n} is more than {MAX_CHOICES} choices in one request",
                       "prompt" if len(job.prompts) > 1 else "n")
    limits = state.engine.limits
    room = min(limits.max_seq_len, limits.max_cached_tokens // choices)
    for ids in job.prompts:
        max_tokens = asked if asked is not None else default_max_tokens(len(ids), room)
        for i in range(n):
            params = job.body.sampling_params(max_tokens, job.logprobs, seed_offset=i)
            try:
                limits.check(ids, params)
            except ValueError as err:
                raise APIError(400, str(err), prompt_field,
                               code="context_length_exceeded" if "context" in str(err) else None) from None
            if params.guided:  # compiled and checked here (cached: the engine compiles it again)
                try:
                    state.guided_decoding(limits.vocab_size).grammar(params)
                except ValueError as err:
                    raise APIError(400, str(err), job.body.guided_field()) from None
            job.runs.append((ids, params))
    total = sum(len(ids) + params.max_tokens for ids, params in job.runs)
    if total > limits.max_cached_tokens:
        raise APIError(400, f"the request's {choices} choices need {total} tokens (prompts plus max_tokens), more "
                            f"than the whole KV cache holds ({limits.max_cached_tokens}); lower n or max_tokens",
                       "n" if n > 1 else "prompt")
    return job


def prompt_ids(prompt: Any, tokenizer: Tokenizer, max_seq_len: int) -> list[list[int]]:
    """Each prompt as token ids, checked against the context as soon as it is tokenized."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be empty", "prompt")
    ids = []
    for i, p in enumerate(prompts):
        try:
            ids.append(tokenizer.encode(p) if isinstance(p, str) else list(p))
        except ValueError as err:
            raise APIError(400, str(err), "prompt") from None
        if not ids[-1]:
            raise APIError(400, "prompt must not be empty", "prompt")
        if len(ids[-1]) >= max_seq_len:
            raise APIError(400, f"prompt {i} has {len(ids[-1])} tokens, which leaves no room in the model's context "
                                f"of {max_seq_len} tokens", "prompt", code="context_length_exceeded")
    return ids


def chat_prompt_ids(body: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
    """The conversation through the chat template, with the tools as the template takes them (or as
    a system message where it ignores them)."""
    functions, native = body.tool_functions(), tokenizer.template_renders_tools
    messages = template_messages([m.model_dump(exclude_none=True) for m in body.messages], functions,
                                 body.tool_choice, native)
    try:
        return tokenizer.encode_chat(messages, tools=[{"type": "function", "function": f} for f in functions]
                                     if functions and native else None, **body.template_kwargs())
    except ValueError as err:  # the template refused the conversation
        raise APIError(400, str(err), "messages") from None
