"""Load time and peak memory, each load in a fresh process (so the figure is the load's alone, import and
process start excluded), for MiniLLM (`LLM(path)`) and llama.cpp (`Llama(path)`) on the same file. Both
then compute one token, so lazily mapped weights are counted. The file is in the page cache after a
warm-up run: what is measured is the loader, not the disk."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

_RSS = "int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() / 2**20"
# the peak RSS of this process's memory map: VmHWM, not ru_maxrss, which a child inherits from its parent's
# RSS at fork (a benchmark that has loaded other models would see their size)
_PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"
_CHILDREN = {
    "minillm": f"""
import json, resource, sys, time
import minillm
base = {_RSS}
start = time.perf_counter()
llm = minillm.LLM(sys.argv[1], progress=False)
seconds = time.perf_counter() - start
llm.generate([[1, 2, 3]], minillm.SamplingParams(max_tokens=1))
kv = llm.engine.runner.cache.nbytes / 2**20
print(json.dumps({{"load_s": seconds, "peak_rss_mib": {_PEAK},
                  "import_rss_mib": base, "kv_cache_mib": kv}}))
""",
    "llama.cpp": f"""
import json, resource, sys, time
from llama_cpp import Llama
base = {_RSS}
start = time.perf_counter()
model = Llama(sys.argv[1], n_ctx=2048, n_threads=2, verbose=False)
seconds = time.perf_counter() - start
model.eval([1, 2, 3])
print(json.dumps({{"load_s": seconds, "peak_rss_mib": {_PEAK},
                  "import_rss_mib": base}}))
""",
}


def one_load(engine: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILDREN[engine], str(path)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{engine} could not load {path.name}: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_figures(engines: list[str], path: Path, runs: int) -> dict[str, dict]:
    """Per engine: load seconds and peak RSS (medians of `runs`, the engines' loads alternating), the RSS
    after imports, and MiniLLM's KV cache pool."""
    for engine in engines:
        one_load(engine, path)  # warm-up: kernels built, file in the page cache
    runs_by_engine: dict[str, list[dict]] = {engine: [] for engine in engines}
    for _ in range(runs):
        for engine in engines:
            runs_by_engine[engine].append(one_load(engine, path))
    return {engine: {key: statistics.median(run[key] for run in measured) for key in measured[0]}
            for engine, measured in runs_by_engine.items()}
