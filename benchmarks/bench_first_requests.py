"""A new user's first requests: per file, each in a fresh process, the load, the first chat turn and the first
JSON-mode turn, each less the same turn again (what the first one pays once: a tokenizer copy, a grammar
engine's vocabulary), and the peak RSS after each. With --base-src, the same in a process running another
checkout's code (its src/), the two alternating round by round. Writes OUT.json and OUT.md.

    python benchmarks/bench_first_requests.py FILE.gguf [...] --out benchmarks/results/cpu_zen3/first_requests \
        [--base-src ../old/src]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from minillm.bench.common import environment
from minillm.bench.report import heading, table, write_report

_CHILD = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import minillm

def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024

start = time.perf_counter()
llm = minillm.LLM(sys.argv[1], progress=False)
figures = {"load_s": time.perf_counter() - start, "load_peak_mib": peak()}
messages = [{"role": "user", "content": "Name three colours."}]
for name, params in (("chat", minillm.SamplingParams(max_tokens=1)),
                     ("json", minillm.SamplingParams(max_tokens=1, guided_json={"type": "object"}))):
    times = []
    for _ in range(2):
        start = time.perf_counter()
        llm.chat(messages, params)
        times.append(time.perf_counter() - start)
    figures[f"first_{name}_extra_s"] = times[0] - times[1]
    figures[f"{name}_peak_mib"] = peak()
print(json.dumps(figures))
"""


def one_run(path: Path, src: str | None) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{path.name}: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md are written")
    parser.add_argument("--base-src", default=None, help="another checkout's src/ folder, measured beside this one")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    versions = {"this": None, **({"base": args.base_src} if args.base_src else {})}
    results: dict = {"environment": environment(), "files": {}}
    rows = []
    for path in args.files:
        for src in versions.values():
            one_run(path, src)  # warm-up: the file in the page cache, kernels loaded
        runs: dict[str, list[dict]] = {name: [] for name in versions}
        for _ in range(args.runs):
            for name, src in versions.items():
                runs[name].append(one_run(path, src))
        medians = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
        results["files"][path.name] = {"runs": runs, "medians": medians}
        for name, m in medians.items():
            rows.append([path.name, name, f"{m['load_s']:.2f}", f"{m['load_peak_mib']:.0f}",
                         f"{m['first_chat_extra_s']:.2f}", f"{m['chat_peak_mib']:.0f}",
                         f"{m['first_json_extra_s']:.2f}", f"{m['json_peak_mib']:.0f}"])
        print(rows[-len(versions):], flush=True)
    command = "python benchmarks/bench_first_requests.py " + " ".join(sys.argv[1:])
    lines = heading("First requests: load, first chat turn, first JSON-mode turn", __doc__.split("\n\n")[0],
                    results["environment"], command)
    lines += table(["file", "code", "load s", "peak MiB after load", "first chat turn: extra s",
                    "peak MiB after chat", "first JSON turn: extra s", "peak MiB after JSON"], rows)
    write_report(args.out.parent, args.out.name, results, lines)


if __name__ == "__main__":
    main()
