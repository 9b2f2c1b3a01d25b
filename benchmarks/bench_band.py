"""Which memory layers let SmolLM2 recover a pass key from memory, untrained?

For each band of memory layers (`--bands`), an untrained SideNet with every gate open
(scale 1, bias 0: one softmax over the local window and the retrieved chunks) runs the
passkey evaluation (`model_worker.evaluate.eval_passkey`, filler haystack by default) with
the in-process memory. Reported per band: exact keys recovered, and how often the key's
chunk was retrieved at the question. docs/method.md (section 1b) explains the choice of the
default band from this.

    python benchmarks/bench_band.py --bands 17-17,14-19,18-23,14-23 --distances 2000 --trials 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memory_service.client import InProcessClient
from model_worker.data import encode
from model_worker.evaluate import EvalConfig, eval_passkey
from model_worker.session import load_model
from model_worker.sidenet import SideNetConfig

BOOK = Path(__file__).resolve().parents[2] / "shared/data/books/thoreau_walden.txt"
OUT = Path(__file__).resolve().parent / "results" / "band.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bands", default="17-17,14-19,18-23,14-23")
    p.add_argument("--distances", default="2000")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--haystack", default="filler", choices=["filler", "prose"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = EvalConfig(
        passkey_distances=[int(d) for d in args.distances.split(",")],
        passkey_trials=args.trials, passkey_haystacks=[args.haystack], seed=args.seed,
    )
    rows = []
    for band in args.bands.split(","):
        first, last = (int(x) for x in band.split("-"))
        model, tok = load_model(None, "none", SideNetConfig(memory_layers=[first, last]), "cpu")
        with torch.no_grad():
            for joint in model.sidenet.joint_layers:
                joint.scale.fill_(1.0)
        prose = encode(tok, BOOK.read_text()[:200_000]) if args.haystack == "prose" else []
        for r in eval_passkey(cfg, model.eval(), InProcessClient(), tok, prose):
            if r["setting"] in ("memory on", "key retrieved"):
                rows.append({"band": band, **r})
                print(f"{band:>6} {r['figure']:<24} {r['setting']:<14} {r['value']:.2f}",
                      flush=True)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print("| band | figure | keys recovered | key chunk retrieved |\n|---|---|---|---|")
    for on, hit in zip(rows[::2], rows[1::2], strict=True):
        print(f"| {on['band']} | {on['figure']} | {on['value']:.0%} | {hit['value']:.0%} |")


if __name__ == "__main__":
    main()
