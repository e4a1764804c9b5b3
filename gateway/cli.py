"""The `cmcs` command line (docs/interface.md section 2).

Every sub-command lives in the package that owns it; this module only parses arguments,
dispatches, and turns expected failures into one clear line and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from siteconfig.errors import CliError  # noqa: F401  (re-exported: gateway modules raise it from here)

DEFAULT_DATA_DIR = Path("cmcs-data")


def package_version() -> str:
    """The installed package's version (its metadata, as pip installed it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cmcs-gateway")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="state directory: pki/, users.yaml, history, model bundle, audit log (default ./cmcs-data)")


ROLES = ("Viewer", "Operator", "Engineer", "Admin")


def _role(text: str) -> str:
    """A role name in any case (docs/interface.md section 2), as the canonical name; argparse's
    choices refuse anything else in one line."""
    return {role.lower(): role for role in ROLES}.get(text.lower(), text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmcs", description="cmcs-gateway: data-centre power distribution gateway")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"cmcs-gateway {package_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="run the gateway (demo site with in-process simulators when no --config)")
    p.add_argument("--config", type=Path, help="site file (YAML); without it the built-in demo site runs")
    _data_dir_arg(p)
    p.add_argument("--no-cmcs", action="store_true", help="do not start the built-in CMCS")
    p.add_argument("--bundle", type=Path, default=None,
                   help="CMCS model bundle (default: <data-dir>/models/current if present, else the shipped one)")
    p.add_argument("--metrics", metavar="[HOST:]PORT", default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST default 127.0.0.1; "
                        "overrides gateway.metrics)")
    p.set_defaults(handler="gateway.app:cli_run")

    p = sub.add_parser("agent", help="run the CMCS alone, as an OPC UA client of a (remote) gateway")
    p.add_argument("--config", type=Path, required=True, help="the gateway's site file (YAML)")
    p.add_argument("--endpoint", required=True, help="the gateway's endpoint, e.g. opc.tcp://gw1:4840/cmcs")
    p.add_argument("--certificate", type=Path, help="this client's application-instance certificate (DER or PEM); "
                   "also its X509 user token unless --user is given")
    p.add_argument("--private-key", type=Path, help="its private key (PEM)")
    p.add_argument("--user", help="log in with this user name (role Engineer), password on standard input")
    p.add_argument("--security", default="Basic256Sha256:SignAndEncrypt",
                   help="POLICY:MODE, POLICY one of Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss "
                        "(or None), MODE Sign or SignAndEncrypt (default Basic256Sha256:SignAndEncrypt)")
    p.add_argument("--application-uri", default=None,
                   help="this client's ApplicationUri (must be the certificate's SubjectAltName URI)")
    p.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the shipped one)")
    p.set_defaults(handler="cmcs.agent:cli_agent")

    p = sub.add_parser("simulate", help="serve the device simulators as real Modbus TCP endpoints")
    p.add_argument("--config", type=Path, help="site file (YAML); without it the built-in demo site")
    p.add_argument("--scenario", type=Path, help="scenario file to replay in real time (default: a quiet day)")
    p.add_argument("--list", action="store_true", help="print one line per device: name, host, port, unit id, profile")
    p.add_argument("--speed", type=float, default=1.0, help="plant time per wall-clock time (default 1.0 = real time)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the plant (default: the scenario's, else 0)")
    p.add_argument("--tsn-interface", default=None,
                   help="serve the site's `driver: tsn` devices on this interface (the device end of the TSN link)")
    p.set_defaults(handler="simulator.serve:cli_simulate")

    p = sub.add_parser("config", help="site files: check, generate")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    c = csub.add_parser("check", help="validate a site file; errors name the file, line and key")
    c.add_argument("file", type=Path)
    c.set_defaults(handler="siteconfig.cli:cli_check")
    c = csub.add_parser("generate", help="write a site file: the demo site, or a large one")
    c.add_argument("--aisles", type=int, default=None, help="number of aisles (default: the demo site)")
    c.add_argument("--units-per-aisle", type=int, default=None, help="micro-ATS units per aisle")
    c.add_argument("--name", default=None, help="site name")
    c.add_argument("-o", "--output", type=Path, default=None, help="file to write (default: standard output)")
    c.set_defaults(handler="siteconfig.cli:cli_generate")

    p = sub.add_parser("train", help="train the risk and load models on simulated scenarios, or evaluate a bundle")
    _data_dir_arg(p)
    p.add_argument("--eval-only", action="store_true", help="evaluate an existing bundle, do not train")
    p.add_argument("--config", type=Path, default=None,
                   help="site file (YAML) to train for: scenarios on its layout; the bundle records it")
    p.add_argument("--scenarios", type=Path, help="folder of scenario files (default for --eval-only: the shipped held-out set)")
    p.add_argument("--bundle", type=Path, help="--eval-only: the model bundle to evaluate (default: the shipped one)")
    p.add_argument("--json", type=Path, help="write the metrics as JSON to this file")
    p.add_argument("--out", type=Path, default=None, help="where to write the bundle (train) or the plots (eval)")
    p.add_argument("--scenario-count", type=int, default=None, help="number of random training scenarios")
    p.add_argument("--seed", type=int, default=0, help="first seed of the random training scenarios")
    p.add_argument("--quick", action="store_true", help="a small, fast run (smoke check)")
    from cmcs.cli_args import add_history_arguments  # argparse only: no numpy or xgboost at start-up

    add_history_arguments(p)  # --history DATA_DIR, --holdout-days D
    p.set_defaults(handler="cmcs.train:cli_train")

    p = sub.add_parser("certs", help="application-instance certificate and trust list (pki/ in the data dir)")
    csub = p.add_subparsers(dest="certs_command", metavar="ACTION")
    csub.required = True
    c = csub.add_parser("create", help="create (or renew) the server's application-instance certificate")
    _data_dir_arg(c)
    c.add_argument("--hostname", action="append", help="DNS name to put in the certificate (repeatable)")
    c.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    c.set_defaults(handler="gateway.pki:cli_certs_create")
    c = csub.add_parser("trust", help="trust a client certificate (a file, or the name of one in pki/rejected/)")
    _data_dir_arg(c)
    c.add_argument("file")
    c.set_defaults(handler="gateway.pki:cli_certs_trust")
    c = csub.add_parser("reject", help="move a trusted certificate to pki/rejected/")
    _data_dir_arg(c)
    c.add_argument("file")
    c.set_defaults(handler="gateway.pki:cli_certs_reject")
    c = csub.add_parser("list", help="list own, trusted and rejected certificates")
    _data_dir_arg(c)
    c.set_defaults(handler="gateway.pki:cli_certs_list")

    p = sub.add_parser("users", help="OPC UA users and their roles (users.yaml in the data dir)")
    usub = p.add_subparsers(dest="users_command", metavar="ACTION")
    usub.required = True
    c = usub.add_parser("add", help="add a user, or change its role or password")
    _data_dir_arg(c)
    c.add_argument("name")
    c.add_argument("--role", required=True, type=_role, choices=ROLES,
                   help="Viewer, Operator, Engineer or Admin (any case)")
    c.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    c.add_argument("--certificate", help="X509 user certificate (PEM or DER) that logs in as this user")
    c.set_defaults(handler="gateway.users:cli_users_add")
    c = usub.add_parser("remove", help="remove a user")
    _data_dir_arg(c)
    c.add_argument("name")
    c.set_defaults(handler="gateway.users:cli_users_remove")
    c = usub.add_parser("list", help="list users and roles")
    _data_dir_arg(c)
    c.set_defaults(handler="gateway.users:cli_users_list")

    p = sub.add_parser("status", help="live terminal view of a running gateway, as an OPC UA client")
    p.add_argument("--endpoint", default="opc.tcp://127.0.0.1:4840/cmcs",
                   help="the gateway's endpoint (default opc.tcp://127.0.0.1:4840/cmcs)")
    p.add_argument("--certificate", type=Path, help="this client's application-instance certificate (DER or PEM); "
                   "also its X509 user token unless --user is given")
    p.add_argument("--private-key", type=Path, help="its private key (PEM)")
    p.add_argument("--user", help="log in with this user name; the password is asked on the terminal")
    p.add_argument("--security", default="Basic256Sha256:SignAndEncrypt",
                   help="POLICY:MODE as for cmcs agent (default Basic256Sha256:SignAndEncrypt; None where allowed)")
    p.add_argument("--application-uri", default=None,
                   help="this client's ApplicationUri (default: the certificate's SubjectAltName URI)")
    p.set_defaults(handler="gateway.status:cli_status")

    p = sub.add_parser("install-service", help="install the systemd unit (user cmcs, /etc/cmcs, /var/lib/cmcs)")
    p.add_argument("--config", type=Path, default=None, help="site file to copy to /etc/cmcs/site.yaml (if none is there)")
    p.add_argument("--tsn", action="store_true", help="also the drop-in granting CAP_NET_RAW (sites with driver: tsn)")
    p.add_argument("--root", type=Path, default=None, help="write under this folder instead of / (staging; no user, "
                   "no systemctl)")
    p.add_argument("--cmcs", default=None, help="path of the cmcs executable for ExecStart (default: this one)")
    p.set_defaults(handler="gateway.service:cli_install_service")

    p = sub.add_parser("metrics", help="the Prometheus endpoint: helpers")
    msub = p.add_subparsers(dest="metrics_command", metavar="ACTION")
    msub.required = True
    c = msub.add_parser("hash-password", help="print the scrypt hash of a scraper's password for "
                        "gateway.metrics.basic_auth.password_hash (password on standard input)")
    c.set_defaults(handler="gateway.metrics:cli_hash_password")

    p = sub.add_parser("bench", help="benchmarks; write a Markdown report, PNG plots and JSON")
    p.add_argument("which", choices=["sim", "mission", "gateway", "tsn", "robustness", "all"])
    p.add_argument("--json", type=Path, help="write the figures as JSON to this file")
    p.add_argument("--out", type=Path, default=Path("reports"), help="report directory (default ./reports)")
    p.add_argument("--scenarios", type=Path, help="folder of scenario files (mission)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="model bundle to replay (mission; default $CMCS_BUNDLE, else the shipped one), "
                        "whatever layout it was trained for")
    p.add_argument("--quick", action="store_true", help="shorter runs, for a smoke check")
    p.add_argument("--stress", choices=["include", "only", "skip"], default="include",
                   help="gateway: the every-value-changing case against node-opcua (default: include it)")
    p.set_defaults(handler="bench.cli:cli_bench")

    return parser


def _resolve(spec: str):
    module_name, func_name = spec.split(":")
    import importlib

    return getattr(importlib.import_module(module_name), func_name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        try:
            handler = _resolve(args.handler)
        except ModuleNotFoundError as exc:
            if not args.handler.startswith(str(exc.name).split(".")[0] + "."):
                raise
            raise CliError(f"{args.command}: not available in this build ({exc.name} is not installed yet)") from None
        code = handler(args)
        return int(code or 0)
    except CliError as exc:
        print(f"cmcs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
