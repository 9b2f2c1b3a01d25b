"""Tenants and their API keys, read from a config file.

Format (YAML or JSON):

    tenants:
      - name: research            # banks are namespaced per tenant
        api_keys: ["sha256:9f86d0...", "k-456"]   # hashes (`longmem keygen`) or plain keys
        max_banks: 64             # optional quota, default unlimited
        max_tokens: 100000000     # optional: sum of the capacities of the tenant's banks
        max_concurrent_searches: 1  # optional, default 1: more wait their turn (see server.py)
        read_only: false          # optional: true refuses create/delete/reset/append

A key is stored as `sha256:<hex digest of the key>`; `longmem keygen` prints a new random
key and its hash (the key goes to the tenant, the hash into this file). A plain key is
still accepted, for local use, with a warning in the log. Presented keys are hashed and
compared with every stored hash in constant time. Keys from `keygen` carry 256 random bits,
so an unsalted hash cannot be reversed by guessing; hand-made keys should be as long.

Without a file the service has one tenant, `default`, whose key is `$LONGMEM_API_KEY`
(or `local-dev-key` when that is unset): fine on a laptop, not on a shared cluster.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from memory_service.errors import InvalidArgument, Unauthenticated

log = logging.getLogger("longmem.tenancy")

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HASHED_KEY = re.compile(r"^sha256:[0-9a-f]{64}$")
DEFAULT_API_KEY = "local-dev-key"
DEFAULT_MAX_CONCURRENT_SEARCHES = 1


def hash_key(api_key: str) -> str:
    """The form a key is stored in: `sha256:<hex>`."""
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A new random API key (256 bits) and its hash."""
    key = "lm-" + secrets.token_urlsafe(32)
    return key, hash_key(key)


@dataclass(frozen=True)
class Tenant:
    name: str
    api_keys: tuple[str, ...] = field(repr=False)  # hashes (`sha256:<hex>`) or plain keys
    max_banks: int | None = None
    max_tokens: int | None = None
    read_only: bool = False
    max_concurrent_searches: int = DEFAULT_MAX_CONCURRENT_SEARCHES


class TenantTable:
    """API key -> tenant."""

    def __init__(self, tenants: list[Tenant]):
        self.tenants = {t.name: t for t in tenants}
        self._hashes: list[tuple[bytes, Tenant]] = []
        for t in tenants:
            if not TENANT_NAME.match(t.name):
                raise InvalidArgument(f"tenant name {t.name!r} must match {TENANT_NAME.pattern}")
            if t.max_concurrent_searches < 1:
                raise InvalidArgument(f"tenant {t.name!r}: max_concurrent_searches must be >= 1")
            for key in t.api_keys:
                digest = (key if HASHED_KEY.match(key) else hash_key(key)).encode()
                if any(hmac.compare_digest(digest, d) for d, _ in self._hashes):
                    raise InvalidArgument(f"API key of tenant {t.name!r} is also another's")
                self._hashes.append((digest, t))

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
                tenant = Tenant(
                    name=str(entry["name"]),
                    api_keys=tuple(keys),
                    max_banks=entry.get("max_banks"),
                    max_tokens=entry.get("max_tokens"),
                    read_only=bool(entry.get("read_only", False)),
                    max_concurrent_searches=int(
                        entry.get("max_concurrent_searches", DEFAULT_MAX_CONCURRENT_SEARCHES)
                    ),
                )
            except (KeyError, TypeError, ValueError) as e:
                raise InvalidArgument(f"tenant config {path}, entry {i}: {e}") from None
            plain = sum(not HASHED_KEY.match(k) for k in tenant.api_keys)
            if plain:
                log.warning(
                    "plain API keys in the tenant file; store their hashes (longmem keygen)",
                    extra={"tenant": tenant.name, "plain_keys": plain, "file": str(path)},
                )
            tenants.append(tenant)
        return cls(tenants)

    @classmethod
    def single(cls, api_key: str | None = None) -> TenantTable:
        key = api_key or os.environ.get("LONGMEM_API_KEY") or DEFAULT_API_KEY
        return cls([Tenant("default", (key,))])

    def authenticate(self, api_key: str | None) -> Tenant:
        if not api_key:
            raise Unauthenticated("missing API key: send it as gRPC metadata 'x-api-key'")
        digest = hash_key(api_key).encode()
        found = None
        for stored, tenant in self._hashes:  # every entry, so the time does not tell which
            if hmac.compare_digest(stored, digest):
                found = tenant
        if found is None:
            raise Unauthenticated("API key not recognised")
        return found
