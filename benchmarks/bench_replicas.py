"""Replicas behind Ray Serve: throughput of one `minillm serve` against `--replicas 2` with the prefix-aware
router and with the power of two choices (Ray Serve's default policy), on requests that share prompt
prefixes.

Each run sends `--prefixes` prompts of `--prefix-len` random tokens, each `--per-prefix` times with its own
ending of 16 tokens, in a shuffled order, `--concurrency` at a time (streaming, `--output-len` tokens each,
greedy, ignore_eos); a run's prefixes are new to the servers (drawn from the run's seed), the same for
every setup. Reported per setup: medians over the runs (after one warm-up run) of output tokens/s,
requests/s, TTFT and end-to-end latency, the prefix-cache hit rate (prompt tokens found in the replicas'
caches, from their /metrics) and the busiest replica's share of the prompt tokens; the seconds from
starting the server to its first 200 on /health, and the resident memory of its processes after the runs
(Ray's included). Writes results/replicas.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

from minillm.argtypes import positive_int
from minillm.bench.common import environment
from minillm.bench.report import heading, table, write_report
from minillm.bench.serving import _level, _start_server

SETUPS = {"1 server": [], "2 replicas, prefix-aware router": ["--replicas", "2"],
          "2 replicas, power of two choices": ["--replicas", "2", "--router", "pow2"]}


COUNTERS = ("minillm_prompt_tokens_total", "minillm_prefix_cache_queries_total", "minillm_prefix_cache_hits_total")


def counters(base: str) -> dict[str, dict[str, float]]:
    """Prompt tokens received, looked up in the prefix cache and found there: by replica ("" for one server)."""
    text = httpx.get(base + "/metrics", timeout=60).text
    return {name: {replica: float(value) for replica, value in
                   re.findall(rf'^{name}(?:{{replica="([^"]*)"}})? (\S+)$', text, re.M)} for name in COUNTERS}


def run_counts(before: dict, after: dict) -> dict[str, float]:
    """A run's prefix-cache hit rate, and the busiest replica's share of its prompt tokens."""
    delta = {name: {r: v - before[name].get(r, 0.0) for r, v in after[name].items()} for name in COUNTERS}
    prompts, queries, hits = (delta[name] for name in COUNTERS)
    return {"prefix_cache_hit_rate": sum(hits.values()) / sum(queries.values()),
            "busiest_replica_share": max(prompts.values()) / sum(prompts.values())}


def tree_rss_mib(root: int) -> float:
    """Resident memory of a process and every process below it; a page shared between processes (the
    libraries, torch) counts in each, so this is an upper bound."""
    parents, rss = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f)
        except OSError:
            continue
        parents[int(entry)] = int(fields["PPid"])
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
    tree, grew = {root}, True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree, grew = tree | below, bool(below)
    return sum(rss.get(pid, 0.0) for pid in tree)


def workload(seed: int, args: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000, 40000) for _ in range(args.prefix_len)] for _ in range(args.prefixes)]
    prompts = [prefix + [rng.randrange(1000, 40000) for _ in range(16)] for prefix in prefixes
               for _ in range(args.per_prefix)]
    rng.shuffle(prompts)
    return prompts


def measure(flags: list[str], args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    proc, base = _start_server(args.model, "ACTIVE", flags)
    ready_s = time.perf_counter() - start
    try:
        runs = []
        for seed in range(args.runs + 1):  # seed 0: the warm-up run
            before = counters(base)
            level = asyncio.run(_level(base, workload(seed, args), args.output_len, args.concurrency, args.timeout))
            level.update(run_counts(before, counters(base)))
            runs.append(level)
            print(f"  run {seed}{' (warm-up)' if seed == 0 else ''}: {level['output_tok_s']:.1f} tok/s, hit rate "
                  f"{level['prefix_cache_hit_rate']:.1%}, busiest replica {level['busiest_replica_share']:.0%}",
                  flush=True)
        rss_mib = tree_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    runs = runs[1:]
    median = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
    return {"flags": flags, "runs": runs, "ready_s": ready_s, "rss_mib": rss_mib,
            "output_tok_s": median(lambda r: r["output_tok_s"]),
            "request_throughput": median(lambda r: r["request_throughput"]),
            "ttft_median_s": median(lambda r: r["ttft_s"]["median"]),
            "e2e_median_s": median(lambda r: r["e2e_s"]["median"]),
            "prefix_cache_hit_rate": median(lambda r: r["prefix_cache_hit_rate"])}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--prefixes", type=positive_int, default=8)
    parser.add_argument("--prefix-len", type=positive_int, default=512, help="tokens")
    parser.add_argument("--per-prefix", type=positive_int, default=8, help="requests sharing each prefix")
    parser.add_argument("--output-len", type=positive_int, default=32)
    parser.add_argument("--concurrency", type=positive_int, default=8)
    parser.add_argument("--runs", type=positive_int, default=3, help="measured runs per setup, after a warm-up run")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run at most")
    parser.add_argument("--out", default="benchmarks/results/cpu_zen2")
    args = parser.parse_args(argv)
    setups = {}
    for name, flags in SETUPS.items():
        print(name, flush=True)
        setups[name] = measure(flags, args)
    results = {"env": environment(), "workload": {k: getattr(args, k) for k in (
        "prefixes", "prefix_len", "per_prefix", "output_len", "concurrency", "runs")}, "setups": setups}
    write(Path(args.out), results, argv)


def write(out: Path, results: dict, argv: list[str]) -> None:
    w = results["workload"]
    single = results["setups"]["1 server"]["output_tok_s"]
    description = (f"`minillm serve` (bundled model, its default setting) on loopback on an AMD EPYC Zen 2, alone "
                   f"or as `--replicas 2` behind Ray Serve (each replica one thread of the two cores). Per run: "
                   f"{w['prefixes']} prompts of {w['prefix_len']} random tokens, each sent {w['per_prefix']} times "
                   f"with its own 16-token ending, "
                   f"shuffled, {w['concurrency']} requests at a time, {w['output_len']} output tokens each (streamed, "
                   f"greedy, ignore_eos); each run's prefixes are new. Medians of {w['runs']} runs after a warm-up "
                   f"run; the load generator shares the two cores.")
    rows = [[name, f"{s['output_tok_s']:.1f}", " / ".join(f"{r['output_tok_s']:.1f}" for r in s["runs"]),
             f"{s['output_tok_s'] / single:.2f}x", f"{s['request_throughput']:.2f}", f"{s['ttft_median_s'] * 1e3:.0f}",
             f"{s['e2e_median_s'] * 1e3:.0f}", f"{s['prefix_cache_hit_rate']:.1%}",
             " / ".join(f"{r['busiest_replica_share']:.0%}" for r in s["runs"]), f"{s['ready_s']:.1f}",
             f"{s['rss_mib']:,.0f}"] for name, s in results["setups"].items()]
    lines = [*heading("Replicas behind Ray Serve", description, results["env"],
                      f"python benchmarks/bench_replicas.py {' '.join(argv)}".rstrip()),
             *table(["setup", "output tok/s", "each run", "vs 1 server", "req/s", "TTFT median (ms)",
                     "E2E median (ms)", "prefix-cache hit rate", "busiest replica's share of prompts, each run",
                     "ready after (s)", "memory, all processes (MiB RSS)"], rows),
             "", "On two cores one server is the fastest: it already computes on both (two threads), two replicas "
                 "only split them (one thread each), and Ray's processes, the extra hop through its proxy and the "
                 "front deployment, and the load generator take their share. Between the routers, the prefix-aware "
                 "one computes each shared prefix once, as one server does (the same hit rate: each prefix's first "
                 "request misses), where the power of two choices computes many twice. But with few prefixes, "
                 "affinity costs balance: a run's throughput follows how evenly its prefixes fall on the replicas "
                 "(the busiest one's share), which the power of two choices keeps even. What changes on a "
                 "many-core host: [docs/scale_out.md](../../../docs/scale_out.md#on-two-cores-and-on-many)."]
    write_report(out, "replicas", results, lines)


if __name__ == "__main__":
    main(sys.argv[1:])
