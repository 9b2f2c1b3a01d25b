"""Rotary positions for memory: how a query meets keys that carry no position.

The bank stores the memory layers' keys before the rotary embedding, i.e. at position 0.
Under RoPE the score of a query at position i against a key at position j depends only on
i - j: <R(i) q, R(j) k> = <R(i - j) q, k>. So rotating the un-rotated query by a distance
`delta` scores it as if the memory sat `delta` tokens back. delta = 0 (no rotation) is the
score at distance 0, which over-weights the fast-turning frequency pairs; InfLLM rotates
by the local window length. `benchmarks/bench_retrieval.py` measures the choices.
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, H, D) with cos/sin (..., T, D) -> x rotated (the Llama convention)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., T, 1, D)
    return x * cos + _rotate_half(x) * sin


def rotate_by(x: torch.Tensor, positions: torch.Tensor, rotary: torch.nn.Module) -> torch.Tensor:
    """x (T, H, D) rotated to positions (T,) with the backbone's rotary module."""
    cos, sin = rotary(x, positions[None].to(x.device))  # (1, T, D) each
    return apply_rotary(x, cos[0].to(x.dtype), sin[0].to(x.dtype))


class MemoryDistance(torch.nn.Module):
    """Rotates un-rotated queries (..., H, D) to meet position-free memory keys as if these
    sat `distance` tokens back; identity for backbones without rotary positions."""

    def __init__(self, cos_sin: tuple[torch.Tensor, torch.Tensor] | None):
        super().__init__()
        cos, sin = cos_sin if cos_sin is not None else (None, None)  # (D,) each
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.cos is None:
            return q
        return apply_rotary(q, self.cos.to(q.dtype), self.sin.to(q.dtype))
