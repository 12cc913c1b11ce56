"""Offline throughput: MiniLLM's continuous-batching engine vs HF transformers (same as
`minillm bench --throughput`). Writes results/throughput[_bfloat16][_compiled].{json,md,png} (dtype and variant in the name)."""

import sys

from minillm.bench.throughput import main

if __name__ == "__main__":
    main(sys.argv[1:])
