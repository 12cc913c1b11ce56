"""Serving benchmark (vLLM's benchmark_serving, scaled to a CPU): a load generator against
`minillm serve` on loopback, bounded in request count and time.

For each concurrency level, N streaming completion requests (random token prompts, fixed output
length, ignore_eos) are sent with at most that many in flight. Reported per level: request
throughput, output tokens/s, and TTFT, TPOT, ITL and end-to-end latency (mean, median, p99). Then,
with the server stopped, the same engine runs the highest level's requests offline (`LLM.generate`):
what serving costs is each level's output tokens/s as a share of that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..argtypes import positive_int
from .common import environment
from .report import heading, table, write_report


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values) if values else float("nan"),
            "median": statistics.median(values) if values else float("nan"), "p99": _percentile(values, 99)}


async def _one(client, prompt: list[int], output_len: int) -> dict:
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    ttft = stamps[0] - start if stamps else end - start
    return {"ttft": ttft, "e2e": end - start, "tokens": tokens,
            "tpot": (end - start - ttft) / max(tokens - 1, 1), "itl": [b - a for a, b in zip(stamps, stamps[1:])]}


async def _level(base: str, prompts: list[list[int]], output_len: int, concurrency: int, timeout: float) -> dict:
    import httpx

    gate = asyncio.Semaphore(concurrency)

    async def limited(client, prompt):
        async with gate:
            return await _one(client, prompt, output_len)

    async with httpx.AsyncClient(base_url=base, timeout=timeout) as client:
        start = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(limited(client, p) for p in prompts)), timeout)
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "request_throughput": len(results) / wall, "output_tok_s": tokens / wall,
            "ttft_s": _summary([r["ttft"] for r in results]), "tpot_s": _summary([r["tpot"] for r in results]),
            "itl_s": _summary([x for r in results for x in r["itl"]]), "e2e_s": _summary([r["e2e"] for r in results])}


def _start_server(model: str | None, wait_policy: str, flags: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "minillm", "serve", "--port", str(port), *flags] + (["--model", model] if model else [])
    # The server shares the cores with this client; PASSIVE OpenMP waits stop threads spinning for a
    # descheduled partner, at a cost when the machine is otherwise idle.
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": wait_policy},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become healthy within 300 s")


def _offline(model: str | None, prompts: list[list[int]], output_len: int, concurrency: int, fast_prefill: bool,
             tensor_parallel_size: int = 1) -> dict:
    """The server's engine without the server: the same requests through `LLM.generate`, after a warm-up."""
    from ..llm import LLM
    from ..sampling_params import SamplingParams

    llm = LLM(model, progress=False, max_num_seqs=concurrency, fast_prefill=fast_prefill,
              tensor_parallel_size=tensor_parallel_size)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    return {"requests": len(prompts), "max_num_seqs": concurrency, "wall_s": wall,
            "output_tok_s": sum(len(o.token_ids) for o in outputs) / wall}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="minillm bench --serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model for the server this benchmark starts")
    parser.add_argument("--url", default=None, help="benchmark a running server instead (loopback only)")
    parser.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--num-requests", type=positive_int, default=16, help="requests per concurrency level")
    parser.add_argument("--input-len", type=positive_int, nargs=2, default=[64, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=positive_int, default=64)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per level at most")
    parser.add_argument("--fast-prefill", action="store_true", help="start the server (and the offline run) with it")
    parser.add_argument("--tensor-parallel-size", type=positive_int, default=1, metavar="N",
                        help="start the server (and the offline run) with the model sharded over N processes")
    parser.add_argument("--omp-wait-policy", default="ACTIVE", choices=["ACTIVE", "PASSIVE"],
                        help="OMP_WAIT_POLICY of the server this benchmark starts")
    parser.add_argument("--out", default="benchmarks/results", help="folder for serving.json/.md/.png")
    args = parser.parse_args(argv)
    if args.url and not args.url.split("//")[-1].startswith(("127.", "localhost", "[::1]")):
        parser.error("--url must be a loopback address (127.0.0.0/8, localhost or [::1])")

    flags = ["--fast-prefill"] * args.fast_prefill + ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    proc, base = (None, args.url.rstrip("/")) if args.url else _start_server(args.model, args.omp_wait_policy, flags)
    try:
        rng = random.Random(0)
        levels, prompts = [], []
        for concurrency in args.concurrency:
            prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(*args.input_len))]
                       for _ in range(args.num_requests)]
            asyncio.run(_level(base, prompts[:1], 4, 1, args.timeout))  # warm-up
            level = asyncio.run(_level(base, prompts, args.output_len, concurrency, args.timeout))
            levels.append(level)
            print(f"concurrency {concurrency:3d}: {level['request_throughput']:.2f} req/s, "
                  f"{level['output_tok_s']:.1f} tok/s, TTFT median {level['ttft_s']['median'] * 1e3:.0f} ms, "
                  f"TPOT median {level['tpot_s']['median'] * 1e3:.0f} ms, ITL p99 {level['itl_s']['p99'] * 1e3:.0f} ms",
                  flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    results = {"env": environment(), "omp_wait_policy": None if args.url else args.omp_wait_policy,
               "requests_per_level": args.num_requests, "input_len": args.input_len,
               "output_len": args.output_len, "levels": levels,
               "fast_prefill": args.fast_prefill, "tensor_parallel_size": args.tensor_parallel_size,
               "offline": None if args.url else _offline(args.model, prompts, args.output_len, max(args.concurrency),
                                                         args.fast_prefill, args.tensor_parallel_size)}
    if results["offline"]:
        print(f"offline, the same {len(prompts)} requests: {results['offline']['output_tok_s']:.1f} tok/s", flush=True)
    suffix = "_fast_prefill" * args.fast_prefill + (f"_tp{args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else "")
    _write(Path(args.out), results, argv, suffix)
    return results


def _write(out: Path, results: dict, argv: list[str] | None, suffix: str = "") -> None:
    ms = lambda s: f"{s * 1e3:.0f}"  # noqa: E731
    setting = "with `--fast-prefill`" if results.get("fast_prefill") else "its default setting"
    if results.get("tensor_parallel_size", 1) > 1:
        setting += f", `--tensor-parallel-size {results['tensor_parallel_size']}`"
    description = (f"`minillm serve` ({setting}) on loopback; {results['requests_per_level']} "
                   f"streaming completion requests per level, prompts of {results['input_len'][0]}-{results['input_len'][1]} "
                   f"random tokens, {results['output_len']} output tokens (ignore_eos), greedy. Client and server share "
                   f"the machine; the server runs with OMP_WAIT_POLICY={results['omp_wait_policy']}.")
    offline = results.get("offline")
    share = lambda lv: f"{lv['output_tok_s'] / offline['output_tok_s']:.0%}" if offline else "—"  # noqa: E731
    rows = [[lv["concurrency"], f"{lv['request_throughput']:.2f}", f"{lv['output_tok_s']:.1f}", share(lv),
             *(" / ".join(ms(lv[k][q]) for q in ("mean", "median", "p99")) for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s"))]
            for lv in results["levels"]]
    lines = [*heading("Serving benchmark", description, results["env"], f"minillm bench --serve {' '.join(argv or [])}".rstrip()),
             *table(["concurrency", "req/s", "output tok/s", "of offline", "TTFT mean / median / p99 (ms)",
                     "TPOT mean / median / p99 (ms)", "ITL mean / median / p99 (ms)", "E2E mean / median / p99 (ms)"], rows)]
    if offline:
        lines += ["", f"Offline, the same engine on the last level's {offline['requests']} requests (`LLM.generate`, "
                      f"max_num_seqs {offline['max_num_seqs']}, server stopped): **{offline['output_tok_s']:.1f}** output tok/s."]

    def plot(plt):
        levels = results["levels"]
        xs = [lv["concurrency"] for lv in levels]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(xs, [lv["output_tok_s"] for lv in levels], marker="o")
        left.set_xlabel("concurrent clients")
        left.set_ylabel("output tokens / s")
        left.set_title("throughput")
        for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "end-to-end")):
            right.plot(xs, [lv[key]["median"] * 1e3 for lv in levels], marker="o", label=f"{label} median")
        right.set_yscale("log")
        right.set_xlabel("concurrent clients")
        right.set_ylabel("ms")
        right.set_title("latency")
        right.legend()
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.grid(True, alpha=0.3)
        return fig

    write_report(out, f"serving{suffix}", results, lines, plot)
