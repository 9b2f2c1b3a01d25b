"""How a command gets what it works with: a model, a memory connection and its banks.

Shared by `train`, `eval`, `generate` and `demo`:

    model, tokenizer = load_model(backbone, checkpoint)    # shipped weights by default
    with memory_session(address, api_key) as memory:      # embedded service unless given
        open_bank(memory, model, "book", capacity_tokens)
        read_into_bank(memory, model, "book", tokens, segment_len)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from memory_service import errors
from memory_service.bank import BankSpec
from memory_service.client import MemoryClient
from memory_service.tls import client_tls
from model_worker.backbone import DEFAULT_BACKBONE
from model_worker.config import MemoryConfig
from model_worker.data import windows
from model_worker.memory import Memory
from model_worker.model import CHECKPOINT_CONFIG, LongMemModel
from model_worker.sidenet import SideNetConfig

# Trained SideNet weights for the default backbone, used when no checkpoint is given
# (how they were made: TRAINING.md beside them).
SHIPPED_WEIGHTS = Path(__file__).parent / "weights" / DEFAULT_BACKBONE
UNTRAINED = "none"  # --checkpoint none: the untrained SideNet


class SessionError(OSError):
    """What a command needs is not there: an unreachable service, a refused key, a missing
    checkpoint or backbone package. The CLI prints it as one line."""


def default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_checkpoint(backbone: str | None, checkpoint: str | None) -> str | None:
    """The checkpoint to load: the given one, the shipped weights for the default backbone,
    or None (untrained; also `--checkpoint none`)."""
    if checkpoint == UNTRAINED:
        return None
    if checkpoint is None and backbone in (None, DEFAULT_BACKBONE):
        return str(SHIPPED_WEIGHTS) if (SHIPPED_WEIGHTS / CHECKPOINT_CONFIG).is_file() else None
    return checkpoint


def load_model(
    backbone: str | None,
    checkpoint: str | None = None,
    sidenet: SideNetConfig | None = None,
    device: torch.device | str = "cpu",
) -> tuple[LongMemModel, object]:
    """Backbone + SideNet (+ trained weights: `checkpoint`, by default the shipped ones for
    the default backbone, see `resolve_checkpoint`). A checkpoint brings its own SideNet
    config and, when `backbone` is None, names the backbone."""
    checkpoint = resolve_checkpoint(backbone, checkpoint)
    if checkpoint is not None:
        meta_file = Path(checkpoint) / CHECKPOINT_CONFIG
        if not meta_file.is_file():
            raise SessionError(
                f"checkpoint {checkpoint} not found (a folder written by longmem train)"
            )
        meta = json.loads(meta_file.read_text())
        sidenet = SideNetConfig.from_dict(meta["sidenet"])
        backbone = backbone or meta["backbone"]["name"]
    try:
        model, tokenizer = LongMemModel.from_backbone(backbone or DEFAULT_BACKBONE, sidenet)
    except RuntimeError as e:  # e.g. the default backbone's package is not installed
        raise SessionError(str(e)) from None
    if checkpoint is not None:
        model.load_checkpoint(checkpoint)
    return model.to(device), tokenizer


class TimedMemory:
    """A memory client that adds up the seconds spent in its calls (`seconds`)."""

    def __init__(self, client: Memory):
        self.client, self.seconds = client, 0.0

    def __getattr__(self, name):
        fn = getattr(self.client, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        return timed


def connect(address: str, cfg: MemoryConfig) -> MemoryClient:
    """A client of the service at `address`, checked: unreachable or refused keys fail here
    with a line saying what to do."""
    tls = client_tls(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
    client = MemoryClient(address, api_key=cfg.api_key, timeout=60.0, retries=2, tls=tls)
    try:
        client.list_banks()
    except errors.Unavailable as e:
        client.close()
        raise SessionError(
            f"memory service at {address} is unreachable ({e.message.splitlines()[0]}); "
            "start one with `longmem serve` or leave out --memory for the embedded one"
        ) from None
    except errors.Unauthenticated as e:
        client.close()
        raise SessionError(
            f"memory service at {address} refused the API key ({e.message}); "
            "pass a key of your tenant with --api-key or $LONGMEM_API_KEY"
        ) from None
    return client


@contextmanager
def service_address(cfg: MemoryConfig) -> Iterator[str]:
    """The address of a memory service: `cfg.address`, or an embedded one started here
    (and stopped on exit)."""
    if cfg.address is not None:
        yield cfg.address
        return
    from memory_service.service import start_service

    service = start_service(shards=cfg.shards)
    try:
        yield service.address
    finally:
        service.stop()


@contextmanager
def memory_session(cfg: MemoryConfig) -> Iterator[MemoryClient]:
    """A connected client of `cfg.address` or of an embedded service; closed on exit. A
    given address is checked before anything starts."""
    with service_address(cfg) as address:
        client = connect(address, cfg)
        try:
            yield client
        finally:
            client.close()


def open_bank(
    memory: Memory, model: LongMemModel, name: str, capacity_tokens: int, **storage: str
) -> None:
    """Create bank `name` for this model, empty: an existing bank of that shape, size and
    storage (`dtype`, `search_dtype`: `MemoryConfig.storage`) is reset, any other is
    replaced."""
    info = next((b for b in memory.list_banks() if b.name == name), None)
    if info is not None:
        wanted = BankSpec(
            model.bank_heads, model.head_dim, model.config.chunk_size, capacity_tokens,
            **storage,
        )
        if info.spec == wanted:
            memory.reset_bank(name)
            return
        memory.delete_bank(name)
    model.create_banks(memory, [name], capacity_tokens, **storage)


APPEND_BYTES = 32 << 20  # keys + values per append call: well under a request's 64 MiB


def append_in_parts(memory: Memory, bank: str, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Append keys/values (N, Hkv, D) to `bank` in calls of at most `APPEND_BYTES`."""
    per_token = 2 * keys[0].numel() * keys.element_size()
    step = max(1, APPEND_BYTES // per_token)
    for i in range(0, len(keys), step):
        memory.append(bank, keys[i : i + step], values[i : i + step])


@torch.no_grad()
def read_memory(
    model: LongMemModel, tokens: torch.Tensor, segment_len: int, first: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The memory layers' keys and values (T, Hkv, D) of `tokens[first:]` (default: all but
    the first `context` tokens, which are context only), one reading window at a time, read
    on the reading grid (`data.windows`) as the model reads them (backbone only: it alone
    makes the memory)."""
    for lo, start, end in windows(len(tokens), segment_len, model.config.context, first):
        keys, values = model.encode_memory(tokens[None, lo:end].to(model.device), start - lo)
        yield keys[0], values[0]


def read_into_bank(
    memory: Memory,
    model: LongMemModel,
    bank: str,
    tokens: torch.Tensor,
    segment_len: int,
    first: int | None = None,
) -> None:
    """Write the memory of `tokens[first:]` (`read_memory`) into `bank`."""
    for keys, values in read_memory(model, tokens, segment_len, first):
        memory.append(bank, keys, values)
