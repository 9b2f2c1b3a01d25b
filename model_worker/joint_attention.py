"""Joint attention: the memory-augmented SideNet layer.

Per head h and token t (DESIGN.md section 1):

    A = softmax(q_rot K_local_rot^T * scale) V_local        causal local attention
    M = softmax(q_t K_mem(t)^T / sqrt(d)) V_mem(t)           over t's K retrieved pairs
    out = (1 - sigmoid(g_h)) * A + sigmoid(g_h) * M          g initialised to 0

Following the official code (`Victorwz/LongMem`,
`fairseq/modules/joint_multihead_attention_sum.py`, `JointMultiheadAttentionWeightedSum`):
two separate softmaxes mixed by a per-head `memory_bias` gate with `1 - sigmoid` on the
local side; the retrieval query is the layer's own `q_proj` output on its normed input,
unscaled (`sidenet_layer_palm_sidenet_retrieval.py`); retrieved keys/values are used as
stored, with no projection; the rest of the layer (MLP, residuals) is unchanged.

Where we differ and why:
- Rotary backbones: local attention rotates q and k as the layer normally does, but
  memory attention and retrieval use the un-rotated query against un-rotated cached keys,
  so memory stays position-free (the official GPT-2-like backbone uses ALiBi, which adds
  a bias to local scores only, so its memory side is position-free too).
- Grouped-query attention: query head h reads key/value head h // (Hq / Hkv) locally;
  the memory service applies the same mapping to banks (the official code has no GQA).
- Invalid retrieved slots (a bank holding fewer than K/csz chunks) are masked; a token
  with no valid slot gets A alone. With memory off or every bank empty the wrapped layer
  runs unchanged, which is exactly the original layer (the official code skips memory
  only while the whole memory is empty).
- No dropout on attention probabilities (the backbones we load use 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from model_worker.backbone import Adapter, local_attention
from model_worker.memory import SearchResult

Retrieve = Callable[[torch.Tensor], SearchResult]


def run_layer(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a Hugging Face decoder layer as its model does; return the hidden state."""
    out = layer(x, **layer_kwargs)
    return out[0] if isinstance(out, tuple) else out


def memory_attention(
    q: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each token over its own retrieved pairs.

    q (B, T, H, D), mem_k/mem_v (B, T, H, K, D), mask (B, T, H, K) bool
    -> out (B, T, H, D), has_memory (B, T, H) bool.
    """
    d = q.shape[-1]
    s = torch.einsum("bthd,bthkd->bthk", q.float(), mem_k.float()) * d**-0.5  # (B, T, H, K)
    # finfo.min, not -inf: a fully masked row stays finite (uniform), so no NaN reaches
    # the backward pass; such rows are replaced by A in the caller anyway.
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1).to(q.dtype)
    out = torch.einsum("bthk,bthkd->bthd", p, mem_v)
    return out, mask.any(dim=-1)


class JointAttentionLayer(nn.Module):
    """A deep-copied backbone decoder layer whose self-attention becomes joint attention.

    The wrapped layer keeps its own parameters (trainable, as part of the SideNet); the
    only new parameter is the per-head gate `g` (Hq,), initialised to 0.
    """

    def __init__(
        self, layer: nn.Module, adapter: Adapter, n_heads: int, n_kv_heads: int, head_dim: int
    ):
        super().__init__()
        self.layer = layer
        self.adapter = adapter
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.gate = nn.Parameter(torch.zeros(n_heads))

    def forward(
        self, x: torch.Tensor, layer_kwargs: dict[str, Any], retrieve: Retrieve | None
    ) -> tuple[torch.Tensor, SearchResult | None]:
        """x (B, T, C) -> (B, T, C) and the search result used (None when none was).

        `retrieve(q)` gets the un-rotated, unscaled queries (B, T, Hq, D), detached, and
        returns the memory for them; None means memory is off.
        """
        if retrieve is None:
            return run_layer(self.layer, x, layer_kwargs), None
        ad, layer = self.adapter, self.layer
        h = ad.norm1(layer)(x)
        q, k, v = ad.qkv(layer, h, self.n_heads, self.n_kv_heads, self.head_dim)
        found = retrieve(q.detach())  # before this segment's own keys enter the bank
        if not bool(found.valid.any()):
            return run_layer(layer, x, layer_kwargs), found
        q_rot, k_rot = ad.rotate(q, k, layer_kwargs)
        mask = layer_kwargs.get("attention_mask")
        a = local_attention(q_rot, k_rot, v, ad.attn(layer).scaling, mask)  # (B, T, Hq, D)
        to = {"device": q.device, "dtype": q.dtype}
        m, has = memory_attention(
            q, found.keys.to(**to), found.values.to(**to), found.token_mask().to(q.device)
        )
        g = torch.sigmoid(self.gate).to(q.dtype)[:, None]  # (Hq, 1)
        y = torch.where(has[..., None], (1 - g) * a + g * m, a)  # (B, T, Hq, D)
        x = x + ad.out_proj(layer, y.flatten(2))
        return x + ad.mlp(layer)(ad.norm2(layer)(x)), found
