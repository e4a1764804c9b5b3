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

from cmcs.identity import client_identity
from siteconfig.errors import CliError

log = logging.getLogger(__name__)


def cli_agent(args) -> int:
    from cmcs.live import LiveCmcs, LiveOptions
    from cmcs.models import BundleError
    from siteconfig.loader import load_site
    from siteconfig.yamlpos import ConfigError, ConfigErrors

    try:
        site = load_site(args.config)
    except (ConfigError, ConfigErrors) as exc:
        raise CliError(str(exc), exit_code=1) from None
    identity = client_identity(args, default_uri="urn:cmcs-gateway:cmcs-agent")
    options = LiveOptions(endpoint=args.endpoint, certificate=args.certificate, private_key=args.private_key,
                          username=args.user, password=identity.password, security_policy=identity.policy,
                          security_mode=identity.mode, application_uri=identity.application_uri, bundle=args.bundle)
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
