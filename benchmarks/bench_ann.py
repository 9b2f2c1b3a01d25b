"""Approximate indexes against exact search by bank size: `longmem bench --suites index` (the
suite is in memory_service/bench/index.py), writing to benchmarks/results/ann/ (JSON and PNG
plots). Any `longmem bench` flag passes through, e.g. `--sizes 65536 --kinds ivf_flat,hnsw`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memory_service.cli import main

if __name__ == "__main__":
    out = Path(__file__).parent / "results" / "ann"
    sys.exit(main(["bench", "--suites", "index", "--out", str(out), *sys.argv[1:]]))
