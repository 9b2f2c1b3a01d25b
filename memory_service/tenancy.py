"""Tenants and their API keys, read from a config file.

Format (YAML or JSON):

    tenants:
      - name: research            # banks are namespaced per tenant
        api_keys: ["k-123", "k-456"]
        max_banks: 64             # optional quota, default unlimited
        max_tokens: 100000000     # optional: sum of the capacities of the tenant's banks
        read_only: false          # optional: true refuses create/delete/reset/append

Without a file the service has one tenant, `default`, whose key is `$LONGMEM_API_KEY`
(or `local-dev-key` when that is unset): fine on a laptop, not on a shared cluster.
"""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from memory_service.errors import InvalidArgument, Unauthenticated

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_API_KEY = "local-dev-key"


@dataclass(frozen=True)
class Tenant:
    name: str
    api_keys: tuple[str, ...] = field(repr=False)
    max_banks: int | None = None
    max_tokens: int | None = None
    read_only: bool = False


class TenantTable:
    """API key -> tenant."""

    def __init__(self, tenants: list[Tenant]):
        self.tenants = {t.name: t for t in tenants}
        self._by_key: dict[str, Tenant] = {}
        for t in tenants:
            if not TENANT_NAME.match(t.name):
                raise InvalidArgument(f"tenant name {t.name!r} must match {TENANT_NAME.pattern}")
            for key in t.api_keys:
                if key in self._by_key:
                    raise InvalidArgument(f"API key of tenant {t.name!r} is also another's")
                self._by_key[key] = t

    @classmethod
    def load(cls, path: str | Path) -> TenantTable:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise InvalidArgument(f"cannot read tenant config {path}: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("tenants"), list):
            raise InvalidArgument(f"tenant config {path} needs a top-level 'tenants' list")
        tenants = []
        for i, entry in enumerate(data["tenants"]):
            try:
                keys = entry["api_keys"]
                if not keys or not all(isinstance(k, str) and k for k in keys):
                    raise ValueError("api_keys must be a non-empty list of strings")
                tenants.append(
                    Tenant(
                        name=str(entry["name"]),
                        api_keys=tuple(keys),
                        max_banks=entry.get("max_banks"),
                        max_tokens=entry.get("max_tokens"),
                        read_only=bool(entry.get("read_only", False)),
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                raise InvalidArgument(f"tenant config {path}, entry {i}: {e}") from None
        return cls(tenants)

    @classmethod
    def single(cls, api_key: str | None = None) -> TenantTable:
        key = api_key or os.environ.get("LONGMEM_API_KEY") or DEFAULT_API_KEY
        return cls([Tenant("default", (key,))])

    def authenticate(self, api_key: str | None) -> Tenant:
        if not api_key:
            raise Unauthenticated("missing API key: send it as gRPC metadata 'x-api-key'")
        for key, tenant in self._by_key.items():
            if hmac.compare_digest(key, api_key):
                return tenant
        raise Unauthenticated("API key not recognised")
