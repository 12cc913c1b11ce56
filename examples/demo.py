"""A tour of MiniLLM's core: config, model, our FlashAttention-2, the KV cache and batched generation."""

import time

import torch

from minillm import CacheOverflowError, Configs, KVCache, MiniLLM, ModelConfig, TextGenerator
from minillm.attention import flash_attention_with_kv_cache, sdpa_attention, standard_attention


def section(title: str) -> None:
    print(f"\n== {title}")


torch.manual_seed(0)

section("Model")
config = ModelConfig(dim_model=256, num_heads=8, num_kv_heads=2, num_layers=4, max_seq_len=512, vocab_size=1000)
model = MiniLLM(config).eval()
print(f"{config.num_layers} layers, dim {config.dim_model}, {config.num_heads} query / {config.num_kv_heads} KV heads, "
      f"{config.num_parameters() / 1e6:.2f} M parameters")
for name in ("small", "medium", "large"):
    preset = getattr(Configs, name)()
    print(f"  Configs.{name}(): {preset.num_parameters() / 1e6:,.1f} M parameters")

section("Flash attention is exact")
q = torch.randn(2, 8, 300, 64)
k, v = torch.randn(2, 2, 300, 64), torch.randn(2, 2, 300, 64)
ref = standard_attention(q, k, v)
for block in (16, 64, 128):
    err = (flash_attention_with_kv_cache(q, k, v, tile_size=block) - ref).abs().max().item()
    print(f"  block {block:3d}: max |flash - standard| = {err:.1e}")
print(f"  SDPA:      max |sdpa - standard|  = {(sdpa_attention(q, k, v) - ref).abs().max().item():.1e}")
decode = flash_attention_with_kv_cache(q[:, :, -1:], k, v, cache_seqlens=[300, 120])
print(f"  one decode query over rows of 300 and 120 cached keys -> output {list(decode.shape)}")

section("KV cache: incremental decoding equals a full forward")
ids = torch.randint(0, config.vocab_size, (1, 48))
cache = KVCache(config, batch_size=1, max_seq_len=64)
with torch.inference_mode():
    full = model(ids)
    steps = [model(ids[:, :40], kv_cache=cache)] + [model(ids[:, t:t + 1], kv_cache=cache) for t in range(40, 48)]
print(f"  max |incremental - full| = {(torch.cat(steps, 1) - full).abs().max().item():.1e}; "
      f"cache holds {cache.get_seq_len(0)} tokens, {cache.nbytes / 2**20:.2f} MiB")
try:
    with torch.inference_mode():
        model(torch.zeros(1, 20, dtype=torch.long), kv_cache=cache)
except CacheOverflowError as err:
    print(f"  overflow is refused: {err}")

section("Batched generation: prompts of different lengths")
generator = TextGenerator(model)
prompts = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17], [42]]
start = time.perf_counter()
results = generator.generate(prompts, max_new_tokens=16, temperature=0)
elapsed = time.perf_counter() - start
for prompt, result in zip(prompts, results):
    alone = generator.generate(prompt, max_new_tokens=16, temperature=0).token_ids
    print(f"  {prompt} -> {result.token_ids[:8]}... ({result.finish_reason}); same as alone: {alone == result.token_ids}")
print(f"  {3 * 16} tokens in {elapsed * 1e3:.0f} ms")

section("Sampling with a seed is reproducible")
kwargs = dict(max_new_tokens=10, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=7)
first = generator.generate(prompts[0], **kwargs).token_ids
print(f"  seed 7: {first}; again: {generator.generate(prompts[0], **kwargs).token_ids == first}")
