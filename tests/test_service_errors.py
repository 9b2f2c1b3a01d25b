# ruff: noqa: E501  (one bad input per line reads best as a table)
"""Bad input over gRPC: the right status, a message that says what was wrong, the bank as
before, and the server still serving."""

from __future__ import annotations

import grpc
import pytest
import torch

from memory_service.client import MemoryClient
from memory_service.service import start_service
from memory_service.tenancy import Tenant, TenantTable
from memory_service.wire import encode
from protos.longmem.v1 import memory_pb2 as pb
from protos.longmem.v1 import memory_pb2_grpc as pb_grpc

KEY, READER, SMALL = "key-a", "key-reader", "key-small"
TENANTS = TenantTable([
    Tenant("a", (KEY,)),
    Tenant("reader", (READER,), read_only=True),
    Tenant("small", (SMALL,), max_banks=1, max_tokens=4096),
])
C = grpc.StatusCode


@pytest.fixture(scope="module")
def service(ray_local):
    s = start_service(shards=2, tenants=TENANTS, max_message_bytes=8 << 20)
    client = MemoryClient(s.address, KEY)
    client.create_bank("bank", kv_heads=3, head_dim=64, capacity_tokens=4096)
    g = torch.Generator().manual_seed(0)
    client.append("bank", torch.randn(402, 3, 64, generator=g), torch.randn(402, 3, 64, generator=g))
    channel = grpc.insecure_channel(s.address)
    yield s, client, pb_grpc.MemoryServiceStub(channel)
    channel.close()
    client.close()
    s.stop()


def raw_tensor(t: torch.Tensor, **override) -> pb.Tensor:
    msg = encode(t)
    for k, v in override.items():
        if k == "shape":
            del msg.shape[:]
            msg.shape.extend(v)
        else:
            setattr(msg, k, v)
    return msg


def kv(n=8, h=3, d=64):
    return torch.randn(n, h, d), torch.randn(n, h, d)


def nan_at_end(n, h=3, d=64):
    t = torch.randn(n, h, d)
    t[-1, -1, -1] = float("nan")
    return t


def append_req(keys, values, bank="bank", **kw):
    return pb.AppendRequest(bank=bank, keys=kw.get("k", encode(keys)), values=kw.get("v", encode(values)))


def search_req(queries, top_k=4, banks=("bank",), q=None):
    return pb.SearchRequest(banks=list(banks), queries=q or encode(queries), top_k=top_k)


GOOD_Q = torch.randn(1, 5, 9, 64)

CASES = {
    # name: (method, request, api key, code, message fragment)
    "append rank 2": ("Append", append_req(torch.randn(8, 192), torch.randn(8, 192)), KEY, C.INVALID_ARGUMENT, "rank 2"),
    "append head dim": ("Append", append_req(*kv(d=32)), KEY, C.INVALID_ARGUMENT, "(3, 32)"),
    "append head count": ("Append", append_req(*kv(h=2)), KEY, C.INVALID_ARGUMENT, "(2, 64)"),
    "append int dtype": ("Append", append_req(torch.ones(8, 3, 64, dtype=torch.int32), torch.ones(8, 3, 64, dtype=torch.int32)), KEY, C.INVALID_ARGUMENT, "floating-point"),
    "append bytes vs shape": ("Append", append_req(*kv(), k=raw_tensor(torch.randn(8, 3, 64), shape=[9, 3, 64])), KEY, C.INVALID_ARGUMENT, "do not match shape"),
    "append unknown dtype": ("Append", append_req(*kv(), k=raw_tensor(torch.randn(8, 3, 64), dtype=99)), KEY, C.INVALID_ARGUMENT, "dtype"),
    "append negative shape": ("Append", append_req(*kv(), k=raw_tensor(torch.randn(8, 3, 64), shape=[-8, -3, 64])), KEY, C.INVALID_ARGUMENT, "invalid shape"),
    "append NaN keys": ("Append", append_req(nan_at_end(9), torch.randn(9, 3, 64)), KEY, C.INVALID_ARGUMENT, "NaN or Inf"),
    "append Inf values": ("Append", append_req(torch.randn(9, 3, 64), torch.randn(9, 3, 64).index_fill_(0, torch.tensor([8]), float("inf"))), KEY, C.INVALID_ARGUMENT, "NaN or Inf"),
    "append empty": ("Append", append_req(*kv(n=0)), KEY, C.INVALID_ARGUMENT, "empty"),
    "append keys/values differ": ("Append", append_req(torch.randn(8, 3, 64), torch.randn(7, 3, 64)), KEY, C.INVALID_ARGUMENT, "differ in shape"),
    "append unknown bank": ("Append", append_req(*kv(), bank="nope"), KEY, C.NOT_FOUND, "'nope' not found"),
    "search top_k 0": ("Search", search_req(GOOD_Q, 0), KEY, C.INVALID_ARGUMENT, "top_k"),
    "search top_k negative": ("Search", search_req(GOOD_Q, -3), KEY, C.INVALID_ARGUMENT, "top_k"),
    "search top_k absurd": ("Search", search_req(GOOD_Q, 10**9), KEY, C.INVALID_ARGUMENT, "top_k"),
    "search rank 3": ("Search", search_req(torch.randn(5, 9, 64)), KEY, C.INVALID_ARGUMENT, "rank 3"),
    "search head dim": ("Search", search_req(torch.randn(1, 5, 9, 32)), KEY, C.INVALID_ARGUMENT, "head_dim 32"),
    "search heads not multiple": ("Search", search_req(torch.randn(1, 5, 4, 64)), KEY, C.INVALID_ARGUMENT, "multiple"),
    "search NaN": ("Search", search_req(torch.full((1, 5, 9, 64), float("nan"))), KEY, C.INVALID_ARGUMENT, "NaN or Inf"),
    "search empty": ("Search", search_req(torch.randn(1, 0, 9, 64)), KEY, C.INVALID_ARGUMENT, "empty"),
    "search rows vs banks": ("Search", search_req(torch.randn(2, 5, 9, 64)), KEY, C.INVALID_ARGUMENT, "one row per bank"),
    "search no banks": ("Search", search_req(GOOD_Q, banks=()), KEY, C.INVALID_ARGUMENT, "at least one bank"),
    "search unknown bank": ("Search", search_req(GOOD_Q, banks=("nope",)), KEY, C.NOT_FOUND, "'nope' not found"),
    "search bytes vs shape": ("Search", search_req(None, q=raw_tensor(GOOD_Q, shape=[1, 5, 9, 65])), KEY, C.INVALID_ARGUMENT, "do not match shape"),
    "create twice": ("CreateBank", pb.CreateBankRequest(name="bank", spec=pb.BankSpec(kv_heads=3, head_dim=64)), KEY, C.ALREADY_EXISTS, "already exists"),
    "create bad spec": ("CreateBank", pb.CreateBankRequest(name="x", spec=pb.BankSpec(kv_heads=0, head_dim=64)), KEY, C.INVALID_ARGUMENT, "kv_heads"),
    "create int dtype": ("CreateBank", pb.CreateBankRequest(name="x", spec=pb.BankSpec(kv_heads=1, head_dim=64, dtype=pb.INT32)), KEY, C.INVALID_ARGUMENT, "dtype"),
    "create bad name": ("CreateBank", pb.CreateBankRequest(name="../etc", spec=pb.BankSpec(kv_heads=1, head_dim=8)), KEY, C.INVALID_ARGUMENT, "bank name"),
    "describe unknown": ("DescribeBank", pb.BankRef(name="nope"), KEY, C.NOT_FOUND, "not found"),
    "delete unknown": ("DeleteBank", pb.BankRef(name="nope"), KEY, C.NOT_FOUND, "not found"),
    "missing key": ("DescribeBank", pb.BankRef(name="bank"), None, C.UNAUTHENTICATED, "missing API key"),
    "wrong key": ("Search", search_req(GOOD_Q), "wrong", C.UNAUTHENTICATED, "not recognised"),
    "read-only append": ("Append", append_req(*kv()), READER, C.PERMISSION_DENIED, "read-only"),
    "read-only create": ("CreateBank", pb.CreateBankRequest(name="r", spec=pb.BankSpec(kv_heads=1, head_dim=8)), READER, C.PERMISSION_DENIED, "read-only"),
    "over size limit": ("Append", append_req(*kv(n=12000)), KEY, C.RESOURCE_EXHAUSTED, "larger than max"),
    "quota tokens": ("CreateBank", pb.CreateBankRequest(name="huge", spec=pb.BankSpec(kv_heads=1, head_dim=8, capacity_tokens=8192)), SMALL, C.RESOURCE_EXHAUSTED, "quota"),
}


def call(stub, method, request, key):
    metadata = (("x-api-key", key),) if key else ()
    answer = getattr(stub, method)(request, metadata=metadata, timeout=30)
    return list(answer) if method == "Search" else answer


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_status_and_changes_nothing(service, case):
    _, client, stub = service
    method, request, key, code, fragment = CASES[case]
    before = client.describe_bank("bank")
    probe = torch.randn(1, 7, 9, 64, generator=torch.Generator().manual_seed(1))
    found_before = client.search(["bank"], probe, top_k=8)
    with pytest.raises(grpc.RpcError) as err:
        call(stub, method, request, key)
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details(), err.value.details()
    # the bank is as before and the server still answers
    assert client.describe_bank("bank") == before
    found_after = client.search(["bank"], probe, top_k=8)
    assert torch.equal(found_before.chunk_ids, found_after.chunk_ids)
    assert torch.equal(found_before.keys, found_after.keys)
    assert [b.name for b in client.list_banks()] == ["bank"]


def test_bank_quota(service):
    s, _, _ = service
    small = MemoryClient(s.address, SMALL)
    small.create_bank("one", kv_heads=1, head_dim=8, capacity_tokens=1024)
    from memory_service.errors import ResourceExhausted

    with pytest.raises(ResourceExhausted, match="quota of 1 banks"):
        small.create_bank("two", kv_heads=1, head_dim=8, capacity_tokens=1024)
    small.delete_bank("one")
    small.close()
