"""`cmcs agent`: the CMCS alone, as an OPC UA client of a gateway on this or another host.

    cmcs agent --config site.yaml --endpoint opc.tcp://gw1:4840/cmcs \\
               --certificate cmcs.der --private-key cmcs.pem            # X509 user token
    cmcs agent ... --user cmcs-remote --password-stdin < secret          # or a user name (role Engineer)

The gateway must trust the certificate (`cmcs certs trust`) and know the user with the Engineer
role (`cmcs users add NAME --role Engineer --certificate F` or `--password-stdin`). Start the
gateway with `cmcs run --no-cmcs` so that only one CMCS acts.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from siteconfig.errors import CliError

log = logging.getLogger(__name__)


def _uri_of(cert_path: Path) -> str | None:
    from cryptography import x509

    data = cert_path.read_bytes()
    cert = x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_certificate(data)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def cli_agent(args) -> int:
    from cmcs.live import SECURITY_POLICIES, LiveCmcs, LiveOptions
    from cmcs.models import BundleError
    from siteconfig.loader import load_site
    from siteconfig.yamlpos import ConfigError, ConfigErrors

    try:
        site = load_site(args.config)
    except (ConfigError, ConfigErrors) as exc:
        raise CliError(str(exc), exit_code=1) from None
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
        raise CliError(f"--security {policy} needs --certificate and --private-key")
    if args.user is None and args.certificate is None:
        raise CliError("give --certificate/--private-key (X509 user token) or --user (password on standard input)")
    password = None
    if args.user:
        password = sys.stdin.readline().rstrip("\r\n") if not sys.stdin.isatty() else __import__("getpass").getpass()
    uri = args.application_uri
    if uri is None and args.certificate is not None:
        try:
            uri = _uri_of(Path(args.certificate))
        except ValueError as exc:
            raise CliError(f"--certificate {args.certificate}: not a certificate ({exc})") from None
    options = LiveOptions(endpoint=args.endpoint, certificate=args.certificate, private_key=args.private_key,
                          username=args.user, password=password, security_policy=policy, security_mode=mode,
                          application_uri=uri or "urn:cmcs-gateway:cmcs-agent", bundle=args.bundle)
    try:
        live = LiveCmcs(site, options)
    except (BundleError, FileNotFoundError) as exc:
        raise CliError(f"model bundle: {exc}") from None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"cmcs agent: site '{site.name}', model {live.predictor.version}, gateway {args.endpoint}; "
              "Ctrl-C to stop", flush=True)
        await live.run(stop)
        print("cmcs agent: stopped", flush=True)

    try:
        asyncio.run(main())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return 0
