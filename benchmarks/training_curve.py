"""The learning curve of a `longmem train` log as a Markdown table, one row per block of steps.

    python benchmarks/training_curve.py runs/v12.log.jsonl --block 15

Columns: mean loss; loss on the tokens only memory can predict (weighted by their count)
and their count; each head's gate scale without the token's part at the block's last step
(mean and largest); the mean norm of the token maps' rows (scale / bias); the norm of the
memory maps' zero-initialised halves (`adapter_norm`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def block_row(steps: list[dict]) -> str:
    recalled = [(s["recall_loss"], s["recall_tokens"]) for s in steps if s["recall_tokens"]]
    n = sum(t for _, t in recalled)
    recall = f"{sum(loss * t for loss, t in recalled) / n:.3f}" if n else "-"
    last = steps[-1]
    scale = flat(last["gate_scale"])
    token_maps = "-"  # per-head gates only (--no-token-gate)
    if "gate_token_scale" in last:
        token_maps = (f"{mean(flat(last['gate_token_scale'])):.2f} / "
                      f"{mean(flat(last['gate_token_bias'])):.2f}")
    return (
        f"| {steps[0]['step']}-{last['step']} | {mean([s['loss'] for s in steps]):.3f} "
        f"| {recall} | {n} | {mean(scale):.2f} | {max(scale):.2f} | {token_maps} "
        f"| {last['adapter_norm']:.2f} |"
    )


def curve_table(log: Path, block: int) -> str:
    steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not steps:
        raise SystemExit(f"{log}: no steps logged")
    lines = [
        "| steps | loss | loss on recalled tokens | recalled tokens | gate scale, mean "
        "| largest | token map row norm, scale / bias | maps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [block_row(steps[i : i + block]) for i in range(0, len(steps), block)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", type=Path, help="the .log.jsonl that `longmem train` wrote")
    p.add_argument("--block", type=int, default=15, help="steps per row")
    args = p.parse_args()
    print(curve_table(args.log, args.block))


if __name__ == "__main__":
    main()
