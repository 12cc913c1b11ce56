"""Speculative decoding on the CPU: decode speed without and with n-gram drafts (prompt lookup) at batch 1 on
input-grounded tasks (code edits, summaries asked to quote their source, JSON extraction; three prompts
each) and on free generation (three prompts), on the bundled SmolLM2-135M (default setting), with the
acceptance rate and tokens per verification step; llama.cpp on the same file and prompts, plain and with its
prompt lookup (`llama_cpp.llama_speculative.LlamaPromptLookupDecoding`), in the same run. Then batches of 4
and 16 without and with speculation; a draft model (`--draft-target FILE`: the bundled model drafts for
FILE, which must share its vocabulary); and the cost side on larger files (`--shape FILE`): what a
verification step of k + 1 rows costs beside a one-row step, and the speed-up an acceptance rate would give.

Greedy, chat-formatted prompts, up to NEW tokens. Decode speed is (tokens - 1) / (time of the last token -
time of the first), so prefill is left out; a task's figure is its prompts' tokens over their decode time.
Engines alternate within each round, ROUNDS rounds, medians reported; the tokens with speculation are
checked equal to those without. Writes results/speculative.{json,md}.

    python benchmarks/bench_speculative.py [--no-llama-cpp] [--draft-target FILE] [--shape FILE ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from minillm import LLM, SamplingParams
from minillm.bench.common import environment
from minillm.bench.report import heading, table, write_report
from minillm.engine import LLMEngine
from minillm.engine.scheduler import ScheduledStep
from minillm.engine.sequence import Sequence
from minillm.loading import default_model_path

RESULTS = Path(__file__).resolve().parent / "results"
NEW, ROUNDS, THREADS = 128, 3, 2
SHAPE_DRAFTS = (1, 2, 4, 8)  # draft lengths whose verification steps are timed on the larger files
SHAPE_RATES = (0.5, 0.7, 0.9)  # per-token acceptance rates the speed-up is computed for

# Three prompts per task. The first of each is the earlier benchmark's; the others were written for this
# run before their outputs were seen: a code edit that leaves most lines alone, a summary told to copy
# sentences or statements word for word, an extraction given the JSON format to fill (as such prompts
# usually are). A 135M model follows the instructions loosely (it paraphrases, invents fields, loops):
# what it copies from its input is what prompt lookup can win.
TASKS = {
    "code edit": [
        """Add type hints to this Python code. Return the whole code, changing nothing else.

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
        """Add input validation to this function: raise a ValueError if `quantity` is negative. Return the whole \
function with the change.

```python
def add_to_cart(cart, product_id, quantity, price):
    if product_id in cart:
        cart[product_id]["quantity"] += quantity
    else:
        cart[product_id] = {"quantity": quantity, "price": price}
    total = 0
    for item in cart.values():
        total += item["quantity"] * item["price"]
    return total
```""",
        """Rename the class `Acct` to `BankAccount` and keep everything else the same. Return the whole code.

```python
class Acct:
    def __init__(self, owner, balance=0):
        self.owner = owner
        self.balance = balance

    def deposit(self, amount):
        self.balance += amount
        return self.balance

    def withdraw(self, amount):
        if amount > self.balance:
            raise ValueError("insufficient funds")
        self.balance -= amount
        return self.balance
```""",
    ],
    "quoting summary": [
        """Summarize the following text, quoting its key sentences word for word.

Text: The new bridge over the river opened on Monday after three years of construction. The bridge is 400 \
meters long and carries two lanes of traffic in each direction. The city council said that the bridge will \
reduce traffic in the old town by half. Local shops in the old town are worried that fewer people will visit \
them. The mayor said that the council will build a new parking area near the market to help the shops.""",
        """Summarize the text below in three bullet points. Each bullet point must be one sentence copied exactly, \
word for word, from the text.

Text: The museum will open a new exhibition about the history of flight on April 5. The exhibition includes \
twenty aircraft, from early gliders to modern jets. Visitors can try a flight simulator in the main hall. \
Tickets cost 12 dollars for adults and 6 dollars for children. The museum is open every day except Monday.""",
        """Write a short summary of this news report for a newsletter. Quote the statements of the mayor and of the \
police chief exactly as they appear in the report.

Report: Heavy rain flooded several streets in the east of the city on Sunday night. About two hundred homes \
lost power for several hours. The mayor said: "We will repair the damaged roads as quickly as possible and \
help every family that needs it." The police chief said: "Please stay away from the river until the water \
level goes down." Schools in the east of the city will stay closed on Monday.""",
    ],
    "JSON extraction": [
        """Extract every person from the text as a JSON list of objects with the keys "name", \
"age", "job" and "city".

Text: Maria Gonzalez is a 34 year old engineer who lives in Valencia. Her brother Carlos Gonzalez, 29, works \
as a teacher in Madrid. Their friend Anna Schmidt is a 41 year old doctor from Berlin. Anna's neighbour, \
Peter Novak, is a 52 year old taxi driver in Prague.""",
        """Extract every person from the text. Reply with only a JSON list in this format:
[{"name": "...", "age": 0, "job": "...", "city": "..."}]

Text: Maria Gonzalez is a 34 year old engineer who lives in Valencia. Her brother Carlos Gonzalez, 29, works \
as a teacher in Madrid. Their friend Anna Schmidt is a 41 year old doctor from Berlin. Anna's neighbour, \
Peter Novak, is a 52 year old taxi driver in Prague.""",
        """Extract the orders from this email as a JSON list in this format:
[{"order_id": "...", "item": "...", "quantity": 0, "price": 0.0}]

Email: Hello, I would like to confirm my recent orders. Order A-1042 is for 3 ceramic mugs at 8.50 each. \
Order A-1043 is for 1 wooden cutting board at 24.00. Order A-1047 is for 6 cotton napkins at 3.25 each. \
Thank you, Helen.""",
    ],
    "free generation": [
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Explain how a bicycle works.",
        "Write a letter to a friend about your summer holiday by the sea.",
    ],
}
PROMPTS = [(task, i, text) for task, texts in TASKS.items() for i, text in enumerate(texts)]


def decode_rate(tokens: int, seconds: float) -> float:
    return (tokens - 1) / seconds if tokens > 1 else 0.0


def minillm_run(engine: LLMEngine, ids: list[int]) -> dict:
    before = engine.stats()
    request = engine.add_request(ids, SamplingParams(max_tokens=NEW, temperature=0))
    first, steps, tokens = None, 0, []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request and out.token_ids:
                first = first or time.perf_counter()
                steps += 1
                tokens += out.token_ids
    end = time.perf_counter()
    after = engine.stats()
    engine.reset_prefix_cache()
    return {"tokens": len(tokens), "decode_s": end - first, "steps": steps, "ids": tokens,
            "drafted": after.get("spec_drafted_tokens", 0) - before.get("spec_drafted_tokens", 0),
            "accepted": after.get("spec_accepted_tokens", 0) - before.get("spec_accepted_tokens", 0)}


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
    first, count = None, 0
    for _ in model.create_completion(ids, max_tokens=NEW, temperature=0.0, stream=True):
        first = first or time.perf_counter()
        count += 1
    return {"tokens": count, "decode_s": time.perf_counter() - first}


def summarise(runs: list[dict]) -> dict:
    """One engine on one prompt over the rounds: medians, and the drafts' totals."""
    entry = {"tokens": runs[0]["tokens"], "decode_s": statistics.median(r["decode_s"] for r in runs)}
    entry["decode_tok_s"] = decode_rate(entry["tokens"], entry["decode_s"])
    if "drafted" in runs[0]:
        entry |= {"steps": runs[0]["steps"], "drafted": runs[0]["drafted"], "accepted": runs[0]["accepted"]}
    return entry


def alternate(runners: dict, prompts: list[list[int]]) -> list[dict]:
    """Each prompt's runs per engine: a warm-up, then ROUNDS rounds with the engines in turn on each prompt."""
    for ids in prompts:
        for run in runners.values():
            run(ids[:32])
    samples = [{name: [] for name in runners} for _ in prompts]
    for _ in range(ROUNDS):
        for ids, sample in zip(prompts, samples):
            for name, run in runners.items():
                sample[name].append(run(ids))
    return samples


def batch1(runners: dict, prompts: list[list[int]]) -> list[dict]:
    samples = alternate(runners, prompts)
    for (task, i, _), sample in zip(PROMPTS, samples):
        plain = sample["MiniLLM"][0]["ids"]
        assert all(r["ids"] == plain for r in sample["MiniLLM ngram"]), f"{task} {i}: speculation changed the tokens"
    return [{name: summarise(runs) for name, runs in sample.items()} for sample in samples]


def task_totals(entries: list[dict]) -> dict:
    """A task's prompts together: decode tokens over decode time, acceptance, tokens per step."""
    out = {}
    for name in entries[0]:
        tokens = sum(e[name]["tokens"] - 1 for e in entries)
        out[name] = {"decode_tok_s": tokens / sum(e[name]["decode_s"] for e in entries)}
        if "drafted" in entries[0][name]:
            drafted, accepted = sum(e[name]["drafted"] for e in entries), sum(e[name]["accepted"] for e in entries)
            out[name] |= {"acceptance": accepted / drafted if drafted else 0.0,
                          "tokens_per_step": tokens / sum(e[name]["steps"] - 1 for e in entries)}
    return out


def batch_run(engine: LLMEngine, prompts: list[list[int]]) -> dict:
    params = SamplingParams(max_tokens=NEW, temperature=0)
    before = engine.stats().get("spec_drafted_tokens", 0)
    start = time.perf_counter()
    outs = engine.generate(prompts, [params] * len(prompts))
    seconds = time.perf_counter() - start
    engine.reset_prefix_cache()
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tokens": tokens, "tok_s": tokens / seconds, "ids": [o.token_ids for o in outs],
            "drafted": engine.stats().get("spec_drafted_tokens", 0) - before}


def batched(engines: dict, prompts: list[list[int]]) -> dict:
    samples = {name: [] for name in engines}
    for _ in range(ROUNDS):
        for name, engine in engines.items():
            samples[name].append(batch_run(engine, prompts))
    assert all(s["ids"] == samples["MiniLLM"][0]["ids"] for runs in samples.values() for s in runs)
    return {name: {"tok_s": statistics.median(r["tok_s"] for r in runs), "tokens": runs[0]["tokens"],
                   "drafted": runs[0]["drafted"]} for name, runs in samples.items()}


def draft_model(target: Path, prompts: list[list[int]]) -> dict:
    """The bundled model drafting for `target` (same vocabulary): the cost model's choice, and drafts forced
    (min_acceptance 0, 4 tokens) to see the acceptance rate and what it costs."""
    llm = LLM(target, progress=False)
    draft = str(default_model_path())
    engines = {"MiniLLM": llm.engine,
               "MiniLLM ngram": _engine(llm, "ngram"),
               "draft model": _engine(llm, {"model": draft}),
               "draft model, forced": _engine(llm, {"model": draft, "min_acceptance": 0, "num_speculative_tokens": 4})}
    samples = alternate({name: (lambda ids, e=e: minillm_run(e, ids)) for name, e in engines.items()}, prompts)
    for sample in samples:
        assert all(r["ids"] == sample["MiniLLM"][0]["ids"] for runs in sample.values() for r in runs)
    entries = [{name: summarise(runs) for name, runs in sample.items()} for sample in samples]
    return {"target": target.name, "draft": Path(draft).name, "prompts": entries, "total": task_totals(entries)}


def _engine(llm: LLM, speculative) -> LLMEngine:
    return LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, replace(llm.engine.config, speculative=speculative))


def shape_costs(path: Path | None) -> dict:
    """Verification steps of k + 1 rows (one sequence after 256 tokens of context: the last token and k
    drafts) beside one-row steps, each the fastest of 5, and the speed-up a per-token acceptance rate a would
    give with k drafts: (1 - a^(k+1)) / (1 - a) tokens per step over the step's relative cost."""
    llm = LLM(path, progress=False) if path is not None else LLM(progress=False)
    runner, context = llm.engine.runner, 256
    seq = Sequence([1] * (context + 1), SamplingParams(max_tokens=2, temperature=0))
    seq.block_table, seq.num_computed = list(range(context // runner.cache.block_size + 1)), context
    seq.state = SimpleNamespace(matcher=None, generator=None)

    def step_ms(k: int) -> float:
        step = ScheduledStep([seq], [1 + k], [[1] * k])
        runner.run(step)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            runner.run(step)
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    with torch.inference_mode():
        one = step_ms(0)
        relative = {k: step_ms(k) / one for k in SHAPE_DRAFTS}
    best = {}
    for a in SHAPE_RATES:
        gains = {k: (1 - a ** (k + 1)) / (1 - a) / relative[k] for k in SHAPE_DRAFTS}
        k = max(gains, key=gains.get)
        best[str(a)] = {"k": k, "speed_up": gains[k]}
    return {"file": Path(path or default_model_path()).name, "one_row_ms": one,
            "relative_step": {str(k): v for k, v in relative.items()}, "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--draft-target", type=Path, help="a GGUF file with the bundled model's vocabulary")
    parser.add_argument("--shape", type=Path, nargs="*", default=[], help="larger GGUF files for the cost side")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    llm = LLM(progress=False)
    tokenizer = llm.tokenizer
    engines = {"MiniLLM": llm.engine, "MiniLLM ngram": _engine(llm, "ngram")}
    runners = {name: (lambda ids, e=e: minillm_run(e, ids)) for name, e in engines.items()}
    if not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None:
        for name, model in llama_cpp_engines(default_model_path()).items():
            runners[name] = lambda ids, m=model: llama_cpp_run(m, ids)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": text}]) for _, _, text in PROMPTS]
    entries = batch1(runners, prompts)
    env = environment()
    if "llama.cpp" in runners:
        import llama_cpp

        env["llama_cpp_python"] = llama_cpp.__version__
    results: dict = {"environment": env, "new_tokens": NEW, "rounds": ROUNDS,
                     "cost_model_ms": [(r, t * 1e3) for r, t in engines["MiniLLM ngram"].drafter.cost.points],
                     "prompts": [{"task": task, "index": i, **entry} for (task, i, _), entry in zip(PROMPTS, entries)],
                     "tasks": {task: task_totals([e for (t, _, _), e in zip(PROMPTS, entries) if t == task])
                               for task in TASKS}}
    first = [prompts[i] for i, (_, index, _) in enumerate(PROMPTS) if index == 0]
    results["batch4"] = batched(engines, first)
    results["batch16"] = batched(engines, prompts + first)
    if args.draft_target is not None:
        results["draft_model"] = draft_model(args.draft_target, first)
    results["shapes"] = [shape_costs(None)] + [shape_costs(path) for path in args.shape]
    write_report(RESULTS, "speculative", results, report(results, "llama.cpp" in runners, args))
    print((RESULTS / "speculative.md").read_text())


def report(results: dict, llama: bool, args: argparse.Namespace) -> list[str]:
    def cells(entry: dict, tokens: int | None) -> list[str]:
        base, spec = entry["MiniLLM"]["decode_tok_s"], entry["MiniLLM ngram"]
        acceptance = spec["acceptance"] if "acceptance" in spec else \
            (spec["accepted"] / spec["drafted"] if spec["drafted"] else 0.0)
        per_step = spec["tokens_per_step"] if "tokens_per_step" in spec else (spec["tokens"] - 1) / max(spec["steps"] - 1, 1)
        row = [] if tokens is None else [tokens]
        row += [f"{base:.1f}", f"{spec['decode_tok_s']:.1f}", f"**{spec['decode_tok_s'] / base:.2f}x**",
                f"{acceptance:.0%}", f"{per_step:.2f}"]
        if llama:
            row += [f"{entry['llama.cpp']['decode_tok_s']:.1f}", f"{entry['llama.cpp prompt lookup']['decode_tok_s']:.1f}"]
        return row

    header = ["MiniLLM tok/s", "with n-gram drafts", "speed-up", "acceptance", "tokens/step"]
    if llama:
        header += ["llama.cpp tok/s", "llama.cpp prompt lookup tok/s"]
    rows = [[task] + cells(entry, None) for task, entry in results["tasks"].items()]
    prompt_rows = [[f"{p['task']} {p['index'] + 1}"] + cells(p, p["MiniLLM"]["tokens"]) for p in results["prompts"]]
    b4, b16 = results["batch4"], results["batch16"]
    lines = heading("Speculative decoding: prompt lookup (n-gram drafts), a draft model, the cost side",
                    " ".join(__doc__.split("\n\n")[1].split()).replace("NEW", str(results["new_tokens"]))
                    .replace("ROUNDS rounds", f"{results['rounds']} rounds"), results["environment"],
                    "python benchmarks/bench_speculative.py" + (f" --draft-target {args.draft_target}"
                                                                if args.draft_target else "")
                    + (" --shape " + " ".join(map(str, args.shape)) if args.shape else ""))
    lines += ["## Batch 1, bundled SmolLM2-135M (Q4_1 GGUF), by task (three prompts each)", ""]
    lines += table(["task"] + header, rows)
    lines += ["", "By prompt (tokens: the greedy answer's length, at most 128):", ""]
    lines += table(["prompt", "tokens"] + header, prompt_rows)
    model = ", ".join(f"{r}: {t:.1f}" for r, t in results["cost_model_ms"])
    lines += ["", f"The engine's cost model, measured at its start-up in this run (rows: ms per step): {model}.", "",
              "## Batches", "",
              f"Batch 4 (the first prompt of each task): {b4['MiniLLM']['tok_s']:.1f} tok/s without, "
              f"{b4['MiniLLM ngram']['tok_s']:.1f} with n-gram drafts (**{b4['MiniLLM ngram']['tok_s'] / b4['MiniLLM']['tok_s']:.2f}x**,"
              f" {b4['MiniLLM ngram']['drafted']} draft tokens fed). Batch 16 (the twelve prompts and the first of each "
              f"task again; prefill included, the batch shrinks as answers end): {b16['MiniLLM']['tok_s']:.1f} tok/s "
              f"without, {b16['MiniLLM ngram']['tok_s']:.1f} with (**{b16['MiniLLM ngram']['tok_s'] / b16['MiniLLM']['tok_s']:.2f}x**,"
              f" {b16['MiniLLM ngram']['drafted']} draft tokens fed: none while the batch saturates the CPU)."]
    if "draft_model" in results:
        dm = results["draft_model"]
        header_dm = ["prompt", "tokens", "target alone tok/s", "n-gram", "draft model (cost model)", "draft model, forced k=4",
                     "forced: acceptance", "forced: tokens/step"]
        dm_rows = []
        for (task, _, _), entry in zip([p for p in PROMPTS if p[1] == 0], dm["prompts"]):
            forced = entry["draft model, forced"]
            dm_rows.append([task, entry["MiniLLM"]["tokens"], f"{entry['MiniLLM']['decode_tok_s']:.1f}",
                            f"{entry['MiniLLM ngram']['decode_tok_s']:.1f}", f"{entry['draft model']['decode_tok_s']:.1f}",
                            f"{forced['decode_tok_s']:.1f}",
                            f"{forced['accepted'] / forced['drafted'] if forced['drafted'] else 0:.0%}",
                            f"{(forced['tokens'] - 1) / max(forced['steps'] - 1, 1):.2f}"])
        lines += ["", f"## A draft model: {dm['draft']} drafting for {dm['target']}", "",
                  "The same SmolLM2-135M re-quantized by llama.cpp (same vocabulary): the draft is as large as the target, "
                  "so a draft token costs a whole step plus its verification row and cannot pay; the cost model sees it "
                  "and drafts nothing. Forced drafts show the route works and what the acceptance is.", ""]
        lines += table(header_dm, dm_rows)
    lines += ["", "## The cost side on larger files", "",
              "A verification step of k + 1 rows over a one-row step (one sequence, 256 tokens of context), and the "
              "speed-up a per-token acceptance rate a would give at the best k: computed, not measured end to end "
              "(the larger files are random valid blocks: their text is nonsense, so their acceptance says nothing).", ""]
    shape_rows = []
    for shape in results["shapes"]:
        shape_rows.append([shape["file"], f"{shape['one_row_ms']:.1f}"]
                          + [f"{shape['relative_step'][str(k)]:.2f}" for k in SHAPE_DRAFTS]
                          + [f"{shape['best'][str(a)]['speed_up']:.2f}x (k={shape['best'][str(a)]['k']})" for a in SHAPE_RATES])
    lines += table(["file", "1-row step ms"] + [f"k={k} step / 1-row" for k in SHAPE_DRAFTS]
                   + [f"a={a}" for a in SHAPE_RATES], shape_rows)
    return lines


if __name__ == "__main__":
    main()
