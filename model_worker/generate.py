"""Generation with long-term memory: read a document into a named bank, then continue a
prompt, streaming tokens as they come.

The document is read as training reads streams: segment by segment, each segment's
layer-m keys/values appended to the bank. The prompt and the generated tokens form the
local window; when it reaches `segment_len`, its older half is read into the bank too,
so the memory keeps everything that left the window.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from memory_service import errors
from memory_service.tenancy import DEFAULT_API_KEY
from model_worker.data import DataError, encode
from model_worker.model import LongMemModel
from model_worker.train import (
    connect,
    default_device,
    load_model,
    memory_service,
    open_bank,
    read_into_bank,
)


@dataclass
class GenerateConfig:
    prompt: str
    document: str | None = None  # read into the bank first (the bank is created or reset)
    bank: str = "document"
    backbone: str | None = None
    checkpoint: str | None = None
    segment_len: int = 512
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 50
    memory_tokens: int = 65536
    memory: str | None = None
    api_key: str = DEFAULT_API_KEY
    shards: int = 2
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
    memory,
    bank: str,
    prompt: str,
    cfg: GenerateConfig,
) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece (decoded text), reading from and
    writing to `bank`."""
    device = next(model.parameters()).device
    window = encode(tokenizer, prompt)
    if not window:
        raise DataError("the prompt is empty")
    seg, half = cfg.segment_len, cfg.segment_len // 2
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    eos = getattr(tokenizer, "eos_token_id", None)
    new: list[int] = []
    shown = ""
    for _ in range(cfg.max_new_tokens):
        while len(window) >= seg:  # the window's older half leaves it: into memory
            read_into_bank(memory, model, bank, torch.tensor(window[:half]), seg)
            window = window[half:]
        logits = model(torch.tensor(window, device=device)[None], [bank], memory).logits[0, -1]
        if cfg.temperature > 0:
            top = torch.topk(logits.float() / cfg.temperature, min(cfg.top_k, logits.shape[-1]))
            pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=g)
            token = int(top.indices[pick])
        else:
            token = int(logits.argmax())
        if token == eos:
            break
        window.append(token)
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(shown) :]
            shown = text


def generate(cfg: GenerateConfig, on_text=print) -> str:
    """Load the model, read `cfg.document` into `cfg.bank` (or use the bank as it is), and
    generate; each new piece of text goes to `on_text` as it comes. Returns the whole text."""
    if cfg.memory is not None:
        connect(cfg.memory, cfg.api_key).close()  # fail early, before loading the model
    model, tokenizer = load_model(
        cfg.backbone, cfg.checkpoint, None, default_device(cfg.device)
    )
    model.eval()
    doc = read_document(cfg.document, tokenizer) if cfg.document else None
    pieces = []
    with memory_service(cfg.memory, cfg.api_key, cfg.shards) as address:
        memory = connect(address, cfg.api_key)
        try:
            if doc is not None:
                open_bank(memory, model, cfg.bank, cfg.memory_tokens)
                read_into_bank(memory, model, cfg.bank, doc, cfg.segment_len)
            else:
                try:
                    memory.describe_bank(cfg.bank)
                except errors.NotFound:
                    raise DataError(
                        f"bank {cfg.bank!r} not found; read a document into it with --document"
                    ) from None
            for piece in stream_tokens(model, tokenizer, memory, cfg.bank, cfg.prompt, cfg):
                pieces.append(piece)
                on_text(piece)
        finally:
            memory.close()
    return "".join(pieces)
