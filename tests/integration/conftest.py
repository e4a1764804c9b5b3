"""Shared helpers for integration tests: real sockets on 127.0.0.1, free ports."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from siteconfig.model import Site

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def relocate_site(site: Site, host: str = LOCALHOST) -> Site:
    """The same site with every distinct device address moved to a free port on `host`."""
    new_address: dict[tuple[str, int], int] = {}
    held: list[socket.socket] = []  # keep each probe bound until all are chosen: no port twice

    def moved(endpoint):
        key = (endpoint.host, endpoint.port)
        if key not in new_address:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            held.append(s)
            new_address[key] = s.getsockname()[1]
        return dataclasses.replace(endpoint, host=host, port=new_address[key])

    sources = tuple(dataclasses.replace(s, device=moved(s.device)) for s in site.sources)
    aisles = []
    for a in site.aisles:
        pdbs = tuple(dataclasses.replace(p, device=moved(p.device)) for p in a.pdbs)
        units = tuple(
            dataclasses.replace(
                u, device=moved(u.device),
                storage=dataclasses.replace(u.storage, device=moved(u.storage.device)) if u.storage else None)
            for u in a.units)
        aisles.append(dataclasses.replace(a, pdbs=pdbs, units=units))
    for s in held:
        s.close()
    return dataclasses.replace(site, sources=sources, aisles=tuple(aisles))


@pytest.fixture
def demo_site_free_ports() -> Site:
    """The demo site, its endpoints on free local ports (so tests never collide with a running demo)."""
    from siteconfig.demo import demo_site

    return relocate_site(demo_site())


@pytest.fixture
def relocate():
    """`relocate(site)`: the site with its endpoints on free local ports (see relocate_site)."""
    return relocate_site
