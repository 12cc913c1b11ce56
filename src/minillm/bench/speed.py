"""`minillm bench`: prefill, batch-1 decode, TTFT and batched decode, side by side with HF
transformers on the same weights. (llama.cpp through llama-cpp-python is not wired in yet.)

Every figure is the median of several runs after a warm-up, measured in this one run. Achieved
memory bandwidth = bytes of weights read per decode step x steps/s, against the machine's own
bandwidth, measured here by streaming a 1 GiB buffer.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..llm import LLM
from ..loading import default_model_path
from ..sampling_params import SamplingParams
from .common import environment, median_seconds

PREFILL_TOKENS, DECODE_TOKENS, PROMPT_TOKENS = 512, 128, 16


def median_time(fn: Callable[[], object], runs: int) -> float:
    return median_seconds(fn, warmup=1, runs=runs)[0]


def machine_bandwidth() -> float:
    """Bytes/s reading a 1 GiB float32 buffer (a sum: one read per element), median of 5."""
    data = torch.ones(1 << 28)
    return data.numel() * 4 / median_time(lambda: data.sum(), 5)


def weight_bytes(model: torch.nn.Module, embedding: torch.Tensor, head: torch.Tensor | None) -> int:
    """Bytes a decode step reads: every parameter and buffer once, less the embedding table (a step
    reads one row of it) unless the LM head is that same tensor."""
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in unique.values())
    return total if head is embedding else total - embedding.numel() * embedding.element_size()


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, length), generator=g).tolist()


def _measure(run: Callable[[int, int, int], None], batches: list[int], runs: int) -> dict:
    """Prefill time, TTFT, and aggregate decode tokens/s per batch size (each batch's own prefill
    subtracted), for an engine given as run(batch, prompt_length, new_tokens)."""
    out = {"prefill_s": median_time(lambda: run(1, PREFILL_TOKENS, 1), runs)}
    for batch in [1, *batches]:
        first = median_time(lambda: run(batch, PROMPT_TOKENS, 1), runs)
        total = median_time(lambda: run(batch, PROMPT_TOKENS, DECODE_TOKENS), runs)
        out.setdefault("ttft_s", first)
        out[f"decode_b{batch}_tok_s"] = batch * (DECODE_TOKENS - 1) / max(total - first, 1e-9)
    return out


def bench_minillm(llm: LLM, batches: list[int], runs: int) -> dict:
    vocab = llm.config.vocab_size

    def run(batch: int, length: int, new: int) -> None:
        llm.generate(prompts(batch, length, vocab), SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))

    return _measure(run, batches, runs)


def bench_hf(model, batches: list[int], runs: int, vocab: int) -> dict:
    def run(batch: int, length: int, new: int) -> None:
        ids = torch.tensor(prompts(batch, length, vocab))
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)

    return _measure(run, batches, runs)


def greedy_matches_hf(llm: LLM, hf) -> bool:
    ids = llm.tokenizer.encode("The capital of France is")
    ours = llm.generate([ids], SamplingParams(max_tokens=32, temperature=0))[0].token_ids
    with torch.inference_mode():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             eos_token_id=llm.eos_token_ids, pad_token_id=0)[0, len(ids):].tolist()
    return ours == theirs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="minillm bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--quantization", default=None, choices=["int8", "int4"], help="MiniLLM's weights")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--out", default="benchmarks/results", help="folder for speed.json/.md/.png")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    path = Path(args.model) if args.model else default_model_path()
    steps = tqdm(total=3, desc="minillm bench", unit="stage")
    bandwidth = machine_bandwidth()
    steps.update()
    # No prefix caching: the runs repeat the same prompts, and this measures computing them.
    llm = LLM(str(path), quantization=args.quantization, progress=False, enable_prefix_caching=False)
    engines = {f"MiniLLM {args.quantization or 'float32'}": bench_minillm(llm, args.batch_sizes, args.runs)}
    head = getattr(llm.model.output, "weight", None)
    engines[next(iter(engines))]["weight_bytes"] = weight_bytes(llm.model, llm.model.tok_embeddings.weight, head)
    steps.update()
    results: dict = {"env": environment(), "model": path.name, "machine_bandwidth_gb_s": bandwidth / 1e9}
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        reference = llm if args.quantization is None else LLM(str(path), progress=False)
        results["greedy_matches_hf_float32"] = greedy_matches_hf(reference, hf)
        engines["HF transformers float32"] = bench_hf(hf, args.batch_sizes, args.runs, llm.config.vocab_size)
        engines["HF transformers float32"]["weight_bytes"] = weight_bytes(
            hf, hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)
    steps.update()
    steps.close()
    for name, figures in engines.items():
        figures["prefill_tok_s"] = PREFILL_TOKENS / figures["prefill_s"]
        if "weight_bytes" in figures:
            figures["bandwidth_gb_s"] = figures["weight_bytes"] * figures["decode_b1_tok_s"] / 1e9
    results["engines"] = engines
    _write(Path(args.out), results, args)
    return results


def _write(out: Path, results: dict, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=2))
    batches = [1, *args.batch_sizes]
    header = ("| engine | prefill 512 (tok/s) | TTFT (ms) | " + " | ".join(f"decode b{b} (tok/s)" for b in batches)
              + " | weights read / token (MB) | achieved bandwidth at b1 (GB/s) |")
    lines = ["# `minillm bench`", "",
             f"Model {results['model']}; prefill of a {PREFILL_TOKENS}-token prompt, TTFT for a {PROMPT_TOKENS}-token "
             f"prompt, decode of {DECODE_TOKENS} tokens (batch b, aggregate tokens/s, prefill excluded); median of "
             f"{args.runs} runs after a warm-up. Machine bandwidth (measured): "
             f"{results['machine_bandwidth_gb_s']:.1f} GB/s.",
             f"Environment: {', '.join(f'{k}: {v}' for k, v in results['env'].items() if v is not None)}.", "",
             f"Command: `{' '.join(['minillm bench'] + ([f'--quantization {args.quantization}'] if args.quantization else []))}`",
             "", header, "|---" * (5 + len(batches)) + "|"]
    for name, f in results["engines"].items():
        cells = [f"{f['prefill_tok_s']:.0f}", f"{f['ttft_s'] * 1e3:.0f}"]
        cells += [f"{f[f'decode_b{b}_tok_s']:.1f}" if f"decode_b{b}_tok_s" in f else "—" for b in batches]
        cells += [f"{f['weight_bytes'] / 1e6:.0f}" if "weight_bytes" in f else "—",
                  f"{f['bandwidth_gb_s']:.1f}" if "bandwidth_gb_s" in f else "—"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "greedy_matches_hf_float32" in results:
        lines += ["", f"Greedy tokens of MiniLLM float32 equal HF transformers' (32 tokens): "
                      f"**{results['greedy_matches_hf_float32']}**."]
    lines += ["", "llama.cpp is not measured by this tool yet."]
    lines += ["", "![speed](speed.png)", ""]
    (out / "speed.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, f in results["engines"].items():
        xs = [b for b in batches if f"decode_b{b}_tok_s" in f]
        ax.plot(xs, [f[f"decode_b{b}_tok_s"] for b in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens / s (aggregate)")
    ax.set_title(results["model"])
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)
