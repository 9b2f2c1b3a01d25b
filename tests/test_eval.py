"""Evaluation on a tiny real backbone: perplexity, passkey and ICL, memory on vs off."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
import torch.nn.functional as F

from memory_service.client import InProcessClient
from model_worker.config import MemoryConfig
from model_worker.data import DataError, encode, windows
from model_worker.evaluate import (
    EvalConfig,
    SegmentCache,
    format_table,
    haystack_tokens,
    passkey_trial,
    read_icl,
    read_passkey_memory,
    run_eval,
)
from model_worker.session import load_model, open_bank, read_into_bank
from tests.longmem_tiny import make_backbone, make_books
from tests.test_model_tiny import open_gates


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


def test_references_match_separate_passes(assets):
    m, _ = load_model(str(assets[0]), None)
    open_gates(m)
    mem = InProcessClient()
    open_bank(mem, m, "b", 4096)
    ids = torch.randint(0, m.backbone.model.config.vocab_size, (1, 120))
    read_into_bank(mem, m, "b", ids[0, :80], 20)
    out = m(ids[:, 80:], ["b"], mem, n_context=8, references=True)
    torch.testing.assert_close(out.logits, m(ids[:, 80:], ["b"], mem, n_context=8).logits)
    torch.testing.assert_close(out.memory_off_logits, m(ids[:, 80:], n_context=8).logits)
    torch.testing.assert_close(out.backbone_logits, m.backbone.model(ids[:, 80:]).logits[:, 8:])
    assert not torch.allclose(out.logits, out.memory_off_logits), "memory must matter here"
    assert out.keys.shape == out.values.shape == (1, 32, m.bank_heads, m.head_dim)


@pytest.mark.parametrize("kind", ["filler", "prose"])
def test_passkey_memory_equals_reading_the_whole_stream(model, kind):
    """Cached haystack segments: the bank must be the same as reading every segment before
    the window; the key lies in memory, beyond the window and its context."""
    m, tok = model
    seg, ctx = 128, m.config.context
    prose = encode(tok, "the side network reads a long book one page at a time. ") * 40
    haystack = haystack_tokens(tok, kind, 900, prose)
    cache = SegmentCache(m)
    for seed in range(3):
        rng = random.Random(seed)
        trial = passkey_trial(tok, haystack, "12345", 900, seg, ctx, rng)
        assert (trial.window_start - ctx) % seg == 0 and trial.window_start >= 3 * seg
        assert ctx <= trial.key_span[0] and trial.key_span[1] <= trial.window_start - ctx
        assert tok.decode(trial.stream[-len(trial.answer):]).strip() == "12345"
        assert "12345" in tok.decode(trial.stream[slice(*trial.key_span)])
        assert len(trial.stream) - trial.window_start <= seg + 40
        mem = InProcessClient()
        for name in ("fast", "full"):
            open_bank(mem, m, name, 4096)
        read_passkey_memory(mem, "fast", trial, seg, ctx, cache)
        read_into_bank(mem, m, "full", torch.tensor(trial.stream[: trial.window_start]), seg)
        assert mem.describe_bank("fast").size_tokens == trial.window_start - ctx
        q = torch.randn(2, 7, m.backbone.n_heads, m.head_dim)
        a, b = mem.search(["fast"] * 2, q, 4), mem.search(["full"] * 2, q, 4)
        assert torch.equal(a.chunk_ids, b.chunk_ids)
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
    with pytest.raises(DataError, match="too short"):
        passkey_trial(tok, haystack, "12345", 100, seg, ctx, random.Random(0))


def test_run_eval_writes_table_and_json(assets, model, tmp_path):
    bb, books, icl = assets
    m, tok = model
    cfg = EvalConfig(
        backbone=str(bb), data=str(books), segment_len=128, docs=2, segments=3,
        passkey_distances=[600], passkey_trials=2, icl=str(icl), icl_tasks=["mr", "sst2"],
        icl_memory_demos=20, icl_shots=2, icl_test=3, icl_seeds=2,
        json_out=str(tmp_path / "e.json"),
    )
    result = run_eval(cfg, m, tok, memory=InProcessClient())
    rows = result["rows"]
    assert json.loads((tmp_path / "e.json").read_text())["rows"] == rows
    figures = [(r["figure"], r["setting"]) for r in rows]
    settings = ["memory on", "memory off", "backbone alone"]
    ppl = ["perplexity", *(f"perplexity @ {lo}-{lo + 31}" for lo in (0, 32, 64, 96))]
    assert figures == [
        *((f, s) for s in settings for f in ppl),
        ("retrieved at seg start", "memory on"),
        *((f"passkey {h} @ 600", s) for h in ("prose", "filler")
          for s in [*settings, "key retrieved"]),
        *((f"icl {t}", s) for t in ("mr", "sst2") for s in settings[:2]),
    ]
    for r in rows:
        assert r["model"] == str(bb) and r["segment_len"] == 128 and r["tokens"] > 0
        assert "checkpoint" in r and "memory_tokens" in r
    total = {r["setting"]: r for r in rows if r["figure"] == "perplexity"}
    assert total["memory on"]["tokens"] == 2 * 3 * 128
    assert total["memory on"]["memory_tokens"] == 2 * 128
    assert total["memory off"]["memory_tokens"] == 0
    by_position = [r for r in rows if r["figure"].startswith("perplexity @")]
    assert sum(r["tokens"] for r in by_position) == 3 * 2 * 3 * 128
    starts = next(r for r in rows if r["figure"] == "retrieved at seg start")
    assert 0 <= starts["value"] <= 1 and starts["chunks"] > 0
    far = next(r for r in rows if r["figure"] == "passkey prose @ 600")
    assert far["memory_tokens"] >= 384 and far["trials"] == 2
    icl_mr = next(r for r in rows if r["figure"] == "icl mr")
    assert icl_mr["memory_demos"] == 20 and icl_mr["examples"] == 2 * 3
    table = format_table(rows)
    assert "passkey filler @ 600" in table and "ppl" in table and "icl sst2" in table


def test_eval_perplexity_memory_off_is_plain_cross_entropy(assets, model):
    bb, books, _ = assets
    m, tok = model
    cfg = EvalConfig(backbone=str(bb), data=str(books), segment_len=64, docs=1, segments=2,
                     sections=["perplexity"], json_out=None)
    rows = run_eval(cfg, m, tok, memory=InProcessClient())["rows"]
    doc = torch.tensor(encode(tok, sorted(books.iterdir())[0].read_text()))
    nll = 0.0
    for lo, start, end in windows(len(doc) - 1, 64, m.config.context)[:2]:
        logits = m(doc[None, lo:end], n_context=start - lo).logits[0]
        nll += F.cross_entropy(logits, doc[start + 1 : end + 1], reduction="sum").item()
    off = next(r for r in rows if (r["figure"], r["setting"]) == ("perplexity", "memory off"))
    assert off["value"] == pytest.approx(torch.tensor(nll / 128).exp().item(), rel=1e-4)


def test_open_bank_empties_or_replaces_a_bank_of_another_size(model):
    m, _ = model
    mem = InProcessClient()
    open_bank(mem, m, "b", 256)
    keys = torch.randn(40, m.bank_heads, m.head_dim)
    mem.append("b", keys, keys)
    open_bank(mem, m, "b", 256)  # same size: emptied
    info = mem.describe_bank("b")
    assert info.size_tokens == 0 and info.spec.capacity_tokens == 256
    mem.append("b", keys, keys)
    open_bank(mem, m, "b", 4096)  # another size (a longer passkey): replaced
    info = mem.describe_bank("b")
    assert info.size_tokens == 0 and info.spec.capacity_tokens == 4096


def test_int8_banks_change_memory_on_perplexity_little(assets):
    bb, books, _ = assets
    m, tok = load_model(str(bb), None)
    open_gates(m.eval())
    ppl = {}
    for dtype in ("float16", "int8"):
        cfg = EvalConfig(backbone=str(bb), data=str(books), segment_len=64, docs=1, segments=4,
                         sections=["perplexity"], json_out=None,
                         memory=MemoryConfig(bank_dtype=dtype))
        mem = InProcessClient()
        rows = run_eval(cfg, m, tok, memory=mem)["rows"]
        on = next(r for r in rows if (r["figure"], r["setting"]) == ("perplexity", "memory on"))
        off = next(r for r in rows if (r["figure"], r["setting"]) == ("perplexity", "memory off"))
        assert on["bank_dtype"] == dtype and mem.describe_bank("eval-ppl").spec.dtype == dtype
        ppl[dtype] = on["value"]
        assert on["value"] != pytest.approx(off["value"], rel=1e-6)  # memory is used
    assert ppl["int8"] == pytest.approx(ppl["float16"], rel=0.01)
