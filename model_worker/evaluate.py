"""Evaluation with memory on and off: long-text perplexity, passkey retrieval, and
memory-augmented in-context learning. Every figure carries the model, checkpoint, segment
length, memory size and token counts it came from (a table, and JSON).

- Perplexity: each document is read segment by segment; the memory holds every earlier
  segment of the document (bank capacity permitting). Compared with the same model with
  memory off, and with the backbone alone on the same window.
- Passkey: a random 5-digit key stated once, then `distance` tokens of filler text, then
  the question. The stream is read in segments; the local window is the last segment
  start before the question through the end, everything earlier is in memory. The answer
  is the greedy one, scored by teacher forcing (greedy decoding yields the key exactly
  when the argmax at every answer position is the key's next token). The backbone
  alone on the same window is shown too: whether the task is within its reach at all.
  Filler positions repeat with period `segment_len`, so every pure-filler segment is the same token
  sequence and its keys/values are computed once and appended as often as needed: exactly
  what reading it again would write, and it makes 100,000-token distances cheap.
- ICL: many demonstrations are read into memory; the local window holds a few
  demonstrations and the test input; the label is the label word with the highest
  next-token logit. Against the same few demonstrations without memory.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memory_service.tenancy import DEFAULT_API_KEY
from model_worker.data import Corpus, DataError, Document, encode
from model_worker.model import LongMemModel
from model_worker.sidenet import SideNetConfig
from model_worker.train import (
    TimedMemory,
    connect,
    default_device,
    load_model,
    memory_service,
    open_bank,
    read_into_bank,
)


@dataclass
class EvalConfig:
    backbone: str | None = None  # None: the checkpoint's, or the default
    checkpoint: str | None = None  # None: an untrained SideNet (gates at 0)
    data: str | None = None  # perplexity documents; None = held-out stdlib files
    segment_len: int = 512
    docs: int = 2
    segments: int = 8  # per document at most
    memory_tokens: int = 65536  # perplexity bank capacity
    passkey_distances: list[int] = field(default_factory=lambda: [256, 2000, 10000, 100000])
    passkey_trials: int = 3
    icl: str | None = None  # folder of ICL tasks; None: skip ICL
    icl_tasks: list[str] = field(default_factory=lambda: list(ICL_TASKS))
    icl_memory_demos: int = 500
    icl_shots: int = 4
    icl_test: int = 100
    sections: list[str] = field(default_factory=lambda: ["perplexity", "passkey", "icl"])
    json_out: str | None = "eval.json"
    memory: str | None = None
    api_key: str = DEFAULT_API_KEY
    shards: int = 2
    device: str | None = None
    seed: int = 0
    k: int = 64
    chunk_size: int = 4
    r: int = 2
    retrieval_layer: int | None = None
    bank_prefix: str = "eval"


def _row(cfg: EvalConfig, model: LongMemModel, **kw) -> dict:
    return {
        "model": model.backbone_name,
        "checkpoint": cfg.checkpoint,
        "segment_len": cfg.segment_len,
        **kw,
    }


# --- perplexity --------------------------------------------------------------------------


@torch.no_grad()
def three_logits(
    model: LongMemModel, ids: torch.Tensor, banks: list[str], memory
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One backbone pass feeding memory on, memory off and the backbone alone (calling the
    model three times would run the backbone three times): logits (B, T, V) x 3, and the
    layer-m keys/values (B, T, Hkv, D) to append."""
    bb = model.backbone(ids)
    top_k = model.config.k // model.config.chunk_size
    on, _ = model.sidenet(bb, lambda q: memory.search(banks, q.float(), top_k))
    off, _ = model.sidenet(bb, None)
    logits = [model.backbone.logits(h) for h in (on, off, bb.hidden[-1])]
    return *logits, bb.keys, bb.values


@torch.no_grad()
def eval_perplexity(
    cfg: EvalConfig, model: LongMemModel, memory, docs: list[Document]
) -> list[dict]:
    seg, bank = cfg.segment_len, f"{cfg.bank_prefix}-ppl"
    device = next(model.parameters()).device
    nll = {"memory on": 0.0, "memory off": 0.0, "backbone alone": 0.0}
    tokens = held_max = 0
    for doc in docs:
        open_bank(memory, model, bank, cfg.memory_tokens)
        held = 0
        n_seg = min(cfg.segments, (len(doc.tokens) - 1) // seg)
        for s in tqdm(range(n_seg), desc=f"perplexity {doc.name}", leave=False, unit="seg"):
            chunk = doc.tokens[s * seg : s * seg + seg + 1].to(device)  # (T + 1,)
            *logits, k, v = three_logits(model, chunk[None, :-1], [bank], memory)
            for name, lg in zip(nll, logits, strict=True):
                nll[name] += F.cross_entropy(lg[0].float(), chunk[1:], reduction="sum").item()
            tokens += seg
            held_max = max(held_max, held)
            memory.append(bank, k[0], v[0])
            held = min(held + seg, cfg.memory_tokens)
    return [
        _row(cfg, model, figure="perplexity", setting=name, metric="perplexity",
             value=math.exp(total / max(tokens, 1)), tokens=tokens, documents=len(docs),
             memory_tokens=held_max if name == "memory on" else 0)
        for name, total in nll.items()
    ]


# --- passkey -----------------------------------------------------------------------------

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
)
KEY = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyTrial:
    stream: list[int]  # intro + key sentence + filler + question + answer
    window_start: int  # a multiple of segment_len: tokens before it are in memory
    answer: list[int]  # the key's tokens, the last tokens of the stream


def passkey_trial(tokenizer, key: str, distance: int, seg: int) -> PasskeyTrial:
    """The token stream of one trial: `distance` filler tokens between the key sentence
    and the question. Filler token at stream position p is `filler_segment[p % seg]`, so
    every segment made only of filler is the same sequence."""
    head = encode(tokenizer, INTRO) + encode(tokenizer, KEY.format(key=key))
    answer = encode(tokenizer, " " + key)
    filler = filler_segment(tokenizer, seg)
    q_start = len(head) + distance
    stream = head + [filler[p % seg] for p in range(len(head), q_start)]
    stream += encode(tokenizer, QUESTION) + answer
    w = (q_start // seg) * seg  # the window: from the last segment start before the question
    if w and len(head) > seg:
        raise DataError(f"--segment-len {seg} is too short for the passkey sentence")
    return PasskeyTrial(stream, w, answer)


def filler_segment(tokenizer, seg: int) -> list[int]:
    filler = encode(tokenizer, FILLER)
    return (filler * (seg // len(filler) + 1))[:seg]


@torch.no_grad()
def read_passkey_memory(
    model: LongMemModel, memory, bank: str, trial: PasskeyTrial, seg: int, cache: dict
) -> None:
    """Write every segment before the window into `bank` as reading them would: segment 0
    (it holds the key) is read; the pure-filler segments after it are one and the same, so
    their keys/values are computed once (kept in `cache`) and appended again."""
    device = next(model.parameters()).device
    for start in range(0, trial.window_start, seg):
        if start == 0:
            read_into_bank(memory, model, bank, torch.tensor(trial.stream[:seg]), seg)
            continue
        if "kv" not in cache:
            ids = torch.tensor(trial.stream[start : start + seg], device=device)[None]
            bb = model.backbone(ids)
            cache["kv"] = (bb.keys[0], bb.values[0])  # (T, Hkv, D) each
        memory.append(bank, *cache["kv"])


@torch.no_grad()
def eval_passkey(cfg: EvalConfig, model: LongMemModel, memory, tokenizer) -> list[dict]:
    seg, bank = cfg.segment_len, f"{cfg.bank_prefix}-passkey"
    device = next(model.parameters()).device
    rng, cache, rows = random.Random(cfg.seed), {}, []
    for distance in cfg.passkey_distances:
        correct = {"memory on": 0, "memory off": 0, "backbone alone": 0}
        held = window_len = 0
        for _ in tqdm(range(cfg.passkey_trials), desc=f"passkey @ {distance}", leave=False):
            trial = passkey_trial(tokenizer, str(rng.randint(10000, 99999)), distance, seg)
            held = trial.window_start
            capacity = max(held, seg)
            open_bank(memory, model, bank, capacity + (-capacity % model.config.chunk_size))
            read_passkey_memory(model, memory, bank, trial, seg, cache)
            window = torch.tensor(trial.stream[held:], device=device)[None]  # (1, n)
            window_len, n_ans = window.shape[1], len(trial.answer)
            for name, logits in (
                ("memory on", model(window, [bank], memory).logits),
                ("memory off", model(window).logits),
                ("backbone alone", model.backbone.model(window).logits),
            ):
                pred = logits[0, -n_ans - 1 : -1].argmax(-1)  # (n_ans,)
                correct[name] += int(pred.tolist() == trial.answer)
        for name, c in correct.items():
            rows.append(_row(
                cfg, model, figure=f"passkey @ {distance}", setting=name, metric="accuracy",
                value=c / cfg.passkey_trials, trials=cfg.passkey_trials, distance=distance,
                tokens=held + window_len, window_tokens=window_len,
                memory_tokens=held if name == "memory on" else 0,
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
def eval_icl(cfg: EvalConfig, model: LongMemModel, memory, tokenizer) -> list[dict]:
    root = Path(cfg.icl)
    if not root.is_dir():
        raise DataError(f"ICL folder {root} does not exist")
    device = next(model.parameters()).device
    bank, rows = f"{cfg.bank_prefix}-icl", []
    for task in cfg.icl_tasks:
        if task not in ICL_TASKS:
            raise DataError(f"unknown ICL task {task!r}; known: {', '.join(ICL_TASKS)}")
        folder, labels, x_field, y_field = ICL_TASKS[task]
        rng = random.Random(cfg.seed)
        train = read_icl(root / folder, "train")
        test = read_icl(root / folder, "test")
        rng.shuffle(train)
        rng.shuffle(test)
        test = test[: cfg.icl_test]

        shots = icl_demos(task, train[: cfg.icl_shots])
        cached = train[cfg.icl_shots : cfg.icl_shots + cfg.icl_memory_demos]
        mem_ids = torch.tensor(encode(tokenizer, icl_demos(task, cached)))
        capacity = max(len(mem_ids), cfg.segment_len)
        open_bank(memory, model, bank, capacity + (-capacity % model.config.chunk_size))
        read_into_bank(memory, model, bank, mem_ids, cfg.segment_len)
        label_ids = [encode(tokenizer, " " + w)[0] for w in labels]
        correct = {"memory on": 0, "memory off": 0}
        window_tokens = 0
        for x, y in tqdm(test, desc=f"icl {task}", leave=False):
            ids = encode(tokenizer, shots + f"{x_field}: {x}\n{y_field}:")[-cfg.segment_len :]
            window_tokens += len(ids)
            ids_t = torch.tensor(ids, device=device)[None]
            for name, out in (
                ("memory on", model(ids_t, [bank], memory)),
                ("memory off", model(ids_t)),
            ):
                pred = int(out.logits[0, -1, label_ids].argmax())
                correct[name] += int(pred == y)
        for name, c in correct.items():
            rows.append(_row(
                cfg, model, figure=f"icl {task}", setting=name, metric="accuracy",
                value=c / max(len(test), 1), examples=len(test), shots=cfg.icl_shots,
                memory_demos=len(cached) if name == "memory on" else 0,
                tokens=window_tokens, memory_tokens=len(mem_ids) if name == "memory on" else 0,
            ))
    return rows


# --- the whole evaluation ------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    """Rows -> a plain-text table: figure, setting, value, tokens, memory tokens."""
    lines = [f"{'figure':<22} {'setting':<15} {'value':>16} {'tokens':>9} {'memory':>9}"]
    for r in rows:
        if r["metric"] == "perplexity":
            value = f"ppl {r['value']:.2f}"
        else:
            n = r.get("trials") or r.get("examples")
            value = f"{r['value']:.0%} of {n}"
        lines.append(
            f"{r['figure']:<22} {r['setting']:<15} {value:>16} {r['tokens']:>9} "
            f"{r['memory_tokens']:>9}"
        )
    return "\n".join(lines)


def run_eval(
    cfg: EvalConfig, model: LongMemModel | None = None, tokenizer=None, memory=None
) -> dict:
    """Evaluate the selected sections; returns {"rows": [...], "seconds": {...}, ...} and
    writes it to `cfg.json_out`. A loaded model/tokenizer and a memory client may be passed
    in; otherwise they are loaded here and the service is `cfg.memory` or an embedded one."""
    if model is None:
        sidenet = SideNetConfig(
            r=cfg.r, retrieval_layer=cfg.retrieval_layer, k=cfg.k, chunk_size=cfg.chunk_size
        )
        model, tokenizer = load_model(
            cfg.backbone, cfg.checkpoint, sidenet, default_device(cfg.device)
        )
    model.eval()
    docs = []
    if "perplexity" in cfg.sections:
        corpus = Corpus(cfg.data, tokenizer, cfg.segment_len, "eval" if cfg.data is None else "all")
        docs = corpus.documents(cfg.docs)
        if not docs:
            raise DataError(f"no document in {corpus.root} is longer than one segment")
    if memory is not None:
        return _evaluate(cfg, model, tokenizer, memory, docs)
    if cfg.memory is not None:
        connect(cfg.memory, cfg.api_key).close()  # fail early, before starting anything
    with memory_service(cfg.memory, cfg.api_key, cfg.shards) as address:
        client = connect(address, cfg.api_key)
        try:
            return _evaluate(cfg, model, tokenizer, client, docs)
        finally:
            client.close()


def _evaluate(cfg: EvalConfig, model: LongMemModel, tokenizer, client, docs: list[Document]):
    memory = TimedMemory(client)
    rows, seconds = [], {}
    for section, fn in (
        ("perplexity", lambda: eval_perplexity(cfg, model, memory, docs)),
        ("passkey", lambda: eval_passkey(cfg, model, memory, tokenizer)),
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
