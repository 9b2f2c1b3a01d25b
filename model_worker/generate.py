"""Generation with long-term memory: read a document into a named bank, then continue a
prompt, streaming tokens as they come.

The document is read as training reads streams: on the reading grid, each segment's
memory-layer keys/values appended to the bank. The prompt and the generated tokens form the
local window (after the document's last `context` tokens); when it reaches `segment_len`,
its older half is read into the bank too, so the memory keeps everything that left the
window.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model_worker.config import SEGMENT_LEN, MemoryConfig
from model_worker.data import DataError, encode
from model_worker.memory import Memory
from model_worker.model import LongMemModel
from model_worker.session import (
    connect,
    default_device,
    load_model,
    memory_session,
    open_bank,
    read_into_bank,
)


@dataclass
class GenerateConfig:
    prompt: str
    document: str | None = None  # read into the bank first (the bank is created or reset)
    bank: str = "document"
    backbone: str | None = None
    checkpoint: str | None = None  # None: shipped weights (default backbone); "none": untrained
    segment_len: int = SEGMENT_LEN
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 50
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    device: str | None = None
    seed: int = 0


def read_document(path: str | Path, tokenizer) -> torch.Tensor:
    """Token ids (N,) of a UTF-8 text file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text file") from None
    ids = encode(tokenizer, text)
    if not ids:
        raise DataError(f"{path} is empty")
    return torch.tensor(ids)


@torch.no_grad()
def stream_tokens(
    model: LongMemModel,
    tokenizer,
    memory: Memory,
    bank: str,
    prompt: str,
    cfg: GenerateConfig,
    document: list[int] | None = None,
) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece (decoded text), reading from and
    writing to `bank`, which holds `document` (read into it already) or what it holds."""
    ids = encode(tokenizer, prompt)
    if not ids:
        raise DataError("the prompt is empty")
    stream = (document or []) + ids
    written = len(document or [])  # stream[:written] is in the bank or is context
    seg, half, ctx = cfg.segment_len, cfg.segment_len // 2, model.config.context
    g = torch.Generator(device=model.device).manual_seed(cfg.seed)
    eos = getattr(tokenizer, "eos_token_id", None)
    new: list[int] = []
    shown = ""
    for _ in range(cfg.max_new_tokens):
        while len(stream) - written >= seg:  # the window's older half leaves it: into memory
            read_into_bank(memory, model, bank, torch.tensor(stream[: written + half]), seg,
                           first=written)
            written += half
        lo = max(0, written - ctx)
        window = torch.tensor(stream[lo:], device=model.device)[None]
        logits = model(window, [bank], memory, n_context=written - lo).logits[0, -1]
        if cfg.temperature > 0:
            top = torch.topk(logits.float() / cfg.temperature, min(cfg.top_k, logits.shape[-1]))
            pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=g)
            token = int(top.indices[pick])
        else:
            token = int(logits.argmax())
        if token == eos:
            break
        stream.append(token)
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(shown) :]
            shown = text


def generate(cfg: GenerateConfig, on_text=print) -> str:
    """Load the model, read `cfg.document` into `cfg.bank` (or use the bank as it is), and
    generate; each new piece of text goes to `on_text` as it comes. Returns the whole text."""
    if cfg.memory.address is not None:  # fail early, before loading the model
        connect(cfg.memory.address, cfg.memory).close()
    model, tokenizer = load_model(cfg.backbone, cfg.checkpoint, None, default_device(cfg.device))
    model.eval()
    doc = read_document(cfg.document, tokenizer) if cfg.document else None
    pieces = []
    with memory_session(cfg.memory) as memory:
        if doc is not None:
            open_bank(memory, model, cfg.bank, cfg.memory.capacity_tokens, **cfg.memory.storage)
            read_into_bank(memory, model, cfg.bank, doc, cfg.segment_len)
        elif cfg.bank not in {b.name for b in memory.list_banks()}:
            raise DataError(f"bank {cfg.bank!r} not found; read a document into it with --document")
        document = doc.tolist() if doc is not None else None
        for piece in stream_tokens(model, tokenizer, memory, cfg.bank, cfg.prompt, cfg, document):
            pieces.append(piece)
            on_text(piece)
    return "".join(pieces)
