"""The live CMCS end to end: plant -> Modbus -> gateway -> OPC UA -> CMCS -> methods -> plant.

A bolted joint of PDB-01-A degrades for 40 min and then fails (the plant opens it with an arc;
without a CMCS two IT loads drop, see `cmcs.mission` on the same scenario). The simulators run
60x faster than real time; the gateway polls every 10 s of plant time, the CMCS cycles every
10 s of plant time. Nothing in the loop is mocked: real Modbus TCP, the real OPC UA server with
security on (the CMCS logs in with its own certificate, Basic256Sha256 SignAndEncrypt, role
Engineer), the real models and policy.

What is checked: in Advisory mode the CMCS only advises (events, no transfer); switched to
Automatic it moves every unit off PDB-01-A before the joint fails, writes RiskScore and the
PredictedFailureAlarm (with component and lead time), CycleTime and ActiveMitigations are live,
its calls are audited under its own user, and no IT load drops. The units of aisle 1 left with
PDB-01-A as their second path get a LossOfRedundancyAlarm naming it, with their DES's
ride-through time, before it fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

from asyncua import Client, ua

from gateway.app import Gateway
from gateway.security import CMCS_USER
from gateway.users import set_user
from information_model import spec
from simulator.endpoints import SimulatorHost
from simulator.scenario import parse_scenario
from siteconfig.demo import demo_site
from siteconfig.model import CmcsMode, SourceSelection
from tests.integration.conftest import free_port, relocate_site, until

SPEED = 60.0
PREDICTED_TYPE_ID = next(t.nodeid for t in spec.ALARM_TYPES if t.name == "PredictedFailureAlarmType")
REDUNDANCY_TYPE_ID = next(t.nodeid for t in spec.ALARM_TYPES if t.name == "LossOfRedundancyAlarmType")
ONSET_S = 3600.0
ENGINEER, ENGINEER_PASSWORD = "erin", "erin-engineer-pw"
SCENARIO = f"""name: live-joint
duration_s: 4400
seed: 7
faults:
  - {{kind: joint_degradation, target: PDB-01-A, onset_s: {ONSET_S:.0f}, precursor_s: 2400, severity: 0.9}}
"""


def live_site():
    site = relocate_site(demo_site())
    g = site.gateway
    gateway = dataclasses.replace(
        g, scan_groups_s={k: 10.0 / SPEED for k in g.scan_groups_s},  # every 10 s of plant time
        dwell_time_s=5.0,  # 5 min of plant time
        opcua=dataclasses.replace(g.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True))
    return dataclasses.replace(site, gateway=gateway)


class Events:
    def __init__(self):
        self.items = []

    def event_notification(self, event):
        self.items.append(event)


class PlantTimedEvents(Events):
    """Events with the plant time they arrived at."""

    def __init__(self, plant):
        super().__init__()
        self.plant = plant

    def event_notification(self, event):
        self.items.append((self.plant.t_s, event))


class Values:
    def __init__(self):
        self.max = {}

    def datachange_notification(self, node, val, data):
        if isinstance(val, (int, float)):
            key = node.nodeid.to_string()
            self.max[key] = max(self.max.get(key, val), val)


async def test_cmcs_advises_then_moves_load_off_a_degrading_joint_before_it_fails(tmp_path: Path):
    site = live_site()
    scenario = parse_scenario(SCENARIO, "live-joint.yaml", site)
    set_user(tmp_path, ENGINEER, "Engineer", password=ENGINEER_PASSWORD)
    host = SimulatorHost(site, scenario=scenario, speed=SPEED)
    gateway = Gateway(site, tmp_path, cmcs=True, cmcs_time_scale=SPEED)
    plant = host.plant
    aisle1 = [i for i, u in enumerate(site.units) if u.aisle == site.aisles[0].name]
    await host.start()
    await gateway.start()
    client = Client(f"opc.tcp://127.0.0.1:{site.gateway.opcua.port}/cmcs", timeout=10)
    client.set_user(ENGINEER)
    client.set_password(ENGINEER_PASSWORD)
    try:
        await client.connect()
        ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
        site_obj = await client.nodes.objects.get_child(f"{ns}:{site.name}")
        cmcs = await site_obj.get_child(f"{ns}:Cmcs")
        types_ns = await client.get_namespace_index("urn:cmcs-gateway:UA:PowerDistribution")
        pdb = await site_obj.get_child([f"{ns}:Aisles", f"{ns}:{site.aisles[0].name}", f"{ns}:PDB-01-A"])
        risk_node = await pdb.get_child(f"{types_ns}:RiskScore")
        mode_node = await cmcs.get_child(f"{types_ns}:Mode")
        assert await mode_node.read_value() == CmcsMode.ADVISORY  # the default: advise, do not act

        events, alarms, values = Events(), Events(), Values()
        sub = await client.create_subscription(100, events)
        await sub.subscribe_events(client.nodes.server, ua.ObjectIds.BaseEventType)
        asub = await client.create_subscription(100, alarms)
        await asub.subscribe_events(client.nodes.server, client.get_node(ua.NodeId(PREDICTED_TYPE_ID, types_ns)))
        redundancy = PlantTimedEvents(plant)
        rsub = await client.create_subscription(100, redundancy)
        await rsub.subscribe_events(client.nodes.server, client.get_node(ua.NodeId(REDUNDANCY_TYPE_ID, types_ns)))
        vsub = await client.create_subscription(100, values)
        await vsub.subscribe_data_change([risk_node, await cmcs.get_child(f"{types_ns}:ActiveMitigations"),
                                          await cmcs.get_child(f"{types_ns}:CycleTime")])

        # Advisory: the first advice about PDB-01-A's units comes; nothing moves by itself
        deadline = time.monotonic() + 120
        advice = None
        while advice is None and time.monotonic() < deadline and plant.t_s < ONSET_S:
            advice = next((e for e in events.items if "CMCS advises: SwitchSource" in str(getattr(e, "Message", ""))
                           and "PDB-01-A" in str(e.Message)), None)
            await asyncio.sleep(0.1)
        assert advice is not None, f"no advice before plant t={plant.t_s:.0f} s; live calls {gateway.live.calls[:3]}"
        advised_at = plant.t_s
        assert advised_at < ONSET_S - 120, f"advice only at {advised_at:.0f} s, the joint fails at {ONSET_S:.0f} s"
        assert gateway.live.calls == []  # Advisory acts on nothing
        active = plant.snapshot()["ats"]["ActiveSource"]
        on_a = [i for i in aisle1 if active[i] == SourceSelection.SOURCE_A]
        assert on_a, "the scenario needs units on PDB-01-A"

        # Automatic: the operator (an Engineer) lets it act
        await cmcs.call_method(f"{types_ns}:SetMode", ua.Variant(int(CmcsMode.AUTOMATIC), ua.VariantType.Int32))
        moved_at = None
        while time.monotonic() < deadline and plant.t_s < ONSET_S:
            active = plant.snapshot()["ats"]["ActiveSource"]
            if all(active[i] == SourceSelection.SOURCE_B for i in aisle1):
                moved_at = plant.t_s
                break
            await asyncio.sleep(0.05)
        assert moved_at is not None, (f"aisle 1 still has units on PDB-01-A at the joint's failure; "
                                      f"calls {gateway.live.calls}")
        # IT is warned before the failure: each unit of aisle 1 now has PDB-01-A as its second path,
        # and an OPC UA client sees that unit's LossOfRedundancyAlarm with its DES's ride-through
        aisle1_names = {site.units[i].name for i in aisle1}

        def warnings():  # unit -> the latest active warning naming PDB-01-A that arrived before the failure
            return {e.SourceName: e for t, e in redundancy.items if t < ONSET_S and e.SourceName in aisle1_names
                    and e.PathAtRisk == "PDB-01-A" and getattr(e, "ActiveState/Id")}

        while time.monotonic() < deadline and plant.t_s < ONSET_S and set(warnings()) != aisle1_names:
            await asyncio.sleep(0.05)
        warned = warnings()
        assert set(warned) == aisle1_names, (plant.t_s, [(round(t), e.SourceName, e.PathAtRisk, e.RideThroughTime)
                                                         for t, e in redundancy.items][-10:])
        assert not any(e.SourceName not in aisle1_names for _t, e in redundancy.items)  # the other aisles are whole
        # RideThroughTime is what the DES can carry: (SoC - floor) x capacity / load, 0 where it cannot carry the load
        snap = plant.snapshot()
        for i in aisle1:
            unit, load_kw = site.units[i], float(snap["ats"]["LoadPower"][i])
            des = unit.storage
            got = warned[unit.name].RideThroughTime
            if des.max_power_kw >= 1.1 * load_kw:
                expected = 3600.0 * (float(snap["des"]["StateOfCharge"][i]) - des.soc_min_pct) / 100.0 \
                    * des.capacity_kwh / load_kw
                assert 0.75 * expected <= got <= 1.25 * expected, (unit.name, got, expected)
            elif des.max_power_kw <= 0.9 * load_kw:
                assert got == 0.0, (unit.name, got, load_kw)
        assert any(e.RideThroughTime > 0 for e in warned.values())
        # ... and keeps them there through the failure
        while time.monotonic() < deadline and plant.t_s < ONSET_S + 300:
            await asyncio.sleep(0.2)
        assert plant.t_s >= ONSET_S + 300, "the plant did not reach the failure in time (machine too slow?)"
        totals = plant.totals()
        assert totals["dropped_loads"] == 0 and totals["unserved_kwh"] == 0.0, totals
        active = plant.snapshot()["ats"]["ActiveSource"]
        assert all(active[i] == SourceSelection.SOURCE_B for i in aisle1)

        # what a SCADA sees: RiskScore of the segment went past its operating point, the alarm
        # named the component and a lead time, the CMCS's own figures moved
        assert values.max[risk_node.nodeid.to_string()] >= gateway.live.base_thresholds["pdb"]
        alarm = next((e for e in alarms.items if getattr(e, "SourceName", None) == "PDB-01-A"
                      and "predicted in" in str(getattr(e, "Message", ""))), None)
        assert alarm is not None, [str(getattr(e, "Message", "")) for e in alarms.items][-10:]
        assert 0 < alarm.LeadTime <= 7 * 86400 and alarm.PredictedComponent == "PDB-01-A"
        mitigations = (await cmcs.get_child(f"{types_ns}:ActiveMitigations")).nodeid.to_string()
        assert values.max[mitigations] >= 1
        assert await (await cmcs.get_child(f"{types_ns}:CycleTime")).read_value() > 0
        assert await (await cmcs.get_child(f"{types_ns}:ModelVersion")).read_value() == gateway.live.predictor.version

        # every transfer it made went through the command service, audited under its own user
        records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
        switches = [r for r in records if r.get("method") == "SwitchSource"]
        assert switches and all(r["user"] == CMCS_USER and r["role"] == "Engineer" for r in switches)
        assert {r["object"] for r in switches if r["status"] == "Good"} >= {site.units[i].name for i in on_a}
        assert all(status == "Good" for _t, _a, status in gateway.live.calls)  # no interlock refused it
        for s in (sub, asub, rsub, vsub):
            await s.delete()
    finally:
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001 - teardown goes on
            pass
        await gateway.stop()
        await host.stop()


async def test_a_dead_device_is_not_fresh_and_a_lost_session_is_rebuilt(tmp_path: Path):
    """What the policy gets when a device stops answering (its values Uncertain/Bad: not fresh,
    the others still are), and after the session is cut (reconnected, safe start again)."""
    site = live_site()
    host = SimulatorHost(site, speed=SPEED)
    gateway = Gateway(site, tmp_path, cmcs=True, cmcs_time_scale=SPEED)
    await host.start()
    await gateway.start()
    try:
        live = gateway.live
        await until(lambda: live.cycles > 3 and all(f.all() for f in live.observation()[2].values()), 30,
                     "every device fresh")
        address = host.endpoint_of("MATS-01-01").address
        dead = {u.name for u in site.units if (u.device.host, u.device.port) == address}
        assert 0 < len(dead) < len(site.units)
        await host.stop_endpoint(address)
        names = live.names["ats"]
        await until(lambda: not live.observation()[2]["ats"][names.index("MATS-01-01")], 30, "MATS-01-01 stale")
        fresh = live.observation()[2]["ats"]
        assert {n for n, f in zip(names, fresh, strict=True) if not f} == dead
        await host.start_endpoint(address)
        await until(lambda: live.observation()[2]["ats"].all(), 30, "fresh again")

        # the session is cut under it: it reconnects, and the policy starts again from a safe start
        assert live.connections == 1
        before, cycles = live.policy_state, live.cycles
        live.client.uaclient.protocol.transport.close()
        await until(lambda: live.connections == 2 and live.connected and live.cycles > cycles + 2, 40, "reconnected")
        assert live.policy_state is not before  # nothing carried over blind: a new safe start
        await until(lambda: all(f.all() for f in live.observation()[2].values()), 30, "fresh after reconnecting")
    finally:
        await gateway.stop()
        await host.stop()
