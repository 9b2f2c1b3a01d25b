"""Residual SideNet: L/r trainable layers copied from the frozen backbone.

SideNet layer l (1-based) starts as a deep copy of backbone layer r*l (1-based, i.e.
index r*l - 1), and

    H_side[0] = H_llm[0]                                  (backbone embeddings)
    H_side[l] = f_side[l](H_side[l-1]) + (H_llm[r*l] - H_llm[r*(l-1)])

where f_side[l] is the whole copied decoder layer (its own internal residuals included).
The final norm and LM head are the backbone's, frozen.

This follows the official code (`Victorwz/LongMem`,
`fairseq/models/sidenet/transformer_decoder_sidenet.py`): layer i (0-based) reloads
`transformer.h[r*i + 1]` for r = 2, the memory-augmented layer is index
`retrieval_layer // r`, and the residual is added to the layer output. Differences: all
SideNet layers are trained (the official code tries to freeze the lower half with a
no-op `module.requires_grad = False`), and the layers are the backbone's own Hugging Face
layer classes, each called with the keyword arguments (mask, rotary cos/sin) the backbone
passed to the layer it was copied from.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from model_worker.backbone import Backbone, BackboneOutput
from model_worker.joint_attention import JointAttentionLayer, Retrieve, run_layer
from model_worker.memory import SearchResult

# Default depth of the retrieval layer as a fraction of the backbone's depth: on SmolLM2
# (30 layers) index 17 scored best of 13/17/21/25/29 (DESIGN.md section 4); the paper
# uses the 18th of 24 layers.
RETRIEVAL_DEPTH = 0.6


@dataclass
class SideNetConfig:
    """LongMem hyper-parameters. `None` fields are derived from the backbone by `resolve`.

    r: layer reduction factor (SideNet has L / r layers).
    retrieval_layer: m, 0-based backbone layer whose keys/values fill the memory.
    memory_layer: 0-based SideNet layer doing joint attention; default the layer copied
        from backbone layer m, i.e. (m + 1) / r - 1 (so m + 1 must be divisible by r).
    k: retrieved tokens per token and head; chunk_size: tokens per memory chunk.
    use_memory: off = every layer is plain local attention.
    """

    r: int = 2
    retrieval_layer: int | None = None
    memory_layer: int | None = None
    k: int = 64
    chunk_size: int = 4
    use_memory: bool = True

    def resolve(self, n_layers: int) -> SideNetConfig:
        """Fill in defaults for a backbone of n_layers and check consistency."""
        r = self.r
        if r < 1 or n_layers % r:
            raise ValueError(f"reduction factor r={r} must divide the {n_layers} backbone layers")
        m = self.retrieval_layer
        if m is None:
            m = min(n_layers, max(r, r * round(RETRIEVAL_DEPTH * n_layers / r))) - 1
        if not 0 <= m < n_layers:
            raise ValueError(f"retrieval_layer {m} not in [0, {n_layers})")
        mem = self.memory_layer
        if mem is None:
            if (m + 1) % r:
                raise ValueError(
                    f"no SideNet layer is a copy of backbone layer {m} with r={r}; "
                    "choose retrieval_layer with (m + 1) % r == 0 or set memory_layer"
                )
            mem = (m + 1) // r - 1
        if not 0 <= mem < n_layers // r:
            raise ValueError(f"memory_layer {mem} not in [0, {n_layers // r})")
        if self.k < 1 or self.k % self.chunk_size:
            raise ValueError(f"k={self.k} must be a positive multiple of chunk_size")
        return replace(self, retrieval_layer=m, memory_layer=mem)

    def to_dict(self) -> dict:
        return asdict(self)


class SideNet(nn.Module):
    """The trainable side network; `config` must be resolved."""

    def __init__(self, backbone: Backbone, config: SideNetConfig):
        super().__init__()
        self.config = config
        self.r = config.r
        src = backbone.adapter.layers(backbone.model)
        layers = []
        for i in range(backbone.n_layers // self.r):  # SideNet index i = layer l - 1
            layer = copy.deepcopy(src[self.r * (i + 1) - 1]).requires_grad_(True)
            if i == config.memory_layer:
                layer = JointAttentionLayer(
                    layer,
                    backbone.adapter,
                    backbone.n_heads,
                    backbone.n_kv_heads,
                    backbone.head_dim,
                )
            layers.append(layer)
        self.layers = nn.ModuleList(layers)

    def forward(
        self, bb: BackboneOutput, retrieve: Retrieve | None
    ) -> tuple[torch.Tensor, SearchResult | None]:
        """Backbone states -> final SideNet hidden (B, T, C) and the memory search result."""
        x, found = bb.hidden[0], None  # (B, T, C)
        for i, layer in enumerate(self.layers):
            kwargs = bb.layer_kwargs[self.r * (i + 1) - 1]  # those of its source layer
            if isinstance(layer, JointAttentionLayer):
                x, found = layer(x, kwargs, retrieve)
            else:
                x = run_layer(layer, x, kwargs)
            x = x + (bb.hidden[self.r * (i + 1)] - bb.hidden[self.r * i])
        return x, found
