"""`minillm bench`: prefill, batch-1 decode, TTFT and batched decode, side by side with HF
transformers on the same weights and llama.cpp (llama-cpp-python, when installed) on the same GGUF.

Every figure is the median of several runs after a warm-up, measured in this one run. Achieved
memory bandwidth = bytes of weights read per decode step x steps/s, against the machine's own
bandwidth, measured here by streaming a 1 GiB buffer.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from ..argtypes import positive_int
from ..llm import LLM
from ..loading import default_model_path
from ..runtime import freeze_heap
from .. import kernels
from ..kernels.ggml import GGMLLinear
from ..sampling_params import SamplingParams
from .common import environment, median_seconds
from .load import load_figures
from .report import heading, table, write_report

PREFILL_TOKENS, DECODE_TOKENS, PROMPT_TOKENS = 512, 128, 16


def median_time(fn: Callable[[], object], runs: int) -> float:
    return median_seconds(fn, warmup=1, runs=runs)[0]


def bandwidth_probe() -> Callable[[], float]:
    """A function measuring the machine's bytes/s: reading a 1 GiB float32 buffer (a sum: one read per
    element), median of 5. The buffer is allocated once, here."""
    data = torch.ones(1 << 28)
    return lambda: data.numel() * 4 / median_time(lambda: data.sum(), 5)


def weight_bytes(model: torch.nn.Module, embedding: torch.Tensor, head: torch.Tensor | None) -> int:
    """Bytes a decode step reads: every parameter and buffer once, less the embedding table (a step
    reads one row of it) unless the LM head is that same tensor."""
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in unique.values())
    return total if head is embedding else total - embedding.numel() * embedding.element_size()


def engine_weight_bytes(llm: LLM) -> int:
    """`weight_bytes` of one of our engines (its LM head may be a GGMLLinear, whose tensors are `weights`)."""
    output = llm.model.output
    head = output.weights[0] if isinstance(output, GGMLLinear) else output.weight
    return weight_bytes(llm.model, llm.model.tok_embeddings.weight, head)


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, length), generator=g).tolist()


def decode_batches(batches: list[int]) -> list[int]:
    """Batch 1 always (TTFT and bandwidth come from it), each size once, in order."""
    return sorted({1, *batches})


def _measure(run: Callable[[int, int, int], None], batches: list[int], runs: int) -> dict:
    """Prefill time, TTFT, and aggregate decode tokens/s per batch size (each batch's own prefill
    subtracted), for an engine given as run(batch, prompt_length, new_tokens)."""
    out = {"prefill_s": median_time(lambda: run(1, PREFILL_TOKENS, 1), runs)}
    for batch in decode_batches(batches):
        first = median_time(lambda: run(batch, PROMPT_TOKENS, 1), runs)
        total = median_time(lambda: run(batch, PROMPT_TOKENS, DECODE_TOKENS), runs)
        out.setdefault("ttft_s", first)
        out[f"decode_b{batch}_tok_s"] = batch * (DECODE_TOKENS - 1) / max(total - first, 1e-9)
    return out


def minillm_runner(llm: LLM) -> Callable[[int, int, int], None]:
    vocab = llm.config.vocab_size

    def run(batch: int, length: int, new: int) -> None:
        llm.generate(prompts(batch, length, vocab), SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))

    return run


def bench_minillm(llm: LLM, batches: list[int], runs: int) -> dict:
    return _measure(minillm_runner(llm), batches, runs)


def paired_decode(runners: dict[str, Callable[[int, int, int], None]], rounds: int,
                  bandwidth: Callable[[], float] | None = None) -> dict[str, list[float]]:
    """Batch-1 decode tokens/s of several engines measured in turn, round after round, and the machine's
    bandwidth (GB/s, under "machine") in each round too: on a machine whose speed drifts within minutes
    (these VMs), a ratio of figures taken minutes apart says little, a ratio within one round says more."""
    out: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            first = median_time(lambda: run(1, PROMPT_TOKENS, 1), 1)
            total = median_time(lambda: run(1, PROMPT_TOKENS, DECODE_TOKENS), 1)
            out[name].append((DECODE_TOKENS - 1) / max(total - first, 1e-9))
        if bandwidth is not None:
            out.setdefault("machine", []).append(bandwidth() / 1e9)
    return out


def bench_hf(model, batches: list[int], runs: int, vocab: int) -> dict:
    def run(batch: int, length: int, new: int) -> None:
        ids = torch.tensor(prompts(batch, length, vocab))
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)

    return _measure(run, batches, runs)


def llama_cpp_runner(path: Path, threads: int) -> Callable[[int, int, int], None]:
    from llama_cpp import Llama

    model = Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=PREFILL_TOKENS + DECODE_TOKENS + 16,
                  n_batch=PREFILL_TOKENS, verbose=False)
    vocab = model.n_vocab()

    def run(batch: int, length: int, new: int) -> None:
        model.reset()
        model.eval(prompts(1, length, vocab)[0])
        for _ in range(new - 1):  # greedy: the argmax of the last logits, fed back
            model.eval([int(model.scores[model.n_tokens - 1].argmax())])

    return run


def bench_llama_cpp(path: Path, runs: int, threads: int) -> dict:
    """llama.cpp on the same GGUF file, same thread count; batch 1 only (llama-cpp-python's API decodes
    one sequence). Weights read per token: every tensor's stored bytes (the tied head is the Q8_0
    embedding, read whole)."""
    import gguf

    figures = _measure(llama_cpp_runner(path, threads), [], runs)
    reader = gguf.GGUFReader(path)
    figures["weight_bytes"] = sum(int(t.n_bytes) for t in reader.tensors)
    return figures


def greedy_matches_hf(llm: LLM, hf) -> bool:
    ids = llm.tokenizer.encode("The capital of France is")
    ours = llm.generate([ids], SamplingParams(max_tokens=32, temperature=0))[0].token_ids
    with torch.inference_mode():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             eos_token_id=llm.eos_token_ids, pad_token_id=0)[0, len(ids):].tolist()
    return ours == theirs


ENGINE_NAMES = ("default", "float32", "bfloat16", "int8", "int4")


def parse_engine(spec: str) -> tuple[str, set[str]]:
    """"default", "float32", "int4:compile", "default:fast_prefill" ... -> (setting, flags). "default" is what
    `LLM(path)` does (a GGUF file on its own blocks); float32 / bfloat16 dequantize; int8 / int4 re-quantize;
    flags: compile, fast_prefill (EngineConfig's)."""
    name, *flags = spec.split(":")
    if name == "gguf":
        name = "default"
    if name not in ENGINE_NAMES or not set(flags) <= {"compile", "fast_prefill"}:
        raise argparse.ArgumentTypeError(f"not an engine: {spec!r} ({'|'.join(ENGINE_NAMES)}[:compile][:fast_prefill])")
    return name, set(flags)


def load_engine(path: Path, setting: str, flags: set[str]) -> LLM:
    kwargs = {"dtype": setting} if setting in ("float32", "bfloat16") else {}
    if setting in ("int8", "int4"):
        kwargs["quantization"] = setting
    # No prefix caching: the runs repeat the same prompts, and this measures computing them.
    llm = LLM(str(path), progress=False, enable_prefix_caching=False, compile="compile" in flags,
              fast_prefill="fast_prefill" in flags, **kwargs)
    freeze_heap()  # as the CLI and server do: no full garbage collections of the whole heap mid-run
    return llm


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="minillm bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--engines", nargs="+", default=["default", "float32"], metavar="SPEC",
                        help="MiniLLM settings to measure: default (a GGUF file on its own blocks), float32, bfloat16, "
                             "int8 or int4, each optionally :compile and/or :fast_prefill (default: default float32)")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--runs", type=positive_int, default=3)
    parser.add_argument("--paired-rounds", type=positive_int, default=5,
                        help="rounds of batch-1 decode, default and llama.cpp in turn (default 5)")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--out", default="benchmarks/results", help="folder for speed.json/.md/.png")
    args = parser.parse_args(argv)
    try:
        specs = [parse_engine(spec) for spec in args.engines]
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))  # one line and exit status 2, as for any other bad option

    from tqdm.auto import tqdm

    path = Path(args.model) if args.model else default_model_path()
    threads = torch.get_num_threads()
    steps = tqdm(total=len(specs) + 4, desc="minillm bench", unit="engine")
    results: dict = {"env": environment(), "model": path.name, "threads": threads}
    engines: dict[str, dict] = {}
    for setting, flags in specs:
        llm = load_engine(path, setting, flags)
        label = f"default ({'gguf blocks, ' + kernels.isa() if llm.quantized else 'float32'})" if setting == "default" else setting
        name = f"MiniLLM {label}" + "".join(f" {flag.replace('_', ' ')}" for flag in sorted(flags))
        engines[name] = bench_minillm(llm, args.batch_sizes, args.runs)
        engines[name]["weight_bytes"] = engine_weight_bytes(llm)
        engines[name]["compile_s"] = llm.engine.compile_seconds
        del llm
        # Compiled graphs are cached per code object (MiniLLM.forward), so the next engine's calls
        # would first try this model's graphs and their guards; start it from a clean slate.
        torch._dynamo.reset()
        steps.update()
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        results["greedy_matches_hf_float32"] = greedy_matches_hf(LLM(str(path), dtype="float32", progress=False), hf)
        engines["HF transformers float32"] = bench_hf(hf, args.batch_sizes, args.runs, hf.config.vocab_size)
        engines["HF transformers float32"]["weight_bytes"] = weight_bytes(
            hf, hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)
        del hf
    steps.update()
    if not args.no_llama_cpp and path.suffix == ".gguf":
        if importlib.util.find_spec("llama_cpp") is None:
            results["llama_cpp"] = "not installed (see docs/BENCHMARKS.md: pip install 'minillm[llama-cpp]')"
        else:
            engines["llama.cpp (llama-cpp-python)"] = bench_llama_cpp(path, args.runs, threads)
            if ("default", set()) in specs:
                llm = load_engine(path, "default", set())
                step_bytes = engine_weight_bytes(llm)
                rounds = paired_decode({"default": minillm_runner(llm), "llama.cpp": llama_cpp_runner(path, threads)},
                                       args.paired_rounds, bandwidth_probe())
                results["paired_b1"] = {
                    **rounds, "ratio_median": statistics.median([a / b for a, b in zip(rounds["default"], rounds["llama.cpp"])]),
                    "bandwidth_fraction_median": statistics.median([t * step_bytes / 1e9 / m for t, m in zip(rounds["default"], rounds["machine"])])}
    steps.update()
    with_llama_cpp = "paired_b1" in results or "llama.cpp (llama-cpp-python)" in engines
    results["load"] = load_figures(["minillm", *(["llama.cpp"] if with_llama_cpp else [])], path, args.runs)
    results["file_mb"] = path.stat().st_size / 1e6 if path.is_file() else None
    # Measured last: streaming a 1 GiB buffer first slows the decodes that follow it.
    results["machine_bandwidth_gb_s"] = bandwidth_probe()() / 1e9
    steps.update()
    steps.close()
    for name, figures in engines.items():
        figures["prefill_tok_s"] = PREFILL_TOKENS / figures["prefill_s"]
        figures["bandwidth_gb_s"] = figures["weight_bytes"] * figures["decode_b1_tok_s"] / 1e9
    results["engines"] = engines
    _write(Path(args.out), results, args)
    return results


def _write(out: Path, results: dict, args: argparse.Namespace) -> None:
    batches = decode_batches(args.batch_sizes)
    description = (f"Model {results['model']}; prefill of a {PREFILL_TOKENS}-token prompt, TTFT for a {PROMPT_TOKENS}-token "
                   f"prompt, decode of {DECODE_TOKENS} tokens (batch b, aggregate tokens/s, prefill excluded); median of "
                   f"{args.runs} runs after a warm-up. Machine bandwidth (measured): "
                   f"{results['machine_bandwidth_gb_s']:.1f} GB/s. Threads: {results['threads']} for every engine.")
    header = ["engine", "prefill 512 (tok/s)", "TTFT (ms)", *(f"decode b{b} (tok/s)" for b in batches),
              "weights read / token (MB)", "achieved bandwidth at b1 (GB/s)", "compile (s)"]
    rows = []
    for name, f in results["engines"].items():
        rows.append([name, f"{f['prefill_tok_s']:.0f}", f"{f['ttft_s'] * 1e3:.0f}",
                     *(f"{f[f'decode_b{b}_tok_s']:.1f}" if f"decode_b{b}_tok_s" in f else "—" for b in batches),
                     f"{f['weight_bytes'] / 1e6:.0f}", f"{f['bandwidth_gb_s']:.1f}",
                     f"{f['compile_s']:.0f}" if f.get("compile_s") else "—"])
    lines = [*heading("`minillm bench`", description, results["env"], f"minillm bench --engines {' '.join(args.engines)} --batch-sizes {' '.join(map(str, args.batch_sizes))}"),
             *table(header, rows)]
    if "load" in results:
        file_mb = results.get("file_mb")
        lines += ["", f"Load (each in a fresh process, the file in the page cache; median of {args.runs}"
                      + (f"; file {file_mb:.0f} MB" if file_mb else "") + "):", ""]
        lines += table(["engine", "load (s)", "peak RSS (MiB)", "RSS after imports (MiB)", "KV cache pool (MiB)"],
                       [[name, f"{f['load_s']:.2f}", f"{f['peak_rss_mib']:.0f}", f"{f['import_rss_mib']:.0f}",
                         f"{f['kv_cache_mib']:.0f}" if "kv_cache_mib" in f else "—"] for name, f in results["load"].items()])
    if "greedy_matches_hf_float32" in results:
        lines += ["", f"Greedy tokens of MiniLLM float32 equal HF transformers' (32 tokens): "
                      f"**{results['greedy_matches_hf_float32']}**."]
    if "llama_cpp" in results:
        lines += ["", f"llama.cpp: {results['llama_cpp']}."]
    if "paired_b1" in results:
        paired = results["paired_b1"]
        lines += ["", f"Batch-1 decode, MiniLLM default and llama.cpp measured in turn ({len(paired['default'])} rounds, "
                      f"tok/s): default {', '.join(f'{v:.1f}' for v in paired['default'])}; llama.cpp "
                      f"{', '.join(f'{v:.1f}' for v in paired['llama.cpp'])}; median ratio of a round "
                      f"**{paired['ratio_median']:.2f}x**."]
        if "machine" in paired:
            lines[-1] += (f" The machine's bandwidth in each round: {', '.join(f'{v:.1f}' for v in paired['machine'])} "
                          f"GB/s; the default's achieved bandwidth at b1 as a share of it, median of the rounds: "
                          f"**{paired['bandwidth_fraction_median']:.0%}**.")

    def plot(plt):
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
        return fig

    write_report(out, "speed", results, lines, plot)
