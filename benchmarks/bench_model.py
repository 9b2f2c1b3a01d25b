"""Training-step throughput of the LongMem model on the default backbone (SmolLM2-135M).

Rows, all measured in one run on the same segments (B x T tokens per step):
  backbone forward        frozen backbone only, no grad (the floor of any step)
  sidenet step, no memory backbone + SideNet forward, loss, backward, AdamW step
  sidenet step, in-process memory   same + search of each stream's bank (prefilled with
                          --memory-tokens of the backbone's own keys) + append afterwards

Prints a table and writes JSON to benchmarks/results/bench_model.json.
Example: python benchmarks/bench_model.py --segment 512 --batch 1 --repeats 3
GPU: --device cuda --dtype bfloat16 (banks stay float16 on the CPU client).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memory_service.client import InProcessClient, MemoryClient
from memory_service.service import start_service
from model_worker.model import LongMemModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: str) -> float:
    """Best (minimum) seconds of fn() over `repeats` runs after one warm-up run: the least
    disturbed by other processes on a shared machine."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-tokens", type=int, default=4096)
    ap.add_argument("--shards", type=int, default=2, help="shards of the gRPC service")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--out", default="benchmarks/results/bench_model.json")
    args = ap.parse_args()
    dev, B, T = args.device, args.batch, args.segment

    model, _ = LongMemModel.from_backbone(dtype=DTYPES[args.dtype])
    model.to(dev).train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-4, betas=(0.9, 0.98))
    vocab = model.backbone.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=g).to(dev)
    streams = [f"bench-{b}" for b in range(B)]

    service = start_service(shards=args.shards)
    memories = {"in-process": InProcessClient(), "gRPC": MemoryClient(service.address)}
    scratch = "bench-scratch"
    for memory in memories.values():
        capacity = max(65536, 2 * args.memory_tokens)
        model.create_banks(memory, [*streams, scratch], capacity_tokens=capacity)
    with torch.no_grad():
        for _ in range(args.memory_tokens // T):
            fill = torch.randint(0, vocab, (B, T), generator=g).to(dev)
            bb = model.backbone(fill)
            for b, s in enumerate(streams):
                for memory in memories.values():
                    memory.append(s, bb.keys[b].cpu(), bb.values[b].cpu())

    def backbone_forward():
        model.backbone(ids)

    def step(memory):
        out = model(ids, streams if memory else None, memory)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if memory is not None:  # keep the bank size fixed: append to a scratch stream
            memory.append(scratch, out.keys[0].detach().cpu(), out.values[0].detach().cpu())

    rows = [
        ("backbone forward", timed(backbone_forward, args.repeats, dev)),
        ("sidenet step, no memory", timed(lambda: step(None), args.repeats, dev)),
        *[
            (f"sidenet step, {name} memory", timed(lambda m=m: step(m), args.repeats, dev))
            for name, m in memories.items()
        ],
    ]
    memories["gRPC"].close()
    service.stop()
    base = rows[0][1]
    result = {
        "backbone": model.backbone_name, "device": dev, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "batch": B, "segment": T,
        "memory_tokens_per_stream": args.memory_tokens, "k": model.config.k,
        "chunk_size": model.config.chunk_size, "platform": platform.platform(),
        "rows": [{"name": n, "seconds": s, "tokens_per_s": B * T / s, "vs_backbone": s / base}
                 for n, s in rows],
    }
    print(f"{'row':34s} {'s/step':>8s} {'tokens/s':>9s} {'x backbone':>10s}")
    for r in result["rows"]:
        print(f"{r['name']:34s} {r['seconds']:8.3f} {r['tokens_per_s']:9.1f} "
              f"{r['vs_backbone']:10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
