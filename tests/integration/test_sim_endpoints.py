"""Register-map profiles, their codec, and the plant-backed Modbus TCP endpoints.

Real sockets on 127.0.0.1 (free ports), the real plant (simulator.plant) on the demo site,
the pymodbus client, and mbpoll as an independent Modbus client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes

from siteconfig.demo import demo_site, generate_site, site_to_yaml
from siteconfig.model import SourceSelection
from siteconfig.points import COMMANDS, POINTS
from siteconfig.profiles import (
    REGISTER_TYPES,
    CommandResult,
    PointMap,
    Profile,
    available_profiles,
    decode_block,
    decode_command,
    decode_point,
    encode_command,
    encode_point,
    load_profile,
    parse_profile,
    read_blocks,
)
from siteconfig.yamlpos import ConfigErrors
from simulator.endpoints import EndpointError, SimulatorHost
from simulator.plant import Plant
from simulator.scenario import Fault, Scenario

REPO = Path(__file__).resolve().parents[2]
PROFILE_NAMES = ("power_source_v1", "pdb_segment_v1", "micro_ats_v1", "des_v1")
MBPOLL = shutil.which("mbpoll")
needs_mbpoll = pytest.mark.skipif(MBPOLL is None, reason="mbpoll is not installed (apt-get install mbpoll)")
ATS = "MATS-01-01"  # preferred source A in the demo site
DES = "DES-01-01"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def tolerance(point: PointMap) -> float:
    """Largest difference between a value and its decoded register encoding."""
    if point.type == "float32":
        return 1e-6
    return point.scale / 2 + 1e-9


def assert_close(point: PointMap, decoded, expected) -> None:
    if point.kind == "bool" or point.kind.startswith("enum:") or point.kind == "int":
        assert decoded == int(expected), f"{point.name}: {decoded} != {expected}"
    elif point.type == "float32":
        assert decoded == pytest.approx(expected, rel=1e-6, abs=1e-6), point.name
    else:
        assert abs(decoded - expected) <= tolerance(point), f"{point.name}: {decoded} != {expected}"


async def mbpoll(*args: str) -> tuple[int, dict[int, float], str]:
    """Run mbpoll once (-1) over TCP: exit code, {reference: value}, stderr."""
    proc = await asyncio.create_subprocess_exec(
        MBPOLL, "-m", "tcp", "-1", "-o", "2", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=15)
    # a 16-bit value >= 0x8000 prints as "35077 (-30459)": unsigned first
    pattern = r"^\[(\d+)\]:\s+(-?[\d.]+)(?:\s+\(-?\d+\))?\s*$"
    values = {int(m[1]): float(m[2]) for m in re.finditer(pattern, out.decode(), re.M)}
    return proc.returncode, values, err.decode()


@pytest.fixture
async def host(demo_site_free_ports):
    """The demo site served from the real plant, frozen (the test moves the plant)."""
    plant = Plant(demo_site_free_ports, seed=3)
    plant.advance_to(5.0)
    async with SimulatorHost(demo_site_free_ports, plant, run_clock=False) as h:
        yield h


@pytest.fixture
async def live_host(demo_site_free_ports):
    """The demo site with the plant clock running at real time."""
    async with SimulatorHost(demo_site_free_ports, seed=4) as h:
        yield h


async def client_for(host: SimulatorHost, name: str) -> AsyncModbusTcpClient:
    endpoint = host.devices[name].endpoint
    client = AsyncModbusTcpClient(endpoint.host, port=endpoint.port, timeout=2, retries=0)
    assert await client.connect()
    return client


async def read_input(client, host: SimulatorHost, name: str) -> dict:
    """Every input-register point and diagnostic of a device, read the way a driver reads them."""
    device = host.devices[name]
    out = {}
    for block in read_blocks(device.profile, "input"):
        rr = await client.read_input_registers(block.address, count=block.count, device_id=device.unit_id)
        assert not rr.isError(), rr
        out.update(decode_block(block, rr.registers))
    return out


# --------------------------------------------------------------------------------------------
# profiles and codec (no sockets)
# --------------------------------------------------------------------------------------------


def test_every_profile_maps_exactly_the_catalogue():
    assert set(PROFILE_NAMES) <= set(available_profiles())
    kinds = set()
    for name in PROFILE_NAMES:
        profile = load_profile(name)
        kinds.add(profile.device_kind)
        assert sorted(p.name for p in profile.points) == sorted(p.name for p in POINTS[profile.device_kind])
        assert {c.name for c in profile.commands} == set(COMMANDS[profile.device_kind])
        for command in profile.commands:
            assert tuple(a.name for a in command.args) == COMMANDS[profile.device_kind][command.name]
        # the whole input table (header + telemetry) is one request
        assert len(read_blocks(profile, "input")) == 1, name
    assert kinds == set(POINTS)


def sample_values(point: PointMap) -> list:
    """Edge and middle values the point's encoding must carry."""
    if point.type == "bool" or point.kind == "bool":
        return [False, True]
    if point.enum:
        from siteconfig.profiles import ENUMS

        return [m.value for m in ENUMS[point.enum]]
    if point.type == "float32":
        return [0.0, -1.5, 478.8069190173264, 1e-3, 3.0e9]
    fmt, _ = REGISTER_TYPES[point.type]
    bits = 16 * REGISTER_TYPES[point.type][1]
    low, high = (0, 2**bits - 1) if fmt.isupper() else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    values = [low * point.scale, high * point.scale, 0.0, 123.456 if high * point.scale > 124 else point.scale]
    if low < 0:
        values.append(-12.34)
    return [int(v) for v in values] if point.kind == "int" else values


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_codec_round_trips_every_point(name):
    profile = load_profile(name)
    maps = list(profile.points) + list(profile.diagnostics) + [a for c in profile.commands for a in c.args]
    for point in maps:
        for value in sample_values(point):
            registers = encode_point(point, value)
            assert len(registers) == point.size and all(0 <= r <= 0xFFFF for r in registers)
            assert_close(point, decode_point(point, registers), value)
            swapped = dataclasses.replace(point, word_order="little")
            assert encode_point(swapped, value) == registers[::-1]
            assert decode_point(swapped, registers[::-1]) == decode_point(point, registers)


def test_codec_documented_encodings_and_limits():
    ats = load_profile("micro_ats_v1")
    # int32, scale 0.01, high word first
    assert encode_point(ats.point("LoadPower"), 9.96) == [0, 996]
    assert encode_point(ats.point("LoadPower"), -700.0) == [0xFFFE, 0xEE90]  # -70000 as int32
    assert decode_point(ats.point("ContactTemperature"), [0xFFF6]) == -1.0  # int16 two's complement, 0.1
    with pytest.raises(ValueError):
        encode_point(ats.point("SourceAVoltage"), 7000.0)  # uint16 at 0.1 V tops out at 6553.5 V
    assert encode_point(ats.point("SourceAVoltage"), 7000.0, clamp=True) == [0xFFFF]
    assert encode_point(ats.point("SourceAVoltage"), -3.0, clamp=True) == [0]
    with pytest.raises(ValueError):
        encode_point(ats.point("State"), 9)  # not an AtsState
    with pytest.raises(ValueError):
        encode_point(ats.point("LoadPower"), math.nan)
    source = load_profile("power_source_v1")
    assert encode_point(source.point("BackupBatteryVoltage"), 1.0) == [0x3F80, 0x0000]  # IEEE 754 big endian


def test_command_codec():
    ats, des = load_profile("micro_ats_v1"), load_profile("des_v1")
    switch = ats.command("SwitchSource")
    assert encode_command(switch, Target=2) == [2]
    assert decode_command(switch, [2]) == {"Target": 2}
    for bad in ([0], [3], [7]):  # None is not a target; 3 and 7 are not SourceSelections
        with pytest.raises(ValueError):
            decode_command(switch, bad)
    with pytest.raises(ValueError):
        decode_command(switch, [1, 2])
    bridge = des.command("StartBridging")
    registers = encode_command(bridge, Power=7.5, Duration=60.0)
    assert registers == [0, 750, 0, 600]
    assert decode_command(bridge, registers) == {"Power": 7.5, "Duration": 60.0}
    with pytest.raises(ValueError):
        encode_command(bridge, Power=7.5)
    stop = des.command("StopBridging")
    assert encode_command(stop) == [1] and decode_command(stop, [1]) == {}
    with pytest.raises(ValueError):
        decode_command(stop, [0])


def synthetic_profile(n_points: int, gap_every: int = 0) -> Profile:
    """A profile with many uint32 points, contiguous or with a one-register gap every `gap_every`."""
    points, address = [], 0
    for i in range(n_points):
        if gap_every and i and i % gap_every == 0:
            address += 1
        points.append(PointMap(f"P{i}", "input", address, "uint32"))
        address += 2
    return Profile("synthetic", "<test>", "v", "m", "", "ats", "big", tuple(points))


@pytest.mark.parametrize("profile", [load_profile(n) for n in PROFILE_NAMES]
                         + [synthetic_profile(200), synthetic_profile(150, gap_every=7)],
                         ids=list(PROFILE_NAMES) + ["400-registers", "with-gaps"])
@pytest.mark.parametrize("limit", [125, 16, 3])
def test_read_blocks_cover_every_point_within_the_limit(profile, limit):
    for table in ("input", "holding", "discrete", "coil"):
        maps = profile.maps(table)
        blocks = read_blocks(profile, table, limit)
        covered = [p.name for b in blocks for p in b.points]
        assert sorted(covered) == sorted(p.name for p in maps)  # every point, exactly once
        for b in blocks:
            assert 1 <= b.count <= limit
            assert b.address == b.points[0].address and b.address + b.count == b.points[-1].end
            for before, after in zip(b.points, b.points[1:]):
                assert after.address == before.end  # never across a gap
        # as few requests as the limit allows: a new block only at a gap or at the limit
        for before, after in zip(blocks, blocks[1:]):
            if after.address == before.address + before.count:
                assert before.count + after.points[0].size > limit
    if profile.name == "synthetic" and limit == 125 and len(profile.points) == 200:
        assert len(read_blocks(profile, "input", limit)) == math.ceil(400 / 124)  # 62 uint32 per request


def test_profile_errors_name_file_line_and_key():
    text = (REPO / "drivers/profiles/micro_ats_v1.yaml").read_text()
    text = text.replace("address: 11, type: uint16", "address: 10, type: uint16")  # overlaps State
    text = text.replace("name: RatedCurrent", "name: RatedCurent")
    text = text.replace("units: degC", "units: C", 1)
    with pytest.raises(ConfigErrors) as info:
        parse_profile(text, "micro_ats_v1.yaml", expected_name="micro_ats_v1")
    lines = str(info.value).splitlines()
    assert all(re.match(r"micro_ats_v1\.yaml:\d+: \S+: ", line) for line in lines), lines
    assert any("overlaps" in line and "points[3].address" in line for line in lines)
    assert any("RatedCurrent" in line and "missing" in line for line in lines)
    assert any("did you mean 'RatedCurrent'" in line for line in lines)
    assert any("units" in line and "'degC'" in line for line in lines)
    with pytest.raises(ConfigErrors, match="no register-map profile 'nope'"):
        load_profile("nope")


# --------------------------------------------------------------------------------------------
# endpoints: reads
# --------------------------------------------------------------------------------------------


@needs_mbpoll
async def test_mbpoll_reads_what_the_profile_documents(host):
    """An independent client reads every input register; decoded by the profile it is the plant."""
    for name in (ATS, DES, "PDB-01-A", "SourceB"):
        device = host.devices[name]
        expected = host.plant.read_device(name)
        (block,) = read_blocks(device.profile, "input")
        code, values, err = await mbpoll("-a", str(device.unit_id), "-t", "3", "-r", str(block.address + 1),
                                         "-c", str(block.count), "-p", str(device.endpoint.port), device.endpoint.host)
        assert code == 0, err
        assert len(values) == block.count, (name, values)
        registers = [int(values[block.address + 1 + i]) for i in range(block.count)]
        decoded = decode_block(block, registers)
        for point in device.profile.points:
            if point.table == "input":
                assert_close(point, decoded[point.name], expected[point.name])
        assert decoded["PlantTime"] == pytest.approx(host.plant.t_s, abs=0.01)
    # a 32-bit value as mbpoll shows it with -B (high word first): raw * scale
    ats = host.devices[ATS]
    load_power = ats.profile.point("LoadPower")
    code, values, err = await mbpoll("-a", str(ats.unit_id), "-t", "3:int", "-B", "-r", str(load_power.address + 1),
                                     "-p", str(ats.endpoint.port), ats.endpoint.host)
    assert code == 0, err
    assert values[load_power.address + 1] * load_power.scale == pytest.approx(
        host.plant.read_device(ATS)["LoadPower"], abs=load_power.scale)
    # status bits as discrete inputs (FC2)
    source = host.devices["SourceA"]
    code, values, err = await mbpoll("-a", str(source.unit_id), "-t", "1", "-r", "1", "-c", "2",
                                     "-p", str(source.endpoint.port), source.endpoint.host)
    assert code == 0, err
    state = host.plant.read_device("SourceA")
    assert (values[1], values[2]) == (float(state["Available"]), float(state["BackupReady"]))


@needs_mbpoll
async def test_mbpoll_unmapped_address_is_refused(host):
    ats = host.devices[ATS]
    code, _, err = await mbpoll("-a", str(ats.unit_id), "-t", "3", "-r", "100", "-p", str(ats.endpoint.port),
                                ats.endpoint.host)
    assert code != 0 and "Illegal data address" in err


async def test_reads_follow_the_running_plant(live_host):
    """With the clock running, the served plant time keeps up with the wall clock and the plant."""
    client = await client_for(live_host, ATS)
    try:
        first = await read_input(client, live_host, ATS)
        await asyncio.sleep(0.5)
        second = await read_input(client, live_host, ATS)
    finally:
        client.close()
    assert 0.3 <= second["PlantTime"] - first["PlantTime"] <= 0.8
    assert abs(second["PlantTime"] - live_host.plant.t_s) <= 0.15  # at most one 100 ms tick behind
    assert second["Heartbeat"] - first["Heartbeat"] in range(3, 9)


# --------------------------------------------------------------------------------------------
# endpoints: commands
# --------------------------------------------------------------------------------------------


async def test_switch_source_over_modbus_moves_the_unit(live_host):
    client = await client_for(live_host, ATS)
    device = live_host.devices[ATS]
    try:
        before = await read_input(client, live_host, ATS)
        assert before["ActiveSource"] == SourceSelection.SOURCE_A
        switch = device.profile.command("SwitchSource")
        rr = await client.write_registers(switch.address, encode_command(switch, Target=2), device_id=device.unit_id)
        assert not rr.isError(), rr
        for _ in range(30):  # the transfer completes within a few plant ticks
            after = await read_input(client, live_host, ATS)
            if after["ActiveSource"] == SourceSelection.SOURCE_B:
                break
            await asyncio.sleep(0.1)
        assert after["ActiveSource"] == SourceSelection.SOURCE_B
        assert live_host.plant.read_device(ATS)["ActiveSource"] == SourceSelection.SOURCE_B
        assert after["TransferCount"] == before["TransferCount"] + 1
        assert after["CommandCounter"] == before["CommandCounter"] + 1
        assert after["LastCommand"] == switch.code
        assert after["LastCommandResult"] == CommandResult.ACCEPTED
        assert 0 < after["CommandReturn"] == pytest.approx(after["LastTransferTime"], abs=0.01)
        rr = await client.read_holding_registers(switch.address, count=1, device_id=device.unit_id)
        assert rr.registers == [2]  # the block reads back the accepted argument
    finally:
        client.close()


@pytest.fixture
async def source_b_dead(demo_site_free_ports):
    """The demo site with SourceB out from t = 0, plant frozen at 5 s."""
    scenario = Scenario(name="source-b-out", faults=(Fault("source_outage", "SourceB", 0.0, duration_s=3600.0),))
    plant = Plant(demo_site_free_ports, scenario=scenario, seed=5)
    plant.advance_to(5.0)
    assert not plant.read_device("SourceB")["Available"]
    async with SimulatorHost(demo_site_free_ports, plant, run_clock=False) as h:
        yield h


async def test_refused_switch_answers_0x04_and_changes_nothing(source_b_dead):
    host = source_b_dead
    client = await client_for(host, ATS)
    device = host.devices[ATS]
    try:
        plant_before = host.plant.read_device(ATS)
        before = await read_input(client, host, ATS)
        switch = device.profile.command("SwitchSource")
        rr = await client.write_registers(switch.address, [int(SourceSelection.SOURCE_B)], device_id=device.unit_id)
        assert rr.isError() and rr.exception_code == ExcCodes.DEVICE_FAILURE
        after = await read_input(client, host, ATS)
        assert host.plant.read_device(ATS) == plant_before
        for point in device.profile.points:
            assert after[point.name] == before[point.name], point.name
        assert after["CommandCounter"] == before["CommandCounter"]
        assert after["LastCommandResult"] == CommandResult.REFUSED
        rr = await client.read_holding_registers(switch.address, count=1, device_id=device.unit_id)
        assert rr.registers == [0]  # the refused argument was not stored either
    finally:
        client.close()


async def test_bad_arguments_answer_0x03_and_bad_addresses_0x02(host):
    ats_client = await client_for(host, ATS)
    des_client = await client_for(host, DES)
    ats, des = host.devices[ATS], host.devices[DES]
    switch = ats.profile.command("SwitchSource")
    bridge, stop = des.profile.command("StartBridging"), des.profile.command("StopBridging")
    try:
        before = host.plant.read_device(ATS)
        for bad in (7, 0):  # not a SourceSelection; SourceSelection.NONE is outside min 1
            rr = await ats_client.write_register(switch.address, bad, device_id=ats.unit_id)
            assert rr.isError() and rr.exception_code == ExcCodes.ILLEGAL_VALUE, bad
        assert host.plant.read_device(ATS) == before
        # the plant's own range check: more power than the inverter gives
        registers = encode_command(bridge, Power=600.0, Duration=10.0)
        rr = await des_client.write_registers(bridge.address, registers, device_id=des.unit_id)
        assert rr.isError() and rr.exception_code == ExcCodes.ILLEGAL_VALUE
        rr = await des_client.write_register(stop.address, 5, device_id=des.unit_id)  # Execute must be 1
        assert rr.isError() and rr.exception_code == ExcCodes.ILLEGAL_VALUE
        for address, values in ((bridge.address, [0, 100]),  # half a block
                                (bridge.address + 2, [0, 100]),  # not at the start of a block
                                (bridge.address, [0, 100, 0, 100, 0]),  # past the block
                                (300, [1])):  # nothing there
            rr = await des_client.write_registers(address, values, device_id=des.unit_id)
            assert rr.isError() and rr.exception_code == ExcCodes.ILLEGAL_ADDRESS, (address, values)
        rr = await ats_client.read_input_registers(0, count=27, device_id=ats.unit_id)  # one past the map
        assert rr.isError() and rr.exception_code == ExcCodes.ILLEGAL_ADDRESS
        pdb = host.devices["PDB-01-A"]
        rr = await ats_client.read_holding_registers(0, count=1, device_id=pdb.unit_id)  # no holding table
        assert rr.isError() and rr.exception_code == ExcCodes.ILLEGAL_ADDRESS
        # a good bridging command is accepted
        registers = encode_command(bridge, Power=5.0, Duration=30.0)
        rr = await des_client.write_registers(bridge.address, registers, device_id=des.unit_id)
        assert not rr.isError(), rr
        host.plant.advance_to(host.plant.t_s + 1.0)
        values = await read_input(des_client, host, DES)
        assert values["Mode"] == 2 and values["ActivePower"] > 0  # Bridging, discharging
        assert 28.0 <= values["BridgeTimeRemaining"] <= 30.0
    finally:
        ats_client.close()
        des_client.close()


# --------------------------------------------------------------------------------------------
# endpoints: availability
# --------------------------------------------------------------------------------------------


async def test_unknown_unit_and_offline_unit_answer_0x0b(host):
    client = await client_for(host, ATS)
    ats = host.devices[ATS]
    try:
        rr = await client.read_input_registers(0, count=8, device_id=200)
        assert rr.isError() and rr.exception_code == ExcCodes.GATEWAY_NO_RESPONSE
        host.set_device_online(ATS, False)
        rr = await client.read_input_registers(0, count=8, device_id=ats.unit_id)
        assert rr.isError() and rr.exception_code == ExcCodes.GATEWAY_NO_RESPONSE
        neighbour = host.devices["PDB-01-A"]  # same endpoint, still answering
        assert neighbour.endpoint.port == ats.endpoint.port
        assert not (await client.read_input_registers(0, count=8, device_id=neighbour.unit_id)).isError()
        host.set_device_online(ATS, True)
        assert not (await client.read_input_registers(0, count=8, device_id=ats.unit_id)).isError()
    finally:
        client.close()


async def test_an_endpoint_stops_and_restarts_alone(host):
    ats, source = host.devices[ATS], host.devices["SourceA"]
    address = (ats.endpoint.host, ats.endpoint.port)
    assert (source.endpoint.host, source.endpoint.port) != address
    client = await client_for(host, ATS)
    await asyncio.sleep(0.25)
    heartbeat = (await read_input(client, host, ATS))["Heartbeat"]
    assert heartbeat >= 2
    await host.stop_endpoint(address)
    assert not host.endpoints[address].running
    rr = None
    try:
        rr = await client.read_input_registers(0, count=8, device_id=ats.unit_id)
    except Exception:  # noqa: BLE001 - the connection is gone: any client error is the expected outcome
        pass
    assert rr is None or rr.isError()
    client.close()
    with pytest.raises(OSError):  # nothing listens any more
        await asyncio.open_connection(*address)
    other = await client_for(host, "SourceA")  # the other endpoints serve on
    assert not (await other.read_input_registers(0, count=8, device_id=source.unit_id)).isError()
    other.close()
    await host.start_endpoint(address)
    client = await client_for(host, ATS)
    try:
        values = await read_input(client, host, ATS)
        assert values["Heartbeat"] < heartbeat  # a power cycle restarts the device clock
        assert values["ActiveSource"] == host.plant.read_device(ATS)["ActiveSource"]
    finally:
        client.close()


async def test_a_taken_port_is_one_clear_error(demo_site_free_ports):
    endpoint = demo_site_free_ports.sources[0].device
    blocker = await asyncio.start_server(lambda r, w: None, endpoint.host, endpoint.port)
    try:
        sim = SimulatorHost(demo_site_free_ports, run_clock=False)
        with pytest.raises(EndpointError, match=f"{endpoint.port}"):
            await sim.start()
        assert not any(e.running for e in sim.endpoints.values())  # nothing left half-started
    finally:
        blocker.close()
        await blocker.wait_closed()


async def test_a_1000_unit_site_serves_from_one_process(relocate):
    site = relocate(generate_site(20, 50))  # 1,000 micro-ATS + 1,000 DES + 40 PDB + 2 sources
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with SimulatorHost(site) as sim:
        started_s = loop.time() - t0
        assert len(sim.devices) == 2042 and len(sim.endpoints) == 21
        await asyncio.sleep(1.0)
        assert sim.overruns <= 1  # the clock keeps real time
        last = site.units[-1]
        client = await client_for(sim, last.name)
        try:
            values = await read_input(client, sim, last.name)
            assert values["Position"] == pytest.approx(last.position_ft, abs=0.05)
            assert values["PlantTime"] > 0.5
        finally:
            client.close()
    assert started_s < 5.0


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


def cmcs(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, **kwargs)


def test_cli_list_prints_one_line_per_demo_device():
    result = cmcs("simulate", "--list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 58
    expected = [(name, e.host, str(e.port), str(e.unit_id), e.profile) for name, _, e in demo_site().devices()]
    assert [tuple(line.split()) for line in lines] == expected
    assert len({line.index(" 127.0.0.1") for line in lines}) == 1  # aligned columns


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "site.yaml"
    bad.write_text("site: {name: broken}\n")
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("name: x\nduration_s: 60\nfaults:\n"
                        "  - {kind: source_outage, target: SourceC, onset_s: 1, duration_s: 2}\n")
    for args in (("--config", str(bad)), ("--config", str(tmp_path / "missing.yaml")), ("--speed", "-1"),
                 ("--scenario", str(scenario))):
        result = cmcs("simulate", *args)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("cmcs simulate: error: ")
        assert result.stdout == ""  # nothing was served


@needs_mbpoll
async def test_cli_serves_a_site_file_until_sigterm(tmp_path, relocate):
    site = relocate(demo_site())
    path = tmp_path / "site.yaml"
    path.write_text(site_to_yaml(site))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "simulate", "--config", str(path), "--speed", "5", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        assert "58 devices on 5 Modbus TCP endpoints" in line, line
        unit = site.units[0]
        code, values, err = await mbpoll("-a", str(unit.device.unit_id), "-t", "3", "-r", "25", "-c", "2",
                                         "-p", str(unit.device.port), unit.device.host)
        assert code == 0, err
        assert values[25] * 0.1 == pytest.approx(unit.position_ft) and values[26] * 0.1 == unit.rated_current_a
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=15)
    assert proc.returncode == 0, err.decode()
    assert "stopped" in out.decode() and "Traceback" not in err.decode()
