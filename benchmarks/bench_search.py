"""Training-shaped search, LongMem's original faiss design against the bank in process and
the gRPC service (1 and 2 shards): `longmem bench --suites search` (the suite is in
memory_service/bench/search.py), writing search.json and search.png to benchmarks/results/.
Any `longmem bench` flag passes through, e.g. `--search-iters 10 --search-queries random`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memory_service.cli import main

if __name__ == "__main__":
    out = Path(__file__).parent / "results"
    sys.exit(main(["bench", "--suites", "search", "--out", str(out), *sys.argv[1:]]))
