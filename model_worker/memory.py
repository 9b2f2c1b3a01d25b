"""The one place the model knows about memory: the interface it talks to.

Implemented by the memory service's clients (in-process and gRPC); the model never knows
which one it holds. Shapes: B rows (one bank per row), n tokens, Hq query heads, Hkv
key/value heads, D head dim, `top_k` in chunks of `chunk_size` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch


class SearchResult(Protocol):
    keys: torch.Tensor  # (B, n, Hq, top_k * chunk_size, D), bank dtype
    values: torch.Tensor  # (B, n, Hq, top_k * chunk_size, D), bank dtype
    scores: torch.Tensor  # (B, n, Hq, top_k) float32
    chunk_ids: torch.Tensor  # (B, n, Hq, top_k) int64, -1 where none
    valid: torch.Tensor  # (B, n, Hq, top_k) bool

    def token_mask(self) -> torch.Tensor:
        """(B, n, Hq, top_k * chunk_size) bool: which retrieved tokens are real."""
        ...


class BankSpec(Protocol):
    kv_heads: int
    head_dim: int
    chunk_size: int
    capacity_tokens: int
    dtype: str


class BankInfo(Protocol):
    name: str
    spec: BankSpec
    size_tokens: int  # tokens searchable now


class Memory(Protocol):
    def search(self, bank_names: Sequence[str], queries: torch.Tensor, top_k: int) -> SearchResult:
        """queries (B, n, Hq, D) float32, row b searches bank_names[b]; query head h reads
        key/value head h // (Hq / Hkv). A bank with fewer than top_k chunks returns what
        it has (the rest invalid)."""
        ...

    def append(self, bank_name: str, keys: torch.Tensor, values: torch.Tensor) -> Any:
        """keys/values (n_tokens, Hkv, D) in stream order."""
        ...

    def create_bank(
        self,
        name: str,
        *,
        kv_heads: int,
        head_dim: int,
        chunk_size: int,
        capacity_tokens: int,
        dtype: str = "float16",
    ) -> BankInfo: ...

    def reset_bank(self, name: str) -> BankInfo:
        """Empty the bank; its spec stays."""
        ...

    def delete_bank(self, name: str) -> None: ...

    def describe_bank(self, name: str) -> BankInfo: ...

    def list_banks(self) -> list[BankInfo]:
        """This tenant's banks."""
        ...
