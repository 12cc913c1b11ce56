"""Speculative decoding at batch 1 on the bundled SmolLM2-135M (default setting): decode speed without and
with n-gram drafts (prompt lookup) on input-grounded tasks (a code edit, a summary that quotes its source,
JSON extraction) and on free generation, with the acceptance rate and tokens per verification step; and
llama.cpp on the same file and prompts, plain and with its prompt lookup
(`llama_cpp.llama_speculative.LlamaPromptLookupDecoding`), in the same run. Then batch 16 (the four tasks
four times each) without and with speculation.

Greedy, chat-formatted prompts, up to NEW tokens. Decode speed is (tokens - 1) / (time of the last token -
time of the first), so prefill is left out; engines alternate within each round, ROUNDS rounds, medians
reported. Writes results/speculative.{json,md}.

    python benchmarks/bench_speculative.py [--no-llama-cpp]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from minillm import LLM, SamplingParams
from minillm.bench.common import environment
from minillm.bench.report import heading, table, write_report
from minillm.engine import LLMEngine
from minillm.loading import default_model_path

RESULTS = Path(__file__).resolve().parent / "results"
NEW, ROUNDS, THREADS = 128, 3, 2

TASKS = {
    "code edit": """Add type hints to this Python code. Return the whole code, changing nothing else.

```python
def parse_record(line, separator=","):
    fields = line.strip().split(separator)
    name = fields[0].strip()
    age = int(fields[1])
    city = fields[2].strip()
    return {"name": name, "age": age, "city": city}


def load_records(path, separator=","):
    records = []
    with open(path) as handle:
        for line in handle:
            if line.strip():
                records.append(parse_record(line, separator))
    return records
```""",
    "quoting summary": """Summarize the following text, quoting its key sentences word for word.

Text: The new bridge over the river opened on Monday after three years of construction. The bridge is 400 \
meters long and carries two lanes of traffic in each direction. The city council said that the bridge will \
reduce traffic in the old town by half. Local shops in the old town are worried that fewer people will visit \
them. The mayor said that the council will build a new parking area near the market to help the shops.""",
    "JSON extraction": """Extract every person from the text as a JSON list of objects with the keys "name", \
"age", "job" and "city".

Text: Maria Gonzalez is a 34 year old engineer who lives in Valencia. Her brother Carlos Gonzalez, 29, works \
as a teacher in Madrid. Their friend Anna Schmidt is a 41 year old doctor from Berlin. Anna's neighbour, \
Peter Novak, is a 52 year old taxi driver in Prague.""",
    "free generation": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def decode_rate(timings: list[float], tokens: int) -> float:
    """Tokens per second after the first token (timings: first and last token's arrival)."""
    return (tokens - 1) / (timings[1] - timings[0]) if tokens > 1 else 0.0


def minillm_run(engine: LLMEngine, ids: list[int]) -> dict:
    before = engine.stats()
    request = engine.add_request(ids, SamplingParams(max_tokens=NEW, temperature=0))
    start, first, steps, tokens = time.perf_counter(), None, 0, []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request and out.token_ids:
                first = first or time.perf_counter()
                steps += 1
                tokens += out.token_ids
    end = time.perf_counter()
    after = engine.stats()
    drafted = after.get("spec_drafted_tokens", 0) - before.get("spec_drafted_tokens", 0)
    accepted = after.get("spec_accepted_tokens", 0) - before.get("spec_accepted_tokens", 0)
    engine.reset_prefix_cache()
    return {"tokens": len(tokens), "decode_tok_s": decode_rate([first, end], len(tokens)),
            "total_s": end - start, "tokens_per_step": (len(tokens) - 1) / max(steps - 1, 1),
            "drafted": drafted, "accepted": accepted, "ids": tokens}


def llama_cpp_engines(path: Path) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    def make(draft):
        return Llama(str(path), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=2048, verbose=False,
                     draft_model=draft)

    return {"llama.cpp": make(None),
            "llama.cpp prompt lookup": make(LlamaPromptLookupDecoding(num_pred_tokens=10))}


def llama_cpp_run(model, ids: list[int]) -> dict:
    model.reset()
    start, first, count = time.perf_counter(), None, 0
    for _ in model.create_completion(ids, max_tokens=NEW, temperature=0.0, stream=True):
        first = first or time.perf_counter()
        count += 1
    end = time.perf_counter()
    return {"tokens": count, "decode_tok_s": decode_rate([first, end], count), "total_s": end - start}


def batch_run(engine: LLMEngine, prompts: list[list[int]]) -> dict:
    params = SamplingParams(max_tokens=NEW, temperature=0)
    start = time.perf_counter()
    outs = engine.generate(prompts, [params] * len(prompts))
    seconds = time.perf_counter() - start
    engine.reset_prefix_cache()
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tokens": tokens, "tok_s": tokens / seconds, "ids": [o.token_ids for o in outs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-llama-cpp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    llm = LLM(progress=False)
    tokenizer = llm.tokenizer
    engines = {"MiniLLM": llm.engine,
               "MiniLLM ngram": LLMEngine(llm.model, tokenizer, llm.eos_token_ids,
                                          replace(llm.engine.config, speculative="ngram"))}
    runners = {name: (lambda ids, e=e: minillm_run(e, ids)) for name, e in engines.items()}
    path = default_model_path()
    if not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None:
        for name, model in llama_cpp_engines(path).items():
            runners[name] = lambda ids, m=model: llama_cpp_run(m, ids)
    prompts = {task: tokenizer.encode_chat([{"role": "user", "content": text}]) for task, text in TASKS.items()}
    for ids in prompts.values():  # warm-up
        for run in runners.values():
            run(ids[:32])
    samples: dict[str, dict[str, list[dict]]] = {task: {name: [] for name in runners} for task in TASKS}
    for _ in range(ROUNDS):
        for task, ids in prompts.items():
            for name, run in runners.items():
                samples[task][name].append(run(ids))

    results: dict = {"environment": environment(), "new_tokens": NEW, "rounds": ROUNDS, "batch1": {}}
    rows = []
    for task in TASKS:
        plain = samples[task]["MiniLLM"][0]["ids"]
        spec = samples[task]["MiniLLM ngram"]
        assert all(s["ids"] == plain for s in spec), f"{task}: speculation changed the tokens"
        entry = {}
        for name, runs in samples[task].items():
            entry[name] = {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                           "tokens": runs[0]["tokens"]}
            if name == "MiniLLM ngram":
                drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
                entry[name] |= {"acceptance": accepted / drafted if drafted else 0.0,
                                "tokens_per_step": statistics.median(r["tokens_per_step"] for r in runs)}
        results["batch1"][task] = entry
        base = entry["MiniLLM"]["decode_tok_s"]
        ngram = entry["MiniLLM ngram"]
        row = [task, entry["MiniLLM"]["tokens"], f"{base:.1f}", f"{ngram['decode_tok_s']:.1f}",
               f"{ngram['decode_tok_s'] / base:.2f}x", f"{ngram['acceptance']:.0%}", f"{ngram['tokens_per_step']:.2f}"]
        if "llama.cpp" in entry:
            lc, lk = entry["llama.cpp"], entry["llama.cpp prompt lookup"]
            row += [f"{lc['decode_tok_s']:.1f}", f"{lk['decode_tok_s']:.1f} ({lk['tokens']} tok)"]
        rows.append(row)

    batch = [ids for ids in prompts.values() for _ in range(4)]
    batch_samples = {name: [] for name in engines}
    for _ in range(ROUNDS):
        for name, engine in engines.items():
            batch_samples[name].append(batch_run(engine, batch))
    assert batch_samples["MiniLLM ngram"][0]["ids"] == batch_samples["MiniLLM"][0]["ids"]
    results["batch16"] = {name: {"tok_s": statistics.median(r["tok_s"] for r in runs), "tokens": runs[0]["tokens"]}
                          for name, runs in batch_samples.items()}

    env = results["environment"]
    header = ["task", "tokens", "MiniLLM tok/s", "MiniLLM ngram tok/s", "speed-up", "acceptance", "tokens/step"]
    if "llama.cpp" in runners:
        header += ["llama.cpp tok/s", "llama.cpp prompt lookup tok/s"]
    b16 = results["batch16"]
    lines = heading("Speculative decoding: n-gram drafts at batch 1", __doc__.split("\n\n")[1].replace("\n", " "),
                    env, "python benchmarks/bench_speculative.py") + table(header, rows) + [
        "", "Greedy tokens with speculation equal those without (checked in the run). Batch 16 (each task four "
        f"times, {NEW} new tokens at most, prefill included): {b16['MiniLLM']['tok_s']:.1f} tok/s without, "
        f"{b16['MiniLLM ngram']['tok_s']:.1f} tok/s with n-gram drafts "
        f"({b16['MiniLLM ngram']['tok_s'] / b16['MiniLLM']['tok_s']:.2f}x)."]
    write_report(RESULTS, "speculative", results, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
