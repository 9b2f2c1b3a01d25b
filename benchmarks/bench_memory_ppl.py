"""What memory can do for perplexity, and what each memory setting does, on held-out books.

Reads each document on the evaluation grid (512-token segments after 64 context tokens,
the first `--segments` of them) and reports perplexity as a ratio to
the backbone alone, overall and by quarter of the segment (as `longmem eval` counts perplexity):

- `--part context`: the backbone alone with more real context before each segment
  (512, 1024, 2048 tokens instead of 64): what perfect memory of the recent past is worth,
  an upper bound for memory with this backbone;
- `--part settings`: the SideNet with memory, one backbone pass per segment and several
  settings on it: the checkpoint as trained, the gates open (scale 1, bias 0: one softmax
  over local and memory; every other trained part at 0) and shifted, the memory distance,
  and top-k chunks;
- `--part memory`: the checkpoint as trained, its memory holding the document's own past
  (as `longmem eval` reads it) or, a control, as much of the other held-out document's
  past: what is gained from recalling the text itself, and what from memory being there.

Writes benchmarks/results/memory_ppl_<part>.json. Training-free settings use the SideNet
layers as copied; gates come from `--checkpoint` (default: the shipped weights).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memory_service.client import InProcessClient
from model_worker.data import Corpus, windows
from model_worker.positions import MemoryDistance
from model_worker.session import load_model, open_bank

BOOKS = "../shared/data/books"
HELD_OUT = ("doyle_adventures_of_sherlock_holmes.txt", "thoreau_walden.txt")
SEG, CTX, BUCKETS = 512, 64, 4
# name: (scale, bias, memory distance, top-k chunks); None = the checkpoint's gate
SETTINGS = {
    "checkpoint as trained": (None, None, 512, 16),
    "open": (1.0, 0.0, 512, 16),
    "open, k 32 chunks": (1.0, 0.0, 512, 32),
    "open, k 8 chunks": (1.0, 0.0, 512, 8),
    "open, distance 0": (1.0, 0.0, 0, 16),
    "open, distance 128": (1.0, 0.0, 128, 16),
    "open, distance 2048": (1.0, 0.0, 2048, 16),
    "scale 1, bias -1": (1.0, -1.0, 512, 16),
    "scale 1, bias +1": (1.0, 1.0, 512, 16),
    "scale 0.5, bias 0": (0.5, 0.0, 512, 16),
}


class Tally:
    """Summed token NLL per setting and quarter of the segment."""

    def __init__(self):
        self.nll: dict[str, torch.Tensor] = {}
        self.count = torch.zeros(BUCKETS, dtype=torch.float64)

    def add(self, name: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits (T, V), targets (T,): the segment's last T tokens."""
        nll = F.cross_entropy(logits.float(), targets, reduction="none").double()
        bucket = torch.arange(len(targets)) * BUCKETS // SEG
        self.nll.setdefault(name, torch.zeros(BUCKETS, dtype=torch.float64))
        self.nll[name].index_add_(0, bucket, nll)

    def count_tokens(self, n: int) -> None:
        self.count.index_add_(
            0, torch.arange(n) * BUCKETS // SEG, torch.ones(n, dtype=torch.float64)
        )

    def rows(self, base: str) -> list[dict]:
        ref = self.nll[base]
        return [
            {
                "setting": name,
                "perplexity": math.exp(nll.sum() / self.count.sum()),
                "ratio": math.exp((nll.sum() - ref.sum()) / self.count.sum()),
                "ratio_by_quarter": [
                    math.exp((nll[b] - ref[b]) / self.count[b]) for b in range(BUCKETS)
                ],
            }
            for name, nll in self.nll.items()
        ]


def grid(doc, segments: int) -> list[tuple[int, int, int]]:
    return windows(len(doc.tokens) - 1, SEG, CTX)[:segments]


@torch.no_grad()
def part_context(model, docs, segments: int, contexts=(512, 1024, 2048)) -> Tally:
    tally, backbone = Tally(), model.backbone.model
    for doc in docs:
        for _lo, s, e in tqdm(grid(doc, segments)[1:], desc=doc.name, leave=False):  # 1..: the
            # first segment has no text before it
            targets = doc.tokens[s + 1 : e + 1]
            for ctx in (CTX, *contexts):
                logits = backbone(doc.tokens[max(0, s - ctx) : e][None]).logits[0, -(e - s) :]
                tally.add(
                    "backbone" if ctx == CTX else f"backbone, {ctx} tokens before", logits, targets
                )
            tally.count_tokens(e - s)
    return tally


@torch.no_grad()
def part_settings(model, docs, segments: int) -> Tally:
    sidenet, tally, memory = model.sidenet, Tally(), InProcessClient()
    trained = {n: p.detach().clone() for n, p in sidenet.named_parameters() if p.requires_grad}
    rotations = {d: MemoryDistance(model.backbone.rotary_at(d)) for _, _, d, _ in SETTINGS.values()}

    def use(scale, bias, distance):
        for name, p in sidenet.named_parameters():  # as trained, or all at 0 but scale/bias
            if name in trained:
                p.copy_(trained[name] if scale is None else torch.zeros_like(p))
        for joint in sidenet.joint_layers:
            if scale is not None:
                joint.scale.fill_(scale)
                joint.bias.fill_(bias)
            joint.to_memory = rotations[distance]
        sidenet.to_memory = rotations[distance]

    for doc in docs:
        open_bank(memory, model, "ppl", 1 << 20)
        for i, (lo, s, e) in enumerate(tqdm(grid(doc, segments), desc=doc.name, leave=False)):
            ids, targets, n_ctx = doc.tokens[lo:e][None], doc.tokens[s + 1 : e + 1], s - lo
            bb = model.backbone(ids)
            tally.add("backbone", model.backbone.logits(bb.hidden[-1][0, n_ctx:]), targets)
            for name, (scale, bias, distance, k) in SETTINGS.items():
                use(scale, bias, distance)
                search = lambda q, k=k: memory.search(["ppl"], q.float(), k)  # noqa: E731
                hidden, _ = sidenet(bb, search if i else None, n_ctx)  # segment 0: empty bank
                tally.add(name, model.backbone.logits(hidden[0, n_ctx:]), targets)
            tally.count_tokens(e - s)
            memory.append("ppl", bb.keys[0, n_ctx:], bb.values[0, n_ctx:])
    return tally


@torch.no_grad()
def part_memory(model, docs, segments: int) -> Tally:
    tally, memory, k = Tally(), InProcessClient(), model.config.k // model.config.chunk_size
    for d, doc in enumerate(docs):
        other = docs[(d + 1) % len(docs)]
        for bank in ("own", "foreign"):
            open_bank(memory, model, bank, 1 << 20)
        pairs = list(zip(grid(doc, segments), grid(other, segments), strict=True))
        for i, ((lo, s, e), (o_lo, o_s, o_e)) in enumerate(tqdm(pairs, desc=doc.name)):
            ids, targets, n_ctx = doc.tokens[lo:e][None], doc.tokens[s + 1 : e + 1], s - lo
            bb = model.backbone(ids)
            tally.add("backbone", model.backbone.logits(bb.hidden[-1][0, n_ctx:]), targets)
            for bank in ("own", "foreign"):
                search = lambda q, b=bank: memory.search([b], q.float(), k)  # noqa: E731
                hidden, _ = model.sidenet(bb, search if i else None, n_ctx)  # 0: empty bank
                name = "memory: own past" if bank == "own" else "memory: other book's past"
                tally.add(name, model.backbone.logits(hidden[0, n_ctx:]), targets)
            tally.count_tokens(e - s)
            memory.append("own", bb.keys[0, n_ctx:], bb.values[0, n_ctx:])
            theirs = model.backbone(other.tokens[o_lo:o_e][None])
            memory.append("foreign", theirs.keys[0, o_s - o_lo :], theirs.values[0, o_s - o_lo :])
    return tally


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("context", "settings", "memory"), default="settings")
    p.add_argument("--segments", type=int, default=16, help="per document")
    p.add_argument("--checkpoint", default=None, help="default: the shipped weights")
    p.add_argument("--books", default=BOOKS)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(None, args.checkpoint)
    model.eval()
    docs = Corpus(",".join(f"{args.books}/{b}" for b in HELD_OUT), tok, SEG).documents()
    run = {"context": part_context, "settings": part_settings, "memory": part_memory}[args.part]
    rows = run(model, docs, args.segments).rows("backbone")
    print("| setting | perplexity | vs backbone | by quarter of the segment |\n|---|---|---|---|")
    for r in rows:
        quarters = " / ".join(f"{x:.3f}" for x in r["ratio_by_quarter"])
        print(f"| {r['setting']} | {r['perplexity']:.2f} | {r['ratio']:.4f}x | {quarters} |")
    out = Path(f"benchmarks/results/memory_ppl_{args.part}.json")
    out.write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
