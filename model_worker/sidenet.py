"""Residual SideNet: trainable copies of every r-th backbone layer, from the memory band up.

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

Memory band: every copy of a backbone layer in `memory_layers = [first, last]` is a
joint-attention layer, and the backbone's keys/values of those layers are what reading
writes to memory (one bank, the layers side by side as key/value heads). The paper uses one
memory layer; on SmolLM2 one layer (13, 17 or 21) recovered 0 of 30 pass keys training-free,
while layers 14-23 together, the band where the backbone copies in context, found them (the
measurement is in docs/method.md). Hence r = 1 by default: with r = 2 only every other
layer of the band would see memory. Retrieval happens once per step, before the SideNet
runs, with the backbone's own queries of the band's layers: one memory round trip per
step, however many layers use it.

Layers below the band never see memory: untrained copies there are the backbone's own
layers, so their output is `H[r*i]` and the SideNet starts at the band. `train_layers`
chooses what trains: `gates` (default: the joint-attention layers' gates), `memory` (the
band's layers and their gates) or `all` (every copy); the gates and the memory path's
low-rank maps (`memory_rank`) train in every case. Checkpoints store only what trains;
frozen copies are rebuilt from the backbone.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from model_worker.backbone import Backbone, BackboneOutput
from model_worker.joint_attention import (
    JointAttentionLayer,
    Retrieve,
    Retrieved,
    SharedGate,
    run_layer,
)
from model_worker.memory import SearchResult
from model_worker.positions import MemoryDistance

# Default memory band as fractions of the backbone's depth: layers 14-23 of SmolLM2's 30,
# where its in-context copying happens (see the module docstring).
BAND = (0.47, 0.8)
TRAIN_LAYERS = ("gates", "memory", "all")


def default_band(n_layers: int) -> list[int]:
    first = min(n_layers - 1, round(BAND[0] * n_layers))
    return [first, max(first, round(BAND[1] * n_layers) - 1)]


@dataclass
class SideNetConfig:
    """LongMem hyper-parameters. `None` fields are derived from the backbone by `resolve`.

    r: layer reduction factor (the SideNet copies every r-th backbone layer).
    memory_layers: [first, last] 0-based backbone layers (inclusive): the copies of these
        layers attend to memory, and their keys/values fill it.
    k: retrieved tokens per token, head and memory layer; chunk_size: tokens per chunk.
    context: tokens of the previous segment that every segment is read after (context
        only: they neither query memory nor are written to it; see `data.windows`).
    memory_distance: the query meets memory keys (stored without position) as if they sat
        this many tokens back (rotary backbones; 0 = un-rotated).
    train_layers: `gates`, `memory` (the band's layers and gates) or `all` SideNet layers.
    token_gate: gates with a part shared by every memory head and a part set by each
        token's hidden state, besides each head's own (`JointAttentionLayer`); off: per-head
        gates only.
    memory_rank: rank of the memory path's low-rank maps in every joint-attention layer
        (`JointAttentionLayer`; 0 = none).
    map_search: the memory query map also shifts the queries that search memory, so the
        chunks found are those the memory attention it trains for would pick.
    use_memory: off = every layer is plain local attention.
    """

    r: int = 1
    memory_layers: list[int] | None = None
    k: int = 64
    chunk_size: int = 1  # single tokens: retrieval finds one token's key (method section 8)
    context: int = 64
    memory_distance: int = 512
    train_layers: str = "gates"
    token_gate: bool = True
    memory_rank: int = 16
    map_search: bool = True
    use_memory: bool = True

    def resolve(self, n_layers: int) -> SideNetConfig:
        """Fill in defaults for a backbone of n_layers and check consistency."""
        r = self.r
        if r < 1 or n_layers % r:
            raise ValueError(f"reduction factor r={r} must divide the {n_layers} backbone layers")
        band = list(self.memory_layers) if self.memory_layers else default_band(n_layers)
        if len(band) != 2 or not 0 <= band[0] <= band[1] < n_layers:
            raise ValueError(f"memory_layers {band} must be [first, last] within [0, {n_layers})")
        resolved = replace(self, memory_layers=band)
        if not resolved.memory_sources(n_layers):
            raise ValueError(
                f"no SideNet layer copies a backbone layer in {band} with r={r}: the band "
                f"must contain a layer j with (j + 1) % {r} == 0"
            )
        if self.k < 1 or self.k % self.chunk_size:
            raise ValueError(f"k={self.k} must be a positive multiple of chunk_size")
        if self.context < 0:
            raise ValueError(f"context {self.context} must be >= 0")
        if self.memory_distance < 0:
            raise ValueError(f"memory_distance {self.memory_distance} must be >= 0")
        if self.memory_rank < 0:
            raise ValueError(f"memory_rank {self.memory_rank} must be >= 0")
        if self.train_layers not in TRAIN_LAYERS:
            raise ValueError(f"train_layers {self.train_layers!r} not in {TRAIN_LAYERS}")
        return resolved

    def memory_sources(self, n_layers: int) -> list[int]:
        """Backbone layers, in order, whose SideNet copies use memory (a resolved config)."""
        first, last = self.memory_layers
        sources = (self.r * (i + 1) - 1 for i in range(n_layers // self.r))
        return [j for j in sources if first <= j <= last]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SideNetConfig:
        """The config a checkpoint stored (older ones have no token gates, memory maps or
        mapped search, and no key for them)."""
        return cls(**({"token_gate": False, "memory_rank": 0, "map_search": False} | d))


class SideNet(nn.Module):
    """The side network from the memory band up; `config` must be resolved."""

    def __init__(self, backbone: Backbone, config: SideNetConfig):
        super().__init__()
        self.config = config
        self.r = config.r
        self.sources = config.memory_sources(backbone.n_layers)
        self.first = (self.sources[0] + 1) // self.r - 1  # SideNet index of self.layers[0]
        self.to_memory = MemoryDistance(backbone.rotary_at(config.memory_distance))
        self.shared_gate = SharedGate() if config.token_gate else None
        src = backbone.adapter.layers(backbone.model)
        layers = []
        for i in range(self.first, backbone.n_layers // self.r):
            layer = copy.deepcopy(src[self.source(i)])
            joint = self.source(i) in self.sources
            if joint:
                layer = JointAttentionLayer(
                    layer, backbone, self.to_memory, self.shared_gate, config.memory_rank
                )
            train = config.train_layers == "all" or (joint and config.train_layers == "memory")
            layer.requires_grad_(train)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        for p in self.gates() + self.adapters():  # the memory path always trains
            p.requires_grad_(True)

    def source(self, i: int) -> int:
        """0-based backbone layer that SideNet layer i copies."""
        return self.r * (i + 1) - 1

    @property
    def joint_layers(self) -> list[JointAttentionLayer]:
        return [layer for layer in self.layers if isinstance(layer, JointAttentionLayer)]

    def gates(self) -> list[nn.Parameter]:
        """Every gate parameter: the shared gate's (token gates), then each layer's."""
        shared = list(self.shared_gate.parameters()) if self.shared_gate is not None else []
        return shared + [p for layer in self.joint_layers for p in layer.gates()]

    def adapters(self) -> list[nn.Parameter]:
        """Every memory-path low-rank map's parameters (none when memory_rank is 0)."""
        return [p for layer in self.joint_layers for p in layer.adapters()]

    @torch.no_grad()
    def search_queries(self, bb: BackboneOutput, n_context: int) -> torch.Tensor:
        """The un-rotated queries that search memory (B, T', n_mem * Hq, D): the memory
        layers' backbone queries, with `map_search` shifted by each layer's memory query
        map of the backbone's normed input to that layer."""
        q = bb.queries[:, n_context:]
        if not (self.config.map_search and self.config.memory_rank):
            return q
        shifts = [
            j.query_shift(j.adapter.norm1(j.layer)(bb.hidden[src][:, n_context:]))
            for j, src in zip(self.joint_layers, self.sources, strict=True)
        ]
        return q + torch.cat(shifts, dim=2)

    def forward(
        self, bb: BackboneOutput, retrieve: Retrieve | None, n_context: int = 0
    ) -> tuple[torch.Tensor, SearchResult | None]:
        """Backbone states -> final SideNet hidden (B, T, C) and the memory search result.
        The first `n_context` positions are context only: they do not query memory."""
        found = pairs = None
        if retrieve is not None:  # one search for every memory layer, before this segment's
            found = retrieve(self.to_memory(self.search_queries(bb, n_context)))  # keys enter
            pairs = Retrieved.split(found, len(self.sources))
        x = bb.hidden[self.r * self.first]  # (B, T, C)
        for i, layer in enumerate(self.layers, start=self.first):
            src = self.source(i)
            x = x + (bb.hidden[src] - bb.hidden[self.r * i])  # the layers not copied
            if isinstance(layer, JointAttentionLayer):
                mine = None if pairs is None else pairs[self.sources.index(src)]
                x = layer(x, bb.layer_kwargs[src], mine, n_context)
            else:
                x = run_layer(layer, x, bb.layer_kwargs[src])
        return x, found
