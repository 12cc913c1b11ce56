"""How closely the default setting (the GGUF file's own blocks, our kernels) follows float32 and
llama.cpp on the same file: greedy next-token agreement under teacher forcing, and where free-running
greedy generations first diverge. Writes results/cpu_default/agreement.{json,md}.

    python benchmarks/bench_agreement.py [--tokens 256] [--model file.gguf]

Teacher forcing: MiniLLM's default setting generates `--tokens` greedy tokens per prompt; each engine
then reads the same sequences and we count positions where its argmax equals the other's.
Needs llama-cpp-python for the llama.cpp columns (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch

from minillm import LLM, SamplingParams
from minillm.bench.common import environment
from minillm.bench.report import heading, table, write_report
from minillm.loading import default_model_path

PROMPTS = ["The history of the Roman Empire", "def quicksort(items):", "Ten tips for better sleep:",
           "Once upon a time, in a small village,", "The mitochondria is", "Q: What is 17 times 23?\nA:",
           "Dear hiring manager,", "import numpy as np\n"]


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/cpu_default")
    args = parser.parse_args(argv)
    path = Path(args.model) if args.model else default_model_path()
    default, f32 = LLM(str(path), progress=False), LLM(str(path), dtype="float32", progress=False)
    greedy = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    runs = default.generate(PROMPTS, greedy)
    free_f32 = f32.generate(PROMPTS, greedy)
    sequences = [(r.prompt_token_ids, r.prompt_token_ids + r.token_ids) for r in runs]

    def argmax_ours(llm: LLM, ids: list[int], start: int) -> np.ndarray:
        with torch.no_grad():
            return llm.model(torch.tensor([ids]))[0, start:-1].argmax(-1).numpy()

    picks = {"default": [], "float32": [], "llama.cpp": []}
    free = {"float32": [first_divergence(a.token_ids, b.token_ids) for a, b in zip(runs, free_f32)]}
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    if have_llama:
        from llama_cpp import Llama

        threads = torch.get_num_threads()
        cpp = Llama(str(path), n_ctx=max(len(s) for _, s in sequences) + 8, logits_all=True, n_threads=threads,
                    n_threads_batch=threads, verbose=False)
        free["llama.cpp"] = []
    for (prompt, ids), run in zip(sequences, runs):
        start = len(prompt) - 1
        picks["default"].append(argmax_ours(default, ids, start))
        picks["float32"].append(argmax_ours(f32, ids, start))
        if have_llama:
            cpp.reset()
            cpp.eval(ids)
            picks["llama.cpp"].append(np.asarray(cpp.scores[start:len(ids) - 1]).argmax(-1))
            cpp.reset()
            generated = []
            for token in cpp.generate(prompt, top_k=1, temp=0.0, reset=True):
                generated.append(token)
                if len(generated) == args.tokens:
                    break
            free["llama.cpp"].append(first_divergence(run.token_ids, generated))

    def agreement(a: str, b: str) -> float:
        return float(np.mean(np.concatenate([x == y for x, y in zip(picks[a], picks[b])])))

    pairs = [("default", "float32")] + ([("default", "llama.cpp"), ("float32", "llama.cpp")] if have_llama else [])
    result = {
        "environment": environment(), "model": path.name, "prompts": len(PROMPTS), "tokens": args.tokens,
        "teacher_forced_top1_agreement": {f"{a} vs {b}": agreement(a, b) for a, b in pairs},
        "free_running_first_divergence": free,
    }
    lines = [*heading(f"Greedy agreement: {path.name}, {len(PROMPTS)} prompts x {args.tokens} tokens",
                      "Top-1 agreement when every setting is fed the same (teacher-forced) tokens, and where free-running "
                      "greedy output first departs from the default setting's.", result["environment"],
                      "python benchmarks/bench_agreement.py"),
             *table(["teacher-forced top-1 agreement", "share of positions"],
                    [[k, f"{v:.2%}"] for k, v in result["teacher_forced_top1_agreement"].items()]), "",
             *table(["free-running greedy vs the default setting", "first divergence per prompt (token index)"],
                    [[k, ", ".join(map(str, v))] for k, v in free.items()])]
    if not have_llama:
        lines += ["", "llama.cpp: not installed (see docs/BENCHMARKS.md)."]
    write_report(Path(args.out), "agreement", result, lines)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
