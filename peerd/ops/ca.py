"""The cluster's certificate authority: `peerd ca init` and `peerd ca issue NAME`.

One CA per cluster, kept on one trusted machine (never copied to the boards). Every device gets
a certificate whose name (subject CN and its one DNS subject alternative name) is its peer id,
signed by that CA and usable as both TLS server and client certificate, plus a copy of the CA
certificate to check its peers against. Keys are ECDSA P-256; private keys are written with
mode 0600. See docs/SECURITY.md.

A certificate carries a *role* (its subject's organizational unit): a `device` may join the
cluster, push slices and pull parameters as a member; an `observer` (an operator's
`peerd status`) may call Status only; a `reader` (the evaluator of `peerd cluster`) may call
Status and pull parameters, never join. Certificates issued before roles existed carry none and
are devices.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peerd.state import atomic_write_bytes, check_peer_id

DEFAULT_CA_DIR = "peerd-ca"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
# What a device's TLS directory (`--tls-dir`) holds: its certificate, its key, the CA's
# certificate. Fixed names: the peer id comes from the certificate, not from the file name.
DEVICE_CERT = "device.crt"
DEVICE_KEY = "device.key"
DEVICE_FILES = (CA_CERT, DEVICE_CERT, DEVICE_KEY)
CA_VALID_DAYS = 3650
DEVICE_VALID_DAYS = 825
DEVICE_ROLE = "device"
OBSERVER_ROLE = "observer"
READER_ROLE = "reader"
ROLES = (DEVICE_ROLE, OBSERVER_ROLE, READER_ROLE)
# Certificates are valid from a little before their creation: boards' clocks drift.
BACKDATE = datetime.timedelta(hours=1)


class CaError(ValueError):
    """A CA operation refused or failed; the message says what to do."""


@dataclass(frozen=True)
class IssuedDevice:
    peer_id: str
    directory: Path

    @property
    def files(self) -> list[Path]:
        return [self.directory / name for name in DEVICE_FILES]


def _private_key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o600)


def _make_directory(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - BACKDATE, now + datetime.timedelta(days=days)


def init_ca(ca_dir: Path, name: str = "peerd cluster CA", force: bool = False) -> Path:
    """A new CA (key + self-signed certificate) in `ca_dir`; refuses to replace one unless
    `force`, since every certificate the old one issued would stop working."""
    existing = [ca_dir / f for f in (CA_CERT, CA_KEY) if (ca_dir / f).exists()]
    if existing and not force:
        raise CaError(f"{existing[0]} exists: a new CA would invalidate every device "
                      f"certificate the old one issued; pass --force to replace it")
    _make_directory(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_before, not_after = _validity(CA_VALID_DAYS)
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(ca_dir / CA_KEY, _private_key_bytes(key))
    atomic_write_bytes(ca_dir / CA_CERT, _pem(certificate))
    return ca_dir


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    missing = [str(ca_dir / f) for f in (CA_CERT, CA_KEY) if not (ca_dir / f).exists()]
    if missing:
        raise CaError(f"no CA in {ca_dir} (missing {', '.join(missing)}): create one with "
                      f"`peerd ca init --dir {ca_dir}`")
    certificate = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError(f"{ca_dir / CA_KEY} is not an ECDSA key")
    return certificate, key


def issue(ca_dir: Path, peer_id: str, out_dir: Path | None = None,
          force: bool = False, role: str = DEVICE_ROLE) -> IssuedDevice:
    """A certificate and key for `peer_id` with `role`, signed by the CA in `ca_dir`, written
    with a copy of the CA certificate to `out_dir` (default: CA_DIR/PEER_ID): that directory is
    what the device's `--tls-dir` points at."""
    check_peer_id(peer_id)
    if role not in ROLES:
        raise CaError(f"role {role!r} is not one of {', '.join(ROLES)}")
    ca_certificate, ca_key = _load_ca(ca_dir)
    directory = out_dir if out_dir is not None else ca_dir / peer_id
    if (directory / DEVICE_KEY).exists() and not force:
        raise CaError(f"{directory / DEVICE_KEY} exists; pass --force to issue a new key and "
                      f"certificate for {peer_id} (the old certificate stays valid: see "
                      f"docs/SECURITY.md on revocation)")
    _make_directory(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(DEVICE_VALID_DAYS)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
        .issuer_name(ca_certificate.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        # Only a device serves: the others' certificates are refused as server certificates.
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            if role == DEVICE_ROLE else [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(peer_id)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(directory / DEVICE_KEY, _private_key_bytes(key))
    atomic_write_bytes(directory / DEVICE_CERT, _pem(certificate))
    atomic_write_bytes(directory / CA_CERT, _pem(ca_certificate))
    return IssuedDevice(peer_id, directory)


def certificate_name(certificate: x509.Certificate) -> str:
    """The peer id a device certificate names: its subject common name."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CaError(f"the certificate has {len(names)} common names; a device certificate "
                      f"has exactly one, its peer id")
    return str(names[0].value)


def certificate_role(certificate: x509.Certificate) -> str:
    """The role a certificate carries (its subject's organizational unit); device without one."""
    units = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not units:
        return DEVICE_ROLE
    role = str(units[0].value)
    if len(units) != 1 or role not in ROLES:
        raise CaError(f"the certificate's role {role!r} is not one of {', '.join(ROLES)}")
    return role


def check_issued_by(certificate: x509.Certificate, ca_certificate: x509.Certificate) -> None:
    """Raises CaError unless `ca_certificate` signed `certificate`."""
    try:
        certificate.verify_directly_issued_by(ca_certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise CaError("the certificate was not issued by this CA") from None


def key_matches(certificate: x509.Certificate, key_pem: bytes) -> bool:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.public_key() == certificate.public_key()


