"""Decode speed with the KV cache vs recomputing the whole sequence every step.

Configs.small() with random weights (60.0 M parameters, float32), greedy, batch 1 and 16.
With the cache, each step runs one token per row; without it, each step runs the whole
sequence again (what a model with no cache must do).

    python benchmarks/bench_kv_cache.py     # writes results/kv_cache.{json,md,png}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minillm.bench.common import environment, median_seconds
from minillm.bench.report import heading, table, write_report

from minillm import Configs, MiniLLM, TextGenerator

RESULTS = Path(__file__).resolve().parent / "results"


@torch.inference_mode()
def decode_without_cache(model: MiniLLM, prompts: torch.Tensor, new_tokens: int, backend: str) -> torch.Tensor:
    ids = prompts
    for _ in range(new_tokens):
        next_ids = model(ids, attention_backend=backend, last_token_only=True)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
    return ids[:, prompts.shape[1]:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", default="sdpa")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = Configs.small()
    model = MiniLLM(config).eval()
    generator = TextGenerator(model, attention_backend=args.backend)
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len))
        cached = lambda: generator.generate(prompts.tolist(), max_new_tokens=args.new_tokens, temperature=0)  # noqa: E731
        recompute = lambda: decode_without_cache(model, prompts, args.new_tokens, args.backend)  # noqa: E731
        with_cache = [r.token_ids for r in cached()]
        assert with_cache == recompute().tolist(), "cache and recompute disagree"
        t_cache, _ = median_seconds(cached, warmup=1, runs=args.runs)
        t_full, _ = median_seconds(recompute, warmup=1, runs=args.runs)
        tokens = batch * args.new_tokens
        row = {"batch": batch, "cache_s": t_cache, "recompute_s": t_full,
               "cache_tok_s": tokens / t_cache, "recompute_tok_s": tokens / t_full, "speedup": t_full / t_cache}
        rows.append(row)
        print(f"batch {batch:3d}: with cache {row['cache_tok_s']:8.1f} tok/s, "
              f"recompute {row['recompute_tok_s']:8.1f} tok/s, speed-up {row['speedup']:.1f}x", flush=True)

    meta = {"env": environment(), "model": "Configs.small() random weights, 60.0 M params", "dtype": "float32",
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "attention_backend": args.backend,
            "runs": f"median of {args.runs} after 1 warm-up", "note": "tokens/s include the prefill"}
    description = (f"{meta['model']}, {meta['dtype']}, greedy, prompt {args.prompt_len} tokens + {args.new_tokens} new "
                   f"tokens per row, attention backend `{args.backend}`; {meta['runs']}; tokens/s count new tokens "
                   "over the whole call (prefill included).")
    lines = [*heading("KV cache benchmark", description, meta["env"], "python benchmarks/bench_kv_cache.py"),
             *table(["batch", "with cache (tok/s)", "recompute (tok/s)", "speed-up"],
                    [[r["batch"], f"{r['cache_tok_s']:.1f}", f"{r['recompute_tok_s']:.1f}", f"{r['speedup']:.1f}x"] for r in rows])]

    def plot(plt):
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["cache_tok_s"] for r in rows], width=0.4, label="with KV cache")
        ax.bar([x + 0.2 for x in xs], [r["recompute_tok_s"] for r in rows], width=0.4, label="recompute every step")
        ax.set_xticks(list(xs), [f"batch {r['batch']}" for r in rows])
        ax.set_ylabel("new tokens / s")
        ax.set_title("Configs.small(), float32, CPU")
        ax.legend()
        return fig

    write_report(RESULTS, "kv_cache", {"meta": meta, "rows": rows}, lines, plot)

if __name__ == "__main__":
    main()
