"""AF_PACKET raw sockets for UADP frames: open on an interface, send tagged frames, receive them.

The kernel strips a received 802.1Q tag from the frame and reports it in PACKET_AUXDATA
(tp_vlan_tci, with TP_STATUS_VLAN_VALID set): the tag is read from there, never from the bytes.
Sent frames carry the tag in the bytes (veth passes it; the receiving kernel moves it to auxdata).

Measured on this kernel (no 8021q): only an ETH_P_ALL socket sees the tag. With no VLAN device
for the id, the kernel clears the tag and marks the frame PACKET_OTHERHOST before it reaches
sockets bound to the inner EtherType (0xB62C), whose auxdata then has no VLAN. So the socket is
bound to ETH_P_ALL, and a classic BPF filter (SO_ATTACH_FILTER) keeps only UADP frames, so
other traffic (the benchmark's flood) never wakes Python.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from dataclasses import dataclass


# <linux/if_packet.h>
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_IGNORE_OUTGOING = 23
PACKET_OUTGOING = 4
ETH_P_ALL = 0x0003  # <linux/if_ether.h>
SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>
SO_TIMESTAMPNS = 35  # the kernel's receive time (CLOCK_REALTIME) with each frame; also SCM_TIMESTAMPNS
_TIMESPEC = struct.Struct("qq")
# classic BPF: ldh [12]; jeq #0xB62C, accept, drop (EtherType after the stripped tag)
_UADP_FILTER = ((0x28, 0, 0, 12), (0x15, 0, 1, 0xB62C), (0x06, 0, 0, 0x40000), (0x06, 0, 0, 0))
TP_STATUS_VLAN_VALID = 1 << 4
_AUXDATA = struct.Struct("IIIHHHH")  # struct tpacket_auxdata
MAX_FRAME_LEN = 1522  # IEEE 802.3 maximum tagged frame, FCS included


class LinkUnavailable(OSError):
    """The link cannot be used here; the message names what is missing (privilege or interface)."""


@dataclass(frozen=True)
class ReceivedFrame:
    payload: bytes  # the Ethernet payload after the (stripped) 802.1Q tag: the UADP NetworkMessage
    src_mac: bytes
    dst_mac: bytes
    vlan_id: int | None  # None: untagged
    pcp: int | None
    tag_in_auxdata: bool  # the tag came from PACKET_AUXDATA (the normal case), not from the bytes
    rx_unix_ns: int  # when the kernel received it (SO_TIMESTAMPNS): the late check's "now"


def open_link(interface: str, *, blocking: bool = False) -> socket.socket:
    """An AF_PACKET socket bound to `interface` for UADP frames, with PACKET_AUXDATA on.

    Raises LinkUnavailable naming the missing interface or privilege (CAP_NET_RAW).
    """
    try:
        socket.if_nametoindex(interface)
    except OSError:
        raise LinkUnavailable(f"no network interface '{interface}' here (gateway.tsn.interface)") from None
    try:
        # protocol 0: no frame is queued until bind() below, so none of any interface arrives
        # before the filter is on (a socket made with ETH_P_ALL receives every interface's frames,
        # loopback's TCP included, from its creation to the bind: seen in a test under load)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except PermissionError:
        raise LinkUnavailable(f"raw Ethernet on '{interface}' needs CAP_NET_RAW (run as root or grant "
                              f"the capability)") from None
    _attach_uadp_filter(sock)
    sock.bind((interface, ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    try:  # Linux >= 4.20: our own transmissions are not looped back to us
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setblocking(blocking)
    return sock


def _attach_uadp_filter(sock: socket.socket) -> None:
    program = b"".join(struct.pack("HBBI", *insn) for insn in _UADP_FILTER)
    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(_UADP_FILTER), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def interface_mac(interface: str) -> bytes:
    """The interface's own MAC address."""
    with open(f"/sys/class/net/{interface}/address") as f:
        return bytes(int(p, 16) for p in f.read().strip().split(":"))


_CMSG_SPACE = socket.CMSG_SPACE(_AUXDATA.size) + socket.CMSG_SPACE(_TIMESPEC.size)


def receive(sock: socket.socket) -> ReceivedFrame | None:
    """One frame from the socket (None for our own outgoing ones); BlockingIOError when none waits."""
    data, ancdata, _flags, addr = sock.recvmsg(2048, _CMSG_SPACE)
    if addr[2] == PACKET_OUTGOING:
        return None
    vlan_id = pcp = None
    rx_ns = 0
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == SO_TIMESTAMPNS and len(cdata) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(cdata)
            rx_ns = sec * 1_000_000_000 + nsec
        elif level == SOL_PACKET and ctype == PACKET_AUXDATA and len(cdata) >= _AUXDATA.size:
            status, _len, _snap, _mac, _net, tci, _tpid = _AUXDATA.unpack_from(cdata)
            if status & TP_STATUS_VLAN_VALID:
                vlan_id, pcp = tci & 0x0FFF, tci >> 13
    if len(data) < 14:
        return None
    rx_ns = rx_ns or time.time_ns()
    if data[12:14] == b"\x81\x00":  # a tag the kernel left in the bytes (no VLAN offload): read it there
        tci = int.from_bytes(data[14:16], "big")
        vlan_id, pcp = tci & 0x0FFF, tci >> 13
        return ReceivedFrame(data[18:], data[6:12], data[0:6], vlan_id, pcp, False, rx_ns)
    return ReceivedFrame(data[14:], data[6:12], data[0:6], vlan_id, pcp, vlan_id is not None, rx_ns)


def has_net_raw() -> bool:
    """Whether this process may open raw sockets (root or CAP_NET_RAW)."""
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
        return True
    except PermissionError:
        return False


def pid_tag() -> str:
    """A short tag unique to this process, for names of namespaces and interfaces (15-char limit)."""
    return f"{os.getpid() % 100000:05d}"
