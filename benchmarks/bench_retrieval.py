"""How much of the backbone's own attention on distant text do the retrieved chunks capture?

For a frozen backbone (default SmolLM2) and held-out prose: the backbone reads `--context`
tokens at once (true rotary positions); the last `--window` tokens are the queries and the
tokens before them, minus the first `--sinks`, are the "memory". For every query token
and head we know how much attention mass the backbone puts on that memory. The bank holds
the same tokens as the system writes them (segment by segment, each encoded after a
`--prefix` of the previous one; keys un-rotated, mean-pooled per chunk), and for each way of
scoring a query against the bank (`--positions`) we take the top `--top-k` chunks and add up
the backbone's attention mass on their tokens. Reported: captured share of the memory mass
(ratio of sums over tokens and heads), for each layer and positional choice, against the
best possible `--top-k` chunks and random ones.

Positional choices (keys stay un-rotated, i.e. at position 0):
  none        the un-rotated query (the score at distance 0)
  delta=D     the query rotated by D positions (InfLLM rotates by the local window)
  local       the query rotated by its own position in the local window (LongLLaMA-like)

    python benchmarks/bench_retrieval.py --layers 13,17,21 --positions none,delta=512
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model_worker.backbone import DEFAULT_BACKBONE, load_backbone
from model_worker.data import encode
from model_worker.positions import rotate_by

BOOK = Path(__file__).resolve().parents[2] / "shared/data/books/thoreau_walden.txt"


def layer_qk(model, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple]:
    """One backbone pass over ids (1, N): per layer, un-rotated q (N, Hq, D) and k (N, Hkv, D)."""
    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out: dict[int, dict] = {j: {} for j in layers}
    handles = []
    for j in layers:
        attn = model.model.layers[j].self_attn
        handles.append(attn.q_proj.register_forward_hook(
            lambda _m, _a, o, j=j: out[j].__setitem__("q", o[0].unflatten(-1, (hq, d)))))
        handles.append(attn.k_proj.register_forward_hook(
            lambda _m, _a, o, j=j: out[j].__setitem__("k", o[0].unflatten(-1, (hkv, d)))))
    with torch.no_grad():
        model.model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {j: (out[j]["q"], out[j]["k"]) for j in layers}


def true_attention(q, k, rotary, n_queries: int) -> torch.Tensor:
    """Backbone attention probabilities of the last n_queries tokens: (n, Hq, N)."""
    n_tok, hq, d = q.shape
    rep = hq // k.shape[1]
    pos = torch.arange(n_tok)
    qr, kr = rotate_by(q, pos, rotary), rotate_by(k, pos, rotary)
    qr = qr[-n_queries:]  # (n, Hq, D)
    kr = kr.repeat_interleave(rep, dim=1)  # (N, Hq, D)
    s = torch.einsum("thd,nhd->thn", qr, kr) * d**-0.5
    causal = pos[None, :] > pos[-n_queries:, None]  # (n, N)
    return torch.softmax(s.masked_fill(causal[:, None], float("-inf")), dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE)
    ap.add_argument("--text", default=str(BOOK))
    ap.add_argument("--offset", type=int, default=20000, help="first token of the text used")
    ap.add_argument("--context", type=int, default=3072)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--prefix", type=int, default=64, help="encoding prefix of each segment")
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--layers", default="13,17,21,25")
    ap.add_argument("--positions", default="none,local,delta=64,delta=512,delta=2048")
    ap.add_argument("--json", default="benchmarks/results/bench_retrieval.json")
    args = ap.parse_args()
    torch.manual_seed(0)

    model, tok = load_backbone(args.backbone)
    rotary = model.model.rotary_emb
    layers = [int(x) for x in args.layers.split(",")]
    ids = torch.tensor(encode(tok, Path(args.text).read_text()))[
        args.offset : args.offset + args.context
    ]
    n_mem = args.context - args.window
    mem_lo = args.sinks + (-args.sinks % args.chunk_size)  # first memory token, chunk-aligned
    n_chunks = (n_mem - mem_lo) // args.chunk_size
    mem_hi = mem_lo + n_chunks * args.chunk_size

    full = layer_qk(model, ids[None], layers)  # true attention: one pass over everything
    # the bank as the system writes it: segments of `window` tokens after a prefix
    bank_k = {j: [] for j in layers}
    for start in range(0, n_mem, args.window):
        lo = max(0, start - args.prefix)
        seg = layer_qk(model, ids[None, lo : start + args.window], layers)
        for j in layers:
            bank_k[j].append(seg[j][1][start - lo :])
    rows = []
    for j in layers:
        q, k_full = full[j]
        hq = q.shape[1]
        rep = hq // k_full.shape[1]
        attn = true_attention(q, k_full, rotary, args.window)  # (n, Hq, N)
        mem_attn = attn[..., mem_lo:mem_hi].unflatten(-1, (n_chunks, args.chunk_size)).sum(-1)
        total = mem_attn.sum()  # (n, Hq, chunks) -> mass on memory
        keys = torch.cat(bank_k[j])[mem_lo:mem_hi]  # (M, Hkv, D)
        ckeys = keys.unflatten(0, (n_chunks, args.chunk_size)).mean(1)  # (C, Hkv, D)
        ckeys = ckeys.repeat_interleave(rep, dim=1)  # (C, Hq, D)
        q_win = q[-args.window :]  # (n, Hq, D) un-rotated
        best = mem_attn.topk(args.top_k, dim=-1).values.sum() / total
        row = {"layer": j, "best": float(best), "random": args.top_k / n_chunks,
               "memory_mass": float(mem_attn.sum(-1).mean())}
        local_pos = torch.arange(args.window) + args.prefix
        for choice in args.positions.split(","):
            if choice == "none":
                qs = q_win
            elif choice == "local":
                qs = rotate_by(q_win, local_pos, rotary)
            elif choice.startswith("delta="):
                delta = int(choice.split("=")[1])
                qs = rotate_by(q_win, torch.full((args.window,), delta), rotary)
            else:
                raise SystemExit(f"unknown positional choice {choice!r}")
            s = torch.einsum("thd,chd->thc", qs, ckeys)
            top = s.topk(args.top_k, dim=-1).indices  # (n, Hq, top_k)
            row[choice] = float(mem_attn.gather(-1, top).sum() / total)
        rows.append(row)
        print(json.dumps(row))
    choices = args.positions.split(",")
    print(f"\ncaptured share of the backbone's attention mass on memory (top {args.top_k} "
          f"of {n_chunks} chunks, {args.window} queries, {args.context} tokens)")
    print(f"{'layer':>5} {'mass':>6} " + " ".join(f"{c:>10}" for c in choices)
          + f" {'best':>7} {'random':>7}")
    for r in rows:
        print(f"{r['layer']:>5} {r['memory_mass']:>6.2f} "
              + " ".join(f"{r[c]:>10.1%}" for c in choices)
              + f" {r['best']:>7.1%} {r['random']:>7.1%}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
