"""Evaluation on a tiny real backbone: perplexity, passkey and ICL, memory on vs off."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from memory_service.client import InProcessClient
from model_worker.data import encode
from model_worker.evaluate import (
    EvalConfig,
    format_table,
    passkey_trial,
    read_icl,
    read_passkey_memory,
    run_eval,
    three_logits,
)
from model_worker.train import load_model, open_bank, read_into_bank
from tests.longmem_tiny import make_backbone, make_books


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    bb, books = make_backbone(root / "bb"), make_books(root / "books", n_docs=2)
    icl = root / "icl"
    words = ["good", "bad", "great", "awful", "fine", "dull"]
    g = torch.Generator().manual_seed(0)

    def rows(n):
        for _ in range(n):
            idx = torch.randint(0, len(words), (5,), generator=g).tolist()
            yield int(torch.randint(0, 2, (1,), generator=g)), " ".join(words[i] for i in idx)

    (icl / "mr").mkdir(parents=True)
    for split, n in (("train", 40), ("test", 6)):
        with (icl / "mr" / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(rows(n))
    (icl / "SST-2").mkdir()
    (icl / "SST-2" / "train.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for y, t in rows(40)))
    (icl / "SST-2" / "test.tsv").write_text("".join(f"{y} {t}\n" for y, t in rows(6)))
    return bb, books, icl


@pytest.fixture(scope="module")
def model(assets):
    m, tok = load_model(str(assets[0]), None)
    return m.eval(), tok


def test_icl_formats(assets):
    _, _, icl = assets
    csv_rows, tsv_rows, space_rows = (
        read_icl(icl / "mr", "train"), read_icl(icl / "SST-2", "train"),
        read_icl(icl / "SST-2", "test"))
    assert len(csv_rows) == 40 and len(tsv_rows) == 40 and len(space_rows) == 6
    for text, label in csv_rows + tsv_rows + space_rows:
        assert label in (0, 1) and text and not text[0].isdigit()


def test_three_logits_match_separate_passes(model):
    m, _ = model
    mem = InProcessClient()
    open_bank(mem, m, "b", 4096)
    ids = torch.randint(0, m.backbone.model.config.vocab_size, (1, 40))
    read_into_bank(mem, m, "b", ids[0], 20)
    on, off, base, k, v = three_logits(m, ids, ["b"], mem)
    torch.testing.assert_close(on, m(ids, ["b"], mem).logits)
    torch.testing.assert_close(off, m(ids).logits)
    torch.testing.assert_close(base, m.backbone.model(ids).logits)
    assert not torch.allclose(on, off), "memory on must differ from memory off"
    assert k.shape == v.shape == (1, 40, m.kv_heads, m.head_dim)


def test_passkey_memory_equals_reading_the_whole_stream(model):
    """Filler segments reuse one segment's keys/values: the bank must be the same as
    reading every segment before the window."""
    m, tok = model
    seg = 128
    trial = passkey_trial(tok, "12345", 700, seg)
    assert trial.window_start % seg == 0 and trial.window_start >= 3 * seg
    assert tok.decode(trial.stream[-len(trial.answer):]).strip() == "12345"
    assert len(trial.stream) - trial.window_start <= seg + 40
    mem = InProcessClient()
    for name in ("fast", "full"):
        open_bank(mem, m, name, 4096)
    read_passkey_memory(m, mem, "fast", trial, seg, {})
    read_into_bank(mem, m, "full", torch.tensor(trial.stream[: trial.window_start]), seg)
    assert mem.describe_bank("fast")["size_tokens"] == trial.window_start
    q = torch.randn(2, 7, m.backbone.n_heads, m.head_dim)
    a, b = mem.search(["fast"] * 2, q, 4), mem.search(["full"] * 2, q, 4)
    assert torch.equal(a.chunk_ids, b.chunk_ids)
    torch.testing.assert_close(a.keys, b.keys)
    torch.testing.assert_close(a.values, b.values)


def test_run_eval_writes_table_and_json(assets, model, tmp_path):
    bb, books, icl = assets
    m, tok = model
    cfg = EvalConfig(
        backbone=str(bb), data=str(books), segment_len=128, docs=2, segments=3,
        passkey_distances=[10, 600], passkey_trials=2, icl=str(icl), icl_tasks=["mr", "sst2"],
        icl_memory_demos=20, icl_shots=2, icl_test=6, json_out=str(tmp_path / "e.json"),
    )
    mem = InProcessClient()
    result = run_eval(cfg, m, tok, memory=mem)
    rows = result["rows"]
    assert json.loads((tmp_path / "e.json").read_text())["rows"] == rows
    figures = [(r["figure"], r["setting"]) for r in rows]
    assert figures == [
        ("perplexity", "memory on"), ("perplexity", "memory off"),
        ("perplexity", "backbone alone"),
        ("passkey @ 10", "memory on"), ("passkey @ 10", "memory off"),
        ("passkey @ 10", "backbone alone"),
        ("passkey @ 600", "memory on"), ("passkey @ 600", "memory off"),
        ("passkey @ 600", "backbone alone"),
        ("icl mr", "memory on"), ("icl mr", "memory off"),
        ("icl sst2", "memory on"), ("icl sst2", "memory off"),
    ]
    for r in rows:
        assert r["model"] == str(bb) and r["segment_len"] == 128 and r["tokens"] > 0
        assert "checkpoint" in r and "memory_tokens" in r
    ppl = {r["setting"]: r for r in rows[:3]}
    assert ppl["memory on"]["tokens"] == 2 * 3 * 128
    assert ppl["memory on"]["memory_tokens"] == 2 * 128 and ppl["memory off"]["memory_tokens"] == 0
    # the perplexity with memory off is the same model's loss without retrieval
    doc = result["documents"][0]
    assert doc and ppl["memory off"]["value"] != ppl["memory on"]["value"]
    near, far = rows[3], rows[6]
    assert near["memory_tokens"] == 0 and far["memory_tokens"] >= 512
    assert rows[9]["memory_tokens"] > 0 and rows[9]["memory_demos"] == 20
    table = format_table(rows)
    assert "passkey @ 600" in table and "ppl" in table and "icl sst2" in table


def test_eval_perplexity_memory_off_is_plain_cross_entropy(assets, model):
    bb, books, _ = assets
    m, tok = model
    cfg = EvalConfig(backbone=str(bb), data=str(books), segment_len=64, docs=1, segments=2,
                     sections=["perplexity"], json_out=None)
    rows = run_eval(cfg, m, tok, memory=InProcessClient())["rows"]
    doc = torch.tensor(encode(tok, sorted(books.iterdir())[0].read_text()))
    m.config.use_memory = False
    nll = sum(
        F.cross_entropy(m(doc[None, s * 64 : s * 64 + 64]).logits[0], doc[s * 64 + 1 : s * 64 + 65],
                        reduction="sum").item() for s in range(2))
    m.config.use_memory = True
    assert rows[1]["value"] == pytest.approx(torch.tensor(nll / 128).exp().item(), rel=1e-4)
