"""Offline throughput: MiniLLM's continuous-batching engine vs HF transformers (same as
`minillm bench --throughput`). Writes results/throughput.{json,md,png}."""

import sys

from minillm.bench.throughput import main

if __name__ == "__main__":
    main(sys.argv[1:])
