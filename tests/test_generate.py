"""Generation with memory on a tiny real backbone, in process and through the service."""

from __future__ import annotations

import pytest
import ray
import torch

from memory_service.client import InProcessClient, MemoryClient
from memory_service.service import start_service
from model_worker.config import MemoryConfig
from model_worker.data import DataError, encode
from model_worker.generate import GenerateConfig, generate, stream_tokens
from model_worker.session import load_model, open_bank, read_into_bank
from tests.longmem_tiny import make_backbone, make_books


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    bb, books = make_backbone(root / "bb"), make_books(root / "books", n_docs=1, n_words=300)
    model, tok = load_model(str(bb), None)
    return bb, books / "book0.txt", model.eval(), tok


def test_streamed_pieces_make_the_greedy_continuation(assets):
    _, doc, model, tok = assets
    mem = InProcessClient()
    open_bank(mem, model, "doc", 4096)
    document = encode(tok, doc.read_text())
    read_into_bank(mem, model, "doc", torch.tensor(document), 32)
    cfg = GenerateConfig(prompt="the memory bank", segment_len=32, max_new_tokens=12)
    pieces = list(stream_tokens(model, tok, mem, "doc", cfg.prompt, cfg, document))
    again = "".join(stream_tokens(model, tok, mem, "doc", cfg.prompt, cfg, document))
    assert len(pieces) > 1 and "".join(pieces) == again, "greedy decoding is deterministic"
    # the same, token by token, without the generator: the document's last `context`
    # tokens, then the prompt and what came so far
    ids = document + encode(tok, cfg.prompt)
    ctx = model.config.context
    for _ in range(12):
        window = torch.tensor(ids[len(document) - ctx :])[None]
        ids.append(int(model(window, ["doc"], mem, n_context=ctx).logits[0, -1].argmax()))
    assert "".join(pieces) == tok.decode(ids[len(document) + len(encode(tok, cfg.prompt)):])


def test_window_overflow_goes_into_memory(assets):
    _, _, model, tok = assets
    mem = InProcessClient()
    open_bank(mem, model, "b", 4096)
    cfg = GenerateConfig(prompt="the memory bank holds keys " * 12, segment_len=32,
                         max_new_tokens=40)
    n_prompt = len(encode(tok, cfg.prompt))
    assert n_prompt > 32
    pieces = list(stream_tokens(model, tok, mem, "b", cfg.prompt, cfg))
    info = mem.describe_bank("b")
    held = info.size_tokens + info.pending_tokens
    assert held % 16 == 0, "whole half-windows are written"
    assert n_prompt - held < 32 and pieces, "the window never exceeds one segment"


def test_generate_through_the_service_reuses_a_named_bank(assets):
    bb, doc, _, _ = assets
    svc = start_service(shards=2)
    try:
        out: list[str] = []
        cfg = GenerateConfig(prompt="the side network", document=str(doc), bank="novel",
                             backbone=str(bb), segment_len=32, max_new_tokens=8,
                             memory=MemoryConfig(address=svc.address))
        text = generate(cfg, out.append)
        assert text == "".join(out) and text
        client = MemoryClient(svc.address)
        size = client.describe_bank("novel").size_tokens
        assert size > 100
        cfg.document = None  # the bank as it is: the window is the prompt alone
        reused = generate(cfg, lambda _: None)
        model, tok = load_model(str(bb), None)
        local = InProcessClient()
        open_bank(local, model, "novel", 4096)
        read_into_bank(local, model, "novel", torch.tensor(encode(tok, doc.read_text())), 32)
        assert reused == "".join(stream_tokens(model, tok, local, "novel", cfg.prompt, cfg))
        assert client.describe_bank("novel").size_tokens == size
        cfg.bank = "missing"
        with pytest.raises(DataError, match="bank 'missing' not found"):
            generate(cfg, lambda _: None)
        client.close()
    finally:
        svc.stop()
        ray.shutdown()
