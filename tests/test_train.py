"""Training through the memory service on a tiny real backbone: streams, checkpoints,
resume, and Ray Train data parallel with 2 CPU workers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import ray
import torch

from benchmarks.training_curve import curve_table
from memory_service.client import MemoryClient
from memory_service.service import start_service
from model_worker.config import MemoryConfig
from model_worker.data import Corpus, RecallCorpus, Streams, stdlib_dir
from model_worker.session import SessionError, load_model
from model_worker.sidenet import SideNetConfig
from model_worker.train import (
    TRAINER_STATE,
    TrainConfig,
    distractor_memory,
    lr_at,
    param_groups,
    save_training_checkpoint,
    train,
)
from tests.longmem_tiny import make_backbone, make_books


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return make_backbone(root / "bb"), make_books(root / "books")


@pytest.fixture(scope="module")
def service():
    svc = start_service(shards=2)
    yield svc
    svc.stop()
    ray.shutdown()


def tiny_cfg(assets, service, out, **kw) -> TrainConfig:
    bb, books = assets
    base = dict(
        backbone=str(bb), data=str(books), out=str(out), segment_len=32, batch_size=2,
        steps=6, progress=False, memory=MemoryConfig(address=service.address),
        sidenet=SideNetConfig(k=8, chunk_size=2, context=4),
    )
    return TrainConfig(**(base | kw))


def test_streams_continue_rows_and_flag_new_documents(assets, tmp_path):
    books = make_books(tmp_path / "short", n_docs=3, n_words=150)
    _, tok = load_model(str(assets[0]), None)
    corpus = Corpus(books, tok, segment_len=32)
    streams = Streams(corpus, batch_size=2, context=4, seed=0)
    seen: list[list[str]] = [[], []]
    pos = [0, 0]
    for _ in range(40):
        batch = streams.next_batch()
        assert batch.input_ids.shape == (2, 4 + 32) and batch.targets.shape == (2, 32)
        assert torch.equal(batch.input_ids[:, 5:], batch.targets[:, :-1])
        for b in range(2):
            doc = streams.current(b)
            if batch.new_document[b]:
                seen[b].append(doc.name)
                pos[b] = 0
            # row b is the next segment of stream b's document, after 4 tokens of context
            assert torch.equal(batch.input_ids[b], doc.tokens[pos[b] : pos[b] + 36])
            assert torch.equal(batch.targets[b], doc.tokens[pos[b] + 5 : pos[b] + 37])
            pos[b] += 32
    assert all(len(s) >= 2 for s in seen), "streams must move on to further documents"
    state = streams.state_dict()
    again = Streams(corpus, batch_size=2, context=4, seed=0)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert torch.equal(again.next_batch().input_ids, streams.next_batch().input_ids)


def test_workers_read_disjoint_documents(assets):
    _, tok = load_model(str(assets[0]), None)
    corpus = Corpus(assets[1], tok, segment_len=32)
    a, b = Streams(corpus, 1, rank=0, world=2), Streams(corpus, 1, rank=1, world=2)
    assert not set(a.order) & set(b.order)


def test_default_corpus_is_the_stdlib_with_a_held_out_split():
    train_files = Corpus(None, None, 256, "train")  # listing only: no tokenizer needed yet
    held = Corpus(None, None, 256, "eval")
    assert train_files.root == stdlib_dir() and len(held) > 0
    assert len(train_files) > 10 * len(held)
    assert not set(train_files.files) & set(held.files)
    assert all(f.suffix == ".py" for f in held.files)


def test_lr_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup=4, steps=20)
    lrs = [lr_at(s, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(x > y for x, y in zip(lrs[3:], lrs[4:], strict=False))


def test_recall_documents_ask_later_what_they_state(assets):
    """Every fact is stated once, in the first half, and asked again later with the same
    value; passages come back verbatim; no passkey wording."""
    _, tok = load_model(str(assets[0]), None)
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 60 for i in range(300))
    source = assets[1] / "long.txt"
    source.write_text(text)
    corpus = RecallCorpus(Corpus(str(source), tok, segment_len=32), seed=3)
    doc = tok.decode(corpus.document(0).tokens)
    assert doc == tok.decode(corpus.document(0).tokens)  # the same for a seed
    assert "pass key" not in doc.lower() and "remember it" not in doc.lower()
    paras = doc.split("\n\n")
    facts = [p for p in paras if not p.startswith("Paragraph")]
    assert len(facts) >= 4
    stated = {}
    for i, p in enumerate(paras):
        for value in {w.strip(".):") for w in p.split()} - {"word"}:
            if any(ch.isdigit() for ch in value) and not p.startswith("Paragraph"):
                stated.setdefault(value, []).append(i)
    assert any(len(at) >= 2 for at in stated.values()), "a value must come back later"
    repeats = [p for p in paras if p.startswith("Paragraph") and paras.count(p) > 1]
    assert repeats, "a passage must come back verbatim"
    source.unlink()


def test_optimizer_groups_give_gates_their_own_rate_and_no_decay(assets):
    cfg = SideNetConfig(k=8, chunk_size=2, train_layers="memory", token_gate=True, memory_rank=2)
    model, _ = load_model(str(assets[0]), None, cfg)
    train_cfg = TrainConfig(lr=1e-4, gate_lr=0.05, token_gate_lr=1e-3, adapter_lr=3e-3)
    groups = {g["name"]: g for g in param_groups(model, train_cfg)}
    joint, shared = model.sidenet.joint_layers, model.sidenet.shared_gate
    assert {id(p) for p in groups["gates"]["params"]} == {id(shared.scale), id(shared.bias)}
    assert {id(p) for p in groups["head_gates"]["params"]} == {
        id(p) for j in joint for p in (j.scale, j.bias)}
    assert {id(p) for p in groups["token_gates"]["params"]} == {
        id(j.token_gate.weight) for j in joint}
    assert groups["gates"]["lr"] == 0.05 and groups["head_gates"]["lr"] == pytest.approx(0.005)
    assert {id(p) for p in groups["adapters"]["params"]} == {
        id(p) for j in joint for m in (j.memory_query, j.memory_out) for p in m.parameters()}
    assert groups["token_gates"]["lr"] == 1e-3 and groups["adapters"]["lr"] == 3e-3
    assert all(groups[k]["weight_decay"] == 0.0
               for k in ("gates", "head_gates", "token_gates", "adapters"))
    plain, _ = load_model(str(assets[0]), None, SideNetConfig(k=8, chunk_size=2))
    per_head = {g["name"]: g for g in param_groups(plain, train_cfg)}  # no token gates
    assert per_head["gates"]["lr"] == 0.05
    assert len(per_head["gates"]["params"]) == 2 * len(plain.sidenet.joint_layers)
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["weights"]["params"] and all(p.ndim == 2 for p in groups["weights"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(model.trainable_parameters())


def test_train_checkpoints_and_resumes(assets, service, tmp_path):
    out = tmp_path / "ck"
    s = train(tiny_cfg(assets, service, out, steps=4, save_every=2, bank_prefix="t1"))
    assert s["steps"] == 4 and s["tokens"] == 4 * 2 * 32 and s["memory_seconds"] > 0
    assert torch.isfinite(torch.tensor(s["final_loss"]))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ck", "ck.log.jsonl"], "no temporary or old checkpoint folders are left"
    assert sorted(p.name for p in out.iterdir()) == [
        "longmem.json", "optimizer.pt", "sidenet.safetensors", TRAINER_STATE]
    state = json.loads((out / TRAINER_STATE).read_text())
    assert state["step"] == 4 and len(state["streams"]) == 1
    log = [json.loads(line) for line in (tmp_path / "ck.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # the curve, with the gates' values
    assert [len(row) for row in log[-1]["gate_scale"]] == [4]  # (memory layers, heads)
    assert [len(row) for row in log[-1]["gate_bias"]] == [4]
    table = curve_table(tmp_path / "ck.log.jsonl", block=3).splitlines()  # TRAINING.md's table
    assert [row.split(" | ")[0] for row in table[2:]] == ["| 1-3", "| 4-4"]
    first_block = sum(r["loss"] for r in log[:3]) / 3
    assert float(table[2].split(" | ")[1]) == pytest.approx(first_block, abs=1e-3)
    # every step went through the service: the banks hold the streams' current documents
    client = MemoryClient(service.address)
    banks = {b.name: b for b in client.list_banks()}
    for b, (_, segment) in enumerate(state["streams"][0]["streams"]):
        info = banks[f"t1-w0-s{b}"]
        assert info.size_tokens + info.pending_tokens == segment * 32
    weights = (out / "sidenet.safetensors").read_bytes()
    s2 = train(tiny_cfg(assets, service, out, steps=7, resume=True, bank_prefix="t1"))
    assert s2["steps"] == 3
    assert json.loads((out / TRAINER_STATE).read_text())["step"] == 7
    assert (out / "sidenet.safetensors").read_bytes() != weights
    # resume rebuilt each bank from its document before going on
    state = json.loads((out / TRAINER_STATE).read_text())
    banks = {b.name: b for b in client.list_banks()}
    for b, (_, segment) in enumerate(state["streams"][0]["streams"]):
        info = banks[f"t1-w0-s{b}"]
        assert info.size_tokens + info.pending_tokens == segment * 32
    client.close()


def test_grad_accumulation_counts_tokens(assets, service, tmp_path):
    s = train(tiny_cfg(assets, service, tmp_path / "ck", steps=2, grad_accum=3, bank_prefix="t2"))
    assert s["tokens"] == 2 * 3 * 2 * 32


def test_resume_without_checkpoint_is_refused(assets, service, tmp_path):
    with pytest.raises(SessionError, match="no checkpoint"):
        train(tiny_cfg(assets, service, tmp_path / "none", resume=True))


def test_failed_checkpoint_write_keeps_the_previous_one(assets, tmp_path):
    model, _ = load_model(str(assets[0]), None)
    opt = torch.optim.AdamW(model.trainable_parameters())
    save_training_checkpoint(model, opt, {"step": 1}, tmp_path / "ck")
    with pytest.raises(TypeError):  # not JSON-serializable: the write fails half-way
        save_training_checkpoint(model, opt, {"step": object()}, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / TRAINER_STATE).read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_ray_train_two_cpu_workers(assets, service, tmp_path):
    out = tmp_path / "dp"
    s = train(tiny_cfg(assets, service, out, steps=3, batch_size=1, workers=2, bank_prefix="dp"))
    assert s["workers"] == 2 and s["tokens"] == 3 * 1 * 32 * 2
    state = json.loads((out / TRAINER_STATE).read_text())
    assert state["world"] == 2 and len(state["streams"]) == 2
    client = MemoryClient(service.address)
    names = {b.name for b in client.list_banks()}
    client.close()
    assert {"dp-w0-s0", "dp-w1-s0"} <= names, "each worker has its own streams and banks"
    # the workers' checkpoints loads into a fresh model
    model, _ = load_model(None, str(out))
    assert model.backbone_name == str(assets[0])


def test_distractor_memory_fills_every_bank_before_its_document(assets, service, tmp_path):
    out = tmp_path / "ck"
    cfg = tiny_cfg(assets, service, out, steps=3, save_every=3, distractors=96, bank_prefix="t6")
    train(cfg)
    client = MemoryClient(service.address)

    def held() -> list[int]:
        banks = {b.name: b for b in client.list_banks()}
        state = json.loads((out / TRAINER_STATE).read_text())
        return [
            banks[f"t6-w0-s{b}"].size_tokens + banks[f"t6-w0-s{b}"].pending_tokens - segment * 32
            for b, (_, segment) in enumerate(state["streams"][0]["streams"])
        ]

    assert held() == [96, 96]  # besides the document read so far: the distractors
    train(replace(cfg, steps=5, resume=True))
    assert held() == [96, 96]  # resume wrote them again before rebuilding the document
    client.close()
    # they are the memory of documents no stream reads, read on the grid
    model, tokenizer = load_model(str(assets[0]), None, cfg.sidenet)
    source = RecallCorpus(Corpus(str(assets[1]), tokenizer, 32), seed=1)
    keys, values = distractor_memory(model, source, 40, 32)
    doc = next(d for i in range(len(source)) if (d := source.document(i)) is not None)
    k, v = model.encode_memory(doc.tokens[None, :36], 4)  # context 4, one 32-token segment
    assert keys.shape == (40, model.bank_heads, model.head_dim) and keys.dtype == torch.float16
    torch.testing.assert_close(keys[:32], k[0].half())
    torch.testing.assert_close(values[:32], v[0].half())


def test_too_many_distractors_are_refused(assets, service, tmp_path):
    memory = MemoryConfig(address=service.address, capacity_tokens=256)
    with pytest.raises(ValueError, match="--distractors 200 must be"):
        train(tiny_cfg(assets, service, tmp_path / "ck", distractors=200, memory=memory))
