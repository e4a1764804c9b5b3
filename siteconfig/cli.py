"""`cmcs config check` and `cmcs config generate`."""

from __future__ import annotations

import argparse
import sys

from siteconfig.demo import DEMO_AISLES, DEMO_NAME, DEMO_UNITS_PER_AISLE, generate_site, site_to_yaml
from siteconfig.loader import load_site
from siteconfig.yamlpos import ConfigErrors


def cli_check(args: argparse.Namespace) -> int:
    """Validate a site file: one summary line and 0, or one line per error on stderr and 1."""
    try:
        site = load_site(args.file)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 1
    counts = ", ".join([_count(len(site.sources), "source"), _count(len(site.aisles), "aisle"),
                        f"{len(site.units)} micro-ATS", f"{len(site.storages)} DES",
                        _count(len(site.pdbs), "PDB segment"), _count(len(site.devices()), "device")])
    print(f"{args.file}: OK: site '{site.name}': {counts}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def cli_generate(args: argparse.Namespace) -> int:
    """Write the demo site, or a generated one when a size is given, to --output or stdout."""
    sized = args.aisles is not None or args.units_per_aisle is not None
    try:
        site = generate_site(
            args.aisles if args.aisles is not None else DEMO_AISLES,
            args.units_per_aisle if args.units_per_aisle is not None else DEMO_UNITS_PER_AISLE,
            args.name if args.name is not None or sized else DEMO_NAME,  # no size given: the demo itself
        )
    except ValueError as exc:
        print(f"cmcs config generate: error: {exc}", file=sys.stderr)
        return 2
    text = site_to_yaml(site)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        args.output.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"cmcs config generate: error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{args.output}: {len(site.aisles)} aisles, {len(site.units)} micro-ATS, {len(site.devices())} devices",
          file=sys.stderr)
    return 0
