"""Alarms & Conditions and audit events end to end: plant-backed Modbus simulators, the real
driver and gateway with the alarm engine attached (gateway.alarms.attach, as GatewayServer will
call it), and OPC UA clients (asyncua's; node-opcua's in the interop test) subscribed to events on
the Server object.

Plant time runs faster than wall time where a fault needs it (SimulatorHost `speed`); every wait
is "until it happens, or a generous deadline", never a fixed duration that must fit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.common.events import select_clauses_from_evtype

from gateway import alarms
from gateway.app import Gateway
from gateway.users import set_user
from information_model import spec
from simulator.endpoints import SimulatorHost
from simulator.scenario import Fault, Scenario
from siteconfig.demo import demo_site

from .conftest import every_device_read, free_port, relocate_site

SITE_URI = "urn:cmcs-gateway:site:demo-hall"
TYPES_URI = spec.TYPES_NAMESPACE_URI
OPERATOR, OPERATOR_PASSWORD = "olivia", "olivia-operator"
ALARM_TYPE_IDS = {t.name: t.nodeid for t in spec.ALARM_TYPES}
INTEROP = Path(__file__).resolve().parents[1] / "interop"


def alarm_site():
    site = relocate_site(demo_site())
    # these tests are about alarms: the plain None endpoint (security has its own tests)
    opcua = dataclasses.replace(site.gateway.opcua, allow_security_none=True)
    return dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, stale_time_s=3.0, opcua=opcua))


class Events:
    """asyncua subscription handler that keeps every event."""

    def __init__(self):
        self.items: list = []

    def event_notification(self, event):
        self.items.append(event)

    async def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for ev in self.items[seen:]:
                if predicate(ev):
                    return ev
            seen = len(self.items)
            await asyncio.sleep(0.2)
        raise AssertionError(f"no {what} within {timeout:g} s; got {[_summary(e) for e in self.items]}")


def _summary(ev) -> str:
    return (f"{getattr(ev, 'EventType', None)} {getattr(ev, 'SourceName', None)} sev={getattr(ev, 'Severity', None)} "
            f"active={getattr(ev, 'ActiveState/Id', None)} acked={getattr(ev, 'AckedState/Id', None)}")


class AlarmRig:
    """Simulators + gateway + alarm engine + an Operator's OPC UA session."""

    def __init__(self, tmp_path: Path, scenario: Scenario | None = None, speed: float = 1.0):
        self.site = alarm_site()
        self.host = SimulatorHost(self.site, scenario=scenario, speed=speed)
        self.port = free_port()
        self.gateway = Gateway(self.site, tmp_path, opcua_port=self.port, opcua_host="127.0.0.1")
        set_user(tmp_path, OPERATOR, "Operator", password=OPERATOR_PASSWORD)
        self.url = f"opc.tcp://127.0.0.1:{self.port}/cmcs"
        self.clients: list[Client] = []
        self.alarms: alarms.AlarmEngine | None = None
        self.client: Client | None = None
        self.ns = self.types_ns = 0

    async def __aenter__(self):
        await self.host.start()
        await self.gateway.start()
        self.alarms = self.gateway.server.alarms  # GatewayServer attaches the engine at start
        self.client = await self.connect(OPERATOR, OPERATOR_PASSWORD)
        self.ns = await self.client.get_namespace_index(SITE_URI)
        self.types_ns = await self.client.get_namespace_index(TYPES_URI)
        await self.wait_good("SourceA", "Available")
        await every_device_read(self.gateway.table)  # the first scan spreads the devices over its period
        return self

    async def __aexit__(self, *exc):
        for client in self.clients:
            try:
                await client.disconnect()
            except Exception:  # noqa: BLE001 - teardown goes on
                pass
        if self.alarms is not None:
            await self.alarms.stop()
        await self.gateway.stop()
        await self.host.stop()

    async def connect(self, user: str | None = None, password: str | None = None) -> Client:
        client = Client(self.url, timeout=10)
        if user is not None:
            client.set_user(user)
            client.set_password(password)
        await client.connect()
        self.clients.append(client)
        return client

    def type_id(self, name: str) -> ua.NodeId:
        return ua.NodeId(ALARM_TYPE_IDS[name], self.types_ns)

    def nid(self, identifier: str) -> ua.NodeId:
        return ua.NodeId(identifier, self.ns)

    async def wait_good(self, device: str, point: str, timeout: float = 15.0) -> None:
        node = self.client.get_node(self.nid(f"{device}.{point}"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (await node.read_data_value(raise_on_bad_status=False)).StatusCode.is_good():
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{device}.{point} never Good")

    @staticmethod
    async def subscribe(client: Client, evtypes, evfilter: ua.EventFilter | None = None):
        """Events on the Server object: (handler, subscription, monitored item id)."""
        handler = Events()
        sub = await client.create_subscription(100, handler)
        mid = await sub.subscribe_events(client.nodes.server, evtypes, evfilter=evfilter)
        return handler, sub, mid


async def acknowledge(condition_node, event_id: bytes, comment: str):
    return await condition_node.call_method(ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
                                            ua.Variant(event_id, ua.VariantType.ByteString),
                                            ua.Variant(ua.LocalizedText(comment), ua.VariantType.LocalizedText))


async def status_of(coro) -> str:
    try:
        await coro
    except ua.UaStatusCodeError as exc:
        return ua.StatusCode(exc.code).name
    return "Good"


async def condition_refresh(client: Client, subscription_id: int):
    await client.get_node(ua.ObjectIds.ConditionType).call_method(
        ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh), ua.Variant(subscription_id, ua.VariantType.UInt32))


def active(ev) -> bool:
    return bool(getattr(ev, "ActiveState/Id", False))


def acked(ev) -> bool:
    return bool(getattr(ev, "AckedState/Id", False))


# ---------------------------------------------------------------------------------------------
async def test_joint_over_temperature_raised_acknowledged_and_refreshed(tmp_path):
    # A loosening joint on PDB-01-A: at 20x, its phase crosses the NETA "probable" 3 K over the
    # coolest phase ~20 s of wall time after start (plant t ~ 380 s); it opens at t = 2400 s.
    scenario = Scenario(duration_s=86400, seed=1,
                        faults=(Fault("joint_degradation", "PDB-01-A", 2400.0, 3600.0, 1.0),))
    async with AlarmRig(tmp_path, scenario, speed=20.0) as rig:
        client = rig.client
        alarm_type = client.get_node(ua.ObjectIds.AlarmConditionType)
        seen, operator_sub, _ = await rig.subscribe(client, alarm_type)
        over_temp = rig.type_id("OverTemperatureAlarmType")

        raised = await seen.wait_for(lambda e: e.EventType == over_temp and active(e), 150, "OverTemperature alarm")
        assert raised.SourceName == "PDB-01-A"
        assert raised.SourceNode == rig.nid("PDB-01-A")
        assert raised.Severity == alarms.SEVERITY_PROBABLE
        assert "NETA" in raised.Message.Text and "PDB-01-A" in raised.Message.Text
        assert raised.ConditionName == "OverTemperature"
        assert raised.Retain is True and acked(raised) is False
        assert getattr(raised, "EnabledState/Id") is True
        condition_id = raised.NodeId  # the ConditionId: stable, one per source and alarm type
        assert condition_id == rig.nid("PDB-01-A.OverTemperatureAlarm")
        condition = client.get_node(condition_id)
        assert (await condition.read_browse_name()).Name == "OverTemperatureAlarm"
        assert await client.get_node(rig.nid("PDB-01-A.OverTemperatureAlarm.ActiveState.Id")).read_value() is True

        # Acknowledge: a wrong EventId and a Viewer are refused, the Operator is not
        assert await status_of(acknowledge(condition, b"no-such-event", "?")) == "BadEventIdUnknown"
        viewer = await rig.connect()
        assert await status_of(acknowledge(viewer.get_node(condition_id), raised.EventId, "?")) == \
            "BadUserAccessDenied"
        latest = [e for e in seen.items if e.NodeId == condition_id][-1]
        await acknowledge(condition, latest.EventId, "thermography booked")
        ack = await seen.wait_for(lambda e: e.NodeId == condition_id and acked(e), 20, "acknowledged state")
        assert ack.EventId != latest.EventId
        assert active(ack) and ack.Retain is True
        assert ack.ClientUserId == OPERATOR and ack.Comment.Text == "thermography booked"
        assert await client.get_node(rig.nid("PDB-01-A.OverTemperatureAlarm.AckedState.Id")).read_value() is True
        assert await status_of(acknowledge(condition, ack.EventId, "again")) == "BadConditionBranchAlreadyAcked"

        # a client that connects now gets the active alarm from ConditionRefresh, between the brackets
        fresh, fresh_sub, _ = await rig.subscribe(viewer, viewer.get_node(ua.ObjectIds.AlarmConditionType))
        await condition_refresh(viewer, fresh_sub.subscription_id)
        refresh_end = ua.NodeId(ua.ObjectIds.RefreshEndEventType)
        await fresh.wait_for(lambda e: e.EventType == refresh_end, 20, "RefreshEndEvent")
        types = [e.EventType for e in fresh.items]
        start = types.index(ua.NodeId(ua.ObjectIds.RefreshStartEventType))
        end = types.index(refresh_end)
        refreshed = [e for e in fresh.items[start + 1:end] if e.NodeId == condition_id]
        assert refreshed, [_summary(e) for e in fresh.items]
        assert active(refreshed[-1]) and acked(refreshed[-1]) and refreshed[-1].SourceName == "PDB-01-A"
        # another session's subscription is not this session's to refresh
        assert await status_of(condition_refresh(viewer, operator_sub.subscription_id)) == "BadSubscriptionIdInvalid"

        # no false alarms on the healthy equipment meanwhile
        assert {(e.SourceName, e.EventType) for e in seen.items} == {("PDB-01-A", over_temp)}


async def test_source_outage_raises_one_source_loss_and_calls_are_audited(tmp_path):
    scenario = Scenario(duration_s=86400, seed=1,
                        faults=(Fault("source_outage", "SourceB", 15.0, 0.0, 0.5, duration_s=80000.0),))
    async with AlarmRig(tmp_path, scenario) as rig:
        client = rig.client
        audit, _, _ = await rig.subscribe(client, client.get_node(ua.ObjectIds.AuditUpdateMethodEventType))
        seen, _, _ = await rig.subscribe(client, client.get_node(ua.ObjectIds.AlarmConditionType))

        # an Operator's SwitchSource, before the outage: an AuditUpdateMethodEvent with the user
        unit = None
        for u in rig.site.units:
            if await client.get_node(rig.nid(f"{u.name}.ActiveSource")).read_value() == 1:
                unit = u.name
                break
        assert unit is not None
        method_id = rig.nid(f"{unit}.SwitchSource")
        await client.get_node(rig.nid(unit)).call_method(method_id, ua.Variant(2, ua.VariantType.Int32))
        ev = await audit.wait_for(lambda e: e.MethodId == method_id, 20, "audit event of SwitchSource")
        assert ev.EventType == ua.NodeId(ua.ObjectIds.AuditUpdateMethodEventType)
        assert ev.ClientUserId == OPERATOR and ev.Status is True
        assert ev.SourceNode == rig.nid(unit) and ev.SourceName == "Attribute/Call"
        assert [a.Value for a in ev.InputArguments] == [2]
        assert ev.ActionTimeStamp is not None and ev.ServerId.startswith("urn:cmcs-gateway:")
        # a refused call is audited too
        viewer = await rig.connect()
        refused = await status_of(viewer.get_node(rig.nid(unit)).call_method(method_id, ua.Variant(1, ua.VariantType.Int32)))
        assert refused == "BadUserAccessDenied"
        ev = await audit.wait_for(lambda e: e.MethodId == method_id and e.Status is False, 20, "refused call's audit")
        assert ev.ClientUserId != OPERATOR and ev.StatusCodeId.name == "BadUserAccessDenied"

        # SourceB goes out at plant t = 15 s: its SourceLoss alarm
        source_loss = rig.type_id("SourceLossAlarmType")
        loss = await seen.wait_for(lambda e: e.EventType == source_loss and active(e), 60, "SourceLoss alarm")
        assert loss.SourceName == "SourceB" and loss.Severity == alarms.SEVERITY_SOURCE_LOST
        assert loss.ConditionName == "SourceLoss" and loss.NodeId == rig.nid("SourceB.SourceLossAlarm")
        # one alarm for one cause: the B bus segments and the units' B inputs raise none of their own,
        # even after the units' ITIC on-delay has run out
        await asyncio.sleep(alarms.ITIC_LONG_S + 3.0)
        assert {e.SourceName for e in seen.items if e.EventType == source_loss} == {"SourceB"}
        # (aisle 4's A segment may pass 80 % with the whole aisle on it: a true Overload, not this test's)
        assert [c.device for c in rig.alarms.active_conditions() if c.type_name == "SourceLossAlarmType"] == ["SourceB"]


async def test_predicted_failure_from_the_cmcs_with_an_of_type_filter(tmp_path):
    async with AlarmRig(tmp_path) as rig:
        client, engine = rig.client, rig.alarms
        predicted_type = client.get_node(rig.type_id("PredictedFailureAlarmType"))
        # a filter as generic clients build it: OfType(ConditionType), fields of the alarm type
        evfilter = ua.EventFilter()
        evfilter.SelectClauses = await select_clauses_from_evtype([predicted_type])
        element = ua.ContentFilterElement(FilterOperator=ua.FilterOperator.OfType, FilterOperands=[
            ua.LiteralOperand(Value=ua.Variant(ua.NodeId(ua.ObjectIds.ConditionType)))])
        evfilter.WhereClause = ua.ContentFilter(Elements=[element])
        seen, sub, mid = await rig.subscribe(client, predicted_type, evfilter)
        audit, _, _ = await rig.subscribe(client, client.get_node(ua.ObjectIds.AuditConditionAcknowledgeEventType))

        condition_id = engine.raise_predicted_failure("MATS-01-03", "contact set A", 5400.0, 0.8)
        ev = await seen.wait_for(lambda e: e.NodeId == condition_id and active(e), 20, "PredictedFailure alarm")
        assert ev.EventType == rig.type_id("PredictedFailureAlarmType") and ev.SourceName == "MATS-01-03"
        assert ev.PredictedComponent == "contact set A" and ev.LeadTime == 5400.0
        assert ev.Severity == 760  # 200 + 700 * risk
        assert ev.InputNode == rig.nid("MATS-01-03.RiskScore")

        engine.clear_predicted_failure("MATS-01-03")
        cleared = await seen.wait_for(lambda e: e.NodeId == condition_id and not active(e), 20, "return to normal")
        assert cleared.Retain is True  # inactive but not acknowledged: still shown
        await acknowledge(client.get_node(condition_id), cleared.EventId, "contacts replaced")
        done = await seen.wait_for(lambda e: e.NodeId == condition_id and acked(e), 20, "acknowledged")
        assert done.Retain is False
        ev = await audit.wait_for(lambda e: e.SourceNode == condition_id, 20, "AuditConditionAcknowledgeEvent")
        assert ev.ConditionEventId == cleared.EventId and ev.ClientUserId == OPERATOR and ev.Status is True

        # a write is audited as well (the Operator may not write the Engineer's setpoint)
        writes, _, _ = await rig.subscribe(client, client.get_node(ua.ObjectIds.AuditWriteUpdateEventType))
        threshold = client.get_node(rig.nid("Cmcs.RiskThreshold"))
        assert await status_of(threshold.write_value(ua.Variant(0.7, ua.VariantType.Double))) == "BadUserAccessDenied"
        ev = await writes.wait_for(lambda e: e.SourceNode == threshold.nodeid, 20, "AuditWriteUpdateEvent")
        assert ev.ClientUserId == OPERATOR and ev.Status is False and ev.NewValue == 0.7
        assert ev.SourceName == "Attribute/Write" and ev.AttributeId == ua.AttributeIds.Value

        # nothing is retained any more: ConditionRefresh2 on the item brings only the brackets
        before = len(seen.items)
        await client.get_node(ua.ObjectIds.ConditionType).call_method(
            ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh2), ua.Variant(sub.subscription_id, ua.VariantType.UInt32),
            ua.Variant(mid, ua.VariantType.UInt32))
        end = await seen.wait_for(lambda e: e.EventType == ua.NodeId(ua.ObjectIds.RefreshEndEventType), 20, "RefreshEnd")
        assert [e.EventType for e in seen.items[before:]][-2:] == [ua.NodeId(ua.ObjectIds.RefreshStartEventType),
                                                                   end.EventType]


def test_thresholds_have_hysteresis_and_upstream_suppression():
    """The rules alone (no sockets): NETA bands with 1 K hysteresis; a unit's input is not its
    alarm while the source feeding it has one."""
    rule = alarms.JointTemperatureRule("PDB-01-A")
    values = {"JointTemperature": 36.0, "AmbientTemperature": 30.0, "JointTemperatureL1": 36.0,
              "JointTemperatureL2": 32.5, "JointTemperatureL3": 32.6}

    def lookup(_device, point):
        return values.get(point)

    class NoUpstream:
        @staticmethod
        def is_raised(device, type_name):
            return False

    assert rule.evaluate(lookup, 0, NoUpstream).level == 1  # 3.5 K over the coolest phase: probable
    values["JointTemperatureL1"] = 35.2  # 2.7 K: below 3 K, above 3 - 1 K
    assert rule.evaluate(lookup, 0, NoUpstream).level == 0  # not entered from normal ...
    assert rule.evaluate(lookup, 1, NoUpstream).level == 1  # ... but kept once in
    values["JointTemperatureL1"] = 34.4
    assert rule.evaluate(lookup, 1, NoUpstream).level == 0
    values.update(JointTemperature=71.0, JointTemperatureL1=71.0)  # 41 K over ambient: major
    verdict = rule.evaluate(lookup, 0, NoUpstream)
    assert (verdict.level, verdict.severity) == (3, alarms.SEVERITY_MAJOR) and "NETA" in verdict.message
    values["JointTemperature"] = None  # not Good: hold the state
    assert rule.evaluate(lookup, 3, NoUpstream) is None

    unit = alarms.UnitInputsRule("MATS-01-01", {1: ("SourceA", "PDB-01-A"), 2: ("SourceB", "PDB-01-B")}, 415.0)
    volts = {"SourceAVoltage": 415.0, "SourceBVoltage": 0.0}

    class SourceBDown:
        @staticmethod
        def is_raised(device, type_name):
            return device == "SourceB"

    assert unit.evaluate(lambda d, p: volts[p], 0, NoUpstream).severity == alarms.SEVERITY_UNIT_ONE_INPUT
    assert unit.evaluate(lambda d, p: volts[p], 0, SourceBDown).level == 0


NODE_CLIENT = r"""
// node-opcua against the gateway: subscribe to the Server's events with OfType(ConditionType),
// ConditionRefresh, find the condition of SOURCE, acknowledge it, see AckedState become true.
const out = process.stdout.write.bind(process.stdout);
for (const k of ["log", "info", "warn", "debug", "trace"]) console[k] = (...a) => process.stderr.write(a.join(" ") + "\n");
const ua = await import("node-opcua-client");
const env = process.env;
const fields = ["EventId", "EventType", "SourceName", "Severity", "Message", "ConditionName", "ActiveState.Id",
                "AckedState.Id", "Retain", "ConditionId"];
const result = { ok: false, events: [] };
const client = ua.OPCUAClient.create({ endpointMustExist: false, connectionStrategy: { maxRetry: 1 },
  securityMode: ua.MessageSecurityMode.None, securityPolicy: ua.SecurityPolicy.None });
const timer = setTimeout(() => { out("RESULT:" + JSON.stringify({ ...result, error: "timeout" }) + "\n"); process.exit(2); }, 60000);
try {
  await client.connect(env.ENDPOINT);
  const session = await client.createSession({ type: ua.UserTokenType.UserName, userName: env.USER_NAME, password: env.PASSWORD });
  const sub = await session.createSubscription2({ requestedPublishingInterval: 100, requestedLifetimeCount: 600,
    requestedMaxKeepAliveCount: 20, maxNotificationsPerPublish: 1000, publishingEnabled: true, priority: 1 });
  const filter = ua.constructEventFilter(fields, ua.ofType("ConditionType"));
  const item = await sub.monitor({ nodeId: ua.resolveNodeId("Server"), attributeId: ua.AttributeIds.EventNotifier },
    { queueSize: 1000, filter, discardOldest: true, samplingInterval: 0 }, ua.TimestampsToReturn.Both);
  const events = [];
  item.on("changed", (v) => events.push(Object.fromEntries(fields.map((f, i) => [f, v[i].value]))));
  const wait = async (pred) => { for (;;) { const e = events.find(pred); if (e) return e; await new Promise((r) => setTimeout(r, 100)); } };
  const refreshStatus = await ua.callConditionRefresh(session, sub.subscriptionId);
  result.refresh = refreshStatus.name;
  const start = ua.resolveNodeId("RefreshStartEventType").toString(), end = ua.resolveNodeId("RefreshEndEventType").toString();
  await wait((e) => e.EventType?.toString() === end);
  result.events = events.map((e) => ({ type: e.EventType?.toString(), source: e.SourceName, severity: e.Severity,
    condition: e.ConditionId?.toString(), active: e["ActiveState.Id"], acked: e["AckedState.Id"], retain: e.Retain }));
  const mine = events.find((e) => e.SourceName === env.SOURCE && e["ActiveState.Id"] === true);
  if (!mine) throw new Error("no active condition of " + env.SOURCE + " in the refresh");
  result.conditionName = mine.ConditionName;
  const ack = await ua.acknowledgeCondition(session, mine.ConditionId, mine.EventId, "seen by node-opcua");
  result.acknowledge = ack.name;
  const after = await wait((e) => e.ConditionId?.toString() === mine.ConditionId.toString() && e["AckedState.Id"] === true);
  result.ackedEvent = { acked: after["AckedState.Id"], newEventId: after.EventId.toString("hex") !== mine.EventId.toString("hex") };
  result.first = result.events[0]?.type === start;
  await sub.terminate();
  await session.close();
  await client.disconnect();
  result.ok = true;
} catch (err) {
  result.error = String(err && err.stack || err);
}
clearTimeout(timer);
out("RESULT:" + JSON.stringify(result) + "\n");
process.exit(result.ok ? 0 : 1);
"""


@pytest.mark.interop
async def test_node_opcua_refreshes_and_acknowledges(tmp_path):
    node = shutil.which("node")
    if node is None or not (INTEROP / "node_modules" / "node-opcua-client").is_dir():
        pytest.fail("node and tests/interop/node_modules (npm ci) are needed for the node-opcua check")
    async with AlarmRig(tmp_path) as rig:
        condition_id = rig.alarms.raise_predicted_failure("PDB-02-B", "joint L2", 7200.0, 0.6)
        await rig.alarms.drain()
        proc = await asyncio.create_subprocess_exec(
            node, "--input-type=module", cwd=INTEROP, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "ENDPOINT": rig.url, "USER_NAME": OPERATOR, "PASSWORD": OPERATOR_PASSWORD,
                 "SOURCE": "PDB-02-B", "XDG_CONFIG_HOME": str(tmp_path / "node-pki")})
        out, err = await asyncio.wait_for(proc.communicate(NODE_CLIENT.encode()), 90)
        lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("RESULT:")]
        assert lines, f"node printed no result (exit {proc.returncode}): {err.decode(errors='replace')[-3000:]}"
        result = json.loads(lines[-1][len("RESULT:"):])
        assert result["ok"], result
        assert result["refresh"] == "Good" and result["first"] is True
        mine = [e for e in result["events"] if e["source"] == "PDB-02-B"]
        assert mine and mine[0]["condition"] == condition_id.to_string() and mine[0]["severity"] == 620
        assert result["conditionName"] == "PredictedFailure"
        assert result["acknowledge"] == "Good" and result["ackedEvent"] == {"acked": True, "newEventId": True}
        assert rig.alarms.condition_of("PDB-02-B", "PredictedFailureAlarmType").acked
