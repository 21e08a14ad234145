"""A local CA that mints X.509-SVIDs (and TLS server certificates) with ``cryptography``."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UTC = datetime.UTC


def _now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


class LocalCA:
    """A self-signed root CA for one (or more) trust domains."""

    def __init__(self, name: str = "pywg test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def leaf(
        self,
        *,
        uris: list[str] = (),  # type: ignore[assignment]
        dns: list[str] = (),  # type: ignore[assignment]
        ips: list[str] = (),  # type: ignore[assignment]
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        ca: bool = False,
        server: bool = False,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A leaf certificate (an X.509-SVID when ``uris`` is one spiffe:// ID)."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = _now()
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pywg test")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(days=1))  # a day back: tests compare with a NOW taken at collection
            .not_valid_after(not_after or now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key

    def write_leaf(self, directory: Path, stem: str, **kw: object) -> tuple[Path, Path]:
        """Mint a leaf and write ``stem.pem`` (the certificate) and ``stem.key`` (0600)."""
        cert, key = self.leaf(**kw)  # type: ignore[arg-type]
        return (_write(directory / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM)),
                _write(directory / f"{stem}.key", _pem_key(key), 0o600))


def write_bundle(path: Path, *cas: LocalCA) -> Path:
    return _write(path, b"".join(ca.pem for ca in cas))


def hours(n: float) -> datetime.timedelta:
    return datetime.timedelta(hours=n)
