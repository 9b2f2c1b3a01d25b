"""Memory-augmented adaptation: train the SideNet on long documents through the memory service.

Per step, for B streams (row b = the next segment of stream b; docs/method.md):

    out = model(segment, banks, memory)    # retrieval from each stream's bank
    loss.backward(); clip; optimizer step  # every --grad-accum steps
    model.append_memory(memory, banks, out)  # then the segment enters the banks

A stream's bank is reset when its document ends. With `--distractors N` it then first gets
N tokens of memory read from documents no stream reads (the same for every document, read
once at the start): retrieval must find the document's own past among far more chunks, as
it must in a 100k-token evaluation, while the documents themselves span 2k-9k tokens. The
memory is the embedded service (local
Ray + gRPC on loopback) unless `--memory HOST:PORT` names a running one. With
`--workers N`, Ray Train runs N data-parallel workers: each has its own streams and banks,
and gradients are averaged over the workers before every optimizer step.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memory_service.files import atomic_dir
from model_worker.backbone import DEFAULT_BACKBONE
from model_worker.config import SEGMENT_LEN, MemoryConfig
from model_worker.data import Corpus, DataError, RecallCorpus, Streams
from model_worker.joint_attention import HEAD_GATE_LR
from model_worker.model import LongMemModel
from model_worker.session import (
    UNTRAINED,
    SessionError,
    TimedMemory,
    append_in_parts,
    connect,
    default_device,
    load_model,
    open_bank,
    read_into_bank,
    read_memory,
    service_address,
)
from model_worker.sidenet import SideNetConfig

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"


@dataclass
class TrainConfig:
    backbone: str = DEFAULT_BACKBONE
    data: str | None = None  # folder or files of text documents; None = the Python stdlib
    mix: str = "recall"  # recall: documents with far-past dependencies; plain: as they are
    out: str = "runs/longmem"  # checkpoint folder (the final checkpoint; resumable)
    segment_len: int = SEGMENT_LEN
    batch_size: int = 2  # streams per worker
    steps: int = 100  # optimizer steps
    grad_accum: int = 1
    lr: float = 2e-4
    gate_lr: float = 0.1  # the memory gates (the shared part): own rate, no weight decay
    token_gate_lr: float = 1e-3  # the token gates' map (hidden size inputs: a smaller rate)
    adapter_lr: float = 1e-3  # the memory path's low-rank maps (SideNetConfig.memory_rank)
    recall_weight: float = 2.0  # loss weight of the tokens only memory can predict (recall mix)
    distractors: int = 0  # tokens of other documents' memory in every bank before its own
    warmup: int = 10
    weight_decay: float = 0.01
    clip: float = 1.0
    save_every: int = 0  # 0: only at the end
    resume: bool = False
    workers: int = 1  # > 1: Ray Train data parallel
    device: str | None = None
    seed: int = 0
    bank_prefix: str = "train"
    progress: bool = True
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    sidenet: SideNetConfig = field(default_factory=SideNetConfig)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The inverse of `dataclasses.asdict` (Ray Train passes the config as a dict)."""
        nested = {"memory": MemoryConfig(**d["memory"]),
                  "sidenet": SideNetConfig.from_dict(d["sidenet"])}
        return cls(**{**d, **nested})


# --- checkpoints -----------------------------------------------------------------------


def save_training_checkpoint(
    model: LongMemModel, opt: torch.optim.Optimizer, state: dict, path: str | Path
) -> None:
    """Write the whole checkpoint folder beside `path`, then swap it in: a crash leaves
    the previous checkpoint (or none), never a half-written one."""

    def write(tmp: Path) -> None:
        model.save_checkpoint(tmp)
        torch.save(opt.state_dict(), tmp / OPTIMIZER_STATE)
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))

    atomic_dir(path, write)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then linear (polynomial
    power 1, as in the paper) decay towards 0 at step `steps`."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    return max(0.0, 1 - (step + 1 - cfg.warmup) / (cfg.steps + 1 - cfg.warmup))


def adapter_norm(model: LongMemModel) -> float:
    """How far the memory path's low-rank maps have moved from 0: the norm of their
    zero-initialised `up` halves together (0 without maps)."""
    ups = [j.memory_query.up.weight for j in model.sidenet.joint_layers if j.memory_query]
    ups += [j.memory_out.up.weight for j in model.sidenet.joint_layers if j.memory_out]
    return float(sum(p.detach().float().pow(2).sum() for p in ups) ** 0.5)


def param_groups(model: LongMemModel, cfg: TrainConfig) -> list[dict]:
    """Weights with lr and weight decay; biases, norm weights and gates without. The memory
    gates have their own lr; with token gates that is the shared gate's, the per-head gates
    train at `HEAD_GATE_LR` of it and the token map at `token_gate_lr`; the memory path's
    low-rank maps at `adapter_lr`, without weight decay (they start at 0 and stay small)."""
    sidenet = model.sidenet
    gates = {id(p) for p in sidenet.gates()}
    shared = {id(p) for p in sidenet.shared_gate.parameters()} if sidenet.shared_gate else set()
    adapters = {id(p) for p in sidenet.adapters()}
    groups = {"weights": [], "no_decay": [], "gates": [], "head_gates": [], "token_gates": [],
              "adapters": []}
    for p in model.trainable_parameters():
        if id(p) in adapters:
            kind = "adapters"
        elif id(p) not in gates:
            kind = "no_decay" if p.ndim < 2 else "weights"
        elif p.ndim == 2:
            kind = "token_gates"
        else:
            kind = "head_gates" if shared and id(p) not in shared else "gates"
        groups[kind].append(p)
    lrs = {"weights": cfg.lr, "no_decay": cfg.lr, "gates": cfg.gate_lr,
           "head_gates": cfg.gate_lr * HEAD_GATE_LR, "token_gates": cfg.token_gate_lr,
           "adapters": cfg.adapter_lr}
    return [
        {"name": kind, "params": params, "lr": lrs[kind],
         "weight_decay": cfg.weight_decay if kind == "weights" else 0.0}
        for kind, params in groups.items()
    ]


@torch.no_grad()
def distractor_memory(
    model: LongMemModel, corpus: Corpus | RecallCorpus, n_tokens: int, segment_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory of the first `n_tokens` tokens (after each one's context) of `corpus`'s
    documents, read on the reading grid: keys and values (n_tokens, n_mem * Hkv, D),
    float16, on the CPU."""
    keys, values, done, i = [], [], 0, 0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="distractor memory")
    while done < n_tokens:
        if i >= len(corpus):
            raise DataError(f"--distractors {n_tokens}: the corpus holds only {done} tokens")
        doc, i = corpus.document(i), i + 1
        if doc is None:
            continue
        for k, v in read_memory(model, doc.tokens, segment_len):  # (T, Hkv, D)
            take = min(n_tokens - done, len(k))
            keys.append(k[:take].half().cpu())
            values.append(v[:take].half().cpu())
            done += take
            bar.update(take)
            if done == n_tokens:
                break
    bar.close()
    return torch.cat(keys), torch.cat(values)


# --- the loop --------------------------------------------------------------------------


def train_worker(cfg: TrainConfig, address: str, rank: int = 0, world: int = 1) -> dict:
    """Train on this worker's streams; average gradients over `world` workers (torch
    distributed, set up by Ray Train) when world > 1. Returns a summary (rank 0's view)."""
    import torch.distributed as dist

    torch.manual_seed(cfg.seed + rank)
    device = default_device(cfg.device)
    out = Path(cfg.out)
    resume = cfg.resume and (out / TRAINER_STATE).is_file()
    if cfg.resume and not resume:
        raise SessionError(f"--resume: no checkpoint in {out} (it has no {TRAINER_STATE})")
    init = str(out) if resume else UNTRAINED
    model, tokenizer = load_model(cfg.backbone, init, cfg.sidenet, device)
    corpus = Corpus(cfg.data, tokenizer, cfg.segment_len, "train" if cfg.data is None else "all")
    if cfg.data is not None:
        corpus.check()
    if cfg.mix == "recall":
        corpus = RecallCorpus(corpus, cfg.seed)
    elif cfg.mix != "plain":
        raise ValueError(f"--mix {cfg.mix!r}: choose recall or plain")
    streams = Streams(corpus, cfg.batch_size, model.config.context, cfg.seed, rank, world)
    distractors = None
    if cfg.distractors:  # documents of another seed: never read by a stream of this run
        other = RecallCorpus(corpus.source, cfg.seed + 1) if cfg.mix == "recall" else corpus
        distractors = distractor_memory(model, other, cfg.distractors, cfg.segment_len)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
    )
    start = 0
    if resume:
        state = json.loads((out / TRAINER_STATE).read_text())
        if state["world"] != world:
            raise ValueError(
                f"checkpoint {out} was trained with {state['world']} workers, not {world}"
            )
        opt.load_state_dict(torch.load(out / OPTIMIZER_STATE, map_location=device))
        streams.load_state_dict(state["streams"][rank])
        start = state["step"]
        if start >= cfg.steps:
            raise ValueError(f"checkpoint {out} is already at step {start}; raise --steps")

    memory = TimedMemory(connect(address, cfg.memory))
    banks = [f"{cfg.bank_prefix}-w{rank}-s{b}" for b in range(cfg.batch_size)]
    for b, bank in enumerate(banks):
        open_bank(memory, model, bank, cfg.memory.capacity_tokens, **cfg.memory.storage)
        s = streams.streams[b]
        if resume and s.doc >= 0 and s.segment > 0:  # rebuild what the bank held
            if distractors is not None:
                append_in_parts(memory, bank, *distractors)
            done = streams.current(b).tokens[: model.config.context + s.segment * cfg.segment_len]
            read_into_bank(memory, model, bank, done, cfg.segment_len)

    base_lr = [g["lr"] for g in opt.param_groups]
    log = open(out.parent / f"{out.name}.log.jsonl", "a") if rank == 0 else None
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    tokens_per_step = cfg.batch_size * cfg.segment_len * cfg.grad_accum * world
    bar = tqdm(
        total=cfg.steps, initial=start, disable=rank != 0 or not cfg.progress, unit="step",
        dynamic_ncols=True,
    )
    model.train()
    t0, losses, loss, summary = time.perf_counter(), [], float("nan"), {}
    for step in range(start, cfg.steps):
        for g, base in zip(opt.param_groups, base_lr, strict=True):
            g["lr"] = base * lr_at(step, cfg)
        step_loss, recall_nll, recall_n = 0.0, 0.0, 0
        for _ in range(cfg.grad_accum):
            batch = streams.next_batch()
            for bank, new in zip(banks, batch.new_document, strict=True):
                if new:
                    memory.reset_bank(bank)
                    if distractors is not None:
                        append_in_parts(memory, bank, *distractors)
            ids, targets = batch.input_ids.to(device), batch.targets.to(device)
            recall = batch.recall.flatten().to(device)  # (B*T,) only memory predicts these
            with autocast:
                o = model(ids, banks, memory, n_context=streams.context)
                nll = F.cross_entropy(
                    o.logits.flatten(0, 1).float(), targets.flatten(), reduction="none"
                )
            weight = 1 + (cfg.recall_weight - 1) * recall.float()
            loss_b = (nll * weight).sum() / weight.sum() / cfg.grad_accum
            if loss_b.requires_grad:  # not when only the gates train and every bank is empty
                loss_b.backward()
            step_loss += nll.mean().item() / cfg.grad_accum
            recall_nll += nll[recall].sum().item()
            recall_n += int(recall.sum())
            model.append_memory(memory, banks, o)
        if world > 1:  # average gradients (and the loss, for the log) over workers
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            loss_t = torch.tensor([step_loss], device=device)
            flat = torch.cat([g.flatten() for g in grads] + [loss_t])
            dist.all_reduce(flat)
            flat /= world
            for p, g in zip(params, flat[:-1].split([p.numel() for p in params]), strict=True):
                p.grad = g.view_as(p)
            step_loss = float(flat[-1])
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = step_loss
        losses.append(loss)
        done = step + 1
        elapsed = time.perf_counter() - t0
        bar.update(1)
        gates = model.gates()
        if log is not None:
            log.write(json.dumps({
                "step": done, "loss": round(loss, 4), "lr": opt.param_groups[0]["lr"],
                "recall_loss": round(recall_nll / recall_n, 4) if recall_n else None,
                "recall_tokens": recall_n,
                "seconds": round(elapsed, 1), "memory_seconds": round(memory.seconds, 1),
                "adapter_norm": round(adapter_norm(model), 5),
                **{f"gate_{k}": [[round(x, 4) for x in row] for row in v.tolist()]
                   for k, v in gates.items()},  # (n_mem, Hq) each
            }) + "\n")
            log.flush()
        bar.set_postfix(
            loss=f"{loss:.3f}",
            gate=f"{gates['scale'].mean():.2f}",
            tok_s=f"{tokens_per_step * (done - start) / elapsed:.0f}",
            mem=f"{memory.seconds:.1f}s",
        )
        if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
            all_streams = [streams.state_dict()]
            if world > 1:
                all_streams = [None] * world
                dist.all_gather_object(all_streams, streams.state_dict())
            if rank == 0:
                summary = {
                    "steps": done - start,
                    "first_loss": losses[0],
                    "final_loss": loss,
                    "tokens": tokens_per_step * (done - start),
                    "seconds": elapsed,
                    "memory_seconds": memory.seconds,
                    "workers": world,
                    "checkpoint": str(out),
                }
                state = {"step": done, "world": world, "streams": all_streams,
                         "config": asdict(cfg), "summary": summary}
                save_training_checkpoint(model, opt, state, out)
    bar.close()
    if log is not None:
        log.close()
    memory.client.close()
    return summary


class WorkerFailed(RuntimeError):
    """A Ray Train worker failed; the message is its own last line."""


def _ray_train_loop(config: dict) -> None:
    import ray.train

    from memory_service.service import find_service

    ctx = ray.train.get_context()
    cfg = TrainConfig.from_dict(config["cfg"])
    # --memory names the service; else the one on this Ray cluster, found via its coordinator
    address = cfg.memory.address or find_service()
    train_worker(cfg, address, ctx.get_world_rank(), ctx.get_world_size())


def train(cfg: TrainConfig) -> dict:
    """Run training (one process, or `cfg.workers` Ray Train workers) through the memory
    service; returns a summary with the final loss, tokens, seconds and memory seconds."""
    if cfg.steps < 1 or cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.workers < 1:
        raise ValueError("--steps, --grad-accum, --batch-size and --workers must be at least 1")
    if not 0 <= cfg.distractors <= cfg.memory.capacity_tokens // 2:
        raise ValueError(
            f"--distractors {cfg.distractors} must be in [0, half of --capacity-tokens "
            f"({cfg.memory.capacity_tokens})]: the bank must still hold the document"
        )
    if cfg.memory.address is not None:  # fail early, before Ray starts
        connect(cfg.memory.address, cfg.memory).close()
    with service_address(cfg.memory) as address:
        if cfg.workers == 1:
            return train_worker(cfg, address)
        return _train_ray(cfg)


def _train_ray(cfg: TrainConfig) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    use_gpu = torch.cuda.is_available() and cfg.device != "cpu"
    storage = tempfile.mkdtemp(prefix="longmem-raytrain-")
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"cfg": asdict(cfg)},
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}
        ),
        run_config=RunConfig(storage_path=storage, name="longmem-train"),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # a worker's error: report its own message, in one line
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        raise WorkerFailed(f"a training worker failed: {_last_line(root)}") from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if result.error is not None:
        raise WorkerFailed(f"a training worker failed: {_last_line(result.error)}")
    return json.loads((Path(cfg.out) / TRAINER_STATE).read_text())["summary"]


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__

