"""Prefill, TTFT and decode at batch 1/4/16/32 for MiniLLM settings vs HF transformers and llama.cpp
(same as `minillm bench`). Writes results/speed.{json,md,png}."""

import sys

from minillm.bench.speed import main

if __name__ == "__main__":
    main(sys.argv[1:])
