"""`LLMEngine`: continuous batching over a paged KV cache, driven one step at a time.

add_request() queues a request, step() runs one scheduled forward pass and returns what every
affected request produced (new tokens, new final text, whether it finished), abort() drops a
request and frees its blocks at once. `LLM` and the server are built on this loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache.paged_cache import bytes_per_block
from ..excerpt import excerpt
from ..model.transformer import MiniLLM
from ..runtime import tune_allocator
from ..sampling_params import SamplingParams
from ..text.detokenizer import IncrementalDetokenizer
from ..text.tokenizer import Tokenizer
from .block_manager import BlockManager
from .drafters import make_drafter
from .gpu_memory import kv_cache_bytes
from ..generation.guided import GuidedDecoding
from ..generation.sampler import TokenLogprobs
from .model_runner import ModelRunner, RowError, RunnerFailed
from .settings import EngineConfig, resolve
from .scheduler import ScheduledStep, Scheduler
from .sequence import Sequence

logger = logging.getLogger("minillm")


@dataclass
class RequestState:
    detokenizer: IncrementalDetokenizer | None  # None: an engine on token ids only (no tokenizer), no text
    generator: torch.Generator | None
    end_ids: set[int]  # EOS ids (unless ignore_eos) and stop_token_ids
    matcher: Any = None  # the grammar state of a guided request (generation/guided.py)


@dataclass
class StepOutput:
    """What one request produced in one step."""

    request_id: str
    text: str  # newly final text (may be "")
    token_ids: list[int]  # new tokens
    finish_reason: str | None  # "stop" | "length" | "error" once finished
    logprobs: list[TokenLogprobs] | None = None  # for token_ids, when the request asked
    error: str | None = None  # why the request failed (finish_reason "error"); the others go on

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A whole request's result, as `generate` collects it (and `LLM` returns it)."""

    prompt: str | None  # the text prompt, if it was given as text
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (EOS, stop token or stop string), "length", or "error" (see `error`)
    error: str | None = None  # why this request failed; the others in the batch are unaffected


class RequestFailed(RuntimeError):
    """A request that failed while it ran (the others in its steps went on)."""


@dataclass(frozen=True)
class PromptLimits:
    """What a prompt must fit, known without the engine (the server checks requests in its own process)."""

    vocab_size: int
    max_seq_len: int
    max_cached_tokens: int
    has_tokenizer: bool = True

    def check(self, ids: list[int], params: SamplingParams) -> None:
        """A prompt must be non-empty, inside the vocabulary, and leave room for its new tokens in the
        model's context and in the KV cache."""
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        total = len(ids) + params.max_tokens
        if total > self.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; with max_tokens={params.max_tokens} that is {total}, "
                             f"beyond the model's context of {self.max_seq_len} tokens")
        if total > self.max_cached_tokens:
            raise ValueError(f"the prompt has {len(ids)} tokens; with max_tokens={params.max_tokens} that is {total}, "
                             f"more than the whole KV cache holds ({self.max_cached_tokens} tokens)")
        if params.stop and not self.has_tokenizer:
            raise ValueError("stop strings need a tokenizer; this engine runs on token ids only")


class LLMEngine:
    def __init__(self, model: MiniLLM, tokenizer: Tokenizer | None, eos_token_ids: Seq[int],
                 config: EngineConfig | None = None, runner: Callable[..., ModelRunner] = ModelRunner) -> None:
        """runner: makes the model runner, as ModelRunner(model, num_blocks, block_size, settings, max_batch); a
        tensor-parallel rank 0's (parallel/driver.py) sends each step to the other ranks too."""
        tune_allocator()
        self.model, self.tokenizer = model, tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.config = config = (config or EngineConfig()).for_device(model.device)
        self.settings = settings = resolve(model, config)
        block_bytes = bytes_per_block(model.config, config.block_size, settings.kv_dtype)
        kv_bytes = config.kv_cache_memory
        if kv_bytes is None:
            kv_bytes = 1 << 30 if model.device.type != "cuda" else kv_cache_bytes(
                model, settings.attention, config.gpu_memory_utilization, config.max_num_batched_tokens,
                config.max_num_seqs, config.block_size)
        # No point holding more than every running sequence at full context could use.
        useful = config.max_num_seqs * -(-model.config.max_seq_len // config.block_size)
        num_blocks = min(kv_bytes // block_bytes, useful)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={kv_bytes} bytes cannot hold one block of "
                             f"{config.block_size} tokens ({block_bytes} bytes)")
        # RoPE that depends on the sequence's length (longrope, dynamic): a block's K/V depend on more than
        # its prefix, so blocks cannot be shared between sequences
        self.recompute_at = model.rope.switch_at + 1 if model.rope.long is not None else None
        prefix_caching = config.enable_prefix_caching and model.rope.switch_at is None
        if config.enable_prefix_caching and not prefix_caching:
            logger.info("prefix caching is off: this model's RoPE depends on each sequence's length")
        self.blocks = BlockManager(num_blocks, config.block_size, prefix_caching)
        if config.tensor_parallel_size > 1 and runner is ModelRunner:
            raise ValueError("tensor_parallel_size > 1: the ranks are started by LLM(..., tensor_parallel_size=N), "
                             "which loads each rank's shard")
        self.runner = runner(model, num_blocks, config.block_size, settings, config.max_num_seqs)
        self.drafter = None if settings.speculative is None else make_drafter(
            settings.speculative, model, tokenizer, self.runner, num_blocks, config.block_size, config)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   None if self.drafter is None else self.drafter.draft_lens)
        self.compile_seconds = 0.0
        if config.compile:
            start = time.perf_counter()
            self.runner.warmup()
            self.compile_seconds = time.perf_counter() - start
            logger.info("compiled the engine step in %.1f s", self.compile_seconds)
        self.requests: dict[str, Sequence] = {}
        self.stalled = False
        self.guided = None if tokenizer is None else GuidedDecoding(tokenizer, model.config.vocab_size,
                                                                    self.eos_token_ids)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens at most, %.1f MiB",
                    num_blocks, config.block_size, self.max_cached_tokens, self.runner.cache.nbytes / 2**20)

    @property
    def failure(self) -> str | None:
        """Why no step can run any more (a tensor-parallel rank died); None while steps can."""
        return self.runner.failure

    @property
    def max_cached_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None, group: str | None = None) -> str:
        """Queue a request; a prompt that can never run is refused here with a ValueError. Requests of one
        `group` (one server request's n choices) share the engine fairly with other groups (scheduler.py)."""
        params = params or SamplingParams()
        if isinstance(prompt, str) and self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; this engine runs on token ids only")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self.check_prompt(ids, params)
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(ids, params, request_id, group)
        generator = None if params.seed is None else torch.Generator(self.model.device).manual_seed(params.seed)
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        detokenizer = None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer, params.stop)
        seq.state = RequestState(detokenizer, generator, ends, self.guided.matcher(params) if params.guided else None)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    @property
    def limits(self) -> PromptLimits:
        config = self.model.config
        return PromptLimits(config.vocab_size, config.max_seq_len, self.max_cached_tokens, self.tokenizer is not None)

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        """The prompt fits (PromptLimits), and a guided request's schema, regex or choices compile."""
        self.limits.check(ids, params)
        if params.guided:
            if self.guided is None:
                raise ValueError("guided decoding needs a tokenizer; this engine runs on token ids only")
            self.guided.grammar(params)

    def abort(self, request_id: str) -> None:
        """Stop a request (a client went away); its blocks are free when this returns."""
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    def pause(self, request_id: str, paused: bool = True) -> None:
        """Hold (or release) a request's decoding while its consumer is not reading; it keeps its blocks."""
        seq = self.requests.get(request_id)
        if seq is not None:
            seq.paused = paused

    def expire(self, max_wait: float) -> list[StepOutput]:
        """End the requests that have waited more than `max_wait` seconds without starting (finish reason
        "timeout"), so that a client hears at once that the server is too busy rather than waiting on."""
        outputs = []
        for seq in self.scheduler.expired(max_wait):
            self.scheduler.finish(seq, "timeout")
            self.requests.pop(seq.request_id, None)
            outputs.append(StepOutput(seq.request_id, "", [], "timeout",
                                      error=f"the request waited more than {max_wait:g} s for the engine to start it"))
        return outputs

    def close(self) -> None:
        """Stop what the engine started beyond this process (a tensor-parallel engine's workers)."""
        self.runner.close()

    def reset_prefix_cache(self) -> None:
        self.blocks.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[StepOutput]:
        """One scheduled forward pass. A failure is the failing request's alone: a row whose logits
        are non-finite fails by itself, and if the whole step raises, each sequence is run again on
        its own (the same cache slots are rewritten, no random draw was made) and only those that
        still fail are failed, so every other request gets the tokens it would have had alone.
        With speculative decoding the drafter fills the draft slots the scheduler reserved, and a
        sequence may emit several tokens (engine/speculative.py)."""
        step = self.scheduler.schedule()
        self.stalled = step is None  # unfinished work that cannot run now (paused, or waiting for blocks)
        if step is None:
            return []
        if self.drafter is not None and any(step.draft_slots):
            step.set_drafts(self.drafter.propose(step.seqs, step.draft_slots))
        try:
            sampled = self.runner.run(step)
        except RunnerFailed as err:  # no step can run any more: every request fails with the reason
            return [self._fail(seq, str(err)) for seq in list(self.requests.values()) if not seq.is_finished]
        except Exception:
            logger.exception("a step of %d sequences failed; running each alone", len(step.seqs))
            sampled = [self._run_alone(seq, count, draft)
                       for seq, count, draft in zip(step.seqs, step.num_tokens, step.drafts)]
        outputs = []
        for seq, count, draft, result in zip(step.seqs, step.num_tokens, step.drafts, sampled):
            if isinstance(result, RowError):
                outputs.append(self._fail(seq, result.message))
            elif result is None:  # a prompt chunk
                seq.num_computed += count
                self.blocks.register_computed(seq)
            else:
                outputs.append(self._emit(seq, count, draft, result))
                if len(seq) == self.recompute_at and not seq.is_finished:
                    # longrope: the sequence now outgrows the original context, where every position takes the
                    # long factors; transformers' generate recomputes the whole cache at this point, and so do we
                    self.scheduler.recompute(seq)
        return outputs

    def _run_alone(self, seq: Sequence, count: int, draft: list[int]) -> list[tuple[int, TokenLogprobs | None]] | RowError | None:
        try:
            return self.runner.run(ScheduledStep([seq], [count], [draft]))[0]
        except Exception as err:
            logger.exception("request %s failed", seq.request_id)
            return RowError(f"internal error while running this request: {type(err).__name__}: {err}")

    def fail(self, request_id: str, message: str) -> StepOutput | None:
        """End a running request with finish reason "error" (its blocks are freed); None if it is not running."""
        seq = self.requests.get(request_id)
        return None if seq is None or seq.is_finished else self._fail(seq, message)

    def _fail(self, seq: Sequence, message: str) -> StepOutput:
        self.scheduler.finish(seq, "error")
        self.requests.pop(seq.request_id, None)
        return StepOutput(seq.request_id, "", [], "error", error=message)

    def _emit(self, seq: Sequence, count: int, draft: list[int],
              emitted: list[tuple[int, TokenLogprobs | None]]) -> StepOutput:
        """Append a sequence's new tokens (one, or after a draft its accepted tokens and one more) until one
        ends it. Every emitted token but the last equals its draft token, so those drafts' K/V are computed;
        the rejected ones' slots are not (later tokens overwrite them), and their blocks are given back."""
        accepted = len(emitted) - 1
        seq.num_computed += count - (len(draft) - accepted)
        if draft:
            self.drafter.update(seq, len(draft), accepted)
        text, tokens, logprobs, reason, error = "", [], [], None, None
        for token, token_logprobs in emitted:
            seq.token_ids.append(token)
            tokens.append(token)
            logprobs.append(token_logprobs)
            piece, reason, error = self._check_token(seq, token)
            text += piece
            if reason is not None or error is not None:
                break
        seq.num_computed = min(seq.num_computed, len(seq))  # an accepted draft that ended it: the rest is dropped
        self.blocks.register_computed(seq)
        if error is not None:
            return self._fail(seq, error)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.requests.pop(seq.request_id, None)
        elif self.drafter is not None:
            self.blocks.trim(seq, len(seq))
        return StepOutput(seq.request_id, text, tokens, reason, logprobs if logprobs[0] is not None else None)

    def _check_token(self, seq: Sequence, token: int) -> tuple[str, str | None, str | None]:
        """A new token's text, whether it ends the request ("stop", "length"), or why it fails it (a grammar
        that refuses it)."""
        state: RequestState = seq.state
        detokenizer = state.detokenizer
        if token in state.end_ids:  # EOS or a stop token: it ends the text and adds none
            return (detokenizer.finish() if detokenizer else ""), "stop", None
        text = detokenizer.add(token) if detokenizer else ""
        if state.matcher is not None and not state.matcher.consume_token(token):
            # its first line: the rest is the grammar library's internal state
            return "", None, (f"the grammar refused token {token}: "
                              f"{excerpt(state.matcher.get_error().split(chr(10))[0])}")
        if detokenizer and detokenizer.stopped:
            return text, "stop", None
        if state.matcher is not None and state.matcher.is_stopped():  # the schema / regex / choice is complete
            return text + (detokenizer.finish() if detokenizer else ""), "stop", None
        if seq.num_outputs >= seq.params.max_tokens:
            return text + (detokenizer.finish() if detokenizer else ""), "length", None
        return text, None, None

    def generate(self, prompts: Seq[list[int]], params: Seq[SamplingParams],
                 on_finish: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Run prompts (token ids) to completion together; results in input order. Every prompt is
        checked before any runs (the ValueError names the prompt); `on_finish` is called as each ends."""
        for i, (ids, p) in enumerate(zip(prompts, params)):
            try:
                self.check_prompt(ids, p)
            except ValueError as err:
                raise ValueError(f"prompt {i}: {err}") from None
        index = {self.add_request(ids, p): i for i, (ids, p) in enumerate(zip(prompts, params))}
        results = [RequestOutput(None, list(ids)) for ids in prompts]
        pending = set(index)
        try:
            while pending:
                for out in self.step():
                    if out.request_id not in pending:
                        continue
                    result = results[index[out.request_id]]
                    result.text += out.text
                    result.token_ids += out.token_ids
                    if out.finished:
                        result.finish_reason, result.error = out.finish_reason, out.error
                        pending.discard(out.request_id)
                        if on_finish is not None:
                            on_finish()
        finally:
            for request_id in pending:  # interrupted: free what the unfinished requests hold
                self.abort(request_id)
        return results

    def stats(self) -> dict[str, float]:
        queries = self.blocks.prefix_queries
        return {
            "running": len(self.scheduler.running),
            "paused": sum(s.paused for s in self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.blocks.usage,
            "free_blocks": self.blocks.num_free,
            "num_blocks": self.blocks.num_blocks,
            "prefix_cache_hit_rate": self.blocks.prefix_hits / queries if queries else 0.0,
            "prefix_cache_queries": queries,  # prompt tokens looked up, and of those found: cumulative counts that
            "prefix_cache_hits": self.blocks.prefix_hits,  # add up across engines (server replicas), unlike a rate
            "num_preemptions": self.scheduler.num_preemptions,
            **(self.drafter.stats() if self.drafter is not None else {}),
        }
