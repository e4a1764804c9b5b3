"""Devices for the stress case of `cmcs bench gateway`: every point changes on every read.

The plant simulator (simulator/endpoints.py) answers with what the plant does, so only about a
third of the variables change each second. The stress case wants the ceiling: every variable
changing every scan. These endpoints serve the same register maps (the device's profile) at
the same addresses as the site file gives, over plain Modbus TCP (Modbus Application Protocol
v1.1b3 and Modbus Messaging on TCP/IP v1.0b: MBAP header, function codes 1-4 read, 6 and 16
acknowledged), and each read of a block returns the other of two images: every point alternates
between two valid values (floats 10 <-> 20 in engineering units, integers and enumerations 1 <-> 2,
bits 0 <-> 1), so each read differs from the one before.

Answers are precomputed bytes (a dictionary look-up per request): the endpoint must cost far less
than the gateway it feeds, both share this machine's two cores.

    python -m bench.stress_devices SITE_FILE     # prints {"ready": true} then serves until SIGTERM
"""

from __future__ import annotations

import asyncio
import json
import signal
import struct
import sys

from siteconfig.model import Site
from siteconfig.profiles import BIT_TABLES, TABLES, Profile, encode_point, load_profile

# Modbus function code -> table (Modbus Application Protocol v1.1b3, section 6)
READ_FUNCTIONS = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}
WRITE_SINGLE, WRITE_MULTIPLE = 6, 16
GATEWAY_TARGET_FAILED = 0x0B  # exception: no device answers for this unit id
ILLEGAL_FUNCTION = 0x01
_MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length, unit id
PHASE_VALUES = {"float": (10.0, 20.0), "int": (1, 2), "bool": (False, True)}


def _images(profile: Profile) -> dict[str, tuple[int, tuple[list[int], list[int]]]]:
    """table -> (first address, (image A, image B)): every mapped register or bit, in both phases."""
    out = {}
    for table in TABLES:
        maps = profile.maps(table)
        if not maps:
            continue
        low, high = min(p.address for p in maps), max(p.end for p in maps)
        phases = []
        for k in (0, 1):
            image = [0] * (high - low)
            for p in maps:
                kind = "bool" if p.kind == "bool" or table in BIT_TABLES else "int" if p.kind != "float" else "float"
                words = encode_point(p, PHASE_VALUES[kind][k], clamp=True)
                image[p.address - low:p.end - low] = words
            phases.append(image)
        out[table] = (low, (phases[0], phases[1]))
    return out


class StressEndpoint:
    """One listening address: the devices (unit ids) behind it."""

    def __init__(self, units: dict[int, dict]) -> None:
        self.units = units  # unit id -> table images
        self.answers: dict[tuple, bytes] = {}  # (unit, function, address, count, phase) -> PDU
        self.phase: dict[tuple, int] = {}  # (unit, function, address) -> phase of the next answer
        self.requests = 0

    def __call__(self) -> "_Connection":
        return _Connection(self)

    def answer(self, unit: int, pdu: bytes) -> bytes:
        function = pdu[0]
        images = self.units.get(unit)
        if images is None:
            return bytes((function | 0x80, GATEWAY_TARGET_FAILED))
        if function in (WRITE_SINGLE, WRITE_MULTIPLE):
            return pdu[:5]  # acknowledged as written (the stress case sends no commands)
        table = READ_FUNCTIONS.get(function)
        if table is None or len(pdu) < 5:
            return bytes((function | 0x80, ILLEGAL_FUNCTION))
        address, count = struct.unpack_from(">HH", pdu, 1)
        key = (unit, function, address)
        phase = self.phase.get(key, 0)
        self.phase[key] = 1 - phase
        cached = self.answers.get(key + (count, phase))
        if cached is not None:
            return cached
        low, images = images.get(table, (0, ([], [])))
        image = images[phase]
        values = [image[a - low] if 0 <= a - low < len(image) else 0 for a in range(address, address + count)]
        if table in BIT_TABLES:
            packed = bytearray((count + 7) // 8)
            for i, bit in enumerate(values):
                if bit:
                    packed[i // 8] |= 1 << (i % 8)
            body = bytes(packed)
        else:
            body = struct.pack(f">{count}H", *values)
        answer = bytes((function, len(body))) + body
        self.answers[key + (count, phase)] = answer
        return answer


class _Connection(asyncio.Protocol):
    def __init__(self, endpoint: StressEndpoint) -> None:
        self.endpoint = endpoint
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data
        out = []
        while len(buf) >= 7:
            tid, _proto, length, unit = _MBAP.unpack_from(buf)
            end = 6 + length
            if len(buf) < end:
                break
            pdu = self.endpoint.answer(unit, buf[7:end])
            out.append(_MBAP.pack(tid, 0, len(pdu) + 1, unit) + pdu)
            buf = buf[end:]
            self.endpoint.requests += 1
        self.buffer = buf
        if out:
            self.transport.write(b"".join(out))


async def serve(site: Site) -> list[asyncio.Server]:
    """Listen on every device address of the site; returns the servers."""
    profiles: dict[str, dict] = {}
    by_address: dict[tuple[str, int], dict[int, dict]] = {}
    for _name, _kind, ep in site.devices():
        if ep.profile not in profiles:
            profiles[ep.profile] = _images(load_profile(ep.profile))
        by_address.setdefault((ep.host, ep.port), {})[ep.unit_id] = profiles[ep.profile]
    loop = asyncio.get_running_loop()
    return [await loop.create_server(StressEndpoint(units), host, port, reuse_address=True)
            for (host, port), units in by_address.items()]


async def _main(site_file: str) -> None:
    from siteconfig.loader import load_site

    servers = await serve(load_site(site_file))
    print(json.dumps({"ready": True, "endpoints": len(servers)}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()
    print(json.dumps({"stopped": True}), flush=True)


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1]))
    sys.exit(0)
