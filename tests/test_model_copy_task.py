"""Memory-augmented adaptation learns a long-range copy through the memory (tiny model).

Each stream is [S, S'] where S is a random token sequence and S' = S: the repeat lies
beyond the local window (one segment), so only memory can predict it. The bank (24 tokens)
fits in K = 32, so this tests that the memory path learns to read the right entry, not
retrieval selectivity (see test_model_smollm2 for that).

The tiny frozen backbone is a Qwen2 whose first layer has a 2-token sliding window and the
rest full attention: its layer-1 keys then carry the previous token, which is what a
position-free memory needs to find "the token after this one" (a pretrained LM has such
previous-token features; a random full-attention layer averages them away). The LM head
is scaled up so a random tiny backbone can express confident predictions at all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config

from memory_service.client import InProcessClient
from model_worker.model import LongMemModel
from model_worker.sidenet import SideNetConfig

V, T, B = 32, 24, 16


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster, and robust to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_long_range_copy_through_memory(one_thread):
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, use_sliding_window=True, sliding_window=2,
        max_window_layers=0, tie_word_embeddings=False,
        layer_types=["sliding_attention"] + ["full_attention"] * 3,
    )
    backbone = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        backbone.lm_head.weight.mul_(10.0)
    cfg = SideNetConfig(  # per-head gates, no memory maps: what is tested is the memory
        r=2, memory_layers=[1, 1], k=32, chunk_size=4, train_layers="all", token_gate=False,
        memory_rank=0,  # path itself, not what trains around it
    )
    model = LongMemModel(backbone, cfg)
    mem = InProcessClient()
    streams = [f"s{b}" for b in range(B)]
    model.create_banks(mem, streams, capacity_tokens=1024)
    gates = model.sidenet.gates()
    with torch.no_grad():  # memory open from the start (scale 1): a random backbone gives
        gates[0].fill_(1.0)  # the zero-scale start no signal to open it by
    rest = [p for p in model.trainable_parameters() if all(p is not g for g in gates)]
    # the gates get a larger step so memory opens quickly; everything else lr 1e-2
    opt = torch.optim.AdamW([{"params": rest}, {"params": gates, "lr": 0.1}], lr=1e-2,
                            weight_decay=0.0)
    g = torch.Generator().manual_seed(1)

    def repeat_loss(train: bool) -> torch.Tensor:
        s = torch.randint(0, V, (B, T), generator=g)
        for name in streams:
            mem.reset_bank(name)
        with torch.no_grad():  # the first occurrence enters each stream's bank
            model.append_memory(mem, streams, model(s))
        model.train(train)
        out = model(s, streams, mem)  # the repeat
        if model.config.use_memory:  # all 6 chunks retrieved
            assert (out.retrieved.valid.sum(-1) == T // 4).all()
        return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), s[:, 1:].flatten())

    for _ in range(450):
        loss = repeat_loss(train=True)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        on = repeat_loss(train=False).item()
        model.config.use_memory = False
        off = repeat_loss(train=False).item()
    assert on < 0.5 * off and on < 0.5 * torch.log(torch.tensor(float(V))).item(), (on, off)
