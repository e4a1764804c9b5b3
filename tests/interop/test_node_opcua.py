"""Interop: an OPC UA client that is not ours (node-opcua, tests/interop/client.mjs) against the
gateway serving the demo site from plant-backed Modbus simulators on free local ports.

The client knows nothing of our NodeId naming: it finds the types namespace by URI, browses from
Objects, finds the MicroAtsType instances by HasTypeDefinition, reads LoadPower with its units,
subscribes, and calls SwitchSource twice on a unit on SourceA. It prints one JSON object.

Needs Node >= 18 and `npm ci` in tests/interop (CI's .ci/run does it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.users import set_user
from simulator.endpoints import SimulatorHost
from siteconfig.demo import demo_site
from tests.integration.conftest import free_port, relocate_site

pytestmark = pytest.mark.interop

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "client.mjs"
TYPES_URI = "urn:cmcs-gateway:UA:PowerDistribution"
SITE_URI = "urn:cmcs-gateway:site:demo-hall"
KWT = (ord("K") << 16) | (ord("W") << 8) | ord("T")  # UNECE 'KWT' as an OPC UA unitId
UNITS_URI = "http://www.opcfoundation.org/UA/units/un/cefact"
CLIENT_TIMEOUT_S = 90
OPERATOR = ("interop-operator", "interop-password")  # SwitchSource needs Operator; anonymous is a Viewer


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (Node.js >= 18) is not on PATH: the node-opcua interop test needs it")
    if not (HERE / "node_modules" / "node-opcua-client").is_dir():
        pytest.fail("node-opcua-client is not installed: run `cd tests/interop && npm ci` first "
                    "(CI's .ci/run does it)")
    return node


@pytest.fixture
def node() -> str:
    """The node binary, with node-opcua-client installed next to client.mjs (else the test fails)."""
    return _node()


async def run_client(endpoint: str, *args: str, pki_dir: Path) -> tuple[int, dict, str]:
    """Run client.mjs while this event loop keeps serving; (exit code, its JSON, its stderr)."""
    proc = await asyncio.create_subprocess_exec(
        _node(), str(CLIENT), endpoint, "--pki-dir", str(pki_dir), "--timeout", str(CLIENT_TIMEOUT_S - 10), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"node client did not finish within {CLIENT_TIMEOUT_S} s")
    stderr = err.decode(errors="replace")
    try:
        report = json.loads(out.decode())
    except ValueError:
        pytest.fail(f"node client printed no JSON (exit {proc.returncode}):\nstdout: {out[:2000]!r}\n"
                    f"stderr: {stderr[-3000:]}")
    return proc.returncode, report, stderr


@pytest.fixture
async def endpoint(node, tmp_path):
    """The demo site: its simulators and the gateway on free local ports; yields the endpoint URL
    once every micro-ATS has been polled (LoadPower and ActiveSource Good)."""
    site = relocate_site(demo_site())
    # this walk is about the model over the plain endpoint; security has tests/interop/test_security.py
    site = dataclasses.replace(site, gateway=dataclasses.replace(
        site.gateway, opcua=dataclasses.replace(site.gateway.opcua, allow_security_none=True)))
    host = SimulatorHost(site)
    port = free_port()
    set_user(tmp_path / "data", OPERATOR[0], "Operator", password=OPERATOR[1])
    gateway = Gateway(site, tmp_path / "data", opcua_port=port, opcua_host="127.0.0.1")
    await host.start()
    try:
        await gateway.start()
        try:
            points = [(u.name, p) for u in site.units for p in ("LoadPower", "ActiveSource")]
            deadline = time.monotonic() + 15
            while not all(gateway.table.get(d, p).quality.is_good for d, p in points):
                assert time.monotonic() < deadline, "the demo devices never polled Good"
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # past the server's next flush of values into the address space
            yield f"opc.tcp://127.0.0.1:{port}/cmcs"
        finally:
            await gateway.stop()
    finally:
        await host.stop()


async def test_node_opcua_client(endpoint, tmp_path):
    code, report, stderr = await run_client(endpoint, "--user", OPERATOR[0], "--password", OPERATOR[1],
                                            pki_dir=tmp_path / "pki")
    summary = json.dumps({k: v for k, v in report.items() if k != "units"}, indent=1)[:6000]
    assert code == 0 and report.get("ok") is True, f"node client failed (exit {code}): {summary}\n{stderr[-3000:]}"

    # the types namespace, resolved by URI; the MicroAtsType instances, found by HasTypeDefinition
    namespaces = report["namespaceArray"]
    types_ns = namespaces.index(TYPES_URI)
    assert report["typesNamespaceIndex"] == types_ns
    assert report["microAtsType"]["namespaceUri"] == TYPES_URI
    assert report["microAtsInstances"] == 24, summary
    units = report["units"]
    assert len({u["nodeId"] for u in units}) == 24
    assert report["objectsWithoutOneTypeDefinition"] == []
    assert all(u["path"].startswith("Objects/") for u in units)

    # LoadPower: a Good value in kW (UNECE KWT) with a sane EURange
    for u in units:
        lp = u["loadPower"]
        assert lp["typeDefinition"] == "ns=0;i=2368", (u["path"], lp)  # AnalogItemType
        assert lp["dataType"] == "ns=0;i=11", (u["path"], lp)  # Double
        assert lp["statusCode"] == "Good", (u["path"], lp)
        eu = lp["engineeringUnits"]
        assert eu is not None and lp["engineeringUnitsStatus"] == "Good", (u["path"], lp)
        assert eu["unitId"] == KWT and eu["displayName"] == "kW" and eu["namespaceUri"] == UNITS_URI, (u["path"], eu)
        rng = lp["euRange"]
        assert rng is not None and lp["euRangeStatus"] == "Good", (u["path"], lp)
        assert rng["low"] >= 0 and 1 <= rng["high"] <= 10_000 and rng["low"] < rng["high"], (u["path"], rng)
        assert rng["low"] <= lp["value"] <= rng["high"], (u["path"], lp)

    # ActiveSource: typed with the SourceSelection enumeration of the types namespace, sent as Int32
    dtypes = report["dataTypes"]
    for u in units:
        src = u["activeSource"]
        assert src["statusCode"] == "Good" and src["value"] in (1, 2), (u["path"], src)
        assert src["variantType"] == "Int32", (u["path"], src)
        dt = dtypes[src["dataType"]]
        assert dt["namespaceUri"] == TYPES_URI and dt["browseName"] == {"namespaceUri": TYPES_URI,
                                                                          "name": "SourceSelection"}, dt
        assert dt["isEnumeration"] and dt["supertype"] == ["ns=0;i=29"], dt
        assert dt.get("enumStrings") == ["None", "SourceA", "SourceB"] or \
            dt.get("enumValues") == [{"value": 0, "name": "None"}, {"value": 1, "name": "SourceA"},
                                     {"value": 2, "name": "SourceB"}], dt

    # every variable of the site: explicit DataType, a Description, values encoded as declared, units
    sweep = report["variables"]
    site_problems = [p for p in sweep["problems"] if p["namespaceUri"] in (SITE_URI, TYPES_URI)
                     and "/Server/" not in p["path"]]
    assert sweep["problemsByNamespace"].get(SITE_URI, 0) == 0 and not site_problems, json.dumps(sweep, indent=1)

    # a subscription on every LoadPower: notifications arrive and the values change
    sub = report["subscription"]
    assert sub["monitoredItems"] == 24 and sub["monitoredItemStatus"] == ["Good"], sub
    assert sub["notifications"] >= 24 and sub["badNotifications"] == 0, sub
    assert sub["distinctValues"] > 24 and sub["itemsWithChangingValues"] >= 1, sub

    # SwitchSource by browsing: Good, a measured transfer time, the unit now on SourceB
    sw = report["switch"]
    assert sw["inputArguments"] == [{"name": "Target", "dataType": units[0]["activeSource"]["dataType"],
                                     "valueRank": -1}], sw
    assert sw["outputArguments"] == [{"name": "TransferTime", "dataType": "ns=0;i=11", "valueRank": -1}], sw
    assert sw["activeSourceBefore"] == 1, sw
    assert sw["first"]["statusCode"] == "Good", sw
    assert sw["first"]["outputArguments"][0]["dataType"] == "Double", sw
    assert 0.0 < sw["first"]["transferTimeMs"] < 5.0, sw
    assert sw["activeSourceAfter"] == 2, sw
    # a second call inside the anti-flapping dwell time is refused and changes nothing
    assert sw["second"]["statusCode"] == "BadTooManyOperations", sw
    assert sw["second"]["outputArguments"] == [], sw
    assert sw["activeSourceAfterSecond"] == 2, sw


async def test_client_reports_failure_as_json(node, tmp_path):
    """Nothing listens: the client exits non-zero with an error JSON, not a stack trace."""
    code, report, _ = await run_client(f"opc.tcp://127.0.0.1:{free_port()}/cmcs", pki_dir=tmp_path / "pki")
    assert code != 0 and report["ok"] is False and report["stage"] == "connect" and report["error"], report

