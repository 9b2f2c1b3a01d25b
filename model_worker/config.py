"""Settings shared by the commands: where the memory is, and the defaults they share.

`TrainConfig`, `EvalConfig` and `GenerateConfig` each hold a `MemoryConfig` (the service
and the banks) and, where they build a model, a `SideNetConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from memory_service.bank import BankSpec
from memory_service.tenancy import DEFAULT_API_KEY

SEGMENT_LEN = 512  # tokens per segment: the local window


@dataclass
class MemoryConfig:
    """The memory service a command uses and the size of the banks it opens."""

    address: str | None = None  # HOST:PORT of a running service; None: start an embedded one
    api_key: str = DEFAULT_API_KEY
    tls_ca: str | None = None  # TLS: the CA to trust (PEM); and a client certificate, key
    tls_cert: str | None = None
    tls_key: str | None = None
    shards: int = 2  # shards of the embedded service
    capacity_tokens: int = BankSpec.capacity_tokens  # per bank (stream, document)
    bank_dtype: str = BankSpec.dtype  # how banks store keys/values: float16, int8, ...
    search_dtype: str = BankSpec.search_dtype  # their chunk means (search keys)

    @property
    def storage(self) -> dict[str, str]:
        """How the banks a command opens store their chunks (`BankSpec` fields)."""
        return {"dtype": self.bank_dtype, "search_dtype": self.search_dtype}
