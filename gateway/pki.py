"""The PKI folder of the data directory, certificates, the client trust list and `cmcs certs`.

`<data-dir>/pki/`: own/ (the server's application-instance certificate, made with asyncua's
`cert_gen`, and its key, 0600), trusted/ (client certificates, or CA certificates, that may open
a secure channel), rejected/ (refused ones, for `cmcs certs trust`), crl/. What the OPC UA
server does with them is in gateway/security.py; certs/README.md tells an operator how to use them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from asyncua import ua
from asyncua.crypto import cert_gen
from asyncua.crypto.truststore import TrustStore
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.datadir import prepare_data_dir
from siteconfig.errors import CliError

log = logging.getLogger(__name__)

SC = ua.StatusCodes
CERT_DAYS = 825  # CA/Browser-forum maximum for a TLS leaf; renew with `cmcs certs create`
RSA_KEY_BITS = 2048  # Aes256_Sha256_RsaPss allows 2048..4096 (OPC 10000-7)


# ---- the PKI folder --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    """`<data-dir>/pki/`: own/ (cert.der, key.pem 0600), trusted/, rejected/, crl/."""

    root: Path

    @classmethod
    def of(cls, data_dir: Path) -> Pki:
        return cls(Path(data_dir) / "pki")

    @property
    def own(self) -> Path:
        return self.root / "own"

    @property
    def cert_file(self) -> Path:
        return self.own / "cert.der"

    @property
    def key_file(self) -> Path:
        return self.own / "key.pem"

    @property
    def trusted(self) -> Path:
        return self.root / "trusted"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def crl(self) -> Path:
        return self.root / "crl"

    def ensure(self) -> Pki:
        data_dir = self.root.parent
        if not data_dir.exists():
            data_dir.mkdir(parents=True, mode=0o700)
        for d in (self.root, self.own, self.trusted, self.rejected, self.crl):
            d.mkdir(exist_ok=True, mode=0o700)
        for d in (self.root, self.own):
            os.chmod(d, 0o700)
        return self


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file atomically with `mode` from the first byte (no window where it is readable)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---- certificates ----------------------------------------------------------------------------------
def load_certificate_bytes(data: bytes) -> x509.Certificate:
    """A certificate from PEM or DER bytes (ValueError otherwise)."""
    if b"-----BEGIN CERTIFICATE-----" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def load_certificate_file(path: Path) -> x509.Certificate:
    return load_certificate_bytes(Path(path).read_bytes())


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def thumbprint_of(cert: x509.Certificate) -> str:
    """SHA-1 thumbprint, lower-case hex: what OPC UA (and UaExpert) show for a certificate."""
    return hashlib.sha1(der(cert)).hexdigest()


def leaf_of_chain(data: bytes) -> bytes:
    """The first certificate of a DER chain (SenderCertificate may carry the issuers after it)."""
    if len(data) < 4 or data[0] != 0x30:
        raise ValueError("not a DER certificate")
    first = data[1]
    if first < 0x80:
        return data[: 2 + first]
    n = first & 0x7F
    length = int.from_bytes(data[2: 2 + n], "big")
    return data[: 2 + n + length]


def common_name(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def san_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def san_dns(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


def cert_file_name(cert: x509.Certificate) -> str:
    """`<CN>_<thumbprint>.der`, the name under trusted/ and rejected/ (UaExpert uses `CN [thumb]`)."""
    cn = re.sub(r"[^A-Za-z0-9._-]+", "-", common_name(cert)).strip("-.")[:48] or "certificate"
    return f"{cn}_{thumbprint_of(cert)}.der"


def host_names() -> list[str]:
    """DNS names this host answers to, for the server certificate."""
    names = [socket.gethostname(), socket.getfqdn(), "localhost"]
    return list(dict.fromkeys(n for n in names if n))


def create_server_certificate(pki: Pki, application_uri: str, hostnames: list[str] | None = None,
                              days: int = CERT_DAYS, renewal: bool = False) -> x509.Certificate:
    """A new self-signed application-instance certificate and key in pki/own/ (key 0600)."""
    pki.ensure()
    names = list(dict.fromkeys(hostnames or host_names()))
    key = cert_gen.generate_private_key()  # RSA 2048, e 65537
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    sans += [x509.DNSName(n) for n in names]
    cert = cert_gen.generate_self_signed_app_certificate(
        key, f"cmcs-gateway@{names[0]}", {"organizationName": "cmcs-gateway"}, sans,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days=days)
    write_private(pki.key_file, cert_gen.dump_private_key_as_pem(key), 0o600)
    write_private(pki.cert_file, der(cert), 0o644)
    (log.warning if renewal else log.info)(
        "new application-instance certificate %s (%s, SHA-1 %s)%s", pki.cert_file, application_uri,
        thumbprint_of(cert), ": clients must trust it again" if renewal else "")
    return cert


def ensure_server_certificate(pki: Pki, application_uri: str) -> x509.Certificate:
    """The server certificate, created on first start, or again when expired or made for another
    ApplicationUri (clients refuse a certificate whose SubjectAltName URI is not the server's)."""
    pki.ensure()
    if pki.cert_file.exists() and pki.key_file.exists():
        cert = load_certificate_file(pki.cert_file)
        expired = cert.not_valid_after_utc <= datetime.now(timezone.utc)
        if application_uri in san_uris(cert) and not expired:
            os.chmod(pki.key_file, 0o600)
            return cert
        why = "it has expired" if expired else f"it was made for {san_uris(cert)}, not {application_uri}"
        log.warning("renewing the server certificate: %s", why)
        return create_server_certificate(pki, application_uri, san_dns(cert) or None, renewal=True)
    return create_server_certificate(pki, application_uri)


# ---- client certificate validation ----------------------------------------------------------------
class ClientCertificates:
    """Trust decisions on client application certificates: pki/trusted/ (asyncua TrustStore, with
    CRLs from pki/crl/), re-read whenever those folders change; refused ones copied to rejected/."""

    def __init__(self, pki: Pki):
        self.pki = pki
        self.store = TrustStore([pki.trusted], [pki.crl])
        self._stamp: tuple | None = None
        self._trusted_der: set[bytes] = set()
        self._lock = asyncio.Lock()

    @property
    def count(self) -> int:
        """Trusted client certificates now (as last read from pki/trusted/)."""
        return len(self._trusted_der)

    def _folder_stamp(self) -> tuple:
        entries = []
        for d in (self.pki.trusted, self.pki.crl):
            try:
                with os.scandir(d) as it:
                    for e in it:
                        st = e.stat()
                        entries.append((d.name, e.name, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                pass
        return tuple(sorted(entries))

    async def reload_if_changed(self) -> None:
        async with self._lock:
            stamp = self._folder_stamp()
            if stamp == self._stamp:
                return
            trusted = set()
            for f in self.pki.trusted.glob("*"):
                try:
                    trusted.add(der(load_certificate_file(f)))
                except (OSError, ValueError):
                    log.warning("%s: not a certificate, ignored", f)
            store = TrustStore([self.pki.trusted], [self.pki.crl])
            try:
                if trusted:  # asyncua's TrustStore cannot hold an empty list
                    await store.load_trust()
                await store.load_crl()
            except (OSError, ValueError) as exc:
                log.error("trust list %s or CRLs %s not fully loaded: %s", self.pki.trusted, self.pki.crl, exc)
            self.store = store
            self._trusted_der = trusted
            self._stamp = stamp
            log.info("trust list loaded: %d certificate(s) in %s", len(trusted), self.pki.trusted)

    async def check(self, cert_der: bytes) -> int:
        """Good, or the Bad StatusCode that refuses this certificate (and a copy in rejected/)."""
        try:
            cert = x509.load_der_x509_certificate(cert_der)
        except ValueError:
            return SC.BadCertificateInvalid
        await self.reload_if_changed()
        now = datetime.now(timezone.utc)
        if cert.not_valid_after_utc < now or cert.not_valid_before_utc > now:
            status = SC.BadCertificateTimeInvalid
        elif self.store.is_revoked(cert):
            status = SC.BadCertificateRevoked
        elif cert_der in self._trusted_der:
            status = SC.Good
        elif cert.issuer != cert.subject and self.store.is_trusted(cert):
            status = SC.Good  # issued by a CA certificate in trusted/
        else:
            status = SC.BadCertificateUntrusted
        if status != SC.Good:
            self._reject(cert, status)
        return status

    def _reject(self, cert: x509.Certificate, status: int) -> None:
        path = self.pki.rejected / cert_file_name(cert)
        if not path.exists():
            try:
                write_private(path, der(cert), 0o644)
            except OSError as exc:
                log.error("cannot store the rejected certificate in %s: %s", path, exc)
        log.warning("client certificate refused (%s): %s, thumbprint %s, stored as %s; "
                    "`cmcs certs trust %s` trusts it", ua.StatusCode(status).name, cert.subject.rfc4514_string(),
                    thumbprint_of(cert), path, path.name)


# ---- cmcs certs ------------------------------------------------------------------------------------
DEFAULT_SITE_NAME = "demo-hall"


def application_uri(site_name: str) -> str:
    """The server's ApplicationUri (what gateway.server sets)."""
    return f"urn:cmcs-gateway:{socket.gethostname()}:{site_name}"


def _pki_for_cli(args) -> Pki:
    return Pki.of(prepare_data_dir(args.data_dir)).ensure()


def _describe(cert: x509.Certificate) -> str:
    return (f"{cert.subject.rfc4514_string()}  sha1={thumbprint_of(cert)}  "
            f"not-after={cert.not_valid_after_utc:%Y-%m-%d}")


def cli_certs_create(args) -> int:
    pki = _pki_for_cli(args)
    uri = None
    if pki.cert_file.exists():
        try:
            uri = next(iter(san_uris(load_certificate_file(pki.cert_file))), None)
        except (OSError, ValueError):
            uri = None
    uri = uri or application_uri(DEFAULT_SITE_NAME)
    hostnames = args.hostname or host_names()
    if args.days < 1 or args.days > 3650:
        raise CliError("--days must be between 1 and 3650")
    cert = create_server_certificate(pki, uri, hostnames, days=args.days)
    print(f"created {pki.cert_file} (key {pki.key_file}, 0600)")
    print(f"  {_describe(cert)}")
    print(f"  ApplicationUri {uri}; DNS {', '.join(san_dns(cert))}")
    print("  clients that trusted the previous certificate must trust this one; the gateway loads it at its next start")
    return 0


def _find(folder: Path, name: str) -> list[Path]:
    """Files in `folder` matching a file name, or a thumbprint (prefix of at least 8 hex digits)."""
    if not folder.is_dir():
        return []
    exact = folder / name
    if exact.is_file():
        return [exact]
    key = name.lower().replace(":", "")
    if re.fullmatch(r"[0-9a-f]{8,40}", key):
        hits = []
        for f in sorted(folder.glob("*")):
            try:
                if thumbprint_of(load_certificate_file(f)).startswith(key):
                    hits.append(f)
            except (OSError, ValueError):
                continue
        return hits
    return [f for f in sorted(folder.glob("*")) if f.is_file() and name.lower() in f.name.lower()]


def _resolve(pki: Pki, spec: str, folder: Path) -> tuple[x509.Certificate, Path | None]:
    """A certificate named on the command line: a file path, or a name/thumbprint in `folder`."""
    path = Path(spec)
    if path.is_file():
        try:
            return load_certificate_file(path), path
        except ValueError as exc:
            raise CliError(f"{spec}: not a PEM or DER certificate ({exc})") from None
    hits = _find(folder, spec)
    if not hits:
        raise CliError(f"no certificate {spec!r}: not a file, nor a name or thumbprint in {folder}")
    if len(hits) > 1:
        raise CliError(f"{spec!r} matches {len(hits)} certificates in {folder}: {', '.join(h.name for h in hits)}")
    try:
        return load_certificate_file(hits[0]), hits[0]
    except ValueError as exc:
        raise CliError(f"{hits[0]}: not a PEM or DER certificate ({exc})") from None


def _remove_same(folder: Path, cert: x509.Certificate) -> None:
    for f in folder.glob("*"):
        try:
            if f.is_file() and der(load_certificate_file(f)) == der(cert):
                f.unlink()
        except (OSError, ValueError):
            continue


def cli_certs_trust(args) -> int:
    pki = _pki_for_cli(args)
    cert, source = _resolve(pki, args.file, pki.rejected)
    target = pki.trusted / cert_file_name(cert)
    write_private(target, der(cert), 0o644)
    _remove_same(pki.rejected, cert)
    print(f"trusted: {_describe(cert)} -> {target}")
    if cert.not_valid_after_utc < datetime.now(timezone.utc):
        print("  warning: this certificate has expired; connections with it are still refused")
    return 0


def cli_certs_reject(args) -> int:
    pki = _pki_for_cli(args)
    cert, _source = _resolve(pki, args.file, pki.trusted)
    trusted = any(der(c) == der(cert) for c, _ in _certs_in(pki.trusted))
    _remove_same(pki.trusted, cert)
    target = pki.rejected / cert_file_name(cert)
    write_private(target, der(cert), 0o644)
    print(f"{'no longer trusted' if trusted else 'rejected (was not trusted)'}: {_describe(cert)} -> {target}")
    return 0


def _certs_in(folder: Path) -> list[tuple[x509.Certificate, Path]]:
    out = []
    for f in sorted(folder.glob("*")) if folder.is_dir() else []:
        if not f.is_file() or f.suffix.lower() in (".pem", ".key") and "PRIVATE KEY" in f.read_text(errors="ignore"):
            continue
        try:
            out.append((load_certificate_file(f), f))
        except (OSError, ValueError):
            continue
    return out


def cli_certs_list(args) -> int:
    pki = _pki_for_cli(args)
    rows = []
    for where, folder in (("own", pki.own), ("trusted", pki.trusted), ("rejected", pki.rejected)):
        for cert, f in _certs_in(folder):
            rows.append((where, cert, f))
    if not rows:
        print(f"no certificates in {pki.root} (the gateway creates its own at first start, or `cmcs certs create`)")
        return 0
    for where, cert, f in rows:
        print(f"{where:8}  {cert.subject.rfc4514_string()}  {thumbprint_of(cert)}  "
              f"not-after {cert.not_valid_after_utc:%Y-%m-%d}  {f.name}")
    return 0
