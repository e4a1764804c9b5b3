"""Network namespaces and veth pairs for TSN tests and benchmarks (needs root; iproute2's `ip`).

A `VethLink` is made by its owner and removed by it (use it as a context manager): the device
end in a namespace of its own, the gateway end in another namespace or in the caller's.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000  # <linux/sched.h>


class NetnsError(RuntimeError):
    """A namespace or link could not be made; the message has the failing command and its error."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip ARGS` (iproute2)."""
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise NetnsError("the `ip` command (iproute2) is not installed") from None
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


@dataclass
class VethLink:
    """A veth pair: `gw_if` (in `gw_ns`, or the caller's namespace when None) and `dev_if` in `dev_ns`."""

    tag: str  # unique per run: keeps names apart (interface names are at most 15 characters)
    gw_ns_wanted: bool = False
    gw_ns: str | None = None
    dev_ns: str = ""
    gw_if: str = ""
    dev_if: str = ""
    gw_mac: str = "02:00:00:00:01:01"
    dev_mac: str = "02:00:00:00:02:01"

    def __post_init__(self) -> None:
        self.dev_ns = f"cmcs-tsn-dev-{self.tag}"
        self.gw_ns = f"cmcs-tsn-gw-{self.tag}" if self.gw_ns_wanted else None
        self.gw_if, self.dev_if = f"tsg{self.tag}"[:15], f"tsd{self.tag}"[:15]

    def create(self) -> "VethLink":
        try:
            ip("netns", "add", self.dev_ns)
            if self.gw_ns:
                ip("netns", "add", self.gw_ns)
            ip("link", "add", self.gw_if, "address", self.gw_mac, "type", "veth", "peer", "name", self.dev_if,
               "address", self.dev_mac)
            ip("link", "set", self.dev_if, "netns", self.dev_ns)
            if self.gw_ns:
                ip("link", "set", self.gw_if, "netns", self.gw_ns)
            for ns, ifname in ((self.gw_ns, self.gw_if), (self.dev_ns, self.dev_if)):
                prefix = ("-n", ns) if ns else ()
                ip(*prefix, "link", "set", ifname, "up")
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Delete the pair and the namespaces (whatever of them exists)."""
        ip("link", "del", self.gw_if, check=False)
        for ns in (self.gw_ns, self.dev_ns):
            if ns:
                ip("netns", "del", ns, check=False)

    def exec_prefix(self, ns: str | None) -> list[str]:
        """The command prefix that runs a program in namespace `ns` (none for the caller's)."""
        return ["ip", "netns", "exec", ns] if ns else []

    def __enter__(self) -> "VethLink":
        return self.create()

    def __exit__(self, *_exc) -> None:
        self.remove()


def in_netns(ns: str, make):
    """Call make() in a thread that joined namespace `ns`; returns its result (e.g. a socket, which stays
    bound to that namespace's interface whatever thread uses it later)."""
    result: dict = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            result["value"] = make()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    t = threading.Thread(target=run, name=f"netns {ns}")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


__all__ = ["NetnsError", "VethLink", "in_netns", "ip"]
