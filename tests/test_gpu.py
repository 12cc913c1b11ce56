"""The GPU path, on a CUDA device (skipped without one): our Triton kernels in bfloat16/float16 with head
dims 64 and 128 against standard attention in float32, the engine's CUDA defaults (Triton backend, bf16,
cache sized from GPU memory), CUDA-graph decode against eager decode, and logits against HF transformers
on the same weights."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed (the optional [gpu] extra)")

from checkpoints import hf_model  # noqa: E402
from minillm import Configs, MiniLLM  # noqa: E402
from minillm.attention import standard_attention  # noqa: E402
from minillm.attention.common import gather_pages  # noqa: E402
from minillm.attention.triton_paged import paged_decode, paged_prefill  # noqa: E402
from minillm.engine import EngineConfig, LLMEngine  # noqa: E402
from minillm.loading import load_checkpoint  # noqa: E402
from minillm.sampling_params import SamplingParams  # noqa: E402

CUDA = torch.device("cuda")


def pools(lengths, page, kv_heads, dim, dtype):
    g = torch.Generator().manual_seed(0)
    pages = [max(1, -(-n // page)) for n in lengths]
    num_blocks = sum(pages) + 2
    k_pool, v_pool = (torch.randn(num_blocks, page, kv_heads, dim, generator=g).to(CUDA, dtype) for _ in range(2))
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in pages:
        tables.append(order[at:at + n] + [0] * (max(pages) - n))
        at += n
    return k_pool, v_pool, torch.tensor(tables, device=CUDA)


def reference(q, k_pool, v_pool, table, lengths, q_lens):
    out, at = [], 0
    for b, (n, m) in enumerate(zip(lengths, q_lens)):
        k, v = (gather_pages(p, table[b:b + 1])[:, :, :n].float() for p in (k_pool, v_pool))
        rows = q[at:at + m].float().transpose(0, 1).unsqueeze(0)
        out.append(standard_attention(rows, k, v, [n])[0].transpose(0, 1))
        at += m
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(16, 8, 128), (8, 2, 64)])
def test_kernels_on_cuda(dtype, heads, kv_heads, dim):
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    lengths, q_lens = [300, 1000, 17, 129], [300, 200, 0, 1]  # a prompt, a chunk after a prefix, nothing, one token
    k_pool, v_pool, table = pools(lengths, 16, kv_heads, dim, dtype)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(q_lens), heads, dim, generator=g).to(CUDA, dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device=CUDA)
    out, _ = paged_prefill(q, k_pool, v_pool, table, torch.tensor(lengths, device=CUDA), starts, max(q_lens))
    assert (out.float() - reference(q, k_pool, v_pool, table, lengths, q_lens)).abs().max() <= tol
    decode_lengths = [1, 777, 4096, 64]
    k_pool, v_pool, table = pools(decode_lengths, 16, kv_heads, dim, dtype)
    q = torch.randn(len(decode_lengths), heads, dim, generator=g).to(CUDA, dtype)
    ref = reference(q, k_pool, v_pool, table, decode_lengths, [1] * 4)
    for splits in (None, 1, 7):
        out = paged_decode(q, k_pool, v_pool, table, torch.tensor(decode_lengths, device=CUDA), 4096, num_splits=splits)
        assert (out.float() - ref).abs().max() <= tol


@pytest.fixture(scope="module")
def gpu_model():
    torch.manual_seed(0)
    return MiniLLM(Configs.tiny(num_layers=3, dim_model=256, num_heads=4, num_kv_heads=2, hidden_dim=512)).to(CUDA).eval()


def greedy(model, prompts, **options):
    config = EngineConfig(kv_cache_memory=64 << 20, max_num_seqs=8, enable_prefix_caching=False, **options)
    engine = LLMEngine(model, None, [], config)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    return engine, [c.token_ids for c in engine.generate(prompts, [params] * len(prompts))]


def test_engine_defaults_on_cuda(gpu_model):
    engine, _ = greedy(gpu_model, [[1, 2, 3]])
    assert engine.runner.attention.name == "triton" and engine.runner.graphs is not None
    assert engine.runner.cache.k[0].device.type == "cuda"


def test_cuda_graph_decode_equals_eager_and_sdpa(gpu_model):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 40, 17, 3, 90)]
    _, graphs = greedy(gpu_model, prompts)
    _, eager = greedy(gpu_model, prompts, cuda_graphs=False)
    _, sdpa = greedy(gpu_model, prompts, attention_backend="sdpa")
    assert graphs == eager == sdpa  # float32: every path is exact to well below the logit gaps
    _, alone = greedy(gpu_model, prompts[1:2])
    assert alone[0] == graphs[1]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_logits_match_transformers_on_cuda(tmp_path, kind):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(ids).logits
    loaded = load_checkpoint(tmp_path, dtype="float32", device="cuda", progress=False)
    with torch.no_grad():
        ours = loaded.model(ids.to(CUDA), attention_backend="triton").cpu()
    assert (ours - expected).abs().max() <= 1e-3
    assert load_checkpoint(tmp_path, device="cuda", progress=False).model.dtype == torch.bfloat16  # the GPU default


def test_bad_settings_on_cuda_are_refused_by_name():
    torch.manual_seed(0)
    odd = MiniLLM(Configs.tiny(dim_model=96, num_heads=4, num_kv_heads=2)).to(CUDA)  # head dim 24
    with pytest.raises(ValueError, match="head dim 24 is not supported by the Triton kernels"):
        LLMEngine(odd, None, [], EngineConfig(kv_cache_memory=1 << 20))
    model = MiniLLM(Configs.tiny()).to(CUDA)
    with pytest.raises(ValueError, match="raise gpu_memory_utilization"):
        LLMEngine(model, None, [], EngineConfig(gpu_memory_utilization=1e-6))
