"""The TSN driver end to end, on a veth pair whose device end is in a network namespace of its own.

`cmcs simulate --tsn-interface` serves an all-TSN site in the namespace; the gateway runs here,
on the other end. What a user relies on: frames on the wire carry the class's PCP (read from
PACKET_AUXDATA) and decode as UADP; an operator's SwitchSource over OPC UA reaches the simulated
micro-ATS over TSN and is confirmed; forged frames (tampered, replayed, unsigned, late) are
dropped and counted per device, and the Diagnostics show the count. Needs root (CI runs as root).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time

import pytest
from asyncua import Client, ua

from drivers.base import DriverUnavailable
from drivers.pointtable import PointTable
from drivers.tsn.driver import TsnDriver
from gateway.app import Gateway
from gateway.users import set_user
from siteconfig.loader import load_site
from tsnwire import uadp
from tsnwire.keys import load_key_file
from tsnwire.link import has_net_raw, open_link, receive
from tsnwire.netns import VethLink, in_netns
from tsnwire.security import SIGN_AND_ENCRYPT, Publisher, Subscriber

from .conftest import free_port
from ..tsn_site import DEVICES, VLAN, write_tsn_site

OPERATOR, OPERATOR_PW = "olivia", "olivia-operator"
TELEMETRY_PCP, COMMAND_PCP = 5, 6

pytestmark = pytest.mark.skipif(not has_net_raw(), reason="needs root / CAP_NET_RAW (CI runs as root)")


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """The link, the site file and keys, and `cmcs simulate` serving the devices in the namespace."""
    folder = tmp_path_factory.mktemp("tsn")
    with VethLink(f"t{os.getpid() % 100000}") as link:
        site_file = write_tsn_site(folder, link.gw_if)
        sim = subprocess.Popen([*link.exec_prefix(link.dev_ns), sys.executable, "-m", "gateway.cli", "simulate",
                                "--config", str(site_file), "--tsn-interface", link.dev_if],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            first = sim.stdout.readline()
            assert "5 TSN devices on" in first, first + sim.stdout.read()
            yield link, site_file, folder
        finally:
            sim.terminate()
            sim.wait(timeout=10)


def _capture(sock, seconds: float, want) -> list:
    """Frames from `sock` for up to `seconds`, until want(frames) holds."""
    frames, deadline = [], time.monotonic() + seconds
    sock.settimeout(0.2)
    while time.monotonic() < deadline and not want(frames):
        try:
            frame = receive(sock)
        except TimeoutError:
            continue
        if frame is not None:
            frames.append(frame)
    return frames


def test_telemetry_frames_carry_their_pcp_and_decode_as_uadp(rig):
    link, site_file, folder = rig
    site = load_site(site_file)
    sock = open_link(link.gw_if, blocking=True)
    try:
        publishers = {pub for *_, pub in DEVICES}
        frames = _capture(sock, 10.0, lambda fs: {uadp.decode_network_message(f.payload).publisher_id
                                                 for f in fs} >= publishers)
    finally:
        sock.close()
    assert {uadp.decode_network_message(f.payload).publisher_id for f in frames} >= publishers
    # the 802.1Q tag: stripped from the bytes, reported in PACKET_AUXDATA with the telemetry class's PCP
    assert all(f.tag_in_auxdata and f.vlan_id == VLAN and f.pcp == TELEMETRY_PCP for f in frames)
    by_name = {n: (mac, pub) for n, _p, mac, pub in DEVICES}
    source = next(f for f in frames if uadp.decode_network_message(f.payload).publisher_id == by_name["SourceA"][1])
    assert uadp.mac_text(source.src_mac) == by_name["SourceA"][0]

    # scapy dissects the header as Part 14 lays it out
    pkt = uadp.UADPNetworkMessage(source.payload)
    key = load_key_file(folder / "SourceA.key")
    assert (pkt.version, pkt.publisher_id, pkt.writer_group_id, pkt.dataset_writer_ids) == (
        1, by_name["SourceA"][1], uadp.WRITER_GROUP_ID, [uadp.TELEMETRY_WRITER_ID])
    assert (pkt.signed, pkt.encrypted, pkt.security_token_id, pkt.nonce_length) == (1, 1, key.key_id, 8)
    # opened with the device's key, the DataSet holds the source's points
    # (a lenient age limit: this checks decoding; the late check has its own test below)
    plain = Subscriber(key, SIGN_AND_ENCRYPT, max_age_ns=10**10).open(uadp.decode_network_message(source.payload),
                                                                       source.rx_unix_ns)
    dsm = uadp.UADPDataSetMessage(plain)
    assert dsm.valid == 1 and dsm.field_encoding == 1  # RawData
    layout = uadp.telemetry_layout("source")
    fields = uadp.scapy_layer(layout)(dsm.data)
    assert abs(fields.Voltage - site.nominal_voltage_v) < 0.1 * site.nominal_voltage_v
    assert abs(fields.Frequency - 60.0) < 1.0 and fields.Available == 1


async def test_switch_source_over_opcua_reaches_the_unit_over_tsn_and_forged_frames_are_dropped(rig, tmp_path):
    link, site_file, folder = rig
    site = load_site(site_file)
    opcua = dataclasses.replace(site.gateway.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True)
    site = dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, opcua=opcua))
    set_user(tmp_path, OPERATOR, "Operator", password=OPERATOR_PW)
    gateway = Gateway(site, tmp_path)
    # the device end, seen from inside its namespace: the gateway's command frames and their PCP
    device_side = in_netns(link.dev_ns, lambda: open_link(link.dev_if, blocking=True))
    await gateway.start()
    client = Client(f"opc.tcp://127.0.0.1:{opcua.port}/cmcs", timeout=10)
    client.set_user(OPERATOR)
    client.set_password(OPERATOR_PW)
    try:
        await client.connect()
        ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
        unit = "MATS-01-01"
        active = client.get_node(ua.NodeId(f"{unit}.ActiveSource", ns))
        deadline = time.monotonic() + 10
        while (await active.read_data_value()).StatusCode.is_good() is False and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the first telemetry frames of every device
        assert await active.read_value() == 1

        capture = asyncio.create_task(asyncio.to_thread(
            _capture, device_side, 5.0, lambda fs: any(uadp.decode_network_message(f.payload).dataset_writer_id
                                                       == uadp.COMMAND_WRITER_ID for f in fs)))
        out = await client.get_node(ua.NodeId(unit, ns)).call_method(ua.NodeId(f"{unit}.SwitchSource", ns),
                                                                     ua.Variant(2, ua.VariantType.Int32))
        assert out > 0  # the transfer time the unit reported, ms
        deadline = time.monotonic() + 5
        while await active.read_value() != 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await active.read_value() == 2  # confirmed by the unit's own telemetry, over OPC UA
        commands = [f for f in await capture
                    if uadp.decode_network_message(f.payload).dataset_writer_id == uadp.COMMAND_WRITER_ID]
        assert commands and all(f.tag_in_auxdata and f.pcp == COMMAND_PCP and f.vlan_id == VLAN for f in commands)

        # forged telemetry for the unit, injected at the device end
        driver = gateway.driver.driver_of(unit)
        health = next(h for h in driver.health() if h.label.endswith(unit))
        mac, pub = next((m, p) for n, _p, m, p in DEVICES if n == unit)
        # one of the unit's own telemetry frames, as the gateway received (and took) it
        gw_side = open_link(link.gw_if, blocking=True)
        try:
            taken = _capture(gw_side, 3.0, lambda fs: any(uadp.decode_network_message(f.payload).publisher_id == pub
                                                           for f in fs))
        finally:
            gw_side.close()
        genuine = next(f.payload for f in taken if uadp.decode_network_message(f.payload).publisher_id == pub)
        frames = _forged_frames(load_key_file(folder / f"{unit}.key"), pub, uadp.mac_bytes(mac), genuine)
        await asyncio.sleep(0.05)  # the gateway has taken the genuine frame before its replay comes
        before = health.dropped_frames
        for frame in frames.values():
            device_side.send(frame)
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + 3
        while health.dropped_frames - before < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        drops = driver.devices[unit].drops
        assert health.dropped_frames - before == 4  # and the unit's own frames go on being taken
        assert all(drops[reason] >= 1 for reason in ("tampered", "replayed", "unsigned", "late"))
        # the count is shown in the Diagnostics
        node = client.get_node(ua.NodeId(f"Diagnostics.TSN {link.gw_if} {unit}.DroppedFrames", ns))
        deadline = time.monotonic() + 3
        while await node.read_value() < health.dropped_frames and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await node.read_value() == health.dropped_frames
    finally:
        device_side.close()
        await client.disconnect()
        await gateway.stop()


def _forged_frames(key, publisher_id: int, mac: bytes, genuine: bytes) -> dict[str, bytes]:
    """The unit's genuine frame replayed, a tampered copy, and unsigned and late frames under its id."""
    layout = uadp.telemetry_layout("ats")
    values = {n: 0 for n, _ in layout.fields} | {"ActiveSource": 2, "PreferredSource": 1, "State": 0}
    payload = uadp.encode_dataset_message(1, layout.pack(values))
    header = uadp.ethernet_header(uadp.mac_bytes("03:00:00:b6:2c:01"), mac, VLAN, TELEMETRY_PCP)
    tampered = bytearray(genuine)
    tampered[uadp.HEADER_LEN + 5] ^= 0x40
    unsigned = uadp.encode_header(publisher_id, uadp.TELEMETRY_WRITER_ID, 1,
                                  uadp.datetime_from_unix_ns(time.time_ns()), 0, key.key_id, b"\0" * 8) + payload
    # signed with the right key but 5 s old (dropped before the replay window sees its sequence number)
    late = Publisher(publisher_id, key, SIGN_AND_ENCRYPT).seal(uadp.TELEMETRY_WRITER_ID, payload,
                                                                unix_ns=time.time_ns() - 5_000_000_000)
    return {"replayed": header + genuine, "tampered": header + bytes(tampered), "unsigned": header + unsigned,
            "late": header + late}


async def test_driver_refuses_in_one_line_without_its_interface(tmp_path):
    site = load_site(write_tsn_site(tmp_path, "no-such-if0"))
    driver = TsnDriver(site, PointTable(), [n for n, *_ in DEVICES])
    with pytest.raises(DriverUnavailable) as exc:
        await driver.start()
    assert str(exc.value) == "driver tsn: no network interface 'no-such-if0' here (gateway.tsn.interface)"


def test_under_a_flood_the_schedule_keeps_commands_on_time_and_a_fifo_does_not(tmp_path):
    """The short version of `cmcs bench tsn`: 500 cycles with and without the gates, the same flood."""
    from bench import tsn as bench_tsn
    from tsnwire.keys import generate_key_file

    key = tmp_path / "bench.key"
    generate_key_file(key)
    with VethLink(f"q{os.getpid() % 100000}", gw_ns_wanted=True) as link:
        on = bench_tsn._run_case("schedule_on_flood", link, tmp_path, 500, key, bench_tsn.RT_PRIORITY, grace_s=3.0)
        off = bench_tsn._run_case("schedule_off_flood", link, tmp_path, 500, key, bench_tsn.RT_PRIORITY, grace_s=3.0)
    assert on["commands_received"] == 500 and on["queue_drops"]["command"] == 0
    assert on["flood_offered_mbps"] == 200.0 and on["best_effort_carried_mbps"] < 100.0  # bounded by the budget
    assert on["device_pcp_counts"] == {"6": 500}  # every command on the wire with the command class's PCP
    assert off["p99_us"] > 5 * on["p99_us"]  # the FIFO queues commands behind the flood


def test_the_bench_measures_the_machines_own_wakeup_lateness(tmp_path):
    """`cmcs bench tsn` reports what the machine allows any scheduler (cyclictest at the cycle
    period, every CPU): the floor under the TSN cases' missed cycles and maximum."""
    from bench import tsn as bench_tsn

    r = bench_tsn.machine_wakeups(300, 1000, bench_tsn.RT_PRIORITY, tmp_path)
    assert "error" not in r, r
    assert r["wakeups"] == 300 * os.cpu_count()
    assert 0 < r["p50_us"] <= r["p99_us"] <= r["max_us"]
    assert 0.0 <= r["late_over_5ms_percent"] <= r["late_over_one_cycle_percent"] <= 100.0
