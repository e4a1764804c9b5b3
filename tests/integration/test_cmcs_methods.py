"""The gateway's side of the CMCS: the Cmcs object's report methods and the writable results.

Over a real OPC UA session: who may call ReportPrediction / ClearPrediction / Advise /
ReportLossOfRedundancy / ClearLossOfRedundancy and write
RiskScore, PredictedLoad, CycleTime, ActiveMitigations, ModelVersion (Engineer and up), which
arguments are refused with which StatusCode (docs/interface.md "Method results"), and what a client
sees: the PredictedFailureAlarm, the LossOfRedundancyAlarm, the advice event, the values; the reports are audited, the
per-cycle result writes are not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import pytest
from asyncua import Client, ua

from gateway.app import Gateway
from gateway.users import set_user
from siteconfig.demo import demo_site

from .conftest import free_port, relocate_site

ENGINEER, ENGINEER_PW = "erin", "erin-engineer-pw"
OPERATOR, OPERATOR_PW = "olivia", "olivia-operator"
SC = ua.StatusCodes


class Events:
    def __init__(self):
        self.items = []

    def event_notification(self, event):
        self.items.append(event)


@pytest.fixture
async def rig(tmp_path: Path):
    site = relocate_site(demo_site())
    opcua = dataclasses.replace(site.gateway.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True)
    site = dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, opcua=opcua))
    set_user(tmp_path, ENGINEER, "Engineer", password=ENGINEER_PW)
    set_user(tmp_path, OPERATOR, "Operator", password=OPERATOR_PW)
    gateway = Gateway(site, tmp_path)  # no simulators: the devices are unreachable, which does not matter here
    await gateway.start()
    clients = []

    async def connect(user, password):
        client = Client(f"opc.tcp://127.0.0.1:{opcua.port}/cmcs", timeout=10)
        client.set_user(user)
        client.set_password(password)
        await client.connect()
        clients.append(client)
        ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
        types = await client.get_namespace_index("urn:cmcs-gateway:UA:PowerDistribution")
        return client, ns, types

    yield gateway, connect, tmp_path
    for c in clients:
        await c.disconnect()
    await gateway.stop()


async def _call(client, ns, types, method, *args):
    cmcs = client.get_node(ua.NodeId("Cmcs", ns))
    try:
        await cmcs.call_method(f"{types}:{method}", *args)
        return SC.Good
    except ua.UaStatusCodeError as exc:
        return exc.code


def _s(text):
    return ua.Variant(text, ua.VariantType.String)


def _d(x):
    return ua.Variant(float(x), ua.VariantType.Double)


async def _write(client, node: ua.NodeId, variant: ua.Variant) -> int:
    params = ua.WriteParameters(NodesToWrite=[ua.WriteValue(NodeId=node, AttributeId=ua.AttributeIds.Value,
                                                            Value=ua.DataValue(variant))])
    return (await client.uaclient.write(params))[0].value


async def test_an_operator_may_not_report_or_write_cmcs_results(rig):
    gateway, connect, data = rig
    client, ns, types = await connect(OPERATOR, OPERATOR_PW)
    assert await _call(client, ns, types, "ReportPrediction", _s("PDB-01-A"), _d(0.9), _d(600), _s("")) \
        == SC.BadUserAccessDenied
    assert await _call(client, ns, types, "Advise", _s("MATS-01-01"), _s("move it")) == SC.BadUserAccessDenied
    assert await _write(client, ua.NodeId("PDB-01-A.RiskScore", ns), _d(0.5)) == SC.BadUserAccessDenied
    assert not gateway.server.alarms.is_raised("PDB-01-A", "PredictedFailureAlarmType")


async def test_the_cmcs_reports_a_prediction_and_clears_it(rig):
    gateway, connect, data = rig
    client, ns, types = await connect(ENGINEER, ENGINEER_PW)
    events = Events()
    sub = await client.create_subscription(50, events)
    await sub.subscribe_events(client.nodes.server, ua.ObjectIds.BaseEventType)
    # refused arguments change nothing
    assert await _call(client, ns, types, "ReportPrediction", _s("PDB-99-Z"), _d(0.9), _d(600), _s("")) \
        == SC.BadInvalidArgument
    assert await _call(client, ns, types, "ReportPrediction", _s("PDB-01-A"), _d(1.5), _d(600), _s("")) \
        == SC.BadOutOfRange
    assert await _call(client, ns, types, "ReportPrediction", _s("PDB-01-A"), _d(0.9), _d(-1), _s("")) \
        == SC.BadOutOfRange
    assert not gateway.server.alarms.is_raised("PDB-01-A", "PredictedFailureAlarmType")
    # a good one raises the alarm on the component
    assert await _call(client, ns, types, "ReportPrediction", _s("PDB-01-A"), _d(0.8), _d(840),
                       _s("moving its units to PDB-01-B")) == SC.Good
    assert gateway.server.alarms.is_raised("PDB-01-A", "PredictedFailureAlarmType")
    assert await _call(client, ns, types, "Advise", _s("MATS-01-03"), _s("SwitchSource MATS-01-03 -> SourceB")) == SC.Good
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("CMCS advises" in str(getattr(e, "Message", "")) for e in events.items):
        await asyncio.sleep(0.05)
    texts = [str(getattr(e, "Message", "")) for e in events.items]
    assert any("PDB-01-A: failure predicted in 14 min (risk 80%); moving its units to PDB-01-B" in t for t in texts), texts
    advice = next(e for e in events.items if "CMCS advises: SwitchSource MATS-01-03 -> SourceB" in str(e.Message))
    assert advice.SourceName == "MATS-01-03"
    assert await _call(client, ns, types, "ClearPrediction", _s("PDB-01-A")) == SC.Good
    assert not gateway.server.alarms.is_raised("PDB-01-A", "PredictedFailureAlarmType")
    records = [json.loads(line) for line in (data / "audit.log").read_text().splitlines()]
    methods = [(r["method"], r["status"]) for r in records if r.get("object") == "Cmcs"]
    assert ("ReportPrediction", "BadInvalidArgument") in methods and ("ReportPrediction", "Good") in methods
    assert ("Advise", "Good") in methods and ("ClearPrediction", "Good") in methods
    await sub.delete()


def _b(flag):
    return ua.Variant(bool(flag), ua.VariantType.Boolean)


async def test_the_cmcs_reports_a_loss_of_redundancy_on_a_micro_ats_and_clears_it(rig):
    gateway, connect, data = rig
    alarms = gateway.server.alarms
    operator, ns, types = await connect(OPERATOR, OPERATOR_PW)
    assert await _call(operator, ns, types, "ReportLossOfRedundancy", _s("MATS-01-01"), _s("PDB-01-A"), _d(600),
                       _b(False)) == SC.BadUserAccessDenied
    client, ns, types = await connect(ENGINEER, ENGINEER_PW)
    events = Events()
    sub = await client.create_subscription(50, events)
    await sub.subscribe_events(client.nodes.server, client.get_node(ua.NodeId(2040, types)))  # LossOfRedundancyAlarmType
    # refused arguments change nothing: not a micro-ATS, a path that is not the unit's, a bad time
    for args, expected in (((_s("PDB-01-A"), _s("PDB-01-B"), _d(600), _b(False)), SC.BadInvalidArgument),
                           ((_s("MATS-99-99"), _s("PDB-01-A"), _d(600), _b(False)), SC.BadInvalidArgument),
                           ((_s("MATS-01-01"), _s("PDB-02-A"), _d(600), _b(False)), SC.BadInvalidArgument),
                           ((_s("MATS-01-01"), _s("PDB-01-A"), _d(-1), _b(False)), SC.BadOutOfRange),
                           # NaN: refused argument by argument (InputArgumentResults BadOutOfRange)
                           ((_s("MATS-01-01"), _s("PDB-01-A"), _d(float("nan")), _b(False)), SC.BadInvalidArgument)):
        assert await _call(client, ns, types, "ReportLossOfRedundancy", *args) == expected, args
    assert await _call(client, ns, types, "ClearLossOfRedundancy", _s("SourceA")) == SC.BadInvalidArgument
    assert not alarms.is_raised("MATS-01-01", "LossOfRedundancyAlarmType")
    # at risk, 40 min of ride-through: a warning; then gone with 10 min left: critical
    assert await _call(client, ns, types, "ReportLossOfRedundancy", _s("MATS-01-01"), _s("PDB-01-A"), _d(2400),
                       _b(False)) == SC.Good
    assert alarms.condition_of("MATS-01-01", "LossOfRedundancyAlarmType").severity == 500
    assert await _call(client, ns, types, "ReportLossOfRedundancy", _s("MATS-01-01"), _s("PDB-01-A"), _d(600),
                       _b(True)) == SC.Good
    assert alarms.condition_of("MATS-01-01", "LossOfRedundancyAlarmType").severity == 900
    assert await _call(client, ns, types, "ClearLossOfRedundancy", _s("MATS-01-01")) == SC.Good
    assert not alarms.is_raised("MATS-01-01", "LossOfRedundancyAlarmType")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(events.items) < 3:
        await asyncio.sleep(0.05)
    seen = [(e.SourceName, e.PathAtRisk, e.RideThroughTime, e.Severity, getattr(e, "ActiveState/Id"))
            for e in events.items]
    assert seen == [("MATS-01-01", "PDB-01-A", 2400.0, 500, True), ("MATS-01-01", "PDB-01-A", 600.0, 900, True),
                    ("MATS-01-01", "PDB-01-A", 600.0, 900, False)], seen
    assert "second path PDB-01-A gone" in events.items[1].Message.Text
    assert events.items[0].SourceNode == ua.NodeId("MATS-01-01", ns)
    records = [json.loads(line) for line in (data / "audit.log").read_text().splitlines()]
    methods = [(r["method"], r["status"]) for r in records if r.get("object") == "Cmcs"]
    assert ("ReportLossOfRedundancy", "BadUserAccessDenied") in methods
    assert ("ReportLossOfRedundancy", "BadOutOfRange") in methods and ("ReportLossOfRedundancy", "Good") in methods
    assert ("ClearLossOfRedundancy", "Good") in methods
    await sub.delete()


async def test_the_cmcs_results_are_writable_by_an_engineer_in_range_and_not_audited(rig):
    gateway, connect, data = rig
    client, ns, types = await connect(ENGINEER, ENGINEER_PW)
    cases = [
        ("PDB-01-A.RiskScore", _d(0.42), SC.Good),
        ("MATS-01-01.RiskScore", _d(0.1), SC.Good),
        ("SourceB.RiskScore", _d(1.5), SC.BadOutOfRange),
        ("MATS-01-01.PredictedLoad", _d(7.5), SC.Good),
        ("MATS-01-01.PredictedLoad", _s("lots"), SC.BadTypeMismatch),
        ("Cmcs.CycleTime", _d(12.5), SC.Good),
        ("Cmcs.ActiveMitigations", ua.Variant(2, ua.VariantType.UInt32), SC.Good),
        ("Cmcs.ModelVersion", _s("1.0+test"), SC.Good),
        ("MATS-01-01.LoadPower", _d(1.0), SC.BadNotWritable),  # measurements never
    ]
    for node, variant, expected in cases:
        assert await _write(client, ua.NodeId(node, ns), variant) == expected, node
    assert await client.get_node(ua.NodeId("PDB-01-A.RiskScore", ns)).read_value() == 0.42
    assert await client.get_node(ua.NodeId("Cmcs.ModelVersion", ns)).read_value() == "1.0+test"
    # the results are not audited when accepted (written every cycle); a refused write is
    writes = [json.loads(line) for line in (data / "audit.log").read_text().splitlines()]
    writes = [(r["object"], r["status"]) for r in writes if r.get("method") == "Write"]
    assert ("SourceB.RiskScore", "BadOutOfRange") in writes, writes
    assert ("MATS-01-01.PredictedLoad", "BadTypeMismatch") in writes, writes
    assert all(status != "Good" for _obj, status in writes), writes
