"""Joint attention: the memory-augmented SideNet layer.

Per head h and token t, with q the layer's query, local keys/values rotated as usual and
the token's K retrieved memory pairs (stored without position):

    A, lse_A = softmax-attention over the local causal window   (and its log-sum-exp)
    M, lse_M = softmax-attention over the K retrieved pairs, q rotated by `memory_distance`
    w = sigmoid(lse_M - lse_A + bias_h)                          per-token memory share
    y = A + scale_h * w * (M - A)

With scale_h = 1 and bias_h = 0, y is one softmax over [local; memory] (what
memorizing-transformers and InfLLM use): w is exactly the share of that softmax's mass that
falls on memory, so each token opens memory as much as its scores call for. The paper's
two softmaxes mixed by a constant per-head gate, `(1 - sigmoid(g_h)) A + sigmoid(g_h) M`,
cannot do that. `scale` starts at 0, so the untrained layer is exactly the copied backbone
layer even with memory on; training opens it head by head (first-order: its gradient is
the loss change memory would bring). `bias` shifts a head's memory share; both are the
"gates", trained with their own learning rate and no weight decay.

With `token_gate`, a head's gate has three parts, all starting at 0: one shared by every
memory head (`SharedGate`, trained fastest: its gradient sums every head's, so memory opens
as a whole), the head's own (trained at `HEAD_GATE_LR` of that rate), and the token's: a
linear map of the layer's normed input h_t, so scale and bias become
`shared + scale_h + u_h . h_t` and `shared + bias_h + v_h . h_t`. Memory can then open for
the tokens that recall and stay moderate for ordinary text, which a per-head constant
cannot do (docs/method.md section 7).

With `memory_rank` r > 0 the memory path also gets two rank-r maps, both starting at 0 and
acting on memory alone (memory off, the layer is the backbone's whatever they learn):
`memory_query` adds to the query that reads memory, `q_M = q + U_q V_q h_t`, so a layer can
ask memory for something other than what it asks its window; `memory_out` adds
`U_o V_o d` to the residual stream, where `d = y - A` is what memory changed in the heads'
output, so memory's contribution need not pass through the frozen output projection alone.

Retrieval (in `sidenet.SideNet`, once per step for all memory layers) uses the backbone's
own query of this layer (with `map_search`, plus `memory_query`'s shift of the backbone's
normed input), rotated the same way, against the chunks' mean keys; here each layer attends
to its share of what was found with its own query. Retrieved keys/values are
the backbone's own projections, used as stored. Grouped-query attention: query head h reads
key/value head h // (Hq / Hkv), locally and in the banks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model_worker.backbone import Backbone
from model_worker.memory import SearchResult
from model_worker.positions import MemoryDistance

Retrieve = Callable[[torch.Tensor], SearchResult]


@dataclass
class Retrieved:
    """One memory layer's share of a search: the pairs found for its query heads."""

    keys: torch.Tensor  # (B, T, Hq, K, D)
    values: torch.Tensor  # (B, T, Hq, K, D)
    mask: torch.Tensor  # (B, T, Hq, K) bool: real pairs

    @staticmethod
    def split(found: SearchResult, n_layers: int) -> list[Retrieved]:
        """A search with the query heads of n_layers layers side by side -> one per layer."""
        parts = (x.chunk(n_layers, dim=2) for x in (found.keys, found.values, found.token_mask()))
        return [Retrieved(*p) for p in zip(*parts, strict=True)]


def run_layer(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a Hugging Face decoder layer as its model does; return the hidden state."""
    out = layer(x, **layer_kwargs)
    return out[0] if isinstance(out, tuple) else out


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention with its log-sum-exp.

    q (B, T, Hq, D), k/v (B, T, Hkv, D) -> out (B, T, Hq, D), lse (B, T, Hq). `mask` is the
    backbone's own mask if it built one (bool: True = attend, or additive; (B, 1, T, T)).
    """
    rep = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, T, T)
    if mask is None:
        t = s.shape[-1]
        mask = torch.ones(t, t, dtype=torch.bool, device=s.device).tril()
    if mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    else:
        s = s + mask
    lse = torch.logsumexp(s, dim=-1)  # (B, H, T)
    y = torch.exp(s - lse[..., None]).to(v.dtype) @ v  # (B, H, T, D)
    return y.transpose(1, 2), lse.transpose(1, 2)


def memory_attention(
    q: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each token over its own retrieved pairs.

    q (B, T, H, D), mem_k/mem_v (B, T, H, K, D), mask (B, T, H, K) bool
    -> out (B, T, H, D), lse (B, T, H) (-inf where a token has no valid pair).
    """
    s = torch.einsum("bthd,bthkd->bthk", q.float(), mem_k.float()) * scale  # (B, T, H, K)
    # finfo.min, not -inf: a fully masked row stays finite, so no NaN reaches backward
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).to(q.dtype)
    out = torch.einsum("bthk,bthkd->bthd", p, mem_v)
    return out, lse.masked_fill(~mask.any(-1), float("-inf"))


def mix_memory(
    a: torch.Tensor,
    lse_a: torch.Tensor,
    m: torch.Tensor,
    lse_m: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """y = A + scale_h * sigmoid(lse_M - lse_A + bias_h) * (M - A).

    a, m (B, T, H, D); lse_a, lse_m (B, T, H); scale, bias (H,) or per token (B, T, H).
    With scale 1 and bias 0 this is attention with one softmax over the local and the
    memory scores together.
    """
    w = torch.sigmoid(lse_m - lse_a + bias)  # (B, T, H) memory's share of the joint mass
    return a + (scale * w).to(a.dtype)[..., None] * (m - a)


class SharedGate(nn.Module):
    """The part of every memory head's gate that all of them share: scalars `scale` and
    `bias`, both starting at 0."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(()))


class LowRank(nn.Module):
    """x -> up(down(x)), a rank-r linear map that starts at 0 (`up` is zero-initialised)."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


HEAD_GATE_LR = 0.1  # with token gates: the per-head gates' lr, as a fraction of the gates'


class JointAttentionLayer(nn.Module):
    """A deep-copied backbone decoder layer whose self-attention becomes joint attention.

    New parameters: the per-head gates `scale` (Hq,) and `bias` (Hq,), both starting at 0;
    with a `shared` gate (token gates) also the map `token_gate` (C -> 2 Hq, starting at 0)
    from the token's normed input to its heads' scale and bias offsets; with
    `memory_rank` > 0 the memory path's maps `memory_query` and `memory_out` (`LowRank`).
    """

    def __init__(
        self,
        layer: nn.Module,
        backbone: Backbone,
        to_memory: MemoryDistance,
        shared: SharedGate | None = None,
        memory_rank: int = 0,
    ):
        super().__init__()
        self.layer = layer
        self.adapter = backbone.adapter
        self.n_heads, self.n_kv_heads = backbone.n_heads, backbone.n_kv_heads
        self.head_dim = backbone.head_dim
        self.scale = nn.Parameter(torch.zeros(self.n_heads))
        self.bias = nn.Parameter(torch.zeros(self.n_heads))
        self.shared, self.token_gate = shared, None
        if shared is not None:
            hidden = backbone.model.config.hidden_size
            self.token_gate = nn.Linear(hidden, 2 * self.n_heads, bias=False)
            nn.init.zeros_(self.token_gate.weight)
        self.to_memory = to_memory
        self.memory_query = self.memory_out = None
        if memory_rank > 0:
            hidden, width = backbone.model.config.hidden_size, self.n_heads * self.head_dim
            self.memory_query = LowRank(hidden, width, memory_rank)
            self.memory_out = LowRank(width, hidden, memory_rank)

    def gates(self) -> list[nn.Parameter]:
        """This layer's own gates: per head and, with token gates, the map's weight."""
        return [self.scale, self.bias] + ([self.token_gate.weight] if self.token_gate else [])

    def adapters(self) -> list[nn.Parameter]:
        """The memory path's low-rank maps (none when memory_rank is 0)."""
        maps = [m for m in (self.memory_query, self.memory_out) if m is not None]
        return [p for m in maps for p in m.parameters()]

    def query_shift(self, h: torch.Tensor) -> torch.Tensor:
        """Normed input h (B, T, C) -> what `memory_query` adds to its queries (B, T, Hq, D)."""
        return self.memory_query(h).unflatten(-1, (self.n_heads, self.head_dim))

    def head_gates(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed input h (B, T, C) -> each token's scale and bias, (H,) or (B, T, H)."""
        if self.shared is None:
            return self.scale, self.bias
        d_scale, d_bias = self.token_gate(h).float().chunk(2, dim=-1)  # (B, T, H) each
        return self.shared.scale + self.scale + d_scale, self.shared.bias + self.bias + d_bias

    def forward(
        self,
        x: torch.Tensor,
        layer_kwargs: dict[str, Any],
        found: Retrieved | None,
        n_context: int = 0,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). `found` holds the pairs retrieved for the tokens after
        the first `n_context` (context only: local attention alone); None = memory off."""
        if found is None or not bool(found.mask.any()):  # memory off or empty banks
            return run_layer(self.layer, x, layer_kwargs)
        ad, layer = self.adapter, self.layer
        h = ad.norm1(layer)(x)
        q, k, v = ad.qkv(layer, h, self.n_heads, self.n_kv_heads, self.head_dim)
        q_rot, k_rot = ad.rotate(q, k, layer_kwargs)
        scaling = ad.attn(layer).scaling
        a, lse_a = local_attention(q_rot, k_rot, v, scaling, layer_kwargs.get("attention_mask"))
        to = {"device": q.device, "dtype": q.dtype}
        q_m, h_m = q[:, n_context:], h[:, n_context:]  # the tokens that read memory
        if self.memory_query is not None:
            q_m = q_m + self.query_shift(h_m)
        m, lse_m = memory_attention(
            self.to_memory(q_m), found.keys.to(**to), found.values.to(**to),
            found.mask.to(q.device), scaling,
        )
        scale, bias = self.head_gates(h_m)
        y_new = mix_memory(a[:, n_context:], lse_a[:, n_context:], m, lse_m, scale, bias)
        y = torch.cat([a[:, :n_context], y_new], dim=1)  # (B, T, Hq, D)
        x = x + ad.out_proj(layer, y.flatten(2))
        if self.memory_out is not None:  # memory's change to the heads' output, d = y - A
            d = self.memory_out((y_new - a[:, n_context:]).flatten(2))  # (B, T', C)
            x = x + F.pad(d, (0, 0, n_context, 0))
        return x + ad.mlp(layer)(ad.norm2(layer)(x))
