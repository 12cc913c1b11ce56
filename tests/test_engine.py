"""The continuous-batching engine on the bundled model: batched equals alone, prefix caching,
preemption, seeds, aborts, bad requests. The engines take the LLM's own settings (its float16 KV cache for
the bundled GGUF file), so these run what ships."""

import random
from dataclasses import replace

import pytest
import torch

from minillm import SamplingParams, kernels
from minillm.attention import flash_attention_with_kv_cache, sdpa_attention, standard_attention
from minillm.attention.common import gather_pages
from minillm.cache.paged_cache import bytes_per_block
from minillm.engine import EngineConfig, LLMEngine
from minillm.model.ggml_decoder import GGMLDecoder

GREEDY = SamplingParams(max_tokens=12, temperature=0)
SYSTEM = "You are a helpful assistant who answers in one short sentence. Be precise and friendly. "


def prompts(tokenizer, n=32):
    rng = random.Random(0)
    words = "the cat sat on a mat while seven quick foxes jumped over lazy dogs near rivers and hills".split()
    out = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
        text = (SYSTEM if i % 3 == 0 else "") + f"Story {i}: {body}"
        out.append(tokenizer.encode(text))
    return out


def engine(smollm, **options):
    """A fresh engine on the LLM's own engine settings (the shipped defaults: for the bundled GGUF model a
    float16 KV cache), with the test's changes."""
    return LLMEngine(smollm.model, smollm.tokenizer, smollm.eos_token_ids, replace(smollm.engine.config, **options))


def block_bytes(smollm, block_size=16):
    """One KV block's bytes in the dtype of the LLM's own cache pools."""
    return bytes_per_block(smollm.model.config, block_size, smollm.engine.runner.cache.k[0].dtype)


def run_all(eng, prompt_ids, params):
    ids = [eng.add_request(p, params) for p in prompt_ids]
    tokens = {i: [] for i in ids}
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[i] for i in ids]


@pytest.fixture(scope="module")
def alone(smollm):
    """Each prompt run by itself (a fresh engine, no prefix cache)."""
    eng = engine(smollm, enable_prefix_caching=False)
    return [run_all(eng, [p], GREEDY)[0] for p in prompts(smollm.tokenizer)]


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.slow
def test_batched_equals_alone(smollm, alone, prefix_caching):
    eng = engine(smollm, enable_prefix_caching=prefix_caching, max_num_batched_tokens=256)
    assert eng.runner.cache.k[0].dtype == smollm.engine.runner.cache.k[0].dtype  # the shipped KV dtype
    assert run_all(eng, prompts(smollm.tokenizer), GREEDY) == alone
    stats = eng.stats()
    assert stats["running"] == stats["waiting"] == 0 and stats["free_blocks"] == stats["num_blocks"]
    if prefix_caching:
        assert stats["prefix_cache_hit_rate"] > 0.05  # the shared system prompt was reused
    else:
        assert stats["prefix_cache_hit_rate"] == 0


@pytest.mark.slow
def test_preemption_under_a_tiny_cache(smollm, alone):
    # 24 blocks of 16 tokens: the 32 prompts cannot all run at once, so sequences get preempted.
    eng = engine(smollm, kv_cache_memory=24 * block_bytes(smollm, 16), block_size=16, max_num_batched_tokens=256)
    assert eng.blocks.num_blocks == 24 and eng.runner.cache.nbytes == 24 * block_bytes(smollm, 16)
    assert run_all(eng, prompts(smollm.tokenizer), GREEDY) == alone
    assert eng.stats()["num_preemptions"] > 0
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_seeded_request_same_alone_and_in_a_busy_batch(smollm):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    target = smollm.tokenizer.encode("Write a short poem about autumn:")
    eng = engine(smollm)
    alone = run_all(eng, [target], params)[0]
    others = prompts(smollm.tokenizer, 8)
    mixed = [SamplingParams(max_tokens=10, temperature=0.7, top_k=20, seed=i) for i in range(8)]
    ids = [eng.add_request(p, sp) for p, sp in zip(others[:4], mixed[:4])]
    target_id = eng.add_request(target, params)
    ids += [eng.add_request(p, sp) for p, sp in zip(others[4:], mixed[4:])]
    got = []
    while eng.has_unfinished():
        for out in eng.step():
            if out.request_id == target_id:
                got += out.token_ids
    assert got == alone


def test_abort_frees_blocks_and_others_finish(smollm):
    eng = engine(smollm)
    a = eng.add_request("Tell me about the ocean.", SamplingParams(max_tokens=50, temperature=0))
    b = eng.add_request("Tell me about the desert.", SamplingParams(max_tokens=6, temperature=0))
    eng.step()
    eng.step()
    used = eng.blocks.num_blocks - eng.blocks.num_free
    eng.abort(a)
    assert eng.blocks.num_blocks - eng.blocks.num_free < used
    finished = []
    while eng.has_unfinished():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == [b] and eng.blocks.num_free == eng.blocks.num_blocks


def test_requests_that_can_never_run_are_refused(smollm):
    eng = engine(smollm, kv_cache_memory=8 * block_bytes(smollm), block_size=16)  # 8 blocks = 128 tokens
    ok = eng.add_request("Hello there", SamplingParams(max_tokens=4, temperature=0))
    with pytest.raises(ValueError, match="more than the whole KV cache holds \\(128 tokens\\)"):
        eng.add_request([5] * 120, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="beyond the model's context of 8192 tokens"):
        eng.add_request([5] * 8190, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="the prompt is empty"):
        eng.add_request([], SamplingParams())
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert outs[-1].request_id == ok and outs[-1].finished


@pytest.mark.parametrize("heads,kv_heads,page", [(4, 4, 16), (6, 2, 16), (8, 1, 32)])
@pytest.mark.parametrize("q_len", [1, 5, 40])
def test_paged_attention_equals_contiguous(heads, kv_heads, page, q_len):
    g = torch.Generator().manual_seed(0)
    lengths = [q_len + 3, 77, q_len + 100]
    pages = [(n + page - 1) // page for n in lengths]
    num_blocks = sum(pages) + 5
    k_pool = torch.randn(num_blocks, page, kv_heads, 64, generator=g)
    v_pool = torch.randn(num_blocks, page, kv_heads, 64, generator=g)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, start = [], 0
    for n in pages:
        tables.append(order[start:start + n] + [0] * (max(pages) - n))
        start += n
    table = torch.tensor(tables)
    q = torch.randn(3, heads, q_len, 64, generator=g)
    # the contiguous copy, built slot by slot
    k = torch.zeros(3, kv_heads, max(pages) * page, 64)
    v = torch.zeros_like(k)
    for b in range(3):
        for j in range(lengths[b]):
            k[b, :, j] = k_pool[tables[b][j // page], j % page]
            v[b, :, j] = v_pool[tables[b][j // page], j % page]
    assert torch.equal(gather_pages(k_pool, table)[:, :, :lengths[0]][0], k[0, :, :lengths[0]])
    ref = standard_attention(q, k, v, lengths)
    for tile_size in (16, 64):
        paged = flash_attention_with_kv_cache(q, k_pool, v_pool, lengths, tile_size=tile_size, block_table=table)
        assert (paged - ref).abs().max() <= 1e-5
    assert (flash_attention_with_kv_cache(q, k, v, lengths, tile_size=32) - ref).abs().max() <= 1e-5
    assert (sdpa_attention(q, k, v, lengths) - ref).abs().max() <= 1e-5


def test_fast_prefill_marks_prompt_rows_for_the_gemm(smollm, monkeypatch):
    """With fast_prefill, each step's prompt-chunk rows (after its decode rows) are marked for the bf16 GEMM
    (`PagedStep.gemm_from`); by default no row is."""
    def plans(eng):
        seen = []
        plan = eng.runner.plan
        monkeypatch.setattr(eng.runner, "plan", lambda inputs: seen.append(plan(inputs)) or seen[-1])
        run_all(eng, prompts(smollm.tokenizer, 8), GREEDY)
        return [plan for _, plan in seen]

    fast = plans(engine(smollm, fast_prefill=True, max_num_batched_tokens=64))
    expected = [next((int(plan.query_start[b]) for b, n in enumerate(plan.counts) if n > 1), len(plan.slot_index))
                for plan in fast]
    assert [plan.gemm_from for plan in fast] == expected
    assert any(0 < first < len(plan.slot_index) for first, plan in zip(expected, fast))  # a mixed step was seen
    assert {plan.gemm_from for plan in plans(engine(smollm))} == {-1}
    with pytest.raises(ValueError, match="fast_prefill"):
        engine(smollm, fast_prefill=True, attention_backend="sdpa", kv_cache_dtype=None)


@pytest.mark.skipif(kernels.best_isa() != "avx512_vnni" or "avx512_bf16" not in open("/proc/cpuinfo").read(),
                    reason="the bf16 GEMM prefill path needs AVX512-VNNI and AVX512-BF16")
def test_fast_prefill_computes_prompt_rows_as_a_gemm(smollm):
    """The fused decoder hands gemm_from to the kernels: prompt logits move (bf16), but stay close."""
    eng = engine(smollm, fast_prefill=True, enable_prefix_caching=False)
    ids = torch.tensor(prompts(smollm.tokenizer, 1)[0] * 4)[:96]

    def logits(prompt_gemm):
        plan = eng.runner.cache.plan([list(range(8))], [0], [len(ids)], eng.runner.attention, prompt_gemm=prompt_gemm)
        return eng.runner.forward(ids, plan)

    exact, fast = logits(False), logits(True)
    assert not torch.equal(fast, exact)
    assert (fast - exact).abs().max() <= 0.05 * exact.abs().max()
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


def test_fused_decoder_computes_the_same_bits_as_the_modules(smollm, monkeypatch):
    """The default setting runs every layer in one C++ op (GGMLDecoder, chosen by the runner); the modules'
    own path must give the same logits, bit for bit (log-probabilities of 24 greedy tokens, prefill and decode)."""
    runner = smollm.engine.runner
    assert isinstance(runner.forward.__self__, GGMLDecoder)
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=5)

    def run():
        out = []
        for delta in smollm.stream("The three laws of thermodynamics are", params):
            out += [(lp.token_id, lp.logprob, lp.top) for lp in delta.logprobs or []]
        return out

    fused = run()
    assert len(fused) == 24
    monkeypatch.setattr(runner, "forward", smollm.model.forward)
    assert run() == fused


def test_kv_cache_dtype(smollm, smollm_f32):
    """The default setting keeps K/V in float16 (llama.cpp's default), half the float32 setting's bytes a token;
    the float32 setting keeps them in float32 (HF parity). A 16-bit cache under float32 activations needs our
    C++ attention kernel: asked for elsewhere, it is a clear error."""
    assert smollm.engine.runner.cache.k[0].dtype == torch.float16
    assert smollm_f32.engine.runner.cache.k[0].dtype == torch.float32
    config = EngineConfig(kv_cache_dtype="float16", attention_backend="sdpa", kv_cache_memory=1 << 22)
    with pytest.raises(ValueError, match="can only be float16 under float32, with the 'paged_cpu' attention backend"):
        LLMEngine(smollm.model, smollm.tokenizer, smollm.eos_token_ids, config)


def test_engine_sizes_default_by_device():
    """Unset sizes are filled in for the device (CPU: 64 sequences, 512 tokens a step; GPU: 256, 16384);
    sizes given are kept."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert (EngineConfig().for_device(cpu).max_num_seqs, EngineConfig().for_device(cpu).max_num_batched_tokens) == (64, 512)
    assert (EngineConfig().for_device(gpu).max_num_seqs, EngineConfig().for_device(gpu).max_num_batched_tokens) == (256, 16384)
    assert EngineConfig(max_num_seqs=3, max_num_batched_tokens=7).for_device(gpu).max_num_seqs == 3
