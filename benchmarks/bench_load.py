"""Load time and peak memory of MiniLLM and llama.cpp (when installed) on one file, each load in a fresh
process, alternating, median of several runs after a warm-up (minillm.bench.load):
`python benchmarks/bench_load.py [--model FILE] [--runs 3]`."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from minillm.bench.load import load_figures
from minillm.loading import default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="a GGUF file or HF folder (default: the bundled model)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    path = Path(args.model) if args.model else default_model_path()
    engines = ["minillm"] + (["llama.cpp"] if path.suffix == ".gguf" and importlib.util.find_spec("llama_cpp") else [])
    print(json.dumps(load_figures(engines, path, args.runs), indent=1))


if __name__ == "__main__":
    main()
