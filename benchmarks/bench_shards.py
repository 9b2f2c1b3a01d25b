"""Search and append throughput against the number of shards: `longmem bench --suites shards`
(the suite is in memory_service/bench/shards.py), writing shards.json and shards.png to
benchmarks/results/. Any `longmem bench` flag passes through, e.g.
`--shards 1,2 --shard-tokens 262144`, or `--address auto` on a Ray cluster.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memory_service.cli import main

if __name__ == "__main__":
    out = Path(__file__).parent / "results"
    sys.exit(main(["bench", "--suites", "shards", "--out", str(out), *sys.argv[1:]]))
