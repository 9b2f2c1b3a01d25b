"""The model's commands of `longmem`: demo, train, eval and generate.

The command tree's root is `memory_service.cli`: it lists every command and hands these
(with the rest of the command line) to `main` here, so `longmem serve` never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from memory_service import cli as service_cli
from memory_service.bank import DTYPES, SEARCH_DTYPES, BankSpec
from memory_service.tenancy import DEFAULT_API_KEY
from memory_service.tls import add_client_args
from model_worker.backbone import DEFAULT_BACKBONE
from model_worker.config import SEGMENT_LEN, MemoryConfig
from model_worker.sidenet import TRAIN_LAYERS, SideNetConfig
from model_worker.train import TrainConfig

DEFAULTS = argparse.ArgumentDefaultsHelpFormatter
# Text the shipped weights never saw (from two books held out of their training), for demo
DEMO_TEXT = Path(__file__).parent / "demo_text"


def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x]


def _band(text: str) -> list[int]:
    first, _, last = text.partition("-")
    try:
        return [int(first), int(last or first)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST layers, got {text!r}") from None


def _words(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _config(cls, args: argparse.Namespace):
    """Build dataclass `cls` from the parsed arguments of the same names; its `memory` and
    `sidenet` fields from the memory and SideNet options."""
    kw = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    kw["memory"] = MemoryConfig(
        address=args.memory, api_key=args.api_key, shards=args.shards,
        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
        capacity_tokens=args.memory_tokens, bank_dtype=args.bank_dtype,
        search_dtype=args.search_dtype,
    )
    if "sidenet" in {f.name for f in fields(cls)} and hasattr(args, "k"):
        kw["sidenet"] = SideNetConfig(
            r=args.r, memory_layers=args.memory_layers, k=args.k, chunk_size=args.chunk_size,
            train_layers=getattr(args, "train_layers", SideNetConfig.train_layers),
            token_gate=getattr(args, "token_gate", SideNetConfig.token_gate),
            memory_rank=getattr(args, "memory_rank", SideNetConfig.memory_rank),
            map_search=getattr(args, "map_search", SideNetConfig.map_search),
        )
    return cls(**kw)


def _add_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--memory", default=None, metavar="HOST:PORT",
        help="a running memory service (default: start an embedded one)",
    )
    p.add_argument(
        "--api-key", default=os.environ.get("LONGMEM_API_KEY", DEFAULT_API_KEY),
        help="tenant API key (default $LONGMEM_API_KEY or the embedded default)",
    )
    add_client_args(p)
    p.add_argument("--shards", type=int, default=2, help="shards of the embedded service")
    p.add_argument(
        "--memory-tokens", type=int, default=BankSpec.capacity_tokens, help="bank capacity"
    )
    p.add_argument(
        "--bank-dtype", default=BankSpec.dtype, choices=sorted(DTYPES),
        help="how banks store keys and values (int8: per-chunk, per-head scales)",
    )
    p.add_argument(
        "--search-dtype", default=BankSpec.search_dtype, choices=sorted(SEARCH_DTYPES),
        help="how banks store the chunk means that search reads",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")


def _add_sidenet(p: argparse.ArgumentParser) -> None:
    d = SideNetConfig()
    p.add_argument("--k", type=int, default=d.k, help="retrieved tokens per token and head")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="tokens per chunk")
    p.add_argument("--r", type=int, default=d.r, help="SideNet layer reduction factor")
    p.add_argument(
        "--memory-layers", type=_band, default=None, metavar="FIRST-LAST",
        help="backbone layers whose copies use memory (default: 47%%-80%% of the depth, "
        "14-23 on SmolLM2)",
    )


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, help="default: the checkpoint's, or SmolLM2")
    p.add_argument(
        "--checkpoint", default=None,
        help="a folder written by longmem train (default: the shipped weights of the default "
        "backbone; `none`: an untrained SideNet)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from model_worker.train import train

    s = train(_config(TrainConfig, args))
    print(
        f"trained {s['steps']} steps ({s['tokens']} tokens, {s['workers']} worker(s)) in "
        f"{s['seconds']:.0f}s, {s['memory_seconds']:.1f}s in memory calls; loss "
        f"{s['first_loss']:.3f} -> {s['final_loss']:.3f}; checkpoint {s['checkpoint']}"
    )
    return 0


def _add_eval_args(p: argparse.ArgumentParser, distances: str, trials: int) -> None:
    p.add_argument("--segment-len", type=int, default=SEGMENT_LEN)
    p.add_argument("--docs", type=int, default=2, help="perplexity documents")
    p.add_argument("--segments", type=int, default=8, help="segments per document")
    p.add_argument(
        "--passkey-distances", type=_ints, default=_ints(distances),
        help="comma-separated haystack lengths in tokens",
    )
    p.add_argument("--passkey-trials", type=int, default=trials, help="per distance")
    p.add_argument(
        "--passkey-haystacks", type=_words, default=_words("prose,filler"),
        help="prose (the --data text) and/or filler (the classic repeated sentences)",
    )
    p.add_argument("--seed", type=int, default=0)


def cmd_eval(args: argparse.Namespace) -> int:
    from model_worker.evaluate import EvalConfig, format_table, run_eval

    result = run_eval(_config(EvalConfig, args))
    print(format_table(result["rows"]))
    if args.json_out:
        print(f"wrote {args.json_out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from model_worker.generate import GenerateConfig, generate

    generate(_config(GenerateConfig, args), lambda piece: print(piece, end="", flush=True))
    print()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Service up, model (shipped or given weights), perplexity and passkey with memory on,
    off and the backbone alone, on text the weights never saw; the table and each phase's
    time."""
    from model_worker.evaluate import EvalConfig, format_table, run_eval
    from model_worker.session import load_model, memory_session

    phases: dict[str, float] = {}
    t0 = time.perf_counter()

    def phase(name: str, seconds: float, detail: str = "") -> None:
        phases[name] = seconds
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}: {seconds:.1f}s {detail}", flush=True)

    t = time.perf_counter()
    model, tokenizer = load_model(args.backbone, args.checkpoint)
    model.eval()
    phase("model", time.perf_counter() - t, f"{model.backbone_name}, gates "
          f"{model.gates()['scale'].abs().mean():.2f}")
    data = args.data or ",".join(str(f) for f in sorted(DEMO_TEXT.glob("*.txt")))
    common = {"checkpoint": args.checkpoint, "segment_len": args.segment_len, "data": data,
              "docs": args.docs, "segments": args.segments, "passkey_trials": args.passkey_trials,
              "seed": args.seed, "json_out": None}
    runs = [  # the classic filler goes far cheaply; prose haystacks are read segment by segment
        EvalConfig(**common, sections=["perplexity", "passkey"], passkey_haystacks=["prose"],
                   passkey_distances=args.passkey_distances),
        EvalConfig(**common, sections=["passkey"], passkey_haystacks=["filler"],
                   passkey_distances=args.filler_distances),
    ]
    t = time.perf_counter()
    rows, result = [], {}
    with memory_session(MemoryConfig(shards=args.shards)) as client:
        phase("memory service", time.perf_counter() - t, f"({args.shards} shards)")
        for cfg in runs:
            result = run_eval(cfg, model, tokenizer, client)
            rows += result["rows"]
            for name, seconds in result["seconds"].items():
                phase(name, seconds)
    total = time.perf_counter() - t0
    print()
    print(format_table(rows))
    print()
    print(f"{'phase':<16} {'seconds':>8}")
    for name, seconds in phases.items():
        print(f"{name:<16} {seconds:>8.1f}")
    print(f"{'total':<16} {total:>8.1f}")
    result.update(rows=rows, phases=phases, total_seconds=total)
    out = Path(args.out) / "demo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def add_model_parsers(sub: argparse._SubParsersAction) -> None:
    """`longmem train`, `eval`, `generate` and `demo`."""
    summary = service_cli.MODEL_COMMANDS  # one-line help, shared with the root
    p = sub.add_parser("train", help=summary["train"], formatter_class=DEFAULTS)
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help="local path or hub id")
    p.add_argument(
        "--data", default=None, help="folder or comma-separated files of text (default: stdlib)"
    )
    p.add_argument(
        "--mix", choices=["recall", "plain"], default="recall",
        help="recall: facts and passages that come back 0.5-8k tokens later are written into "
        "the documents; plain: the documents as they are",
    )
    p.add_argument("--out", default="runs/longmem", help="checkpoint folder")
    p.add_argument("--segment-len", type=int, default=SEGMENT_LEN)
    p.add_argument("--batch-size", type=int, default=2, help="streams per worker")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument(
        "--gate-lr", type=float, default=TrainConfig.gate_lr,
        help="lr of the memory gates (with token gates: the shared part; each head's own "
        "trains at a tenth of it)",
    )
    p.add_argument(
        "--token-gate", action=argparse.BooleanOptionalAction, default=SideNetConfig.token_gate,
        help="gates shared by every memory head and set by each token's hidden state (a "
        "linear map), besides each head's own; --no-token-gate: per-head gates only",
    )
    p.add_argument(
        "--token-gate-lr", type=float, default=TrainConfig.token_gate_lr,
        help="lr of the token gates' map",
    )
    p.add_argument(
        "--memory-rank", type=int, default=SideNetConfig.memory_rank,
        help="rank of the low-rank maps on each memory layer's memory path (the query that "
        "reads memory, and memory's change to the output); 0: none",
    )
    p.add_argument(
        "--map-search", action=argparse.BooleanOptionalAction, default=SideNetConfig.map_search,
        help="the memory query map also shifts the queries that search memory",
    )
    p.add_argument(
        "--adapter-lr", type=float, default=TrainConfig.adapter_lr,
        help="lr of the memory path's low-rank maps",
    )
    p.add_argument(
        "--recall-weight", type=float, default=TrainConfig.recall_weight,
        help="loss weight of the tokens only memory can predict (answers, repeated passages)",
    )
    p.add_argument(
        "--distractors", type=int, default=TrainConfig.distractors,
        help="tokens of memory from documents no stream reads, written into every bank "
        "before its document (retrieval then searches a larger bank, as in long evaluations)",
    )
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--workers", type=int, default=1, help="Ray Train data-parallel workers")
    p.add_argument("--bank-prefix", default="train", help="bank names: PREFIX-wRANK-sSTREAM")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--train-layers", choices=TRAIN_LAYERS, default=SideNetConfig.train_layers,
        help="gates: the memory path (gates and memory maps); memory: the band's layers "
        "too; all: every SideNet layer",
    )
    _add_memory(p)
    _add_sidenet(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help=summary["eval"], formatter_class=DEFAULTS)
    _add_checkpoint(p)
    p.add_argument(
        "--data", default=None,
        help="perplexity documents and prose haystack: folder or comma-separated files "
        "(default: stdlib eval split)",
    )
    _add_eval_args(p, distances="2000,16000,100000", trials=20)
    p.add_argument("--icl", default=None, help="folder of ICL tasks (e.g. ../shared/data/icl)")
    p.add_argument("--icl-tasks", type=_words, default=_words("sst2,mr"))
    p.add_argument("--icl-memory-demos", type=int, default=2000)
    p.add_argument("--icl-shots", type=int, default=4)
    p.add_argument("--icl-test", type=int, default=100, help="test examples per seed")
    p.add_argument("--icl-seeds", type=int, default=3)
    p.add_argument("--icl-chunk-size", type=int, default=2, help="bank chunk size for ICL")
    p.add_argument("--sections", type=_words, default=_words("perplexity,passkey,icl"))
    p.add_argument("--json-out", default="eval.json")
    _add_memory(p)
    _add_sidenet(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("generate", help=summary["generate"], formatter_class=DEFAULTS)
    p.add_argument("--prompt", required=True)
    p.add_argument("--document", default=None, help="text file read into the bank first")
    p.add_argument("--bank", default="document", help="bank name (of your tenant)")
    _add_checkpoint(p)
    p.add_argument("--segment-len", type=int, default=SEGMENT_LEN)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    _add_memory(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("demo", help=summary["demo"], formatter_class=DEFAULTS)
    _add_checkpoint(p)
    p.add_argument(
        "--data", default=None, help=f"text the weights never saw (default: {DEMO_TEXT}/*.txt)"
    )
    p.add_argument("--out", default="runs/demo", help="folder of demo.json")
    p.add_argument("--shards", type=int, default=2, help="shards of the embedded service")
    _add_eval_args(p, distances="2000,16000", trials=10)
    p.add_argument(
        "--filler-distances", type=_ints, default=_ints("2000,16000,100000"),
        help="passkey with the classic filler haystack",
    )
    p.set_defaults(run=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longmem", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The embedded Ray runs on loopback for this process only; without this, Ray 2.60's
    # token authentication keeps the service's actors from starting here.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from transformers.utils import logging as hf_logging

    from model_worker.train import WorkerFailed

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return service_cli.run(build_parser(), argv)
    except WorkerFailed as e:
        print(f"longmem train: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
