"""Serving load test of `minillm serve` (same as `minillm bench --serve`). Writes results/serving.{json,md,png}."""

import sys

from minillm.bench.serving import main

if __name__ == "__main__":
    main(sys.argv[1:])
