"""Evaluation with memory on, memory off and the backbone alone: long-text perplexity,
passkey retrieval and memory-augmented in-context learning. Every figure carries the
model, checkpoint, segment length, memory size and token counts it came from (a table,
and JSON). All three settings come from one backbone pass (`references=True`), on the
same window, read on the reading grid (`data.windows`).

- Perplexity: each document is read segment by segment; the memory holds every earlier
  segment of the document (bank capacity permitting). Also split by position in the
  segment (memory should help most where the window holds least), and the share of
  retrieved chunks that sit at a segment start (attention sinks would show up here).
- Passkey: a random 5-digit key sentence written at a random depth of a haystack of
  `distance` tokens, then the question. The haystack is real prose (held-out text) or the
  classic repeated filler. The window holds the end of the haystack and the question;
  the key always lies in memory, beyond the window. The answer is the greedy one, scored
  by teacher forcing (greedy decoding yields the key exactly when the argmax at every
  answer position is the key's next token). The answer is the key's tokens from its first
  digit: a tokenizer that writes digits apart (SmolLM2's) puts the space before the key
  in a token of its own, which says nothing about the key, so it ends the question.
  Also: how often the key's chunk is among the retrieved ones at the question.
- ICL: many demonstrations are read into memory; the local window holds a few
  demonstrations and the test input; the label is the label word with the highest
  next-token logit; averaged over seeds (different demonstrations each).
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model_worker.config import SEGMENT_LEN, MemoryConfig
from model_worker.data import Corpus, DataError, Document, encode, windows
from model_worker.memory import Memory
from model_worker.model import LongMemModel, LongMemOutput
from model_worker.session import (
    APPEND_BYTES,
    UNTRAINED,
    TimedMemory,
    default_device,
    load_model,
    memory_session,
    open_bank,
    read_into_bank,
    resolve_checkpoint,
)
from model_worker.sidenet import SideNetConfig

SETTINGS = ("memory on", "memory off", "backbone alone")
POSITION_BUCKETS = 4  # perplexity by quarter of the segment


@dataclass
class EvalConfig:
    backbone: str | None = None  # None: the checkpoint's, or the default
    checkpoint: str | None = None  # None: shipped weights (default backbone); "none": untrained
    data: str | None = None  # perplexity documents and prose haystack; None: held-out stdlib
    segment_len: int = SEGMENT_LEN
    docs: int = 2
    segments: int = 8  # per document at most
    passkey_distances: list[int] = field(default_factory=lambda: [2000, 16000, 100000])
    passkey_trials: int = 20
    passkey_haystacks: list[str] = field(default_factory=lambda: ["prose", "filler"])
    icl: str | None = None  # folder of ICL tasks; None: skip ICL
    icl_tasks: list[str] = field(default_factory=lambda: ["sst2", "mr"])
    icl_memory_demos: int = 2000
    icl_shots: int = 4
    icl_test: int = 100
    icl_seeds: int = 3
    icl_chunk_size: int = 2  # the official script caches demonstrations in 2-token chunks
    sections: list[str] = field(default_factory=lambda: ["perplexity", "passkey", "icl"])
    json_out: str | None = "eval.json"
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    sidenet: SideNetConfig = field(default_factory=SideNetConfig)  # without a checkpoint
    device: str | None = None
    seed: int = 0
    bank_prefix: str = "eval"


def _row(cfg: EvalConfig, model: LongMemModel, **kw) -> dict:
    return {
        "model": model.backbone_name,
        "checkpoint": cfg.checkpoint,
        "segment_len": cfg.segment_len,
        "bank_dtype": cfg.memory.bank_dtype,
        **kw,
    }


def _three(out: LongMemOutput) -> dict[str, torch.Tensor]:
    """The logits of the three settings from one `references=True` output."""
    return dict(zip(SETTINGS, (out.logits, out.memory_off_logits, out.backbone_logits),
                    strict=True))


def segment_start_share(out: LongMemOutput, chunk_size: int, segment_len: int) -> tuple[int, int]:
    """(retrieved chunks that hold a segment's first token, retrieved chunks): bank
    position g * chunk_size is a segment start when it is a multiple of segment_len."""
    r = out.retrieved
    if r is None:
        return 0, 0
    at_start = (r.chunk_ids * chunk_size) % segment_len < chunk_size
    return int((at_start & r.valid).sum()), int(r.valid.sum())


# --- perplexity --------------------------------------------------------------------------


@torch.no_grad()
def eval_perplexity(
    cfg: EvalConfig, model: LongMemModel, memory: Memory, docs: list[Document]
) -> list[dict]:
    seg, bank, ctx = cfg.segment_len, f"{cfg.bank_prefix}-ppl", model.config.context
    nll = {s: torch.zeros(POSITION_BUCKETS, dtype=torch.float64) for s in SETTINGS}
    counts = torch.zeros(POSITION_BUCKETS, dtype=torch.float64)
    tokens = held_max = starts = retrieved = 0
    for doc in docs:
        open_bank(memory, model, bank, cfg.memory.capacity_tokens, **cfg.memory.storage)
        held = 0
        grid = windows(len(doc.tokens) - 1, seg, ctx)[: cfg.segments]
        for lo, start, end in tqdm(grid, desc=f"perplexity {doc.name}", leave=False, unit="seg"):
            ids = doc.tokens[lo:end].to(model.device)
            targets = doc.tokens[start + 1 : end + 1].to(model.device)
            out = model(ids[None], [bank], memory, n_context=start - lo, references=True)
            bucket = torch.arange(end - start) * POSITION_BUCKETS // seg  # (T,)
            for name, logits in _three(out).items():
                token_nll = F.cross_entropy(logits[0].float(), targets, reduction="none")
                nll[name].index_add_(0, bucket, token_nll.double().cpu())
            counts.index_add_(0, bucket, torch.ones(end - start, dtype=torch.float64))
            s, n = segment_start_share(out, model.config.chunk_size, seg)
            starts, retrieved = starts + s, retrieved + n
            tokens += end - start
            held_max = max(held_max, held)
            model.append_memory(memory, [bank], out)
            held = min(held + end - start, cfg.memory.capacity_tokens)
    rows = []
    for name, per_bucket in nll.items():
        common = {"setting": name, "metric": "perplexity", "documents": len(docs),
                  "memory_tokens": held_max if name == "memory on" else 0}
        rows.append(_row(cfg, model, figure="perplexity", tokens=tokens,
                         value=math.exp(per_bucket.sum() / max(tokens, 1)), **common))
        for b in range(POSITION_BUCKETS):
            lo, hi = b * seg // POSITION_BUCKETS, (b + 1) * seg // POSITION_BUCKETS
            rows.append(_row(cfg, model, figure=f"perplexity @ {lo}-{hi - 1}",
                             tokens=int(counts[b]),
                             value=math.exp(per_bucket[b] / max(counts[b], 1)), **common))
    rows.append(_row(
        cfg, model, figure="retrieved at seg start", setting="memory on", metric="share",
        value=starts / max(retrieved, 1), chunks=retrieved,
        uniform=model.config.chunk_size / seg, tokens=tokens, memory_tokens=held_max,
    ))
    return rows


# --- passkey -----------------------------------------------------------------------------

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
)
KEY = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyTrial:
    stream: list[int]  # intro + haystack (key written in) + question + answer
    window_start: int  # a grid segment start: tokens before it are in memory
    key_span: tuple[int, int]  # where the key sentence lies in the stream
    answer: list[int]  # the key's tokens from its first digit, the last of the stream


def haystack_tokens(tokenizer, kind: str, n: int, prose: list[int]) -> list[int]:
    """n haystack tokens: real text (`prose`, repeated if short) or the classic filler."""
    source = prose if kind == "prose" else encode(tokenizer, FILLER)
    if not source:
        raise DataError(f"no text for the {kind} haystack")
    return (source * (n // len(source) + 1))[:n]


def passkey_trial(
    tokenizer, haystack: list[int], key: str, distance: int, seg: int, ctx: int,
    rng: random.Random,
) -> PasskeyTrial:
    """Intro, `distance` haystack tokens with the key sentence written over them at a random
    depth that lies in memory (before the window and its context), the question, the key."""
    intro = encode(tokenizer, INTRO)
    key_ids = encode(tokenizer, KEY.format(key=key))
    answer = encode(tokenizer, " " + key)
    lead = next(i for i, t in enumerate(answer) if any(c.isdigit() for c in tokenizer.decode([t])))
    question, answer = encode(tokenizer, QUESTION) + answer[:lead], answer[lead:]
    q = len(intro) + distance  # where the question starts
    window_start = ctx + max(0, (q - ctx) // seg) * seg
    lo, hi = max(len(intro), ctx), window_start - ctx - len(key_ids)
    if hi <= lo:
        raise DataError(
            f"passkey distance {distance} is too short for --segment-len {seg}: the key "
            "would sit in the local window"
        )
    depth = rng.randint(lo, hi)
    stream = intro + haystack[:distance]
    stream[depth : depth + len(key_ids)] = key_ids
    stream += question + answer
    return PasskeyTrial(stream, window_start, (depth, depth + len(key_ids)), answer)


class SegmentCache:
    """Layer-m keys/values of windows already read, by their tokens: haystack segments are
    shared by every trial (and filler segments repeat), so each is computed once."""

    def __init__(self, model: LongMemModel):
        self.model, self.kv = model, {}

    def read(self, window: list[int], n_context: int, keep: bool) -> tuple[torch.Tensor, ...]:
        key = (n_context, tuple(window))
        if key in self.kv:
            return self.kv[key]
        ids = torch.tensor(window, device=self.model.device)[None]
        keys, values = self.model.encode_memory(ids, n_context)
        kv = keys[0], values[0]  # (T, Hkv, D) each
        if keep:
            self.kv[key] = kv
        return kv


@torch.no_grad()
def read_passkey_memory(
    memory: Memory, bank: str, trial: PasskeyTrial, seg: int, ctx: int, cache: SegmentCache
) -> None:
    """Write the stream before the window into `bank` on the reading grid, as reading it
    would; segments that do not touch the key come from the cache."""
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    for lo, start, end in windows(trial.window_start, seg, ctx):
        touches_key = lo < trial.key_span[1] and trial.key_span[0] < end
        pending.append(cache.read(trial.stream[lo:end], start - lo, keep=not touches_key))
        size = sum(2 * k.numel() * k.element_size() for k, _ in pending)
        if size >= APPEND_BYTES or end == trial.window_start:
            memory.append(bank, torch.cat([k for k, _ in pending]),
                          torch.cat([v for _, v in pending]))
            pending = []


@torch.no_grad()
def eval_passkey(
    cfg: EvalConfig, model: LongMemModel, memory: Memory, tokenizer, prose: list[int]
) -> list[dict]:
    seg, ctx, csz = cfg.segment_len, model.config.context, model.config.chunk_size
    bank, cache, rows = f"{cfg.bank_prefix}-passkey", SegmentCache(model), []
    longest = max(cfg.passkey_distances)
    filler = haystack_tokens(tokenizer, "filler", longest, prose)
    for distance in cfg.passkey_distances:  # refuse an impossible distance before any work
        passkey_trial(tokenizer, filler, "00000", distance, seg, ctx, random.Random(0))
    for kind in cfg.passkey_haystacks:
        haystack = haystack_tokens(tokenizer, kind, longest, prose)
        for distance in cfg.passkey_distances:
            rng = random.Random(f"{cfg.seed}-{kind}-{distance}")
            correct = dict.fromkeys(SETTINGS, 0)
            hits = window_len = 0
            for _ in tqdm(range(cfg.passkey_trials), desc=f"passkey {kind} @ {distance}",
                          leave=False):
                trial = passkey_trial(
                    tokenizer, haystack, str(rng.randint(10000, 99999)), distance, seg, ctx, rng
                )
                held = trial.window_start - ctx
                open_bank(memory, model, bank, held + (-held % csz), **cfg.memory.storage)
                read_passkey_memory(memory, bank, trial, seg, ctx, cache)
                window = trial.stream[trial.window_start - ctx :]
                window_len, n_ans = len(window), len(trial.answer)
                ids = torch.tensor(window, device=model.device)[None]
                out = model(ids, [bank], memory, n_context=ctx, references=True)
                for name, logits in _three(out).items():
                    pred = logits[0, -n_ans - 1 : -1].argmax(-1)  # (n_ans,)
                    correct[name] += int(pred.tolist() == trial.answer)
                # the key's chunks (bank position = stream position - ctx), at the question
                k0, k1 = trial.key_span
                key_chunks = torch.arange((k0 - ctx) // csz, (k1 - ctx - 1) // csz + 1)
                asked = out.retrieved.chunk_ids[0, -n_ans - 1]  # (Hq, top_k)
                hits += int(torch.isin(asked, key_chunks.to(asked.device)).any())
            n = cfg.passkey_trials
            common = {"trials": n, "distance": distance, "haystack": kind,
                      "tokens": trial.window_start - ctx + window_len, "window_tokens": window_len}
            figure = f"passkey {kind} @ {distance}"
            for name, c in correct.items():
                rows.append(_row(
                    cfg, model, figure=figure, setting=name, metric="accuracy", value=c / n,
                    memory_tokens=trial.window_start - ctx if name == "memory on" else 0,
                    **common,
                ))
            rows.append(_row(
                cfg, model, figure=figure, setting="key retrieved", metric="accuracy",
                value=hits / n, memory_tokens=trial.window_start - ctx, **common,
            ))
    return rows


# --- in-context learning ------------------------------------------------------------------

# task: (folder, label words by label index, input field, label field)
ICL_TASKS = {
    "sst2": ("SST-2", ["negative", "positive"], "Review", "Sentiment"),
    "mr": ("mr", ["negative", "positive"], "Review", "Sentiment"),
    "subj": ("subj", ["subjective", "objective"], "Input", "Type"),
    "sst5": ("sst-5", ["terrible", "bad", "okay", "good", "great"], "Review", "Sentiment"),
    "mpqa": ("mpqa", ["negative", "positive"], "Phrase", "Sentiment"),
}


def read_icl(folder: Path, split: str) -> list[tuple[str, int]]:
    """(text, label) rows of `split` ("train"/"test"): `<split>.csv` (label,text), else
    SST-2's `train.tsv` (header, text\\tlabel) or `test.tsv` (`<label> <text>` lines)."""
    if (f := folder / f"{split}.csv").is_file():
        with f.open(newline="", encoding="utf-8") as fh:
            return [(text, int(label)) for label, text in csv.reader(fh)]
    f = folder / f"{split}.tsv"
    if not f.is_file():
        raise DataError(f"ICL task folder {folder} has no {split}.csv or {split}.tsv")
    lines = f.read_text(encoding="utf-8").splitlines()
    if split == "train":
        return [(t, int(lab)) for t, lab in (ln.rsplit("\t", 1) for ln in lines[1:] if ln)]
    return [(ln[2:].strip(), int(ln[0])) for ln in lines if ln]


def icl_demos(task: str, rows: list[tuple[str, int]]) -> str:
    _, labels, x_field, y_field = ICL_TASKS[task]
    return "".join(f"{x_field}: {x}\n{y_field}: {labels[y]}\n\n" for x, y in rows)


@torch.no_grad()
def eval_icl(cfg: EvalConfig, model: LongMemModel, memory: Memory, tokenizer) -> list[dict]:
    root = Path(cfg.icl)
    if not root.is_dir():
        raise DataError(f"ICL folder {root} does not exist")
    bank, rows = f"{cfg.bank_prefix}-icl", []
    trained = model.config
    model.config = replace(trained, chunk_size=cfg.icl_chunk_size)  # banks and top-k
    try:
        for task in cfg.icl_tasks:
            if task not in ICL_TASKS:
                raise DataError(f"unknown ICL task {task!r}; known: {', '.join(ICL_TASKS)}")
            folder, labels, x_field, y_field = ICL_TASKS[task]
            train_rows = read_icl(root / folder, "train")
            test_rows = read_icl(root / folder, "test")
            label_ids = [encode(tokenizer, " " + w)[0] for w in labels]
            correct = dict.fromkeys(SETTINGS[:2], 0)
            examples = window_tokens = mem_tokens = 0
            for seed in range(cfg.seed, cfg.seed + cfg.icl_seeds):
                rng = random.Random(seed)
                train, test = train_rows[:], test_rows[:]
                rng.shuffle(train)
                rng.shuffle(test)
                shots = icl_demos(task, train[: cfg.icl_shots])
                cached = train[cfg.icl_shots : cfg.icl_shots + cfg.icl_memory_demos]
                mem_ids = torch.tensor(encode(tokenizer, icl_demos(task, cached)))
                capacity = max(len(mem_ids), cfg.segment_len)
                open_bank(
                    memory, model, bank, capacity + (-capacity % cfg.icl_chunk_size),
                    **cfg.memory.storage,
                )
                read_into_bank(memory, model, bank, mem_ids, cfg.segment_len)
                mem_tokens = len(mem_ids)
                for x, y in tqdm(test[: cfg.icl_test], desc=f"icl {task} seed {seed}",
                                 leave=False):
                    ids = encode(tokenizer, shots + f"{x_field}: {x}\n{y_field}:")
                    ids = ids[-cfg.segment_len :]
                    window_tokens += len(ids)
                    ids_t = torch.tensor(ids, device=model.device)[None]
                    out = model(ids_t, [bank], memory, references=True)
                    for name, logits in list(_three(out).items())[:2]:
                        correct[name] += int(int(logits[0, -1, label_ids].argmax()) == y)
                    examples += 1
            for name, c in correct.items():
                rows.append(_row(
                    cfg, model, figure=f"icl {task}", setting=name, metric="accuracy",
                    value=c / max(examples, 1), examples=examples, seeds=cfg.icl_seeds,
                    shots=cfg.icl_shots,
                    memory_demos=cfg.icl_memory_demos if name == "memory on" else 0,
                    tokens=window_tokens, memory_tokens=mem_tokens if name == "memory on" else 0,
                ))
    finally:
        model.config = trained
    return rows


# --- the whole evaluation ------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    """Rows -> a plain-text table: figure, setting, value, tokens, memory tokens."""
    lines = [f"{'figure':<26} {'setting':<15} {'value':>16} {'tokens':>9} {'memory':>9}"]
    for r in rows:
        if r["metric"] == "perplexity":
            value = f"ppl {r['value']:.2f}"
        elif r["metric"] == "share":
            value = f"{r['value']:.1%} (unif {r['uniform']:.1%})"
        else:
            n = r.get("trials") or r.get("examples")
            value = f"{r['value']:.0%} of {n}"
        lines.append(
            f"{r['figure']:<26} {r['setting']:<15} {value:>16} {r['tokens']:>9} "
            f"{r['memory_tokens']:>9}"
        )
    return "\n".join(lines)


def run_eval(
    cfg: EvalConfig, model: LongMemModel | None = None, tokenizer=None, memory=None
) -> dict:
    """Evaluate the selected sections; returns {"rows": [...], "seconds": {...}, ...} and
    writes it to `cfg.json_out`. A loaded model/tokenizer and a memory client may be passed
    in; otherwise they are loaded here and the service is `cfg.memory` or an embedded one."""
    cfg = replace(cfg, checkpoint=resolve_checkpoint(cfg.backbone, cfg.checkpoint) or UNTRAINED)
    if model is None:
        model, tokenizer = load_model(
            cfg.backbone, cfg.checkpoint, cfg.sidenet, default_device(cfg.device)
        )
    model.eval()
    docs = []
    if {"perplexity", "passkey"} & set(cfg.sections):
        corpus = Corpus(cfg.data, tokenizer, cfg.segment_len, "eval" if cfg.data is None else "all")
        docs = corpus.documents(cfg.docs)
        if not docs:
            raise DataError(f"no document in {corpus.root} is longer than one segment")
    if memory is not None:
        return _evaluate(cfg, model, tokenizer, memory, docs)
    with memory_session(cfg.memory) as client:
        return _evaluate(cfg, model, tokenizer, client, docs)


def _evaluate(cfg: EvalConfig, model: LongMemModel, tokenizer, client, docs: list[Document]):
    memory = TimedMemory(client)
    prose = [t for d in docs for t in d.tokens.tolist()]
    rows, seconds = [], {}
    for section, fn in (
        ("perplexity", lambda: eval_perplexity(cfg, model, memory, docs)),
        ("passkey", lambda: eval_passkey(cfg, model, memory, tokenizer, prose)),
        ("icl", lambda: eval_icl(cfg, model, memory, tokenizer)),
    ):
        if section not in cfg.sections or (section == "icl" and cfg.icl is None):
            continue
        t = time.perf_counter()
        rows += fn()
        seconds[section] = time.perf_counter() - t
    result = {
        "model": model.backbone_name,
        "checkpoint": cfg.checkpoint,
        "segment_len": cfg.segment_len,
        "sidenet": model.config.to_dict(),
        "gates": {k: v.tolist() for k, v in model.gates().items()},
        "documents": [d.name for d in docs],
        "config": asdict(cfg),
        "rows": rows,
        "seconds": seconds,
        "memory_seconds": memory.seconds,
    }
    if cfg.json_out:
        Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_out).write_text(json.dumps(result, indent=2))
    return result
