"""MiniLLM in a few lines: build a model, generate with the KV cache, check flash attention."""

import torch

from minillm import Configs, MiniLLM, TextGenerator
from minillm.attention import flash_attention_with_kv_cache, standard_attention

torch.manual_seed(0)
model = MiniLLM(Configs.tiny()).eval()  # random weights; real checkpoints load in a later release

generator = TextGenerator(model)
result = generator.generate([1, 2, 3, 4], max_new_tokens=8, temperature=0)
print("greedy:", result.token_ids, result.finish_reason)

q, k, v = torch.randn(1, 8, 256, 64), torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
err = (flash_attention_with_kv_cache(q, k, v, tile_size=64) - standard_attention(q, k, v)).abs().max()
print(f"flash vs standard attention, max error: {err:.1e}")
