"""Mutual TLS between daemons: this device's certificate, the cluster CA, and peer names.

Every daemon serves and dials with a certificate issued by the cluster CA (`peerd ca`); the
certificate's name is the peer id. gRPC checks both chains against the CA; peerd adds the
checks that tie the names to the messages: the server compares the client certificate's name
with the peer id a message claims (`client_certificate_name`), and the client pins the server
certificate's name to the peer it means to reach (`ssl_target_name_override`). Where only an
address is known (`--peer HOST:PORT`, `peerd status --addr`), `probe_peer_name` learns the name
from the certificate the server presents. docs/SECURITY.md explains the choices and their
limits.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from peerd.net.discovery import parse_address
from peerd.ops.ca import (
    CA_CERT,
    DEVICE_CERT,
    DEVICE_FILES,
    DEVICE_KEY,
    DEVICE_ROLE,
    CaError,
    certificate_name,
    certificate_role,
    check_issued_by,
    key_matches,
)

# The gRPC channel option that makes the client check the server certificate against a name
# other than the host it dials: peers are dialled by IP address, their certificates name peer ids.
TARGET_NAME_OPTION = "grpc.ssl_target_name_override"


class TlsError(ValueError):
    """The TLS files are missing or do not fit together; the message says how to fix it."""


def how_to_create(tls_dir: Path) -> str:
    return (f"create them with `peerd ca init` (once per cluster, on a trusted machine) and "
            f"`peerd ca issue NAME --out {tls_dir}` (once per device), or run without TLS with "
            f"--insecure (see docs/SECURITY.md)")


@dataclass(frozen=True)
class TlsIdentity:
    """A device's TLS material, checked to fit together: its certificate was issued by the CA,
    its key matches it, and it is valid now. `name` is the certificate's peer id, `role` what
    it may call (peerd/ops/ca.py)."""

    directory: Path
    name: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    role: str = DEVICE_ROLE

    @classmethod
    def load(cls, tls_dir: str | Path) -> TlsIdentity:
        directory = Path(tls_dir)
        missing = [str(directory / name) for name in DEVICE_FILES
                   if not (directory / name).is_file()]
        if missing:
            raise TlsError(f"TLS files missing: {', '.join(missing)}; {how_to_create(directory)}")
        try:
            ca_pem, cert_pem, key_pem = (
                (directory / name).read_bytes() for name in (CA_CERT, DEVICE_CERT, DEVICE_KEY))
        except PermissionError as error:
            raise TlsError(f"cannot read {error.filename}: permission denied") from None
        try:
            ca_certificate = x509.load_pem_x509_certificate(ca_pem)
            certificate = x509.load_pem_x509_certificate(cert_pem)
            name = certificate_name(certificate)
            role = certificate_role(certificate)
            check_issued_by(certificate, ca_certificate)
            if not key_matches(certificate, key_pem):
                raise CaError(f"{directory / DEVICE_KEY} is not the key of "
                              f"{directory / DEVICE_CERT}")
        except (ValueError, TypeError) as error:  # CaError too; TypeError: an encrypted key
            raise TlsError(f"{directory}: {error}") from None
        now = datetime.datetime.now(datetime.UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise TlsError(f"{directory / DEVICE_CERT} is valid from "
                           f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                           f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now "
                           f"(check this device's clock, or issue a new certificate)")
        return cls(directory, name, ca_pem, cert_pem, key_pem, role)

    @classmethod
    def load_device(cls, tls_dir: str | Path) -> TlsIdentity:
        """Load the identity a daemon serves with: a device certificate."""
        identity = cls.load(tls_dir)
        if identity.role != DEVICE_ROLE:
            raise TlsError(f"{identity.directory / DEVICE_CERT} is an {identity.role} "
                           f"certificate: a daemon needs a device certificate (peerd ca issue "
                           f"{identity.name} --role device)")
        return identity

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve with this certificate; accept only clients with a certificate from the CA."""
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)],
                                           root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)

    def probe_context(self) -> ssl.SSLContext:
        """A client context that checks the server's chain against the CA but not its name:
        the name is what a probe wants to learn."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=self.ca_pem.decode())
        context.load_cert_chain(self.directory / DEVICE_CERT, self.directory / DEVICE_KEY)
        context.set_alpn_protocols(["h2"])
        return context


async def probe_peer_name(address: str, identity: TlsIdentity, timeout_s: float) -> str:
    """The peer id in the certificate the server at `address` presents, verified against the
    cluster CA. It names whichever cluster member answers there now; the gRPC channel opened
    afterwards is pinned to that name, so a different server answering later is refused.
    Raises ConnectionError when no cluster member answers there."""
    host, port = parse_address(address)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=identity.probe_context(),
                                    server_hostname=""), timeout_s)
    except (OSError, TimeoutError) as error:  # ssl.SSLError is an OSError
        raise ConnectionError(f"no cluster member answers TLS at {address}: "
                              f"{error or type(error).__name__}") from None
    try:
        certificate = writer.get_extra_info("peercert") or {}
    finally:
        # No TLS goodbye: the gRPC server speaks HTTP/2 at once, which a clean close refuses.
        writer.transport.abort()
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    if len(names) != 1:
        raise ConnectionError(f"the certificate at {address} names no single peer")
    return names[0]


def client_certificate_name(context: grpc.aio.ServicerContext) -> str | None:
    """The name (common name) of the certificate the client of this call presented, which gRPC
    verified against the CA; None on a connection without TLS or without a client certificate."""
    names = context.auth_context().get("x509_common_name", [])
    return names[0].decode() if len(names) == 1 else None


@functools.lru_cache(maxsize=256)
def _role_of(pem: bytes) -> str:
    return certificate_role(x509.load_pem_x509_certificate(pem))


def client_certificate_role(context: grpc.aio.ServicerContext) -> str | None:
    """The role of the certificate the client of this call presented (verified by gRPC against
    the CA); None without TLS. A certificate whose role cannot be read has none (None)."""
    certificates = context.auth_context().get("x509_pem_cert", [])
    if len(certificates) != 1:
        return None
    try:
        return _role_of(certificates[0])
    except ValueError:
        return None


def is_tls(context: grpc.aio.ServicerContext) -> bool:
    return context.auth_context().get("transport_security_type") == [b"ssl"]
