"""SmolLM2's own memory keys and retrieval queries, for `longmem bench --index-keys`.

Reads the shared books on the evaluation grid (512-token segments after 64 context
tokens) and writes, as the model would write them to a bank, the un-rotated keys of the
memory band's layers (14-23 on SmolLM2: 10 layers x 3 kv heads x 64) to `keys.npy`,
float16, shaped (N, 3, 64) with one row per (token, layer), token-major: any prefix of
the file holds every layer's keys of the first tokens read. Also `queries.npy`
(128, 9, 64): 128 tokens of the last book, each with the 9 query heads of one band layer
(layers in turn), rotated by the memory distance exactly as the model's retrieval does.

    python benchmarks/real_keys.py --tokens 16777216 --out bench-keys
    longmem bench --suites index --index-keys bench-keys --sizes 1048576,4194304,16777216

A key row is a bank token of the index suite's shape (3 x 64), so a bank of N rows holds
the band's keys of N / 10 tokens of text.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model_worker.data import Corpus, windows
from model_worker.session import load_model

BOOKS = "../shared/data/books"
SEG, CTX, N_QUERIES = 512, 64, 128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=16 * 2**20, help="key rows to write")
    p.add_argument("--books", default=BOOKS, help="folder of text documents")
    p.add_argument("--out", default="bench-keys")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(None, "none")
    corpus = Corpus(args.books, tokenizer, SEG)
    docs = corpus.documents()
    n_layers = len(model.sidenet.sources)  # key rows per token of text
    available = sum(len(d.tokens) - CTX for d in docs) * n_layers
    if args.tokens > available:
        raise SystemExit(f"--tokens {args.tokens:,}: the books give only {available:,} key rows")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = (args.tokens, model.backbone.n_kv_heads, model.head_dim)
    keys = np.lib.format.open_memmap(out / "keys.npy", "w+", np.float16, shape)
    bar = tqdm(total=args.tokens, unit="row", unit_scale=True, desc="keys")
    grid = ((d.tokens, w) for d in docs[::-1] for w in windows(len(d.tokens), SEG, CTX))
    done, queries = 0, None
    with torch.no_grad():  # the last book first: the queries come from its start
        for ids, (w0, s0, end) in grid:
            if done == args.tokens:
                break
            bb = model.backbone(ids[None, w0:end])
            k = bb.keys[0, s0 - w0:]  # (T, n_mem * Hkv, D)
            rows = k.reshape(len(k) * n_layers, *shape[1:])  # (T * n_mem, Hkv, D)
            take = min(len(rows), args.tokens - done)
            keys[done: done + take] = rows[:take].to(torch.float16).numpy()
            done += take
            bar.update(take)
            if queries is None:  # saved at once: a prefix of keys.npy is usable while it grows
                queries = layer_queries(model, bb.queries[0, s0 - w0:], n_layers)
                np.save(out / "queries.npy", queries.to(torch.float16).numpy())
    bar.close()
    keys.flush()
    print(f"wrote {done:,} key rows ({math.ceil(done / n_layers):,} tokens x {n_layers} "
          f"layers) and {N_QUERIES} queries to {out}")


def layer_queries(model, q: torch.Tensor, n_layers: int) -> torch.Tensor:
    """q (T, n_mem * Hq, D) un-rotated -> (N_QUERIES, Hq, D): token i's heads of layer
    i % n_layers, rotated by the memory distance as retrieval rotates them."""
    q = model.sidenet.to_memory(q[None])[0]  # (T, n_mem * Hq, D)
    q = q.reshape(len(q), n_layers, -1, q.shape[-1])  # (T, n_mem, Hq, D)
    picks = torch.arange(N_QUERIES)
    return q[picks * (len(q) // N_QUERIES), picks % n_layers].float()


if __name__ == "__main__":
    main()
