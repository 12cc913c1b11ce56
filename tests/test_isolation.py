"""A request that breaks the math or the model fails alone: the others in its steps get exactly the
tokens they get alone. And a stream nobody reads is paused, then aborted, freeing its blocks."""

import asyncio
import time
from dataclasses import replace

import pytest

from minillm import RequestFailed, SamplingParams
from minillm.engine import LLMEngine
from minillm.server.engine_client import EngineClient

PROMPTS = ["The capital of France is", "List three colours:", "def fibonacci(n):", "Water boils at"]
POISON = 1234  # a token id the broken forward below refuses


def fresh_engine(smollm) -> LLMEngine:
    """On the LLM's own engine settings (its float16 KV cache for the bundled GGUF file), 16 sequences at once."""
    config = replace(smollm.engine.config, max_num_seqs=16)
    return LLMEngine(smollm.model, smollm.tokenizer, smollm.eos_token_ids, config)


def innocent_params():
    return [SamplingParams(max_tokens=10, temperature=0), SamplingParams(max_tokens=10, temperature=0.9, seed=7),
            SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.3),
            SamplingParams(max_tokens=10, temperature=0.7, top_p=0.9, seed=3, logprobs=2)]


def run(eng: LLMEngine, requests):
    ids = [eng.add_request(prompt, params) for prompt, params in requests]
    out = {i: ([], None, None) for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            tokens, _, _ = out[o.request_id]
            out[o.request_id] = (tokens + o.token_ids, o.finish_reason, o.error)
    return [out[i] for i in ids]


def alone(smollm, prompt, params):
    return run(fresh_engine(smollm), [(prompt, params)])[0]


def test_non_finite_rows_fail_alone(smollm):
    """Sampling values that slipped past validation (set after it ran) break only their rows."""
    eng = fresh_engine(smollm)
    expected = [alone(smollm, p, q) for p, q in zip(PROMPTS, innocent_params())]
    poisoned = []
    for field, value in (("temperature", 1e-300), ("frequency_penalty", float("inf")), ("repetition_penalty", 0.0),
                         ("presence_penalty", float("nan"))):
        params = SamplingParams(max_tokens=10, temperature=0.8)
        object.__setattr__(params, field, value)
        poisoned.append(("Tell me a story", params))
    requests = [r for pair in zip(zip(PROMPTS, innocent_params()), poisoned) for r in pair]  # interleaved
    results = run(eng, requests)
    assert results[0::2] == expected
    for tokens, reason, error in results[1::2]:
        assert reason == "error" and "non-finite" in error
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_a_failing_forward_fails_only_its_request(smollm, monkeypatch):
    """A step that raises is run again sequence by sequence; only the one that fails alone fails."""
    eng = fresh_engine(smollm)
    expected = [alone(smollm, p, q) for p, q in zip(PROMPTS, innocent_params())]
    forward = eng.runner.forward

    def broken(ids, *args, **kwargs):
        if POISON in ids.tolist():  # the packed step's tokens [N]
            raise RuntimeError("simulated kernel failure")
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(eng.runner, "forward", broken)
    bad_prompt = smollm.tokenizer.encode("Tell me") + [POISON]
    requests = list(zip(PROMPTS, innocent_params()))
    requests.insert(2, (bad_prompt, SamplingParams(max_tokens=10, temperature=0)))
    results = run(eng, requests)
    tokens, reason, error = results.pop(2)
    assert reason == "error" and "simulated kernel failure" in error and tokens == []
    assert results == expected
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_llm_reports_a_failed_request(smollm):
    bad = SamplingParams(max_tokens=5, temperature=0.5)
    object.__setattr__(bad, "temperature", 1e-300)
    good = SamplingParams(max_tokens=5, temperature=0)
    outputs = smollm.generate(["Hello", "Hello"], [bad, good])
    assert outputs[0].finish_reason == "error" and outputs[0].error
    assert outputs[1].error is None and outputs[1].token_ids == smollm.generate("Hello", good)[0].token_ids
    with pytest.raises(RequestFailed, match="non-finite"):
        list(smollm.stream("Hello", bad))
    assert smollm.engine.blocks.num_free == smollm.engine.blocks.num_blocks


@pytest.mark.slow
def test_a_stream_nobody_reads_is_paused_then_aborted(smollm):
    """The server's engine client (the engine in its own process): a reader that falls 8 outputs
    behind pauses its stream; catching up resumes it; reading nothing for 1.5 s aborts it."""
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    client = EngineClient(None, {"max_num_seqs": 4}, max_buffered=8, stall_timeout=1.5)

    async def until(condition, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)

    async def main():
        await until(lambda: client.ready)
        _, outputs = client.submit(smollm.tokenizer.encode("Once upon a time"), params, group="one")
        await until(lambda: (client.stats or {}).get("paused") == 1)
        await asyncio.sleep(0.2)  # outputs of the steps before the pause landed
        held = outputs.qsize()
        await asyncio.sleep(0.5)
        assert outputs.qsize() == held and 8 <= held <= 16  # no more tokens while nobody reads
        for _ in range(held):  # the reader catches up: the stream resumes
            await outputs.get()
        await until(lambda: outputs.qsize() >= 8)
        await asyncio.sleep(2.5)  # then it stops reading for longer than the timeout
        items = [outputs.get_nowait() for _ in range(outputs.qsize())]
        assert isinstance(items[-1], RequestFailed) and "read nothing" in str(items[-1])
        assert all(not isinstance(i, BaseException) for i in items[:-1])
        await until(lambda: client.stats["running"] == 0 and client.stats["free_blocks"] == client.stats["num_blocks"])
        return sum(len(i.token_ids) for i in items[:-1]) + held

    try:
        assert asyncio.run(main()) < params.max_tokens
    finally:
        client.close()
