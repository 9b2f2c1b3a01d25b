"""Tensors on the wire: raw little-endian bytes with dtype and shape (`longmem.v1.Tensor`)."""

from __future__ import annotations

import math
import sys
import warnings

import torch

from memory_service.errors import InvalidArgument
from protos.longmem.v1 import memory_pb2 as pb

TORCH_OF = {
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.FLOAT32: torch.float32,
    pb.INT32: torch.int32,
    pb.INT64: torch.int64,
}
WIRE_OF = {v: k for k, v in TORCH_OF.items()}
NAME_OF = {pb.FLOAT16: "float16", pb.BFLOAT16: "bfloat16", pb.FLOAT32: "float32"}
MAX_DIMS = 8

assert sys.byteorder == "little", "the wire format is little-endian; this host is not"


def encode(t: torch.Tensor) -> pb.Tensor:
    if t.dtype not in WIRE_OF:
        raise InvalidArgument(f"dtype {t.dtype} cannot travel; use one of {list(WIRE_OF)}")
    t = t.detach().cpu().contiguous()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(dtype=WIRE_OF[t.dtype], shape=list(t.shape), data=data)


def decode(msg: pb.Tensor, name: str) -> torch.Tensor:
    """The tensor in `msg`; InvalidArgument if dtype, shape and byte length do not agree."""
    if msg.dtype not in TORCH_OF:
        names = ", ".join(pb.DType.Name(d) for d in TORCH_OF)
        raise InvalidArgument(f"{name}: dtype {msg.dtype} is not supported; use one of {names}")
    shape = list(msg.shape)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise InvalidArgument(f"{name}: invalid shape {shape}")
    dtype = TORCH_OF[msg.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(msg.data) != expected:
        raise InvalidArgument(
            f"{name}: {len(msg.data)} bytes do not match shape {shape} of "
            f"{pb.DType.Name(msg.dtype)} ({expected} bytes)"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # read-only buffer: we never write into it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(msg.data, dtype=dtype).view(shape)
