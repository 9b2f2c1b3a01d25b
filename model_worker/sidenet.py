"""Residual SideNet: trainable copies of every r-th backbone layer, starting at the memory layer.

SideNet layer i (0-based) is a copy of backbone layer `src(i) = r * (i + 1) - 1` (0-based)
and stands in for the r backbone layers `r*i .. src(i)`. With `H[j]` the backbone's input to
its layer j (`H[0]` = embeddings, `H[L]` = output of the last layer):

    x_i = x_{i-1} + (H[src(i)] - H[r*i])    cross-network residual: the r - 1 backbone
                                            layers the SideNet does not copy
    x_i = f_i(x_i)                          the copied layer, on the memory-aware stream

The final state goes through the backbone's frozen final norm and LM head.

Why this form (the paper writes `f_i(x_{i-1}) + (H[r*(i+1)] - H[r*i])`): there the copied
layer's own update is added on top of the backbone's update of the same layer, so at
initialisation the SideNet is not the backbone (it counts layer r*(i+1) twice; 241
perplexity untrained on SmolLM2) and training first spends its budget undoing that. Here
each copy runs where its source layer runs, on the same input, so an untrained SideNet
reproduces the backbone exactly, and any change memory makes to the stream is carried on by
the upper layers as the backbone itself would carry it.

Layers below the memory layer never see memory: untrained copies there are the backbone's
own layers, so their output is `H[r*i]` and the SideNet starts at the memory layer (the
official code, `Victorwz/LongMem`, also means to freeze that lower half). `train_layers`
chooses what trains: `memory` (default: the memory layer and its gates; the copies above it
stay frozen copies of the backbone and are not stored in checkpoints) or `all`.
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
# (30 layers) index 17 captured the most of the backbone's attention on distant text of
# 13/17/21/25 (benchmarks/bench_retrieval.py); the paper uses the 18th of 24 layers.
RETRIEVAL_DEPTH = 0.6
TRAIN_LAYERS = ("memory", "all")


@dataclass
class SideNetConfig:
    """LongMem hyper-parameters. `None` fields are derived from the backbone by `resolve`.

    r: layer reduction factor (the SideNet copies every r-th backbone layer).
    retrieval_layer: m, 0-based backbone layer whose keys/values fill the memory.
    memory_layer: 0-based SideNet layer doing joint attention; default the layer copied
        from backbone layer m, i.e. (m + 1) / r - 1 (so m + 1 must be divisible by r).
    k: retrieved tokens per token and head; chunk_size: tokens per memory chunk.
    context: tokens of the previous segment that every segment is read after (context
        only: they neither query memory nor are written to it; see `data.windows`).
    memory_distance: the query meets memory keys (stored without position) as if they sat
        this many tokens back (rotary backbones; 0 = un-rotated).
    train_layers: `memory` (the memory layer and its gates) or `all` SideNet layers.
    use_memory: off = every layer is plain local attention.
    """

    r: int = 2
    retrieval_layer: int | None = None
    memory_layer: int | None = None
    k: int = 64
    chunk_size: int = 4
    context: int = 64
    memory_distance: int = 512
    train_layers: str = "memory"
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
        if self.context < 0:
            raise ValueError(f"context {self.context} must be >= 0")
        if self.memory_distance < 0:
            raise ValueError(f"memory_distance {self.memory_distance} must be >= 0")
        if self.train_layers not in TRAIN_LAYERS:
            raise ValueError(f"train_layers {self.train_layers!r} not in {TRAIN_LAYERS}")
        return replace(self, retrieval_layer=m, memory_layer=mem)

    def to_dict(self) -> dict:
        return asdict(self)


class SideNet(nn.Module):
    """The side network from the memory layer up; `config` must be resolved."""

    def __init__(self, backbone: Backbone, config: SideNetConfig):
        super().__init__()
        self.config = config
        self.r = config.r
        self.first = config.memory_layer  # SideNet index of self.layers[0]
        src = backbone.adapter.layers(backbone.model)
        layers = []
        for i in range(self.first, backbone.n_layers // self.r):
            layer = copy.deepcopy(src[self.source(i)])
            if i == config.memory_layer:
                layer = JointAttentionLayer(layer, backbone, config.memory_distance)
            trained = config.train_layers == "all" or i == config.memory_layer
            layers.append(layer.requires_grad_(trained))
        self.layers = nn.ModuleList(layers)

    def source(self, i: int) -> int:
        """0-based backbone layer that SideNet layer i copies."""
        return self.r * (i + 1) - 1

    @property
    def memory(self) -> JointAttentionLayer:
        return self.layers[0]

    def forward(
        self, bb: BackboneOutput, retrieve: Retrieve | None, n_context: int = 0
    ) -> tuple[torch.Tensor, SearchResult | None]:
        """Backbone states -> final SideNet hidden (B, T, C) and the memory search result.
        The first `n_context` positions are context only: they do not query memory."""
        x, found = bb.hidden[self.r * self.first], None  # (B, T, C)
        for i, layer in enumerate(self.layers, start=self.first):
            src = self.source(i)
            x = x + (bb.hidden[src] - bb.hidden[self.r * i])  # the layers not copied
            if i == self.first:
                x, found = layer(x, bb.layer_kwargs[src], retrieve, n_context)
            else:
                x = run_layer(layer, x, bb.layer_kwargs[src])
        return x, found
