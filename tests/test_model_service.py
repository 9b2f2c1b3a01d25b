"""The model does not know where its memory lives: the same forward through the in-process
client and through the gRPC service (real Ray, real server on loopback)."""

from __future__ import annotations

import pytest
import torch

from memory_service.client import InProcessClient, MemoryClient
from memory_service.service import start_service
from tests.test_model_tiny import FAMILIES, VOCAB, open_gates, tiny_model


@pytest.fixture(scope="module")
def service(ray_local):
    s = start_service(shards=2, name="model-test")
    yield s
    s.stop()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_logits_in_process_and_over_grpc(service, family):
    model = tiny_model(FAMILIES[family]())
    open_gates(model)  # memory contributes (untrained, it would not)
    streams = [f"{family}-a", f"{family}-b"]
    local, remote = InProcessClient(), MemoryClient(service.address)
    g = torch.Generator().manual_seed(0)
    segments = [torch.randint(0, VOCAB, (2, 24), generator=g) for _ in range(4)]
    try:
        for memory in (local, remote):
            model.create_banks(memory, streams, capacity_tokens=1024)
        outs = {}
        for name, memory in (("local", local), ("grpc", remote)):
            logits = []
            for ids in segments:  # read a stream segment by segment, memory growing
                with torch.no_grad():
                    out = model(ids, streams, memory)
                model.append_memory(memory, streams, out)
                logits.append(out.logits)
            outs[name] = torch.stack(logits)
        torch.testing.assert_close(outs["local"], outs["grpc"], rtol=1e-5, atol=1e-5)
        off = model(segments[-1]).logits  # memory matters here, so the check has teeth
        assert not torch.allclose(off, outs["grpc"][-1], atol=1e-4)
    finally:
        for name in streams:
            remote.delete_bank(name)
        remote.close()
