"""Self-signed certificates for local work and tests: a CA, a server certificate, client certificates.

Used by ``broker embedded --auth`` and the tests (``cryptography``, of the ``embedded`` extra).
Keys are EC P-256, unencrypted PEM written with mode 0600; certificates are valid for one day
by default. Never for production: a deployment's certificates come from its CA (Strimzi's cluster
CA in ``k8s/``).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from streams.security import write_secret


@dataclass(frozen=True)
class CertFiles:
    """PEM files of one certificate and its key."""

    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_secret(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))


class LocalCA:
    """A throw-away certificate authority in ``directory`` (``ca.pem``, ``ca.key``).

    Parameters
    ----------
    directory : Path
        Where the CA and the certificates it issues are written.
    days : float
        Validity of the CA and of every certificate it issues (days).
    """

    def __init__(self, directory: Path, days: float = 1.0) -> None:
        self.directory, self.days = Path(directory), days
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "transient-broker local CA")])
        usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False)
        cert = (self._builder(self._name, self._key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(usage, critical=True)
                .sign(self._key, hashes.SHA256()))
        self.cert = self.directory / "ca.pem"
        self.cert.write_bytes(cert.public_bytes(_pem()))
        _write_key(self.directory / "ca.key", self._key)

    def _builder(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:

        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self._name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=self.days)))

    def issue(self, name: str, hosts: tuple[str, ...] = (), client: bool = False) -> CertFiles:
        """A certificate for ``name`` (its CN) and ``hosts`` (DNS names or IP addresses), server or client."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        files = CertFiles(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        files.cert.write_bytes(cert.public_bytes(_pem()))
        _write_key(files.key, key)
        return files


def _san(host: str) -> x509.GeneralName:

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem() -> serialization.Encoding:
    return serialization.Encoding.PEM
