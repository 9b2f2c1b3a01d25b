"""TLS for the gRPC API: the server's certificate (and, optionally, client certificates it
requires), and what a client trusts and presents. Files are PEM.

    longmem serve --tls-cert server.pem --tls-key server.key [--tls-client-ca clients-ca.pem]
    longmem train --memory host:50051 --tls-ca ca.pem [--tls-cert me.pem --tls-key me.key]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc

from memory_service.errors import InvalidArgument


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read {what} {path}: {e.strerror}") from None


@dataclass(frozen=True)
class ServerTLS:
    """The server's certificate chain and key; with `client_ca`, every client must present
    a certificate that CA signed."""

    cert: str
    key: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))]
        if self.client_ca is None:
            return grpc.ssl_server_credentials(pair)
        return grpc.ssl_server_credentials(
            pair, _read(self.client_ca, "client CA"), require_client_auth=True
        )


@dataclass(frozen=True)
class ClientTLS:
    """The CA a client trusts (None: the system's roots) and, for a server that requires
    one, the client's own certificate and key."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("a client certificate needs both --tls-cert and --tls-key")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA") if self.ca else None,
            private_key=_read(self.key, "TLS key") if self.key else None,
            certificate_chain=_read(self.cert, "TLS certificate") if self.cert else None,
        )


def server_tls(cert: str | None, key: str | None, client_ca: str | None) -> ServerTLS | None:
    """`ServerTLS` from `serve`'s flags; None (plaintext) when no certificate is given."""
    if cert is None and key is None:
        if client_ca is not None:
            raise InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
    return ServerTLS(cert, key, client_ca)


def add_client_args(parser: argparse.ArgumentParser) -> None:
    """The TLS flags of a command that connects to a service (`--memory`)."""
    parser.add_argument("--tls-ca", default=None, help="connect with TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", default=None, help="client certificate (PEM), with --tls-key")
    parser.add_argument("--tls-key", default=None, help="client key (PEM), with --tls-cert")


def client_tls(ca: str | None, cert: str | None, key: str | None) -> ClientTLS | None:
    """`ClientTLS` from a command's `--tls-ca`, `--tls-cert`, `--tls-key`; None: plaintext."""
    if not (ca or cert or key):
        return None
    return ClientTLS(ca, cert, key)
