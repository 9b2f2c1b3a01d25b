"""LongMemModel: frozen backbone + residual SideNet + memory, and its checkpoints.

One step over a batch of streams (row b = next segment of stream b):

    out = model(input_ids, streams, memory)     # retrieval from each stream's bank
    loss = cross_entropy(out.logits, targets); loss.backward(); opt.step()
    model.append_memory(memory, streams, out)   # then this segment enters the banks

The model talks to memory only through `model_worker.memory.Memory`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from memory_service.files import atomic_write
from model_worker.backbone import DEFAULT_BACKBONE, Backbone, load_backbone
from model_worker.memory import Memory, SearchResult
from model_worker.sidenet import SideNet, SideNetConfig

CHECKPOINT_WEIGHTS = "sidenet.safetensors"
CHECKPOINT_CONFIG = "longmem.json"


@dataclass
class LongMemOutput:
    logits: torch.Tensor  # (B, T - n_context, V): the segment's tokens only
    keys: torch.Tensor  # (B, T - n_context, n_mem * Hkv, D) memory layers' keys (un-rotated)
    values: torch.Tensor  # (B, T - n_context, n_mem * Hkv, D): both to append
    retrieved: SearchResult | None  # what the memory layers got (None: memory not used)
    memory_off_logits: torch.Tensor | None = None  # like logits, with `references=True`
    backbone_logits: torch.Tensor | None = None  # like logits: the frozen backbone alone


class LongMemModel(nn.Module):
    """Backbone (frozen) + SideNet (copied layers and the joint-attention gates)."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        config: SideNetConfig | None = None,
        backbone_name: str = "custom",
    ):
        super().__init__()
        cfg = (config or SideNetConfig()).resolve(backbone.config.num_hidden_layers)
        self.config = cfg
        self.backbone_name = backbone_name
        self.backbone = Backbone(backbone, cfg.memory_sources(backbone.config.num_hidden_layers))
        self.sidenet = SideNet(self.backbone, cfg)

    @classmethod
    def from_backbone(
        cls,
        backbone: str = DEFAULT_BACKBONE,
        config: SideNetConfig | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[LongMemModel, object]:
        """Load `backbone` (default SmolLM2, offline) and build the model; also the tokenizer."""
        model, tokenizer = load_backbone(backbone, dtype)
        return cls(model, config, backbone_name=backbone), tokenizer

    @property
    def bank_heads(self) -> int:
        """Key/value heads per token in a bank: every memory layer's, side by side."""
        return len(self.sidenet.sources) * self.backbone.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.backbone.head_dim

    @property
    def device(self) -> torch.device:
        return self.backbone.model.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.sidenet.parameters() if p.requires_grad]

    def gates(self) -> dict[str, torch.Tensor]:
        """The memory layers' per-head gates (with the shared part), detached:
        {"scale": (n_mem, Hq), "bias": ...}; with token gates also the norm of each head's
        row of their map ("token_scale", "token_bias")."""
        joint = self.sidenet.joint_layers
        shared = self.sidenet.shared_gate
        out = {name: torch.stack([getattr(j, name).detach() for j in joint])
               + (getattr(shared, name).detach() if shared is not None else 0)
               for name in ("scale", "bias")}
        if shared is not None:
            norms = torch.stack([j.token_gate.weight.detach().norm(dim=1) for j in joint])
            out["token_scale"], out["token_bias"] = norms.chunk(2, dim=1)  # (n_mem, Hq) each
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        streams: Sequence[str] | None = None,
        memory: Memory | None = None,
        n_context: int = 0,
        references: bool = False,
    ) -> LongMemOutput:
        """input_ids (B, T); streams[b] names row b's bank. Memory is used when
        `config.use_memory` is set and both streams and memory are given.

        The first `n_context` tokens are context only (the tail of the previous segment):
        they neither query memory nor are returned for appending, so no segment's start
        (an attention sink) enters a bank. `references` also returns, from the same backbone
        pass, the logits with memory off and those of the backbone alone.
        """
        bb = self.backbone(input_ids)
        retrieve = None
        if self.config.use_memory and memory is not None and streams is not None:
            if len(streams) != input_ids.shape[0]:
                raise ValueError(f"{len(streams)} streams for {input_ids.shape[0]} rows")
            top_k = self.config.k // self.config.chunk_size
            banks = list(streams)

            def retrieve(q: torch.Tensor) -> SearchResult:
                return memory.search(banks, q.float(), top_k)

        hidden, found = self.sidenet(bb, retrieve, n_context)
        out = LongMemOutput(
            self.backbone.logits(hidden[:, n_context:]),
            bb.keys[:, n_context:],
            bb.values[:, n_context:],
            found,
        )
        if references:
            off = self.sidenet(bb, None)[0] if retrieve is not None else hidden
            out.memory_off_logits = self.backbone.logits(off[:, n_context:])
            out.backbone_logits = self.backbone.logits(bb.hidden[-1][:, n_context:])
        return out

    # --- memory helpers ------------------------------------------------------------

    def create_banks(
        self,
        memory: Memory,
        streams: Sequence[str],
        capacity_tokens: int,
        **storage: str,
    ) -> None:
        """Create one bank per stream shaped for this model's memory layers; `storage`:
        `BankSpec`'s `dtype` and `search_dtype` (default float16 and float32)."""
        for name in streams:
            memory.create_bank(
                name,
                kv_heads=self.bank_heads,
                head_dim=self.head_dim,
                chunk_size=self.config.chunk_size,
                capacity_tokens=capacity_tokens,
                **storage,
            )

    @torch.no_grad()
    def encode_memory(
        self, input_ids: torch.Tensor, n_context: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What reading a window writes to memory, without running the SideNet: the
        backbone's memory-layer keys and values (B, T - n_context, n_mem * Hkv, D)."""
        bb = self.backbone(input_ids)
        return bb.keys[:, n_context:], bb.values[:, n_context:]

    @torch.no_grad()
    def append_memory(self, memory: Memory, streams: Sequence[str], out: LongMemOutput) -> None:
        """After a step: write row b's keys/values (T, n_mem * Hkv, D) to bank streams[b]."""
        for b, name in enumerate(streams):
            memory.append(name, out.keys[b].detach(), out.values[b].detach())

    # --- checkpoints ---------------------------------------------------------------

    def backbone_signature(self) -> dict:
        """What identifies the backbone: architecture plus a fingerprint of its weights."""
        c = self.backbone.model.config
        emb = self.backbone.model.get_input_embeddings().weight
        sample = emb[: min(64, emb.shape[0])].float()
        return {
            "name": self.backbone_name,
            "model_type": c.model_type,
            "num_hidden_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": self.backbone.n_heads,
            "num_key_value_heads": self.backbone.n_kv_heads,
            "vocab_size": c.vocab_size,
            "embedding_fingerprint": [
                round(float(sample.sum()), 3),
                round(float(sample.abs().sum()), 3),
            ],
        }

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write the trained SideNet weights and gates (safetensors; frozen copies of backbone
        layers are rebuilt from the backbone) and a JSON config naming the backbone
        into folder `path`; each file is written to a temporary name, then renamed."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            n: p.detach().contiguous().cpu()
            for n, p in self.sidenet.named_parameters()
            if p.requires_grad
        }
        meta = {"backbone": self.backbone_signature(), "sidenet": self.config.to_dict()}
        atomic_write(path / CHECKPOINT_WEIGHTS, lambda f: save_file(tensors, str(f)))
        atomic_write(path / CHECKPOINT_CONFIG, lambda f: f.write_text(json.dumps(meta, indent=2)))
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load SideNet + gate weights; refuse a checkpoint made for another backbone or
        another SideNet configuration."""
        path = Path(path)
        meta = json.loads((path / CHECKPOINT_CONFIG).read_text())
        mine, theirs = self.backbone_signature(), meta["backbone"]
        diff = [k for k in mine if k != "name" and mine[k] != theirs.get(k)]
        if diff:
            why = ", ".join(f"{k} {theirs.get(k)} != {mine[k]}" for k in diff)
            raise ValueError(
                f"checkpoint {path} was made for backbone {theirs.get('name')!r}, not this "
                f"model's backbone {mine['name']!r} ({why})"
            )
        theirs = SideNetConfig.from_dict(meta["sidenet"]).to_dict()
        if theirs != self.config.to_dict():
            raise ValueError(
                f"checkpoint {path} has SideNet config {theirs}, model has "
                f"{self.config.to_dict()}"
            )
        state = load_file(path / CHECKPOINT_WEIGHTS)
        params = {n: p for n, p in self.sidenet.named_parameters() if p.requires_grad}
        if set(state) != set(params):
            raise ValueError(f"checkpoint {path} does not match this SideNet's parameters")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])
