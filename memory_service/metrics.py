"""Prometheus metrics of the memory service (standard text exposition, `--metrics-port`).

Per gRPC method and tenant (`tenant="-"` before a key is recognised):

- `longmem_requests_total{method,tenant,code}` (counter): calls by status code; the errors
  are `code!="OK"`;
- `longmem_request_seconds{method,tenant}` (histogram): from the request to the last answer;
- `longmem_request_bytes_total`, `longmem_response_bytes_total` (counters): bytes each way.

Per tenant: `longmem_banks`, `longmem_bank_tokens` and `longmem_bank_bytes` (gauges, kept
by the service every few seconds). Per shard: `longmem_shard_up` (1 or 0),
`longmem_shard_restarts_total` (answers from a new actor process), and the write-ahead log's
`longmem_wal_bytes` and `longmem_wal_replay_seconds` (gauges, `set_wal`: each shard answers
the service's health check with them). The process's own `process_*` metrics (memory,
CPU, open files) come with the exposition.
"""

from __future__ import annotations

from contextvars import ContextVar

import prometheus_client as prom

# the tenant of the call this thread serves; the server sets it once the key is recognised
TENANT: ContextVar[str] = ContextVar("longmem_tenant", default="-")

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CALL = ("method", "tenant")

REQUESTS = prom.Counter("longmem_requests", "gRPC calls by status code", [*CALL, "code"])
LATENCY = prom.Histogram("longmem_request_seconds", "gRPC call latency", CALL, buckets=BUCKETS)
BYTES_IN = prom.Counter("longmem_request_bytes", "request bytes received", CALL)
BYTES_OUT = prom.Counter("longmem_response_bytes", "answer bytes sent", CALL)
BANKS = prom.Gauge("longmem_banks", "banks per tenant", ["tenant"])
BANK_TOKENS = prom.Gauge("longmem_bank_tokens", "tokens held in a tenant's banks", ["tenant"])
BANK_BYTES = prom.Gauge("longmem_bank_bytes", "bytes held in a tenant's banks", ["tenant"])
SHARD_UP = prom.Gauge("longmem_shard_up", "1 while the shard answers its health check", ["shard"])
SHARD_RESTARTS = prom.Counter(
    "longmem_shard_restarts", "times Ray restarted the shard's actor", ["shard"]
)
WAL_BYTES = prom.Gauge("longmem_wal_bytes", "size of the shard's write-ahead log", ["shard"])
WAL_REPLAY = prom.Gauge(
    "longmem_wal_replay_seconds", "time the shard's last write-ahead log replay took", ["shard"]
)


def observe_call(
    method: str, tenant: str, code: str, seconds: float, bytes_in: int, bytes_out: int
) -> None:
    """Count one finished gRPC call."""
    REQUESTS.labels(method, tenant, code).inc()
    LATENCY.labels(method, tenant).observe(seconds)
    BYTES_IN.labels(method, tenant).inc(bytes_in)
    BYTES_OUT.labels(method, tenant).inc(bytes_out)


def set_banks(tenant: str, banks: int, tokens: int, size_bytes: int) -> None:
    """What tenant `tenant`'s banks hold now."""
    BANKS.labels(tenant).set(banks)
    BANK_TOKENS.labels(tenant).set(tokens)
    BANK_BYTES.labels(tenant).set(size_bytes)


def set_shard_up(shard: int, up: bool) -> None:
    """Shard `shard` answered the last health check in time (`up`) or not."""
    SHARD_UP.labels(str(shard)).set(1 if up else 0)
    SHARD_RESTARTS.labels(str(shard))  # present (at 0) from the first check on


def count_restart(shard: int) -> None:
    """Shard `shard` answers from a new actor process: Ray restarted it."""
    SHARD_RESTARTS.labels(str(shard)).inc()


def set_wal(shard: int, size_bytes: int, replay_seconds: float | None = None) -> None:
    """Shard `shard`'s write-ahead log is `size_bytes` long; its last replay (at restart)
    took `replay_seconds` (None: leave as it was). Call in the process that serves the
    metrics (the service's, e.g. from its health loop)."""
    WAL_BYTES.labels(str(shard)).set(size_bytes)
    if replay_seconds is not None:
        WAL_REPLAY.labels(str(shard)).set(replay_seconds)


def serve(host: str, port: int):
    """Serve the exposition at http://host:port/metrics; returns the HTTP server (call
    `shutdown()` to stop it)."""
    server, _ = prom.start_http_server(port, addr=host)
    return server
