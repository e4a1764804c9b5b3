"""How an OPC UA client of the gateway (`cmcs agent`, the built-in CMCS, `cmcs status`) identifies
itself: security policy and mode, certificate, user name, ApplicationUri. One place, so that the
command-line checks and their one-line errors are the same for every client."""

from __future__ import annotations

import getpass
import sys
from dataclasses import dataclass
from pathlib import Path

from asyncua.crypto import security_policies

from siteconfig.errors import CliError

# the policies the gateway offers (docs/interface.md section 4)
SECURITY_POLICIES = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}


def application_uri_of(cert_path: Path) -> str | None:
    """The ApplicationUri a client certificate (PEM or DER) carries in its SubjectAltName, None if
    none (the client's ApplicationUri must equal it); ValueError on a file that is no certificate."""
    from cryptography import x509

    data = cert_path.read_bytes()
    cert = x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_certificate(data)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


@dataclass(frozen=True)
class ClientIdentity:
    """How an OPC UA client of the gateway (`cmcs agent`, `cmcs status`) identifies itself."""

    policy: str  # a SecurityPolicy name of SECURITY_POLICIES, or "None"
    mode: str  # "Sign" or "SignAndEncrypt"
    password: str | None  # for --user
    application_uri: str


def client_identity(args, default_uri: str) -> ClientIdentity:
    """The identity options shared by `cmcs agent` and `cmcs status` (--security, --certificate,
    --private-key, --user, --application-uri), checked; bad input is one CliError line."""
    policy, _, mode = args.security.partition(":")
    mode = mode or "SignAndEncrypt"
    if policy != "None" and policy not in SECURITY_POLICIES:
        raise CliError(f"--security: unknown policy {policy!r}; one of None, {', '.join(SECURITY_POLICIES)}")
    if mode not in ("Sign", "SignAndEncrypt"):
        raise CliError(f"--security: unknown mode {mode!r}; Sign or SignAndEncrypt")
    for opt in ("certificate", "private_key"):
        path = getattr(args, opt)
        if path is not None and not Path(path).is_file():
            raise CliError(f"--{opt.replace('_', '-')} {path}: no such file")
    if policy != "None" and (args.certificate is None or args.private_key is None):
        raise CliError(f"--security {policy} needs --certificate and --private-key "
                       "(or --security None where the gateway allows it)")
    if args.user is None and args.certificate is None:
        raise CliError("give --certificate/--private-key (X509 user token) or --user (password on standard input)")
    password = None
    if args.user:
        password = (getpass.getpass(f"password for {args.user}: ") if sys.stdin.isatty()
                    else sys.stdin.readline().rstrip("\r\n"))
    uri = args.application_uri
    if uri is None and args.certificate is not None:
        try:
            uri = application_uri_of(Path(args.certificate))
        except ValueError as exc:
            raise CliError(f"--certificate {args.certificate}: not a certificate ({exc})") from None
    return ClientIdentity(policy, mode, password, uri or default_uri)
