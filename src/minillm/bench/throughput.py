"""Offline throughput (nano-vllm's benchmark, scaled to a CPU): MiniLLM's engine vs HF transformers.

N requests with input and output lengths drawn uniformly from the given ranges, `ignore_eos`, random
token prompts; throughput = requested output tokens / wall time. HF transformers runs the same
requests with batched `generate` (batches of similar input length, each generating its longest
requested output; only requested tokens count), in float32 (what `from_pretrained` gives for the
bundled GGUF by default) and in bfloat16 (unless MiniLLM runs in float32). MiniLLM runs its default
setting (a GGUF file's own quantized blocks) unless --dtype asks for dequantized weights. Each engine runs `--repeats` times,
the engines taking turns (so a slow spell of a shared machine hits them alike), after a warm-up;
medians are reported, and MiniLLM's prefix cache is emptied before each run. A second workload
measures prefix caching: many requests sharing one long system prompt, with caching on and off.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..argtypes import positive_int
from ..engine import LLMEngine
from ..llm import LLM
from ..quantization import QUANTIZATION_MODES
from ..runtime import freeze_heap
from ..sampling_params import SamplingParams
from .common import environment, progress_bar
from .report import heading, table, write_report


def make_requests(n: int, input_range: tuple[int, int], output_range: tuple[int, int], vocab: int,
                  seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(*input_range))], rng.randint(*output_range))
            for _ in range(n)]


def run_engine(engine: LLMEngine, requests: list[tuple[list[int], int]], desc: str) -> float:
    start = time.perf_counter()
    for ids, out_len in requests:
        engine.add_request(ids, SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True))
    with progress_bar(len(requests), desc) as bar:
        while engine.has_unfinished():
            bar.update(sum(o.finished for o in engine.step()))
    return time.perf_counter() - start


def run_hf(model, requests: list[tuple[list[int], int]], batch_size: int, pad_id: int, desc: str) -> float:
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    start = time.perf_counter()
    with progress_bar(len(requests), f"HF transformers {desc}") as bar, torch.inference_mode():
        for first in range(0, len(order), batch_size):
            batch = [requests[i] for i in order[first:first + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids, _ in batch], device=model.device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch], device=model.device)
            new = max(n for _, n in batch)
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad_id)
            bar.update(len(batch))
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def load_hf(model: str | None, dtypes: list[str], device: str) -> dict:
    """HF transformers' model of the same checkpoint, once per dtype."""
    from transformers import AutoModelForCausalLM

    from ..loading import default_model_path

    path = Path(model) if model else default_model_path()
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    return {dtype: AutoModelForCausalLM.from_pretrained(path.parent if kwargs else path, dtype=getattr(torch, dtype),
                                                        **kwargs).eval().to(device)
            for dtype in dict.fromkeys(dtypes)}


def prefix_workload(llm: LLM, n: int, system_tokens: int, out_len: int) -> dict:
    rng = random.Random(1)
    vocab = llm.model.config.vocab_size
    system = [rng.randrange(100, vocab) for _ in range(system_tokens)]
    requests = [(system + [rng.randrange(100, vocab) for _ in range(rng.randint(8, 32))], out_len) for _ in range(n)]
    result = {}
    for caching in (False, True):
        engine = LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids,  # the LLM's own settings (its KV dtype)
                           replace(llm.engine.config, enable_prefix_caching=caching, max_num_seqs=n, compile=False))
        seconds = run_engine(engine, requests, f"shared prefix, caching {'on' if caching else 'off'}")
        result["on" if caching else "off"] = {"seconds": seconds, "tok_s": n * out_len / seconds,
                                              "hit_rate": engine.stats()["prefix_cache_hit_rate"]}
    result["speedup"] = result["off"]["seconds"] / result["on"]["seconds"]
    result.update(requests=n, system_tokens=system_tokens, output_tokens=out_len)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="minillm bench --throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=positive_int, default=64)
    parser.add_argument("--input-len", type=positive_int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=positive_int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--max-num-seqs", type=positive_int, default=64)
    parser.add_argument("--hf-batch-size", type=positive_int, default=16)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="MiniLLM's weights dequantized to this dtype (default: a GGUF file's own blocks); "
                             "HF transformers runs in float32 and, unless this is float32, bfloat16")
    parser.add_argument("--quantization", default=None, choices=QUANTIZATION_MODES,
                        help="MiniLLM's weights (HF transformers always runs the dequantized checkpoint, in float32 and --dtype)")
    parser.add_argument("--compile", action="store_true", help="MiniLLM's step through torch.compile")
    parser.add_argument("--fast-prefill", action="store_true",
                        help="prompt chunks as bf16 GEMMs on the GGUF blocks (EngineConfig.fast_prefill)")
    parser.add_argument("--device", default="cpu", help="where both engines run (cpu, cuda)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each engine, taking turns (medians)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for throughput.json/.md/.png")
    args = parser.parse_args(argv)

    llm = LLM(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization, progress=False,
              max_num_seqs=args.max_num_seqs, compile=args.compile, fast_prefill=args.fast_prefill)
    requests = make_requests(args.num_requests, tuple(args.input_len), tuple(args.output_len),
                             llm.model.config.vocab_size)
    output_tokens = sum(n for _, n in requests)
    warm = LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, replace(llm.engine.config, compile=False))
    run_engine(warm, requests[:4], "warm-up")
    hf_dtypes = ["float32"] + (["bfloat16"] if args.dtype != "float32" else [])
    hf_models = {} if args.no_hf else load_hf(args.model, hf_dtypes, args.device)
    freeze_heap()  # everything is loaded: no full garbage collections of the whole heap mid-run
    pad_id = llm.eos_token_ids[0]
    for hf in hf_models.values():
        run_hf(hf, requests[:4], args.hf_batch_size, pad_id, "warm-up")
    runs: dict[str, list[float]] = {"minillm": [], **{dtype: [] for dtype in hf_models}}
    for r in range(args.repeats):
        llm.engine.reset_prefix_cache()  # the same prompts again must be computed again
        runs["minillm"].append(run_engine(llm.engine, requests, f"MiniLLM engine ({r + 1}/{args.repeats})"))
        for dtype, hf in hf_models.items():
            runs[dtype].append(run_hf(hf, requests, args.hf_batch_size, pad_id, f"{dtype} ({r + 1}/{args.repeats})"))
    seconds = statistics.median(runs["minillm"])
    variants = [v for v in (args.quantization, "compiled" if args.compile else None,
                            "fast_prefill" if args.fast_prefill else None) if v]
    variant = "".join(f"_{v}" for v in variants)
    setting = args.dtype or ("default" if llm.quantized else "float32")  # "default": the file's own blocks
    results = {"env": environment(), "model": llm.name, "dtype": setting, "variant": variant, "variants": variants,
               "requests": args.num_requests, "repeats": args.repeats,
               "input_len": args.input_len, "output_len": args.output_len, "output_tokens": output_tokens,
               "minillm": {"seconds": seconds, "tok_s": output_tokens / seconds, "runs": runs["minillm"],
                           "compile_s": llm.engine.compile_seconds,
                           "preemptions": llm.engine.stats()["num_preemptions"]}}
    print(f"MiniLLM: {output_tokens} tokens in {seconds:.1f} s (median of {_seconds(runs['minillm'])}) = "
          f"{output_tokens / seconds:.1f} tok/s")
    if hf_models:
        results["hf"] = []
        for dtype in hf_models:
            hf_seconds = statistics.median(runs[dtype])
            results["hf"].append({"dtype": dtype, "seconds": hf_seconds, "tok_s": output_tokens / hf_seconds,
                                  "runs": runs[dtype], "batch_size": args.hf_batch_size,
                                  "minillm_speedup": hf_seconds / seconds})
            print(f"HF transformers {dtype}: {hf_seconds:.1f} s (median of {_seconds(runs[dtype])}) = "
                  f"{output_tokens / hf_seconds:.1f} tok/s; MiniLLM is {hf_seconds / seconds:.2f}x")
        hf_models.clear()
    results["prefix_cache"] = prefix_workload(llm, n=32, system_tokens=512, out_len=16)
    pc = results["prefix_cache"]
    print(f"Shared 512-token prefix, 32 requests: hit rate {pc['on']['hit_rate']:.1%}, "
          f"{pc['off']['seconds']:.1f} s without caching, {pc['on']['seconds']:.1f} s with: {pc['speedup']:.2f}x")
    write_results(Path(args.out), results, argv)
    return results


def _seconds(runs: list[float]) -> str:
    return ", ".join(f"{s:.1f}" for s in runs)


def write_results(out: Path, results: dict, argv: list[str] | None) -> None:
    suffix = ("" if results["dtype"] == "float32" else f"_{results['dtype']}") + results["variant"]
    pc, hfs, ours = results["prefix_cache"], results.get("hf", []), results["minillm"]
    description = (f"{results['requests']} requests, input {results['input_len'][0]}-{results['input_len'][1]} tokens, "
                   f"output {results['output_len'][0]}-{results['output_len'][1]} tokens (uniform), ignore_eos, greedy, "
                   f"{results['dtype']}, model {results['model']}.")
    rows = [["MiniLLM (continuous batching)", f"{ours['seconds']:.1f}", _seconds(ours["runs"]), f"{ours['tok_s']:.1f}"]]
    rows += [[f"HF transformers `generate` {hf['dtype']}, batches of {hf['batch_size']}", f"{hf['seconds']:.1f}",
              _seconds(hf["runs"]), f"{hf['tok_s']:.1f}"] for hf in hfs]
    lines = [*heading(f"Offline throughput ({', '.join([results['dtype'], *results['variants']])})", description,
                      results["env"], f"minillm bench --throughput {' '.join(argv or [])}".rstrip()),
             *table(["engine", f"wall time (s), median of {results['repeats']}", "runs (s)", "output tok/s"], rows), ""]
    lines += [f"MiniLLM ({results['dtype']}) / HF transformers {hf['dtype']}: **{hf['minillm_speedup']:.2f}x**." for hf in hfs]
    lines += ["", f"Prefix caching: {pc['requests']} requests sharing a {pc['system_tokens']}-token prefix, "
                  f"{pc['output_tokens']} output tokens each:", "",
              *table(["prefix caching", "wall time (s)", "hit rate"],
                     [[mode, f"{pc[mode]['seconds']:.1f}", f"{pc[mode]['hit_rate']:.1%}"] for mode in ("off", "on")]),
              "", f"Speed-up from prefix caching: **{pc['speedup']:.2f}x**."]

    def plot(plt):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        names = ["MiniLLM"] + [f"HF {hf['dtype']}" for hf in hfs]
        left.bar(names, [ours["tok_s"]] + [hf["tok_s"] for hf in hfs], color=["tab:blue", "tab:orange", "tab:red"][: len(names)])
        left.set_ylabel("output tokens / s")
        left.set_title(f"{results['requests']} requests, offline throughput")
        right.bar(["caching off", "caching on"], [pc["off"]["seconds"], pc["on"]["seconds"]], color=["tab:gray", "tab:green"])
        right.set_ylabel("wall time (s)")
        right.set_title(f"shared {pc['system_tokens']}-token prefix, {pc['requests']} requests")
        return fig

    write_report(out, f"throughput{suffix}", results, lines, plot)
