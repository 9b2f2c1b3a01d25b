"""LongMem model on tiny random backbones of both families (fast)."""

from __future__ import annotations

import json

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
from model_worker.joint_attention import local_attention, memory_attention, mix_memory
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
    """Two memory layers (1 and 2 of 4) unless told otherwise."""
    cfg = SideNetConfig(**({"k": 8, "chunk_size": 2, "memory_layers": [1, 2]} | sidenet))
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


def open_gates(model: LongMemModel) -> None:
    """Memory fully on: one softmax over local and retrieved keys (scale 1, bias 0)."""
    with torch.no_grad():
        for joint in model.sidenet.joint_layers:
            joint.scale.fill_(1.0)


def filled_memory(model: LongMemModel, streams: list[str], n_tokens: int, seed: int):
    """A client whose banks hold n_tokens of the backbone's own keys/values of random text."""
    mem = InProcessClient()
    model.create_banks(mem, streams, capacity_tokens=1024)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(streams), n_tokens), generator=g)
    model.append_memory(mem, streams, model(ids))
    return mem


def test_shapes_and_dtypes(model):
    ids = torch.randint(0, VOCAB, (2, 12))
    out = model(ids)
    hkv, d = model.bank_heads, model.head_dim  # both memory layers' kv heads
    assert hkv == 2 * model.backbone.n_kv_heads
    hq = 2 * model.backbone.n_heads
    assert out.logits.shape == (2, 12, VOCAB) and out.logits.dtype == torch.float32
    assert out.keys.shape == out.values.shape == (2, 12, hkv, d)
    assert out.retrieved is None
    streams = ["a", "b"]
    mem = filled_memory(model, streams, 20, seed=1)
    out = model(ids, streams, mem)
    k = model.config.k
    assert out.logits.shape == (2, 12, VOCAB)
    assert out.retrieved.keys.shape == (2, 12, hq, k, d)
    out = model(ids, streams, mem, n_context=4, references=True)  # 4 context tokens
    assert out.logits.shape == out.memory_off_logits.shape == (2, 8, VOCAB)
    assert out.backbone_logits.shape == (2, 8, VOCAB)
    assert out.keys.shape == (2, 8, hkv, d)
    assert out.retrieved.keys.shape == (2, 8, hq, k, d)
    torch.testing.assert_close(out.keys, model(ids).keys[:, 4:])


def test_captured_keys_are_the_layers_own_projections():
    """Llama: queries/keys/values are q/k/v_proj of each memory layer's input, before
    rotary, the layers side by side as heads."""
    m = tiny_model(llama_config())
    ids = torch.randint(0, VOCAB, (1, 10))
    bb = m.backbone(ids)
    assert m.sidenet.sources == [1, 2]
    for j, src in enumerate(m.sidenet.sources):
        layer = m.backbone.model.model.layers[src]
        h = layer.input_layernorm(bb.hidden[src])
        kv, qh = slice(2 * j, 2 * j + 2), slice(4 * j, 4 * j + 4)
        a = layer.self_attn
        torch.testing.assert_close(bb.keys[:, :, kv], a.k_proj(h).view(1, 10, 2, 16))
        torch.testing.assert_close(bb.values[:, :, kv], a.v_proj(h).view(1, 10, 2, 16))
        torch.testing.assert_close(bb.queries[:, :, qh], a.q_proj(h).view(1, 10, 4, 16))
    ref = m.backbone.model(ids, output_hidden_states=True).hidden_states
    for i in range(len(ref) - 1):  # the last one HF returns after the final norm
        torch.testing.assert_close(bb.hidden[i], ref[i])


def test_memory_off_ignores_bank_contents(model):
    ids = torch.randint(0, VOCAB, (2, 12))
    streams = ["a", "b"]
    open_gates(model)
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
    model.create_banks(mem, ["a", "b"], capacity_tokens=1024)
    open_gates(model)
    out = model(ids, ["a", "b"], mem)
    assert not out.retrieved.valid.any()
    assert torch.equal(out.logits, model(ids).logits)


def test_untrained_model_is_the_backbone(model):
    """At initialisation the SideNet reproduces the frozen backbone, with memory off and
    with memory on (full banks: the memory path runs, its scale is 0); this also checks
    that the joint path's own attention (rotary, GQA, causal mask) is the layer's."""
    ids = torch.randint(0, VOCAB, (2, 12))
    streams = ["a", "b"]
    mem = filled_memory(model, streams, 24, seed=1)
    out = model(ids, streams, mem, references=True)
    assert out.retrieved.valid.all()
    backbone = model.backbone.model(ids).logits
    torch.testing.assert_close(out.backbone_logits, backbone, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, backbone, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.memory_off_logits, backbone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_gates_start_closed_and_give_each_token_its_own_gate(family):
    """With token gates the untrained model is still the backbone (memory on, full banks);
    once their map is non-zero, tokens of the same head get different gates, and memory
    changes the logits."""
    model = tiny_model(FAMILIES[family]())  # token gates: the default
    ids = torch.randint(0, VOCAB, (2, 12))
    mem = filled_memory(model, ["a", "b"], 24, seed=1)
    out = model(ids, ["a", "b"], mem, references=True)
    torch.testing.assert_close(out.logits, out.backbone_logits, rtol=0, atol=1e-5)
    joint = model.sidenet.joint_layers[0]
    with torch.no_grad():
        joint.token_gate.weight.normal_()
    h = torch.randn(2, 12, joint.token_gate.in_features)
    scale, bias = joint.head_gates(h)
    assert scale.shape == bias.shape == (2, 12, model.backbone.n_heads)
    assert scale.std(dim=1).min() > 0 and bias.std(dim=1).min() > 0
    assert not torch.allclose(model(ids, ["a", "b"], mem).logits, out.backbone_logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_memory_maps_start_at_zero_and_act_on_memory_alone(family):
    """With the memory path's low-rank maps the untrained model is the backbone (memory
    on, full banks); once they are non-zero they change the logits with memory on, and
    memory off stays the backbone; they train and are saved with the gates."""
    model = tiny_model(FAMILIES[family](), memory_rank=4)
    ids = torch.randint(0, VOCAB, (2, 12))
    mem = filled_memory(model, ["a", "b"], 24, seed=1)
    out = model(ids, ["a", "b"], mem, references=True)
    torch.testing.assert_close(out.logits, out.backbone_logits, rtol=0, atol=1e-5)
    with torch.no_grad():
        model.sidenet.shared_gate.scale.fill_(1.0)  # open memory, as trained gates would
        opened = model(ids, ["a", "b"], mem).logits
        for joint in model.sidenet.joint_layers:
            joint.memory_query.up.weight.normal_()
            joint.memory_out.up.weight.normal_()
    out = model(ids, ["a", "b"], mem, references=True)
    assert not torch.allclose(out.logits, opened, atol=1e-3)
    torch.testing.assert_close(out.memory_off_logits, out.backbone_logits, rtol=0, atol=1e-5)
    maps = {id(p) for p in model.sidenet.adapters()}
    assert len(maps) == 4 * len(model.sidenet.joint_layers)
    assert maps <= {id(p) for p in model.trainable_parameters()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_map_search_shifts_the_queries_that_search_memory(family):
    """With `map_search` the memory query map also moves the search: at 0 it finds what
    the backbone's queries find, non-zero it finds other chunks, and without `map_search`
    the same maps leave the search to the backbone's queries."""
    model = tiny_model(FAMILIES[family](), memory_rank=4)
    ids = torch.randint(0, VOCAB, (2, 12))
    mem = filled_memory(model, ["a", "b"], 96, seed=1)
    plain = model(ids, ["a", "b"], mem).retrieved.chunk_ids
    with torch.no_grad():
        for joint in model.sidenet.joint_layers:
            joint.memory_query.up.weight.normal_(std=3.0)
        mapped = model(ids, ["a", "b"], mem).retrieved.chunk_ids
        model.sidenet.config.map_search = False
        unmapped = model(ids, ["a", "b"], mem).retrieved.chunk_ids
    assert not torch.equal(mapped, plain)
    assert torch.equal(unmapped, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_on_cuda_with_gpu_banks_matches_cpu_and_trains(family):
    """The model and its banks on a GPU give the CPU's logits (memory open, float32) and
    a backward pass reaches the gates and the memory maps."""
    outs = []
    for device in ("cpu", "cuda"):
        model = tiny_model(FAMILIES[family](), memory_rank=4)
        with torch.no_grad():
            model.sidenet.shared_gate.scale.fill_(1.0)
            for joint in model.sidenet.joint_layers:
                joint.memory_out.up.weight.normal_(generator=torch.Generator().manual_seed(3))
        model.to(device)
        mem = InProcessClient(device=device)
        model.create_banks(mem, ["a", "b"], capacity_tokens=1024)
        g = torch.Generator().manual_seed(1)
        model.append_memory(
            mem, ["a", "b"], model(torch.randint(0, VOCAB, (2, 24), generator=g).to(device))
        )
        ids = torch.randint(0, VOCAB, (2, 12), generator=g).to(device)
        out = model(ids, ["a", "b"], mem)
        out.logits.logsumexp(-1).mean().backward()
        grads = [p.grad for p in model.sidenet.gates() + model.sidenet.adapters()]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        outs.append(out.logits.detach().cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_open_gate_is_one_softmax_over_local_and_memory():
    """scale 1, bias 0: the memory share w = sigmoid(lse_M - lse_A) makes the mix exactly
    softmax([q K_local; q K_mem]) [V_local; V_mem]."""
    torch.manual_seed(0)
    B, T, H, Hkv, K, D = 2, 5, 4, 2, 6, 8
    q = torch.randn(B, T, H, D)
    k, v = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    mk, mv = torch.randn(B, T, H, K, D), torch.randn(B, T, H, K, D)
    mask = torch.ones(B, T, H, K, dtype=torch.bool)
    a, lse_a = local_attention(q, k, v, D**-0.5, None)
    m, lse_m = memory_attention(q, mk, mv, mask, D**-0.5)
    y = mix_memory(a, lse_a, m, lse_m, torch.ones(H), torch.zeros(H))
    kr, vr = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)  # GQA
    for b in range(B):
        for t in range(T):
            for h in range(H):
                keys = torch.cat([kr[b, : t + 1, h], mk[b, t, h]])  # causal local, then memory
                vals = torch.cat([vr[b, : t + 1, h], mv[b, t, h]])
                p = torch.softmax(keys @ q[b, t, h] / D**0.5, dim=0)
                torch.testing.assert_close(y[b, t, h], p @ vals, rtol=1e-5, atol=1e-5)
    closed = mix_memory(a, lse_a, m, lse_m, torch.zeros(H), torch.zeros(H))
    assert torch.equal(closed, a)


def test_memory_attention_matches_naive_loop():
    torch.manual_seed(0)
    B, T, H, K, D = 2, 3, 4, 6, 8
    q = torch.randn(B, T, H, D)
    mk, mv = torch.randn(B, T, H, K, D), torch.randn(B, T, H, K, D)
    mask = torch.rand(B, T, H, K) > 0.3
    mask[0, 0, 0] = False  # a token/head with nothing retrieved
    out, lse = memory_attention(q, mk, mv, mask, D**-0.5)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                sel = mask[b, t, h]
                if not sel.any():
                    assert lse[b, t, h] == float("-inf")  # no memory share at all
                    continue
                s = mk[b, t, h, sel] @ q[b, t, h] / D**0.5
                torch.testing.assert_close(out[b, t, h], torch.softmax(s, dim=0) @ mv[b, t, h, sel])
                torch.testing.assert_close(lse[b, t, h], torch.logsumexp(s, dim=0))


def test_only_sidenet_trains_and_backbone_is_bit_identical(model):
    streams = ["a", "b"]
    mem = filled_memory(model, streams, 24, seed=1)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trainable = {id(p) for p in model.trainable_parameters()}
    memory_path = model.sidenet.gates() + model.sidenet.adapters()
    assert trainable == {id(p) for p in memory_path}  # train_layers="gates"
    assert len(trainable) == 16  # shared gate; per head, token map, 2 x 2 maps; 2 layers
    joint = model.sidenet.joint_layers[0]
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
        assert (p.grad is not None) == p.requires_grad, n
    assert joint.scale.grad.abs().sum() > 0  # first-order: memory's effect on the loss
    opt.step()
    for n, p in model.backbone.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not torch.equal(joint.scale, torch.zeros_like(joint.scale))


@pytest.mark.parametrize("use_memory", [False, True])
def test_causality(model, use_memory):
    """Perturbing token t leaves every prediction at positions < t unchanged."""
    model.config.use_memory = use_memory
    streams = ["a", "b"]
    mem = filled_memory(model, streams, 24, seed=1)
    open_gates(model)
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
    of the layer it was copied from, and the untrained joint path still matches."""
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
    torch.testing.assert_close(
        m(ids, ["a"], mem).logits, m.backbone.model(ids).logits, rtol=1e-5, atol=1e-5
    )


def test_unsupported_architecture_is_refused():
    with pytest.raises(ValueError, match="supported model types: llama, qwen2, mistral, gpt2"):
        adapter_for(BertConfig())
    with pytest.raises(ValueError, match="unsupported backbone architecture 'bert'"):
        Backbone(AutoModelForCausalLM.from_config(BertConfig(is_decoder=True, num_hidden_layers=2,
                                                             hidden_size=32, num_attention_heads=2,
                                                             intermediate_size=64)), [0])


def test_config_defaults_and_validation():
    c = SideNetConfig().resolve(30)  # SmolLM2
    assert (c.memory_layers, c.k, c.chunk_size, c.r) == ([14, 23], 64, 1, 1)
    assert c.train_layers == "gates"
    assert c.memory_sources(30) == list(range(14, 24))
    assert SideNetConfig(r=2).resolve(30).memory_sources(30) == [15, 17, 19, 21, 23]
    assert SideNetConfig().resolve(4).memory_layers == [2, 2]
    with pytest.raises(ValueError, match="must divide"):
        SideNetConfig(r=4).resolve(30)
    with pytest.raises(ValueError, match="no SideNet layer copies"):
        SideNetConfig(r=2, memory_layers=[16, 16]).resolve(30)
    with pytest.raises(ValueError, match="first, last"):
        SideNetConfig(memory_layers=[20, 14]).resolve(30)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        SideNetConfig(k=62, chunk_size=4).resolve(30)
    with pytest.raises(ValueError, match="train_layers"):
        SideNetConfig(train_layers="some").resolve(30)
    with pytest.raises(ValueError, match="memory_distance"):
        SideNetConfig(memory_distance=-1).resolve(30)


@pytest.mark.parametrize("train_layers", ["gates", "memory", "all"])
def test_sidenet_layers_are_copies_of_every_rth_layer_from_the_memory_band(train_layers):
    m = tiny_model(llama_config(num_hidden_layers=8), r=2, memory_layers=[3, 5],
                   train_layers=train_layers)
    src = m.backbone.model.model.layers
    assert m.sidenet.sources == [3, 5] and len(m.sidenet.layers) == 3  # copies of 3, 5, 7
    assert len(m.sidenet.joint_layers) == 2
    for i, layer in enumerate(m.sidenet.layers, start=1):
        trained = train_layers == "all" or (train_layers == "memory" and i < 3)
        if i < 3:
            assert layer.scale.requires_grad and layer.bias.requires_grad
        layer = getattr(layer, "layer", layer)
        for (n, p), (_, q) in zip(layer.named_parameters(), src[2 * i + 1].named_parameters(),
                                  strict=True):
            assert torch.equal(p, q) and p.requires_grad == trained and not q.requires_grad, n
            assert p.data_ptr() != q.data_ptr()


def test_checkpoint_round_trip_and_refusal(tmp_path):
    m = tiny_model(llama_config(), train_layers="memory")
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(0, VOCAB, (1, 10))
    m.save_checkpoint(tmp_path / "ck")
    assert sorted(f.name for f in (tmp_path / "ck").iterdir()) == [
        "longmem.json", "sidenet.safetensors"]
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "ck" / "sidenet.safetensors")  # only what trains
    assert set(stored) == {n for n, p in m.sidenet.named_parameters() if p.requires_grad}
    assert any(not p.requires_grad for p in m.sidenet.parameters())
    fresh = tiny_model(llama_config(), train_layers="memory")
    assert not torch.equal(fresh(ids).logits, m(ids).logits)
    fresh.load_checkpoint(tmp_path / "ck")
    assert torch.equal(fresh(ids).logits, m(ids).logits)
    other_weights = tiny_model(llama_config(), seed=1, train_layers="memory")
    with pytest.raises(ValueError, match="made for backbone 'tiny-0'.*embedding_fingerprint"):
        other_weights.load_checkpoint(tmp_path / "ck")
    with pytest.raises(ValueError, match="made for backbone 'tiny-0'.*model_type"):
        tiny_model(gpt2_config(), train_layers="memory").load_checkpoint(tmp_path / "ck")

    old = {"token_gate": False, "memory_rank": 0, "map_search": False}  # as before them
    tiny_model(llama_config(), **old).save_checkpoint(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "longmem.json").read_text())
    for key in old:
        del meta["sidenet"][key]
    (tmp_path / "old" / "longmem.json").write_text(json.dumps(meta))
    tiny_model(llama_config(), **old).load_checkpoint(tmp_path / "old")
    with pytest.raises(ValueError, match="SideNet config"):
        tiny_model(llama_config()).load_checkpoint(tmp_path / "old")
