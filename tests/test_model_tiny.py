"""LongMem model on tiny random backbones of both families (fast)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

from memory_service.client import InProcessClient
from model_worker.backbone import Backbone, adapter_for
from model_worker.joint_attention import memory_attention
from model_worker.model import LongMemModel
from model_worker.sidenet import SideNetConfig

VOCAB = 97


def llama_config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    return LlamaConfig(**(base | kw))


def gpt2_config(**kw) -> GPT2Config:
    base = dict(
        vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=512,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2Config(**(base | kw))


def tiny_backbone(config, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def tiny_model(config, seed: int = 0, **sidenet) -> LongMemModel:
    cfg = SideNetConfig(**({"k": 8, "chunk_size": 2} | sidenet))
    return LongMemModel(tiny_backbone(config, seed), cfg, backbone_name=f"tiny-{seed}")


FAMILIES = {"llama": llama_config, "gpt2": gpt2_config}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and robust to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=list(FAMILIES))
def model(request) -> LongMemModel:
    return tiny_model(FAMILIES[request.param]())


def filled_memory(model: LongMemModel, streams: list[str], n_tokens: int, seed: int):
    """A client whose banks hold n_tokens of the backbone's own keys/values of random text."""
    mem = InProcessClient()
    model.create_banks(mem, streams)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(streams), n_tokens), generator=g)
    model.append_memory(mem, streams, model(ids))
    return mem


def test_shapes_and_dtypes(model):
    ids = torch.randint(0, VOCAB, (2, 12))
    out = model(ids)
    hkv, d = model.kv_heads, model.head_dim
    assert out.logits.shape == (2, 12, VOCAB) and out.logits.dtype == torch.float32
    assert out.keys.shape == out.values.shape == (2, 12, hkv, d)
    assert out.retrieved is None
    streams = ["a", "b"]
    mem = filled_memory(model, streams, 20, seed=1)
    out = model(ids, streams, mem)
    k = model.config.k
    assert out.logits.shape == (2, 12, VOCAB)
    assert out.retrieved.keys.shape == (2, 12, model.backbone.n_heads, k, d)


def test_captured_keys_are_the_layers_own_projections():
    """Llama: keys/values are k_proj/v_proj of the layer-m input, before rotary."""
    m = tiny_model(llama_config())
    ids = torch.randint(0, VOCAB, (1, 10))
    bb = m.backbone(ids)
    layer = m.backbone.model.model.layers[m.config.retrieval_layer]
    h = layer.input_layernorm(bb.hidden[m.config.retrieval_layer])
    torch.testing.assert_close(bb.keys, layer.self_attn.k_proj(h).view(1, 10, 2, 16))
    torch.testing.assert_close(bb.values, layer.self_attn.v_proj(h).view(1, 10, 2, 16))
    ref = m.backbone.model(ids, output_hidden_states=True).hidden_states
    for i in range(len(ref) - 1):  # the last one HF returns after the final norm
        torch.testing.assert_close(bb.hidden[i], ref[i])


def test_memory_off_ignores_bank_contents(model):
    ids = torch.randint(0, VOCAB, (2, 12))
    streams = ["a", "b"]
    mem1 = filled_memory(model, streams, 24, seed=1)
    mem2 = filled_memory(model, streams, 24, seed=2)
    on1, on2 = model(ids, streams, mem1).logits, model(ids, streams, mem2).logits
    assert not torch.allclose(on1, on2, atol=1e-4), "memory on: bank contents must matter"
    model.config.use_memory = False
    off1, off2 = model(ids, streams, mem1).logits, model(ids, streams, mem2).logits
    assert torch.equal(off1, off2)
    torch.testing.assert_close(off1, model(ids).logits, rtol=0, atol=0)


def test_empty_bank_falls_back_to_local_attention(model):
    ids = torch.randint(0, VOCAB, (2, 12))
    mem = InProcessClient()
    model.create_banks(mem, ["a", "b"])
    out = model(ids, ["a", "b"], mem)
    assert not out.retrieved.valid.any()
    assert torch.equal(out.logits, model(ids).logits)


def test_closed_gate_equals_local_attention(model):
    """With sigmoid(g) ~ 0 the joint path must reproduce the layer's own attention
    (rotary, GQA and causal mask re-implemented correctly)."""
    ids = torch.randint(0, VOCAB, (2, 12))
    streams = ["a", "b"]
    mem = filled_memory(model, streams, 24, seed=1)
    joint = model.sidenet.layers[model.config.memory_layer]
    with torch.no_grad():
        joint.gate.fill_(-60.0)
    out = model(ids, streams, mem)
    assert out.retrieved.valid.all()
    torch.testing.assert_close(out.logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_memory_attention_matches_naive_loop():
    torch.manual_seed(0)
    B, T, H, K, D = 2, 3, 4, 6, 8
    q = torch.randn(B, T, H, D)
    mk, mv = torch.randn(B, T, H, K, D), torch.randn(B, T, H, K, D)
    mask = torch.rand(B, T, H, K) > 0.3
    mask[0, 0, 0] = False  # a token/head with nothing retrieved
    out, has = memory_attention(q, mk, mv, mask)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                sel = mask[b, t, h]
                assert has[b, t, h] == sel.any()
                if not sel.any():
                    continue
                p = torch.softmax(mk[b, t, h, sel] @ q[b, t, h] / D**0.5, dim=0)
                torch.testing.assert_close(out[b, t, h], p @ mv[b, t, h, sel])


def test_only_sidenet_trains_and_backbone_is_bit_identical(model):
    streams = ["a", "b"]
    mem = filled_memory(model, streams, 24, seed=1)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trainable = {id(p) for p in model.trainable_parameters()}
    joint = model.sidenet.layers[model.config.memory_layer]
    assert id(joint.gate) in trainable
    assert all(not p.requires_grad for p in model.backbone.parameters())
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.01)
    model.train()
    assert not model.backbone.model.training, "backbone must stay in eval mode"
    ids = torch.randint(0, VOCAB, (2, 12))
    out = model(ids, streams, mem)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for p in model.backbone.parameters():
        assert p.grad is None
    for n, p in model.sidenet.named_parameters():
        assert p.grad is not None, n
    assert joint.gate.grad.abs().sum() > 0
    opt.step()
    for n, p in model.backbone.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not torch.equal(joint.gate, torch.zeros_like(joint.gate))


@pytest.mark.parametrize("use_memory", [False, True])
def test_causality(model, use_memory):
    """Perturbing token t leaves every prediction at positions < t unchanged."""
    model.config.use_memory = use_memory
    streams = ["a", "b"]
    mem = filled_memory(model, streams, 24, seed=1)
    ids = torch.randint(0, VOCAB, (2, 16))
    base = model(ids, streams, mem)
    for t in (0, 5, 15):
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 1) % VOCAB
        out = model(ids2, streams, mem)
        torch.testing.assert_close(out.logits[:, :t], base.logits[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out.logits[:, t:], base.logits[:, t:])
        if use_memory:  # retrieval for earlier tokens is unchanged too
            assert torch.equal(out.retrieved.chunk_ids[:, :t], base.retrieved.chunk_ids[:, :t])


def test_per_layer_masks_are_reused():
    """A backbone mixing sliding-window and full layers: each SideNet layer gets the mask
    of the layer it was copied from, and the closed-gate joint path still matches."""
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
        sliding_window=3, max_window_layers=0,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    m = tiny_model(cfg)
    ids = torch.randint(0, VOCAB, (1, 12))
    bb = m.backbone(ids)
    assert bb.layer_kwargs[1]["attention_mask"] is not None
    mem = filled_memory(m, ["a"], 16, seed=3)
    with torch.no_grad():
        m.sidenet.layers[m.config.memory_layer].gate.fill_(-60.0)
    torch.testing.assert_close(m(ids, ["a"], mem).logits, m(ids).logits, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_is_refused():
    with pytest.raises(ValueError, match="supported model types: llama, qwen2, mistral, gpt2"):
        adapter_for(BertConfig())
    with pytest.raises(ValueError, match="unsupported backbone architecture 'bert'"):
        Backbone(AutoModelForCausalLM.from_config(BertConfig(is_decoder=True, num_hidden_layers=2,
                                                             hidden_size=32, num_attention_heads=2,
                                                             intermediate_size=64)), 0)


def test_config_defaults_and_validation():
    c = SideNetConfig().resolve(30)  # SmolLM2
    assert (c.retrieval_layer, c.memory_layer, c.k, c.chunk_size, c.r) == (17, 8, 64, 4, 2)
    c24 = SideNetConfig().resolve(24)
    assert c24.memory_layer == c24.retrieval_layer // 2
    with pytest.raises(ValueError, match="must divide"):
        SideNetConfig(r=4).resolve(30)
    with pytest.raises(ValueError, match="no SideNet layer is a copy"):
        SideNetConfig(retrieval_layer=16).resolve(30)
    assert SideNetConfig(retrieval_layer=16, memory_layer=8).resolve(30).memory_layer == 8
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        SideNetConfig(k=62).resolve(30)


def test_sidenet_layers_start_as_copies_of_every_rth_layer():
    m = tiny_model(llama_config(), r=2)
    src = m.backbone.model.model.layers
    assert len(m.sidenet.layers) == 2
    for i, layer in enumerate(m.sidenet.layers):
        layer = getattr(layer, "layer", layer)
        for (n, p), (_, q) in zip(layer.named_parameters(), src[2 * i + 1].named_parameters(),
                                  strict=True):
            assert torch.equal(p, q) and p.requires_grad and not q.requires_grad, n
            assert p.data_ptr() != q.data_ptr()


def test_checkpoint_round_trip_and_refusal(tmp_path):
    m = tiny_model(llama_config())
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(0, VOCAB, (1, 10))
    m.save_checkpoint(tmp_path / "ck")
    assert sorted(f.name for f in (tmp_path / "ck").iterdir()) == [
        "longmem.json", "sidenet.safetensors"]
    fresh = tiny_model(llama_config())
    assert not torch.equal(fresh(ids).logits, m(ids).logits)
    fresh.load_checkpoint(tmp_path / "ck")
    assert torch.equal(fresh(ids).logits, m(ids).logits)
    other_weights = tiny_model(llama_config(), seed=1)
    with pytest.raises(ValueError, match="made for backbone 'tiny-0'.*embedding_fingerprint"):
        other_weights.load_checkpoint(tmp_path / "ck")
    with pytest.raises(ValueError, match="made for backbone 'tiny-0'.*model_type"):
        tiny_model(gpt2_config()).load_checkpoint(tmp_path / "ck")
