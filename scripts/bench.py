#!/usr/bin/env python
"""Throughput, latency and memory of full tokens vs FastV vs Libra-Merging (see libra_train.bench.cli).

    python scripts/bench.py --model tiny --repeats 1 --warmup 0
    python scripts/bench.py --model llava15-7b-cpu [--methods full,fastv,libra] [--ratios 0.5,0.67,0.8] \
        [--out DIR] [--repeats N] [--device cpu|cuda]
"""

from libra_train.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
