"""Sparkplug B 3.0 over MQTT/TLS against a real mosquitto (`require_certificate true`), certificates
made here by a throw-away CA (and a rogue CA for the impostor broker).

The edge node is the real one (gateway/sparkplug), a sink of a real point table that the test
feeds; one test runs the whole gateway (drivers polling simulators, OPC UA server) with
`gateway.mqtt` in its site file, one kills a gateway process with SIGKILL. Payloads are checked with
an independent decoder too: `protoc --decode_raw` (no schema: raw field numbers).

The outage length is a parameter (CMCS_MQTT_OUTAGE_S, default 3 s: the suite's time budget);
`cmcs bench gateway` runs the long outage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from asyncua import ua

from bench.mqtt_broker import LOCALHOST, Mosquitto, Subscriber, make_pki
from drivers.pointtable import PointTable, Quality
from gateway.sparkplug import EdgeNode
from gateway.app import Gateway
from gateway.sparkplug.catalogue import BDSEQ, REBIRTH, Payload
from siteconfig.demo import relocate_site, site_to_yaml
from siteconfig.loader import load_site
from siteconfig.model import MqttConfig
from siteconfig.points import POINTS
from simulator.endpoints import SimulatorHost

from .conftest import free_port

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sites"
OUTAGE_S = float(os.environ.get("CMCS_MQTT_OUTAGE_S", "3"))
UNIT = "MATS-01-01"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("mqtt-pki"))


@pytest.fixture
def broker(pki, tmp_path):
    b = Mosquitto(tmp_path / "broker", pki)
    b.start()
    yield b
    b.stop()


def _site(name: str = "small-hall"):
    site = load_site(FIXTURES / "small.yaml")
    return dataclasses.replace(site, name=name)


def _table(site) -> PointTable:
    table = PointTable()
    for name, kind, _ in site.devices():
        table.define(name, [p.name for p in POINTS[kind]])
    return table


def _all_good(table: PointTable, site, base: float = 1.0) -> None:
    for name, kind, _ in site.devices():
        table.update_device(name, {p.name: (base if p.kind == "float" else 1 if p.kind != "bool" else True)
                                   for p in POINTS[kind]})


def _config(pki, broker, **kw) -> MqttConfig:
    return MqttConfig(host=LOCALHOST, port=broker.port, tls_ca=str(pki.ca), tls_cert=str(pki.gateway_cert),
                      tls_key=str(pki.gateway_key), **kw)


def _node(site, table, pki, broker, data_dir, **kw) -> EdgeNode:
    node = EdgeNode(site, _config(pki, broker, **kw), data_dir)
    table.attach(node)
    node.start()
    return node


def _decode_raw(body: bytes) -> str:
    """protoc --decode_raw: field numbers and wire values, no schema (an independent decoder)."""
    return subprocess.run(["protoc", "--decode_raw"], input=body, capture_output=True, check=True).stdout.decode()


def _metrics(msg) -> dict:
    return {m.name: m for m in msg.payload.metrics}


def _quality(metric) -> int | None:
    """The metric property "Quality" (Int32), None without it."""
    keys = list(metric.properties.keys)
    return metric.properties.values[keys.index("Quality")].int_value if "Quality" in keys else None


def _seqs_consecutive(messages) -> None:
    """After an NBIRTH (seq 0) every message of the node has the next seq, wrapping at 256."""
    seq = None
    for m in messages:
        kind = m.topic.split("/")[2]
        if kind in ("NDEATH", "NCMD", "DCMD", "STATE"):
            continue
        if kind == "NBIRTH":
            assert m.payload.seq == 0
            seq = 0
            continue
        assert seq is not None, f"{m.topic} before any NBIRTH"
        assert m.payload.seq == (seq + 1) % 256, f"{m.topic}: seq {m.payload.seq} after {seq}"
        seq = m.payload.seq


def test_births_data_deaths_rebirth_and_an_independent_decoder(pki, broker, tmp_path):
    site = _site()
    sub = Subscriber(pki, broker.port)
    sub.start()
    table = _table(site)
    _all_good(table, site)
    node = _node(site, table, pki, broker, tmp_path / "data")
    try:
        sub.wait_for(lambda ms: len([m for m in ms if "/DBIRTH/" in m.topic]) == len(site.devices()), what="DBIRTHs")
        for i in range(300):  # past 256: seq wraps
            table.update_device(UNIT, {"LoadPower": 10.0 + i})
        sub.wait_for(lambda ms: sum(1 for m in ms if "/DDATA/" in m.topic) >= 300, what="300 DDATA")

        nbirth = sub.of("NBIRTH")[0]
        assert nbirth.topic == "spBv1.0/cmcs/NBIRTH/small-hall"
        nm = _metrics(nbirth)
        assert nm[REBIRTH].boolean_value is False and nm[REBIRTH].datatype == 11  # Boolean
        bdseq = nm[BDSEQ].long_value
        dbirths = {m.topic.split("/")[-1]: m for m in sub.of("DBIRTH")}
        assert set(dbirths) == {d for d, _k, _e in site.devices()}  # the site file's device names
        unit = _metrics(dbirths[UNIT])
        load = unit["LoadPower"]
        assert load.datatype == 10 and load.alias > 0  # Double
        assert list(load.properties.keys) == ["engUnit"] and load.properties.values[0].string_value == "kW"
        assert unit["ActiveSource"].datatype == 3 and unit["TransferCount"].datatype == 7  # Int32 enum, UInt32
        assert "StateOfCharge" in _metrics(dbirths["DES-01-01"])
        ddata = sub.of("DDATA", UNIT)
        assert all(not m.name and m.alias == load.alias for d in ddata for m in d.payload.metrics)  # aliases only
        assert [d.payload.metrics[0].double_value for d in ddata] == [10.0 + i for i in range(300)]
        _seqs_consecutive(sub.messages)

        # the independent decoder sees the same fields: Payload.metrics = 2, Metric.name = 1,
        # alias = 2, datatype = 4, properties = 9 (keys = 1); seq = 3
        raw = _decode_raw(nbirth.raw)
        assert '1: "Node Control/Rebirth"' in raw and '1: "bdSeq"' in raw and "3: 0" in raw
        raw = _decode_raw(dbirths[UNIT].raw)
        assert '1: "LoadPower"' in raw and f"2: {load.alias}" in raw and "4: 10" in raw and '1: "engUnit"' in raw
        raw = _decode_raw(ddata[-1].raw)
        assert f"2: {load.alias}" in raw and "LoadPower" not in raw

        # a device gone Bad: DDEATH; Good again: DBIRTH
        table.set_quality("PDB-01-A", Quality.BAD_COMM)
        sub.wait_for(lambda ms: any(m.topic.endswith("/DDEATH/small-hall/PDB-01-A") for m in ms), what="DDEATH")
        n_births = len(sub.of("DBIRTH", "PDB-01-A"))
        _all_good(table, site, base=2.0)
        sub.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/DBIRTH/small-hall/PDB-01-A")]) > n_births,
                     what="DBIRTH after recovery")

        # Uncertain (a missed poll): the last values again, each with the property Quality = 500
        # (stale); Good again: Quality = 192
        def qualities(code):
            return lambda ms: any(m.topic.endswith(f"/DDATA/small-hall/{UNIT}") and len(m.payload.metrics) > 1
                                  and {_quality(x) for x in m.payload.metrics} == {code} for m in ms)

        table.set_quality(UNIT, Quality.UNCERTAIN_LAST_USABLE)
        sub.wait_for(qualities(500), what="the unit's values marked stale")
        stale = next(m for m in reversed(sub.of("DDATA", UNIT)) if _quality(m.payload.metrics[0]) == 500)
        assert {x.alias for x in stale.payload.metrics} == {unit[p.name].alias for p in POINTS["ats"]}
        assert any(x.alias == load.alias and x.double_value == 2.0 for x in stale.payload.metrics)  # the last value (_all_good)
        assert '1: "Quality"' in _decode_raw(stale.raw)
        _all_good(table, site, base=4.0)  # every point read again
        sub.wait_for(qualities(192), what="the unit's values marked good again")

        # NCMD Rebirth: NBIRTH and every DBIRTH again, same bdSeq, seq from 0
        cmd = Payload(timestamp=int(time.time() * 1000))
        m = cmd.metrics.add()
        m.name, m.datatype, m.boolean_value = REBIRTH, 11, True
        sub.client.publish("spBv1.0/cmcs/NCMD/small-hall", cmd.SerializeToString(), qos=1)
        sub.wait_for(lambda ms: len([m for m in ms if "/NBIRTH/" in m.topic]) == 2, what="the second NBIRTH")
        sub.wait_for(lambda ms: len([m for m in ms if "/DBIRTH/" in m.topic]) >= 2 * len(site.devices()) + 1,
                     what="DBIRTHs after Rebirth")
        assert _metrics(sub.of("NBIRTH")[1])[BDSEQ].long_value == bdseq
        _seqs_consecutive(sub.messages)
        assert node.stats()["queue_messages"] == 0  # everything acknowledged, nothing left on disk
    finally:
        node.stop()
        sub.stop()


def test_a_client_without_certificate_is_refused_and_a_rogue_broker_gets_nothing(pki, tmp_path, caplog):
    good = Mosquitto(tmp_path / "good", pki)
    good.start()
    try:
        anonymous = Subscriber(pki, good.port, client_id="no-cert", cert=False)
        with pytest.raises((OSError, TimeoutError)):
            anonymous.start(timeout_s=3)
    finally:
        good.stop()
    rogue = Mosquitto(tmp_path / "rogue", pki, rogue=True)
    rogue.start()
    site = _site()
    table = _table(site)
    _all_good(table, site)
    caplog.set_level(logging.ERROR, logger="gateway.sparkplug.edge")
    node = _node(site, table, pki, rogue, tmp_path / "data")
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("not trusted by the site's CA" in r.message
                                                       for r in caplog.records):
            time.sleep(0.1)
        table.update_device(UNIT, {"LoadPower": 99.0})
        time.sleep(1.5)  # a retry or two
        lines = [r.message for r in caplog.records if "not trusted by the site's CA" in r.message]
        assert len(lines) == 1, lines  # one clear line, not one per retry
        assert node.connections == 0 and node.published == 0 and node.births == 0
        assert "cmcs-small-hall" not in rogue.log.read_text()  # no MQTT session: no CONNECT ever sent
        assert node.stats()["queue_messages"] >= 1  # the data waits on disk for the real broker
    finally:
        node.stop()
        rogue.stop()


_KILLED_GATEWAY = textwrap.dedent("""
    import sys, time, dataclasses
    from pathlib import Path
    from drivers.pointtable import PointTable
    from gateway.sparkplug import EdgeNode
    from siteconfig.loader import load_site
    from siteconfig.model import MqttConfig
    from siteconfig.points import POINTS
    site = load_site(sys.argv[1])
    table = PointTable()
    for name, kind, _ in site.devices():
        table.define(name, [p.name for p in POINTS[kind]])
    cfg = MqttConfig(port=int(sys.argv[2]), tls_ca=sys.argv[3], tls_cert=sys.argv[4], tls_key=sys.argv[5])
    node = EdgeNode(site, cfg, Path(sys.argv[6]))
    table.attach(node)
    node.start()
    i = 0
    while True:
        table.update_device("MATS-01-01", {"LoadPower": float(i)})
        i += 1
        time.sleep(0.05)
""")


def test_kill_9_gives_ndeath_with_the_births_bdseq(pki, broker, tmp_path):
    sub = Subscriber(pki, broker.port)
    sub.start()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_GATEWAY, str(FIXTURES / "small.yaml"), str(broker.port),
                             str(pki.ca), str(pki.gateway_cert), str(pki.gateway_key), str(tmp_path / "data")],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        sub.wait_for(lambda ms: any("/NBIRTH/" in m.topic for m in ms), timeout_s=30, what="NBIRTH")
        bdseq = _metrics(sub.of("NBIRTH")[0])[BDSEQ].long_value
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        death = sub.wait_for(lambda ms: [m for m in ms if "/NDEATH/" in m.topic], what="NDEATH (the will)")[0]
        assert death.topic == "spBv1.0/cmcs/NDEATH/small-hall"
        assert _metrics(death)[BDSEQ].long_value == bdseq
        assert "bdSeq" in _decode_raw(death.raw)
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.stop()


def test_broker_outage_and_a_gateway_restart_lose_nothing_and_keep_order(pki, broker, tmp_path):
    """Broker stopped OUTAGE_S, the gateway restarted during it: every value arrives once the broker is
    back, in order, the outage's with is_historical, after the new births."""
    site = _site()
    sub = Subscriber(pki, broker.port)
    sub.start()
    table = _table(site)
    _all_good(table, site)
    data = tmp_path / "data"
    node = _node(site, table, pki, broker, data)
    value = 0

    def feed(seconds: float) -> None:
        nonlocal value
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            table.update_device(UNIT, {"LoadPower": float(value)})
            value += 1
            time.sleep(0.02)

    try:
        sub.wait_for(lambda ms: any("/DBIRTH/" in m.topic for m in ms), what="DBIRTH")
        feed(0.5)
        sub.wait_for(lambda ms: sum(1 for m in ms if f"/DDATA/small-hall/{UNIT}" in m.topic) >= value,
                     what="live DDATA")
        broker.stop()
        outage_start = value
        feed(OUTAGE_S / 2)
        table.detach(node)  # the gateway restarts in the middle of the outage
        node.stop()
        node = _node(site, table, pki, broker, data)
        feed(OUTAGE_S / 2)
        outage_end = value
        broker.start()
        feed(0.5)
        last = value - 1
        sub.wait_for(lambda ms: any(m.payload.metrics and m.payload.metrics[0].double_value == last
                                    for m in ms if f"/DDATA/small-hall/{UNIT}" in m.topic),
                     timeout_s=30 + OUTAGE_S, what="the last value")
        ddata = [m for m in sub.of("DDATA", UNIT)]
        values = [m.payload.metrics[0].double_value for m in ddata]
        got = list(dict.fromkeys(values))  # at least once: a message whose PUBACK was lost may come twice
        assert got == [float(v) for v in range(value)], "a data point lost or out of order"
        stamps = [m.payload.metrics[0].timestamp for m in ddata]
        assert stamps == sorted(stamps)
        historical = {m.payload.metrics[0].double_value for m in ddata if m.payload.metrics[0].is_historical}
        assert {float(v) for v in range(outage_start, outage_end)} <= historical
        assert float(value - 1) not in historical  # live again at the end
        # the replay comes after the births of the session that sends it
        first_hist = next(i for i, m in enumerate(sub.messages) if "/DDATA/" in m.topic
                          and m.payload.metrics[0].is_historical)
        births_before = [m for m in sub.messages[:first_hist] if "/NBIRTH/" in m.topic]
        assert len(births_before) >= 2
        assert node.stats()["dropped_messages"] == 0
    finally:
        node.stop()
        sub.stop()


def test_two_gateways_into_one_broker_one_subscriber_sees_both(pki, broker, tmp_path):
    sub = Subscriber(pki, broker.port, topic_filter="spBv1.0/cmcs/#")
    sub.start()
    nodes = []
    try:
        for name in ("hall-a", "hall-b"):
            site = _site(name)
            table = _table(site)
            _all_good(table, site)
            nodes.append((_node(site, table, pki, broker, tmp_path / name), table))
        for _node_, table in nodes:
            table.update_device(UNIT, {"LoadPower": 42.0})
        sub.wait_for(lambda ms: {m.topic.split("/")[3] for m in ms if "/DDATA/" in m.topic} == {"hall-a", "hall-b"},
                     what="DDATA of both edge nodes")
        assert {m.topic for m in sub.of("NBIRTH")} == {"spBv1.0/cmcs/NBIRTH/hall-a", "spBv1.0/cmcs/NBIRTH/hall-b"}
    finally:
        for node, _t in nodes:
            node.stop()
        sub.stop()


async def test_the_gateway_publishes_its_site_with_cmcs_results_alarms_and_dcmd(pki, broker, tmp_path):
    """`gateway.mqtt` in a site file (TLS paths relative to it): the whole gateway (drivers polling the
    simulators, OPC UA server, alarms) publishes; a CMCS result written to the address space and a
    raised alarm become metrics; a DCMD SwitchSource goes through the command service, audited."""
    site_dir = tmp_path / "site"
    (site_dir / "mqtt").mkdir(parents=True)
    for f in (pki.ca, pki.gateway_cert, pki.gateway_key):
        shutil.copy(f, site_dir / "mqtt" / f.name)
    base = relocate_site(load_site(FIXTURES / "small.yaml"))
    opcua = dataclasses.replace(base.gateway.opcua, host=LOCALHOST, port=free_port(), allow_security_none=True)
    base = dataclasses.replace(base, gateway=dataclasses.replace(base.gateway, opcua=opcua))
    doc = yaml.safe_load(site_to_yaml(base))
    doc["gateway"]["mqtt"] = {"host": LOCALHOST, "port": broker.port, "group_id": "dc1", "commands": True,
                              "tls": {"ca": "mqtt/ca.pem", "cert": "mqtt/gateway.pem", "key": "mqtt/gateway.key"}}
    (site_dir / "site.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    site = load_site(site_dir / "site.yaml")
    assert site.gateway.mqtt.tls_ca == str(site_dir / "mqtt" / "ca.pem")

    sub = Subscriber(pki, broker.port)
    sub.start()
    host = SimulatorHost(site)
    await host.start()
    gw = Gateway(site, tmp_path / "data", opcua_port=opcua.port, opcua_host=LOCALHOST)
    await gw.start()
    try:
        def wait(predicate, what, timeout_s=30.0):
            return asyncio.get_running_loop().run_in_executor(None, lambda: sub.wait_for(predicate, timeout_s, what))

        await wait(lambda ms: any(f"/DDATA/{site.name}/{UNIT}" in m.topic for m in ms), "DDATA from the drivers")
        born = {m.topic.split("/")[-1] for m in sub.of("DBIRTH")}
        assert born == {d for d, _k, _e in site.devices()}
        # a CMCS result, written into the address space as the CMCS's OPC UA write does
        risk_node = gw.server.model.points[(UNIT, "RiskScore")]
        await gw.server.server.write_attribute_value(risk_node, ua.DataValue(ua.Variant(0.73, ua.VariantType.Double)))
        alias = _metrics(next(m for m in sub.of("DBIRTH", UNIT)))["RiskScore"].alias
        await wait(lambda ms: any(x.alias == alias and abs(x.double_value - 0.73) < 1e-9 for m in ms
                                  if m.topic.endswith(f"/DDATA/{site.name}/{UNIT}") for x in m.payload.metrics),
                   "RiskScore in DDATA")
        # an alarm raised by the CMCS: its metrics appear (a new DBIRTH of that device carries them)
        gw.server.alarms.raise_predicted_failure(UNIT, "contacts", 600.0, 0.9)
        await wait(lambda ms: any(m.topic.endswith(f"/DBIRTH/{site.name}/{UNIT}")
                                  and _metrics(m).get("Alarms/PredictedFailure/Active")
                                  and _metrics(m)["Alarms/PredictedFailure/Active"].boolean_value for m in ms),
                   "the alarm as metrics")
        # the command metrics are declared in DBIRTH (commands: true), 0 / false: no command pending
        unit_birth = _metrics(next(m for m in sub.of("DBIRTH", UNIT)))
        switch = unit_birth["SwitchSource"]
        assert switch.datatype == 3 and switch.int_value == 0 and "SetPreferredSource" in unit_birth
        des = next(d for d, kind, _e in site.devices() if kind == "des")
        des_birth = _metrics(next(m for m in sub.of("DBIRTH", des)))
        assert des_birth["StartBridging/Power"].datatype == 10 and des_birth["StopBridging"].boolean_value is False
        # DCMD SwitchSource by alias alone (as a host may write a metric it was born with): the command
        # service decides, the audit log says who
        cmd = Payload(timestamp=int(time.time() * 1000))
        m = cmd.metrics.add()
        m.alias, m.datatype, m.int_value = switch.alias, 3, 2
        sub.client.publish(f"spBv1.0/dc1/DCMD/{site.name}/{UNIT}", cmd.SerializeToString(), qos=1)
        audit = tmp_path / "data" / "audit.log"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and '"method": "SwitchSource"' not in (audit.read_text() if audit.exists() else ""):
            await asyncio.sleep(0.1)
        line = next(x for x in audit.read_text().splitlines() if '"method": "SwitchSource"' in x)
        assert '"user": "mqtt"' in line and '"role": "Operator"' in line
    finally:
        await gw.stop()
        await host.stop()
        sub.stop()
    assert any(m.topic == f"spBv1.0/dc1/NDEATH/{site.name}" for m in sub.messages)  # a clean stop sends NDEATH too


def test_births_wait_for_the_primary_host_and_data_is_held_while_it_is_offline(pki, broker, tmp_path):
    site = _site()
    sub = Subscriber(pki, broker.port)
    sub.start()
    table = _table(site)
    _all_good(table, site)
    node = _node(site, table, pki, broker, tmp_path / "data", primary_host_id="scada")
    state_topic = "spBv1.0/STATE/scada"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and node.connections == 0:
            time.sleep(0.05)
        table.update_device(UNIT, {"LoadPower": 5.0})
        time.sleep(1.0)
        assert not sub.of("NBIRTH") and not sub.of("DDATA")  # connected, but the host is not online
        sub.client.publish(state_topic, b'{"online": true, "timestamp": 1}', qos=1, retain=True)
        sub.wait_for(lambda ms: any("/DDATA/" in m.topic for m in ms), what="data once the host is online")
        first = sub.of("DDATA", UNIT)[0].payload.metrics[0]
        assert first.double_value == 5.0 and first.is_historical  # held while the host was away
        assert sub.of("NBIRTH")
        sub.client.publish(state_topic, b'{"online": false, "timestamp": 2}', qos=1, retain=True)
        sub.wait_for(lambda ms: any("/NDEATH/" in m.topic for m in ms), what="NDEATH when the host goes offline")
        table.update_device(UNIT, {"LoadPower": 6.0})
        time.sleep(1.0)
        assert len(sub.of("NBIRTH")) == 1 and all(m.payload.metrics[0].double_value != 6.0
                                                   for m in sub.of("DDATA", UNIT))
        sub.client.publish(state_topic, b'{"online": true, "timestamp": 3}', qos=1, retain=True)
        sub.wait_for(lambda ms: any(m.payload.metrics[0].double_value == 6.0 for m in ms
                                    if f"/DDATA/small-hall/{UNIT}" in m.topic), what="the held value")
        assert len(sub.of("NBIRTH")) == 2
    finally:
        node.stop()
        sub.stop()
