"""The GPU path on one CUDA device, every figure against a reference measured in the same run:

- prefill: our Triton varlen FA2 kernel (paged K/V, pages of 16) vs PyTorch SDPA's flash backend
  (contiguous K/V), causal, N = 512 ... 16k (16k tokens per call), head dims 64 and 128, bf16;
  a few tile shapes of ours, the best and the default reported;
- decode: our split-K paged kernel at batch 1 ... 64 and context 1k ... 32k (32 query / 8 KV heads,
  dim 128), achieved bandwidth against a device-to-device copy measured here;
- batch-1 decode of a random-weight model of Qwen3-0.6B's exact shape, with and without CUDA graphs;
- engine throughput on nano-vllm's workload (256 sequences, input and output 100-1024 tokens,
  ignore EOS) vs HF transformers bf16 `generate` on the same weights.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu   # writes gpu.{json,md}
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from minillm.attention.triton_paged import paged_decode, paged_prefill, prefill_tiles
from minillm.bench.common import environment
from minillm.bench.report import heading, table, write_report

CUDA = torch.device("cuda")
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                 rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
TILES = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)]


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy."""
    src = torch.empty(2**31, dtype=torch.bfloat16, device=CUDA)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=50)
    return 2 * 2**32 / (ms / 1e3)


def bench_prefill(total: int = 16384) -> list[dict]:
    rows = []
    for dim in (64, 128):
        heads = 2048 // dim
        for n in (512, 1024, 2048, 4096, 8192, 16384):
            batch = max(1, total // n)
            g = torch.Generator(device=CUDA).manual_seed(0)
            q, k, v = (torch.randn(batch, heads, n, dim, device=CUDA, dtype=torch.bfloat16, generator=g) for _ in range(3))
            flops = 4 * batch * heads * n * n * dim / 2  # causal: half the scores
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                sdpa_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            # the same keys in pages of 16, scattered over the pool
            packed_q = q.transpose(1, 2).reshape(batch * n, heads, dim).contiguous()
            pages = batch * n // 16
            order = torch.randperm(pages, device=CUDA)
            k_pool, v_pool = (torch.empty(pages, 16, heads, dim, device=CUDA, dtype=torch.bfloat16) for _ in range(2))
            for pool, src in ((k_pool, k), (v_pool, v)):
                pool[order] = src.transpose(1, 2).reshape(pages, 16, heads, dim)
            table = order.view(batch, n // 16)
            seqlens = torch.full((batch,), n, device=CUDA)
            starts = torch.arange(0, batch * n + 1, n, device=CUDA)
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch * n, heads, dim)
            tried = {}
            for tiles in TILES:
                try:
                    fn = lambda: paged_prefill(packed_q, k_pool, v_pool, table, seqlens, starts, n, tiles=tiles)  # noqa: E731
                    err = (fn()[0].float() - ref.float()).abs().max().item()
                    tried[tiles] = (do_bench(fn), err)
                except Exception as error:  # a tile shape that does not fit this dim's shared memory
                    print(f"prefill tiles {tiles} dim {dim}: {type(error).__name__}: {str(error)[:200]}")
            default = prefill_tiles(dim, CUDA, n)
            best = min(tried, key=lambda t: tried[t][0])
            row = {"head_dim": dim, "heads": heads, "seq_len": n, "batch": batch, "sdpa_ms": sdpa_ms,
                   "sdpa_tflops": flops / sdpa_ms / 1e9, "default_tiles": list(default),
                   "default_ms": tried.get(default, (None,))[0], "best_tiles": list(best), "best_ms": tried[best][0],
                   "best_tflops": flops / tried[best][0] / 1e9, "max_abs_err_vs_sdpa": tried[best][1],
                   "all": {str(t): ms for t, (ms, _) in tried.items()}}
            row["best_vs_sdpa"] = sdpa_ms / row["best_ms"]
            row["default_vs_sdpa"] = sdpa_ms / row["default_ms"] if row["default_ms"] else None
            print("prefill", row, flush=True)
            rows.append(row)
    return rows


def bench_decode(bandwidth: float) -> list[dict]:
    rows = []
    heads, kv_heads, dim = 32, 8, 128
    for batch in (1, 4, 16, 64):
        for ctx in (1024, 4096, 16384, 32768):
            pages = batch * ctx // 16
            k_pool, v_pool = (torch.randn(pages, 16, kv_heads, dim, device=CUDA, dtype=torch.bfloat16) for _ in range(2))
            table = torch.randperm(pages, device=CUDA).view(batch, ctx // 16)
            seqlens = torch.full((batch,), ctx, device=CUDA)
            q = torch.randn(batch, heads, dim, device=CUDA, dtype=torch.bfloat16)
            ms = do_bench(lambda: paged_decode(q, k_pool, v_pool, table, seqlens, ctx))
            moved = 2 * batch * ctx * kv_heads * dim * 2
            row = {"batch": batch, "context": ctx, "ms": ms, "gb_per_s": moved / ms / 1e6,
                   "of_copy_bandwidth": moved / (ms / 1e3) / bandwidth}
            print("decode", row, flush=True)
            rows.append(row)
    return rows


def qwen3_checkpoint(folder: Path):
    """A random-weight Qwen3-0.6B-shaped model in bf16, saved where our loader reads it; returns HF's model."""
    import transformers

    torch.manual_seed(0)
    with torch.device(CUDA):
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3_06B, dtype=torch.bfloat16))
    hf = hf.to(torch.bfloat16).eval()
    hf.save_pretrained(folder, safe_serialization=True)
    return hf


def engine(model, graphs: bool, max_num_seqs: int, **options):
    from minillm.engine import EngineConfig, LLMEngine

    return LLMEngine(model, None, [], EngineConfig(max_num_seqs=max_num_seqs, cuda_graphs=graphs, **options))


def timed_generate(eng, prompts, outputs) -> float:
    from minillm.sampling_params import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in outputs]
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = eng.generate(prompts, params)
    torch.cuda.synchronize()
    assert [len(r.token_ids) for r in results] == list(outputs)
    return time.perf_counter() - start


def bench_batch1(model, weight_bytes: int, bandwidth: float) -> list[dict]:
    rows = []
    prompt = [random.Random(1).randrange(1000, 100000) for _ in range(128)]
    for graphs in (False, True):
        eng = engine(model, graphs, 1, gpu_memory_utilization=0.3)
        timed_generate(eng, [prompt], [8])  # warm-up
        first = min(timed_generate(eng, [prompt], [1]) for _ in range(3))
        total = sorted(timed_generate(eng, [prompt], [257]) for _ in range(3))[1]
        per_token = (total - first) / 256
        rows.append({"cuda_graphs": graphs, "tok_s": 1 / per_token, "ms_per_token": per_token * 1e3,
                     "weights_gb_per_s": weight_bytes / per_token / 1e9,
                     "of_copy_bandwidth": weight_bytes / per_token / bandwidth})
        print("batch1", rows[-1], flush=True)
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def profile_eager_decode(model, out: Path) -> None:
    """Where an eager (no CUDA graph) batch-1 decode token's time goes: PyTorch's profiler, top ops by
    self CPU time, written to out/eager_profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    eng = engine(model, False, 1, gpu_memory_utilization=0.3)
    prompt = list(range(1000, 1128))
    timed_generate(eng, [prompt], [8])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_generate(eng, [prompt], [33])
    text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (out / "eager_profile.txt").write_text(text)
    print(text, flush=True)


def workload(n: int = 256, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's bench: random prompts and output lengths, each uniform in 100..1024."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    return prompts, [rng.randint(100, 1024) for _ in range(n)]


def bench_throughput(model, hf, with_hf: bool) -> dict:
    prompts, outputs = workload()
    eng = engine(model, True, 256, max_num_batched_tokens=16384, gpu_memory_utilization=0.5)
    timed_generate(eng, prompts[:4], [16] * 4)  # warm-up: Triton compiles for prefill shapes
    seconds = timed_generate(eng, prompts, outputs)
    result = {"sequences": len(prompts), "input_tokens": sum(map(len, prompts)), "output_tokens": sum(outputs),
              "minillm_s": seconds, "minillm_tok_s": sum(outputs) / seconds}
    print("throughput", result, flush=True)
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    if with_hf:
        result.update(hf_throughput(hf, prompts, outputs))
        result["speedup_vs_hf"] = result["minillm_tok_s"] / result["hf_tok_s"]
        print("throughput", result, flush=True)
    return result


@torch.inference_mode()
def hf_throughput(hf, prompts, outputs) -> dict:
    """One left-padded batch of every prompt (HF's static batching; the KV cache of all 256 rows at full
    length fits an H200); each row generates the longest output (a static batch cannot stop rows early),
    so only each request's own output counts as useful."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=CUDA)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=CUDA)
    new = max(outputs)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.generate(ids[:4, -64:], attention_mask=mask[:4, -64:], max_new_tokens=8, do_sample=False,
                cache_implementation="static", disable_compile=True)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    # a static cache: the default one concatenates every layer's whole cache at every step
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                      cache_implementation="static", disable_compile=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert out.shape[1] == width + new
    return {"hf_s": seconds, "hf_tok_s": sum(outputs) / seconds, "hf_generated_tok_s": len(prompts) * new / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu")
    parser.add_argument("--only", nargs="*", default=["prefill", "decode", "batch1", "throughput"])
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers' throughput run")
    args = parser.parse_args()
    env = environment()
    import triton

    env["triton"] = triton.__version__
    results: dict = {"environment": env}
    bandwidth = copy_bandwidth()
    results["copy_bandwidth_gb_s"] = bandwidth / 1e9
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)

    def save() -> None:
        write_report(args.out, "gpu", results, report_lines(results, env))

    models: dict = {}  # the Qwen3-shaped model, HF's and ours on the same weights, made once
    for section in args.only:
        try:
            if section == "prefill":
                results["prefill"] = bench_prefill()
            elif section == "decode":
                results["decode"] = bench_decode(bandwidth)
            elif section in ("batch1", "profile", "throughput"):
                if not models:
                    from minillm.loading import load_checkpoint

                    folder = Path(tempfile.mkdtemp())
                    models["hf"] = qwen3_checkpoint(folder)
                    models["ours"] = load_checkpoint(folder, device="cuda", progress=False).model
                if section == "profile":
                    profile_eager_decode(models["ours"], args.out)
                elif section == "batch1":
                    ours = models["ours"]
                    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
                    results["batch1"] = bench_batch1(ours, weight_bytes, bandwidth)
                else:
                    results["throughput"] = bench_throughput(models["ours"], models["hf"], not args.no_hf)
        except Exception as error:
            import traceback

            traceback.print_exc()
            results.setdefault("errors", {})[section] = f"{type(error).__name__}: {error}"
        save()


def report_lines(results: dict, env: dict) -> list[str]:
    lines = heading("GPU: our Triton kernels and the engine on CUDA",
                    f"Device-to-device copy bandwidth measured in the same run: "
                    f"{results['copy_bandwidth_gb_s']:.0f} GB/s (bytes read + written).", env,
                    "python benchmarks/bench_gpu.py")
    if "prefill" in results:
        lines += ["## Prefill attention (causal, bf16, 16k tokens per call) vs SDPA flash", "",
                  *table(["head dim", "N", "batch", "SDPA ms", "SDPA TFLOP/s", "ours best ms", "tiles", "TFLOP/s",
                          "ours/SDPA speed", "default tiles ms", "default/SDPA"],
                         [[r["head_dim"], r["seq_len"], r["batch"], f"{r['sdpa_ms']:.3f}", f"{r['sdpa_tflops']:.0f}",
                           f"{r['best_ms']:.3f}", r["best_tiles"], f"{r['best_tflops']:.0f}", f"{r['best_vs_sdpa']:.2f}x",
                           f"{r['default_ms']:.3f}" if r["default_ms"] else "-",
                           f"{r['default_vs_sdpa']:.2f}x" if r["default_vs_sdpa"] else "-"] for r in results["prefill"]]), ""]
    if "decode" in results:
        lines += ["## Paged decode (32 query / 8 KV heads, dim 128, bf16, pages of 16)", "",
                  *table(["batch", "context", "µs", "GB/s", "of copy bandwidth"],
                         [[r["batch"], r["context"], f"{r['ms'] * 1e3:.1f}", f"{r['gb_per_s']:.0f}",
                           f"{r['of_copy_bandwidth']:.0%}"] for r in results["decode"]]), ""]
    if "batch1" in results:
        lines += ["## Batch-1 decode, Qwen3-0.6B shape (random weights, bf16), 128-token prompt, 256 tokens", "",
                  *table(["CUDA graphs", "tok/s", "ms/token", "weights GB/s", "of copy bandwidth"],
                         [["on" if r["cuda_graphs"] else "off", f"{r['tok_s']:.0f}", f"{r['ms_per_token']:.2f}",
                           f"{r['weights_gb_per_s']:.0f}", f"{r['of_copy_bandwidth']:.0%}"] for r in results["batch1"]]), ""]
    if "throughput" in results:
        t = results["throughput"]
        rows = [["MiniLLM (Triton, CUDA graphs)", f"{t['minillm_s']:.1f}", f"{t['minillm_tok_s']:.0f}", ""]]
        if "hf_s" in t:
            rows.append(["HF transformers bf16 generate", f"{t['hf_s']:.1f}", f"{t['hf_tok_s']:.0f}",
                         f"{t['hf_generated_tok_s']:.0f} counting its padded rows"])
        lines += ["## Engine throughput: nano-vllm's workload, Qwen3-0.6B shape (random weights, bf16)", "",
                  f"{t['sequences']} sequences, {t['input_tokens']} prompt and {t['output_tokens']} output tokens.", "",
                  *table(["engine", "seconds", "output tok/s", "note"], rows), ""]
        if "speedup_vs_hf" in t:
            lines += [f"MiniLLM / HF: **{t['speedup_vs_hf']:.2f}x**.", ""]
    if "errors" in results:
        lines += ["## Sections that failed", "", *(f"- {k}: {v}" for k, v in results["errors"].items())]
    return lines


if __name__ == "__main__":
    main()
