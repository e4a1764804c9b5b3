"""Modbus/TCP Security: the gateway's TLS client context, TLS error wording, and certificate helpers.

Modbus/TCP Security (Modbus Organization, MB-TCP-Security-v21, 2018) is Modbus TCP inside
TLS 1.2 or later on port 802, with mutual X.509 authentication: the gateway checks the
device's certificate against the CA that signs device certificates, and the device checks the
gateway's client certificate against the CA it trusts. Nothing falls back to plain TCP.

The certificate helpers (`CertificateAuthority`) make a throw-away PKI for tests and lab
set-ups; a site uses the certificates its own PKI issues. No key is ever written into the repo.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["MODBUS_TLS_PORT", "TLS_MIN_VERSION", "CertificateAuthority", "IssuedCertificate", "client_context",
           "describe_tls_error", "is_tls_failure", "session_description"]

MODBUS_TLS_PORT = 802  # IANA "mbap-s", MB-TCP-Security-v21 section 4.2
TLS_MIN_VERSION = ssl.TLSVersion.TLSv1_2  # MB-TCP-Security-v21 R-01: TLS 1.2 or later


def client_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    """The gateway side of a Modbus/TCP Security session.

    TLS >= 1.2; the device's certificate must chain to `ca` (CERT_REQUIRED) and name the address
    the gateway dials in its SubjectAltName (an IP SAN for an IP address); the gateway presents
    `cert`/`key`. Raises OSError (ssl.SSLError, FileNotFoundError) if a file cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = TLS_MIN_VERSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


_SSL_PREFIX = re.compile(r"^\[[A-Z]+: [A-Z0-9_]+\]\s*")
_SSL_SUFFIX = re.compile(r"\s*\(_ssl\.c:\d+\)$")


def is_tls_failure(exc: BaseException) -> bool:
    """True for an error of the TLS handshake itself (not of the TCP connect before it)."""
    return isinstance(exc, (ssl.SSLError, ConnectionResetError, asyncio.IncompleteReadError))


def describe_tls_error(exc: BaseException) -> str:
    """One line for a failed TLS session, e.g. 'TLS: certificate verify failed: unable to get local issuer ...'."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or ""
        return f"TLS: certificate verify failed: {detail}".rstrip(": ")
    if isinstance(exc, (ConnectionResetError, ssl.SSLEOFError, asyncio.IncompleteReadError)):
        # asyncio servers often close without flushing their alert: the client only sees the close
        return (f"TLS: the device closed the connection during the handshake (is it a TLS endpoint, and does "
                f"it trust the gateway's certificate?) ({exc.__class__.__name__})")
    if isinstance(exc, ssl.SSLError):
        text = _SSL_SUFFIX.sub("", _SSL_PREFIX.sub("", str(exc.args[1] if len(exc.args) > 1 else exc)))
        text = text or (exc.reason or type(exc).__name__).lower().replace("_", " ")
        if "alert" in text:  # the device sent the alert: it did not accept the gateway's certificate
            return f"TLS: refused by the device ({text})"
        return f"TLS: {text}"
    return f"TLS: {exc or exc.__class__.__name__}"


def session_description(transport: asyncio.BaseTransport | None) -> str:
    """'TLSv1.3 TLS_AES_256_GCM_SHA384' for a TLS transport, '' for a plain one."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} {cipher[0] if cipher else ''}".strip()


# ---- certificate helpers (tests, lab set-ups) -------------------------------------------------

_VALIDITY = dt.timedelta(days=365)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: fast to generate, supported by every TLS 1.2/1.3 stack (RFC 8422)
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cmcs-gateway"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, folder: str | Path, stem: str) -> tuple[Path, Path]:
        """Write `<stem>.pem` and `<stem>.key` (0600) into `folder`; returns both paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
        cert_path.write_bytes(self.cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(self.key_pem)
        return cert_path, key_path


class CertificateAuthority:
    """A self-signed CA that issues device (server) and gateway (client) certificates."""

    def __init__(self, common_name: str = "cmcs test CA", validity: dt.timedelta = _VALIDITY):
        self._key = _new_key()
        now = dt.datetime.now(dt.timezone.utc)
        self.name = _name(common_name)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name).issuer_name(self.name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, folder: str | Path, stem: str = "ca") -> Path:
        """Write the CA certificate (never its key) as `<stem>.pem`; returns the path."""
        path = Path(folder) / f"{stem}.pem"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.cert_pem)
        return path

    def issue(self, common_name: str, *, ip_addresses: tuple[str, ...] = (), dns_names: tuple[str, ...] = (),
              server: bool = False, client: bool = False, validity: dt.timedelta = _VALIDITY) -> IssuedCertificate:
        """A leaf certificate: `server` for a device (SAN: the addresses the gateway dials), `client` for a gateway."""
        key = _new_key()
        now = dt.datetime.now(dt.timezone.utc)
        usages = [oid for oid, wanted in ((ExtendedKeyUsageOID.SERVER_AUTH, server),
                                          (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if wanted]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        names = [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses] + [x509.DNSName(d) for d in dns_names]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
