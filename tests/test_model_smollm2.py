"""LongMem on the real default backbone, SmolLM2-135M-Instruct (offline, from the GGUF).

Marked `smollm2` so they can be selected (`-m smollm2`) or skipped (`-m "not smollm2"`);
they run in CI. The first run converts the GGUF (~30 s) into $LONGMEM_CACHE.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from memory_service.client import InProcessClient
from model_worker.backbone import DEFAULT_BACKBONE
from model_worker.model import LongMemModel
from model_worker.session import SHIPPED_WEIGHTS, load_model, resolve_checkpoint

pytestmark = pytest.mark.smollm2

TEXT = (
    "The lighthouse keeper rowed out to the island every morning before dawn. He carried "
    "a lantern, a loaf of bread and a small notebook in which he wrote the weather, the "
    "ships he saw and the names of the birds that nested on the rocks. In winter the sea "
    "was grey and the wind came from the north, and he counted the days until the supply "
    "boat returned from the harbour town. His daughter Mara had drawn a map of the island "
    "when she was nine: the cottage, the well, the lighthouse, the cove where seals slept "
    "in the afternoon, and a cross marking the spot where, she insisted, pirates had buried "
    "a chest of silver coins. Years later, when the lighthouse was automated and the keeper "
    "moved to the mainland, Mara came back with a spade and the old map. She dug for three "
    "days beside the well. On the fourth day she found a tin box holding the notebook, "
    "wrapped in oilcloth, with a final entry in her father's careful hand."
)


@pytest.fixture(scope="module")
def smol():
    model, tok = LongMemModel.from_backbone()
    return model, tok


def test_default_backbone_loads_offline_and_has_expected_shape(smol):
    model, tok = smol
    c = model.backbone.model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size) == ("llama", 30, 576)
    assert (model.backbone.n_heads, model.backbone.n_kv_heads, model.head_dim) == (9, 3, 64)
    assert model.sidenet.sources == list(range(14, 24)) and model.bank_heads == 30
    assert len(model.sidenet.layers) == 16  # copies of backbone layers 14, 15, ..., 29
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :64]
    out = model(ids)
    assert out.logits.shape == (1, 64, 49152) and out.logits.dtype == torch.float32
    assert out.keys.shape == (1, 64, 30, 64)
    # the backbone itself is a working language model after conversion
    with torch.no_grad():
        ref = model.backbone.model(ids).logits
    nll = torch.nn.functional.cross_entropy(ref[0, :-1], ids[0, 1:])
    assert nll < 4.0, f"converted SmolLM2 looks broken: next-token NLL {nll:.2f}"


def test_untrained_model_is_the_backbone(smol):
    """Identity at initialisation, float32: memory off, and memory on with a full bank
    but its contribution at its initial value (scale 0), give the backbone's logits."""
    model, tok = smol
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :192]
    mem = InProcessClient()
    model.create_banks(mem, ["s"], capacity_tokens=1024)
    with torch.no_grad():
        model.append_memory(mem, ["s"], model(ids[:, :96], n_context=16))  # tokens 16..95
        out = model(ids[:, 64:], ["s"], mem, n_context=32, references=True)
        alone = model.backbone.model(ids[:, 64:]).logits[:, 32:]
    assert out.retrieved.valid.all()
    assert (out.backbone_logits - alone).abs().max() < 1e-4
    assert (out.logits - alone).abs().max() < 1e-4
    assert (out.memory_off_logits - alone).abs().max() < 1e-4


def test_retrieval_query_and_cached_keys_share_a_space(smol, monkeypatch):
    """Write a segment's own memory-layer keys/values into a bank and query with the same
    segment (SideNet memory-layer queries, untrained): retrieval finds the token's own
    neighbourhood far more often than chance.

    Measured at initialisation (retrieval is weak before training, docs/method.md):
    with the first tokens in the bank, 60% of top-1 picks go to chunk 0, the attention
    sink, so the top-1 chunk is rarely the token's own. We therefore check (a) the token's
    own chunk is among the K/csz retrieved chunks for most (token, head) pairs (~62% vs
    ~32% by chance) and (b) with the sink tokens left out of the bank, the top-1 chunk is
    within 2 chunks of the token ~3x as often as chance.
    """
    model, tok = smol
    # the chunks the figures above were measured on (restored after the test)
    monkeypatch.setattr(model, "config", replace(model.config, chunk_size=4))
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :200]
    T, csz = ids.shape[1], model.config.chunk_size
    top_k = model.config.k // csz
    seg = model(ids)
    own = (torch.arange(T) // csz)[:, None]  # (T, 1) chunk of each token
    for skip in (0, 16):  # bank from token `skip` on
        mem = InProcessClient()
        model.create_banks(mem, ["s"], capacity_tokens=1024)
        mem.append("s", seg.keys[0, skip:], seg.values[0, skip:])
        chunks = model(ids, ["s"], mem).retrieved.chunk_ids[0] + skip // csz  # (T, Hq, k)
        n_chunks = (T - skip) // csz
        if skip == 0:
            found = (chunks == own[:, :, None]).any(-1).float()[32:].mean().item()
            chance = top_k / n_chunks
            assert found > 0.5 and found > 1.6 * chance, (found, chance)
        else:
            near = ((chunks[:, :, 0] - own).abs() <= 2).float()[32:].mean().item()
            chance = 5 / n_chunks
            assert near > 2.5 * chance, (near, chance)


def test_shipped_weights_are_the_default_for_the_default_backbone():
    """eval, generate and demo load the committed SideNet weights when no checkpoint is
    given: trained (gates open), documented, small, and only what was trained."""
    assert resolve_checkpoint(None, None) == str(SHIPPED_WEIGHTS)
    assert resolve_checkpoint(DEFAULT_BACKBONE, None) == str(SHIPPED_WEIGHTS)
    assert resolve_checkpoint(None, "none") is None
    assert resolve_checkpoint("/some/other/backbone", None) is None
    assert (SHIPPED_WEIGHTS / "TRAINING.md").is_file()
    assert (SHIPPED_WEIGHTS / "sidenet.safetensors").stat().st_size < 25 * 2**20
    model, _ = load_model(None, None)
    assert model.gates()["scale"].abs().max() > 0.1, "the shipped gates were trained open"
    untrained, _ = load_model(None, "none")
    assert torch.equal(untrained.gates()["scale"], torch.zeros(10, 9))


def test_real_keys_script_writes_the_bands_keys_token_major(smol, tmp_path):
    """`benchmarks/real_keys.py` (the index suite's SmolLM2 keys): row t * 10 + l is layer
    l's key of token t, as the model writes it to a bank; the queries are retrieval's."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    books = tmp_path / "books"
    books.mkdir()
    (books / "story.txt").write_text(" ".join([TEXT] * 4))
    out = tmp_path / "keys"
    script = Path(__file__).parents[1] / "benchmarks" / "real_keys.py"
    run = [sys.executable, str(script), "--tokens", "2560", "--books", str(books),
           "--out", str(out), "--threads", "1"]
    subprocess.run(run, check=True, capture_output=True, timeout=300)
    keys, queries = np.load(out / "keys.npy"), np.load(out / "queries.npy")
    assert keys.shape == (2560, 3, 64) and keys.dtype == np.float16
    assert queries.shape == (128, 9, 64)
    model, tok = smol
    ids = torch.tensor(tok(" ".join([TEXT] * 4), add_special_tokens=False).input_ids)
    expected, _ = model.encode_memory(ids[None, :576], n_context=64)  # the first window
    expected = expected[0].reshape(-1, 3, 64)  # (T * 10, 3, 64): token-major, layer within
    torch.testing.assert_close(torch.from_numpy(keys[:2560]).float(),
                               expected[:2560].half().float(), rtol=0, atol=0)
    too_many = [*run[:3], "100000000", *run[4:]]
    failed = subprocess.run(too_many, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "the books give only" in failed.stderr
