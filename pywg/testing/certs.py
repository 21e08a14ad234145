"""Self-signed TLS certificates for test beds (DERP servers, derper, derpprobe): PEM files
and the ``sha256-raw:`` pin a DERP map's CertName carries for them."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["SelfSigned", "self_signed"]


@dataclass(frozen=True)
class SelfSigned:
    cert: Path  # PEM
    key: Path  # PEM, 0600
    der: bytes  # the certificate, DER

    @property
    def pin(self) -> str:
        """The DERP map CertName that pins this certificate (Tailscale's ``sha256-raw:``)."""
        return "sha256-raw:" + hashlib.sha256(self.der).hexdigest()


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def self_signed(directory: Path, names: list[str], stem: str = "tls", days: int = 2) -> SelfSigned:
    """A certificate for ``names`` (DNS names or IP literals; the first is the subject),
    written as ``STEM.crt`` / ``STEM.key`` in ``directory`` (derper's manual cert mode wants
    ``HOSTNAME.crt`` / ``HOSTNAME.key``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return SelfSigned(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))
