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
from memory_service.tenancy import DEFAULT_API_KEY
from model_worker.backbone import DEFAULT_BACKBONE

DEFAULTS = argparse.ArgumentDefaultsHelpFormatter


def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x]


def _words(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _config(cls, args: argparse.Namespace):
    """Build dataclass `cls` from the parsed arguments of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def _add_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--memory", default=None, metavar="HOST:PORT",
        help="a running memory service (default: start an embedded one)",
    )
    p.add_argument(
        "--api-key", default=os.environ.get("LONGMEM_API_KEY", DEFAULT_API_KEY),
        help="tenant API key (default $LONGMEM_API_KEY or the embedded default)",
    )
    p.add_argument("--shards", type=int, default=2, help="shards of the embedded service")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")


def _add_sidenet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=64, help="retrieved tokens per token and head")
    p.add_argument("--chunk-size", type=int, default=4, help="tokens per memory chunk")
    p.add_argument("--r", type=int, default=2, help="SideNet layer reduction factor")
    p.add_argument("--retrieval-layer", type=int, default=None, help="backbone layer m")


def _add_train_args(p: argparse.ArgumentParser, steps: int, segment_len: int) -> None:
    p.add_argument("--segment-len", type=int, default=segment_len)
    p.add_argument("--batch-size", type=int, default=1, help="streams per worker")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--gate-lr", type=float, default=2e-2, help="lr of the memory gates")
    p.add_argument(
        "--mix", choices=["recall", "plain"], default="recall",
        help="recall: documents with far-past dependencies written in; plain: as they are",
    )
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--memory-tokens", type=int, default=65536, help="bank capacity per stream")
    p.add_argument("--seed", type=int, default=0)


def cmd_train(args: argparse.Namespace) -> int:
    from model_worker.train import TrainConfig, train

    s = train(_config(TrainConfig, args))
    print(
        f"trained {s['steps']} steps ({s['tokens']} tokens, {s['workers']} worker(s)) in "
        f"{s['seconds']:.0f}s, {s['memory_seconds']:.1f}s in memory calls; loss "
        f"{s['first_loss']:.3f} -> {s['final_loss']:.3f}; checkpoint {s['checkpoint']}"
    )
    return 0


def _add_eval_args(p: argparse.ArgumentParser, docs: int, segments: int, distances: str,
                   trials: int) -> None:
    p.add_argument("--docs", type=int, default=docs, help="perplexity documents")
    p.add_argument("--segments", type=int, default=segments, help="segments per document")
    p.add_argument(
        "--passkey-distances", type=_ints, default=_ints(distances),
        help="comma-separated distances in tokens",
    )
    p.add_argument("--passkey-trials", type=int, default=trials)


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
    """Service up, backbone, brief adaptation (unless --checkpoint), perplexity and passkey
    with memory on and off; the table and each phase's time."""
    from memory_service.service import start_service
    from model_worker.evaluate import EvalConfig, format_table, run_eval
    from model_worker.train import TrainConfig, connect, load_model, train_worker

    phases: dict[str, float] = {}
    t0 = time.perf_counter()

    def phase(name: str, seconds: float, detail: str = "") -> None:
        phases[name] = seconds
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}: {seconds:.1f}s {detail}", flush=True)

    t = time.perf_counter()
    service = start_service(shards=args.shards)
    phase("memory service", time.perf_counter() - t, f"({args.shards} shards, {service.address})")
    try:
        t = time.perf_counter()
        model, tokenizer = load_model(args.backbone, args.checkpoint)
        model.eval()
        phase("backbone", time.perf_counter() - t, model.backbone_name)
        checkpoint = args.checkpoint
        if checkpoint is None:
            t = time.perf_counter()
            cfg = TrainConfig(
                backbone=args.backbone or DEFAULT_BACKBONE, out=args.out, steps=args.steps,
                segment_len=args.segment_len, batch_size=args.batch_size, lr=args.lr,
                warmup=args.warmup, shards=args.shards,
            )
            s = train_worker(cfg, service.address)
            model.load_checkpoint(args.out)
            checkpoint = args.out
            phase(
                "training", time.perf_counter() - t,
                f"(SideNet on the Python stdlib: {s['steps']} steps, {s['tokens']} tokens, "
                f"loss {s['first_loss']:.2f} -> {s['final_loss']:.2f}, "
                f"{s['memory_seconds']:.1f}s in memory calls)",
            )
        ecfg = EvalConfig(
            checkpoint=checkpoint, segment_len=args.segment_len, docs=args.docs,
            segments=args.segments, passkey_distances=args.passkey_distances,
            passkey_trials=args.passkey_trials, sections=["perplexity", "passkey"],
            json_out=str(Path(args.out) / "eval.json"), seed=args.seed,
        )
        client = connect(service.address)
        try:
            result = run_eval(ecfg, model, tokenizer, client)
        finally:
            client.close()
        for name, seconds in result["seconds"].items():
            phase(name, seconds)
    finally:
        service.stop()
    total = time.perf_counter() - t0
    print()
    print(format_table(result["rows"]))
    print()
    print(f"{'phase':<16} {'seconds':>8}")
    for name, seconds in phases.items():
        print(f"{name:<16} {seconds:>8.1f}")
    print(f"{'total':<16} {total:>8.1f}")
    result["phases"], result["total_seconds"] = phases, total
    out = Path(args.out) / "demo.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def add_model_parsers(sub: argparse._SubParsersAction) -> None:
    """`longmem train`, `eval`, `generate` and `demo`."""
    summary = service_cli.MODEL_COMMANDS  # one-line help, shared with the root
    p = sub.add_parser("train", help=summary["train"], formatter_class=DEFAULTS)
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help="local path or hub id")
    p.add_argument("--data", default=None, help="folder of text documents (default: stdlib)")
    p.add_argument("--out", default="runs/longmem", help="checkpoint folder")
    _add_train_args(p, steps=100, segment_len=512)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--workers", type=int, default=1, help="Ray Train data-parallel workers")
    p.add_argument("--bank-prefix", default="train", help="bank names: PREFIX-wRANK-sSTREAM")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _add_memory(p)
    _add_sidenet(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help=summary["eval"], formatter_class=DEFAULTS)
    p.add_argument("--backbone", default=None, help="default: the checkpoint's, or SmolLM2")
    p.add_argument("--checkpoint", default=None, help="a folder written by longmem train")
    p.add_argument("--data", default=None, help="perplexity documents (default: stdlib eval split)")
    p.add_argument("--segment-len", type=int, default=512)
    _add_eval_args(p, docs=2, segments=8, distances="256,2000,10000,100000", trials=3)
    p.add_argument("--memory-tokens", type=int, default=65536, help="perplexity bank capacity")
    p.add_argument("--icl", default=None, help="folder of ICL tasks (e.g. ../shared/data/icl)")
    p.add_argument("--icl-tasks", type=_words, default=_words("sst2,mr,subj,sst5,mpqa"))
    p.add_argument("--icl-memory-demos", type=int, default=500)
    p.add_argument("--icl-shots", type=int, default=4)
    p.add_argument("--icl-test", type=int, default=100)
    p.add_argument("--sections", type=_words, default=_words("perplexity,passkey,icl"))
    p.add_argument("--json-out", default="eval.json")
    p.add_argument("--seed", type=int, default=0)
    _add_memory(p)
    _add_sidenet(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("generate", help=summary["generate"], formatter_class=DEFAULTS)
    p.add_argument("--prompt", required=True)
    p.add_argument("--document", default=None, help="text file read into the bank first")
    p.add_argument("--bank", default="document", help="bank name (of your tenant)")
    p.add_argument("--backbone", default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--segment-len", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--memory-tokens", type=int, default=65536)
    p.add_argument("--seed", type=int, default=0)
    _add_memory(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("demo", help=summary["demo"], formatter_class=DEFAULTS)
    p.add_argument("--backbone", default=None, help="default SmolLM2 (or the checkpoint's)")
    p.add_argument("--checkpoint", default=None, help="skip training, evaluate this one")
    p.add_argument("--out", default="runs/demo", help="checkpoint and demo.json folder")
    p.add_argument("--shards", type=int, default=2, help="shards of the embedded service")
    p.add_argument("--segment-len", type=int, default=256, help="tokens per segment")
    p.add_argument("--steps", type=int, default=100, help="training steps")
    p.add_argument("--batch-size", type=int, default=1, help="streams")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="passkey keys")
    _add_eval_args(p, docs=2, segments=6, distances="100,1000,10000,100000", trials=4)
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

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return service_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
