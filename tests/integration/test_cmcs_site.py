"""The CMCS on a hall it was (or was not) trained for: `cmcs train --config`'s bundle, live.

A small generated hall (2 aisles x 3 micro-ATS, one unit without a DES). A bundle trained for it
(scenarios generated on its layout, `cmcs.dataset.training_scenario(seed, duration, site)`, a
few trees: the test is about the wiring, not the accuracy) runs live on it: the CMCS reaches its
cycles, writes RiskScore, and may be set to Automatic. The shipped bundle (the demo hall's) on
the same hall keeps the CMCS Advisory, and says why over OPC UA: ModelVersion names it,
SetMode(Automatic) returns BadInvalidState, a direct write of Mode = Automatic is put back.
Real Modbus simulators, the real gateway with security on, the real models; 300x real time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest
from asyncua import Client, ua

from cmcs.dataset import compact_for_training, simulate, training_scenario
from cmcs.layout import ADVISORY_ONLY, layout_fingerprint
from cmcs.models import SHIPPED_BUNDLE, Predictor
from cmcs.train import TrainConfig, fit, record_layout
from gateway.app import Gateway, layout_mismatch_line
from gateway.users import set_user
from simulator.endpoints import SimulatorHost
from siteconfig.demo import generate_site
from siteconfig.model import CmcsMode
from tests.integration.conftest import free_port, relocate_site

SPEED = 300.0
ENGINEER, ENGINEER_PASSWORD = "erin", "erin-engineer-pw"
NO_DES_UNIT = "MATS-02-03"


def small_hall():
    """2 x 3, MATS-02-03 without storage, served on free local ports, polled every 10 s of plant time."""
    site = generate_site(2, 3, name="small-hall")
    aisles = tuple(dataclasses.replace(a, units=tuple(dataclasses.replace(u, storage=None) if u.name == NO_DES_UNIT
                                                      else u for u in a.units)) for a in site.aisles)
    site = relocate_site(dataclasses.replace(site, aisles=aisles))
    g = site.gateway
    gateway = dataclasses.replace(
        g, scan_groups_s={k: 10.0 / SPEED for k in g.scan_groups_s},
        opcua=dataclasses.replace(g.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True))
    return dataclasses.replace(site, gateway=gateway)


@pytest.fixture(scope="module")
def hall_bundle(tmp_path_factory) -> Path:
    """A bundle trained for the small hall: two short scenarios on its layout, a few trees."""
    site = small_hall()
    cfg = TrainConfig(site=site, risk_rounds=4, load_rounds=4, processes=1)
    runs = [simulate(*training_scenario(seed, 2100.0, site)) for seed in (0, 1)]
    assert all(r.site_name == site.name for r in runs)
    predictor, _ = fit(cfg, [compact_for_training(runs[0])], [runs[1]], progress=False)
    record_layout(predictor, cfg)
    return predictor.save(tmp_path_factory.mktemp("bundles") / "small-hall")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One data dir for both runs (its certificates are made once: the slowest part of a start)."""
    path = tmp_path_factory.mktemp("cmcs-data")
    set_user(path, ENGINEER, "Engineer", password=ENGINEER_PASSWORD)
    return path


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}")


async def _run(site, data_dir: Path, bundle: Path, body) -> None:
    host = SimulatorHost(site, speed=SPEED)
    gateway = Gateway(site, data_dir, cmcs=True, cmcs_bundle=bundle, cmcs_time_scale=SPEED)
    await host.start()
    await gateway.start()
    client = Client(f"opc.tcp://127.0.0.1:{site.gateway.opcua.port}/cmcs", timeout=10)
    client.set_user(ENGINEER)
    client.set_password(ENGINEER_PASSWORD)
    try:
        await client.connect()
        ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
        types_ns = await client.get_namespace_index("urn:cmcs-gateway:UA:PowerDistribution")
        site_obj = await client.nodes.objects.get_child(f"{ns}:{site.name}")
        cmcs = await site_obj.get_child(f"{ns}:Cmcs")
        await body(gateway, client, site_obj, cmcs, ns, types_ns)
    finally:
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001 - teardown goes on
            pass
        await gateway.stop()
        await host.stop()


async def test_a_bundle_trained_for_a_site_runs_live_on_it(hall_bundle, data_dir: Path):
    site, bundle = small_hall(), hall_bundle  # other ports than the training's: addresses are not the layout
    meta = Predictor.load(bundle).meta
    assert meta["layout"]["fingerprint"] == layout_fingerprint(site)
    assert meta["layout"]["summary"] == "small-hall: 2x3, 5 DES"

    async def body(gateway, client, site_obj, cmcs, ns, types_ns):
        live = gateway.live
        assert not live.advisory_only and live.layout.matches
        version = await cmcs.get_child(f"{types_ns}:ModelVersion")
        await _until(lambda: _equals(version, live.predictor.version), 20, "ModelVersion = the bundle's version")
        assert ADVISORY_ONLY not in await version.read_value()
        unit = await site_obj.get_child([f"{ns}:Aisles", f"{ns}:Aisle02", f"{ns}:{NO_DES_UNIT}"])
        risk = await unit.get_child(f"{types_ns}:RiskScore")
        # past the features' 30-min warm-up (6 s at 300x): RiskScore written, even for the unit without DES
        await _until(lambda: _risk_written(risk), 40, f"RiskScore of {NO_DES_UNIT} written")
        assert live.cycles > 10 and live.errors == 0
        await cmcs.call_method(f"{types_ns}:SetMode", ua.Variant(int(CmcsMode.AUTOMATIC), ua.VariantType.Int32))
        assert await (await cmcs.get_child(f"{types_ns}:Mode")).read_value() == CmcsMode.AUTOMATIC

    await _run(site, data_dir, bundle, body)


async def test_a_bundle_for_another_layout_keeps_the_cmcs_advisory_and_says_why(data_dir: Path):
    site = small_hall()
    shipped_version = Predictor.load(SHIPPED_BUNDLE).version

    async def body(gateway, client, site_obj, cmcs, ns, types_ns):
        live = gateway.live
        assert live.advisory_only
        line = layout_mismatch_line(gateway)
        assert "trained for another layout (demo-hall: 4x6, 24 DES)" in line
        assert "small-hall: 2x3, 5 DES" in line and "stays Advisory" in line and "cmcs train --config" in line
        version = await cmcs.get_child(f"{types_ns}:ModelVersion")
        await _until(lambda: _startswith(version, f"{shipped_version} ({ADVISORY_ONLY}"), 20,
                     "ModelVersion says the bundle was trained for another layout")
        mode = await cmcs.get_child(f"{types_ns}:Mode")
        with pytest.raises(ua.UaStatusCodeError) as refused:
            await cmcs.call_method(f"{types_ns}:SetMode", ua.Variant(int(CmcsMode.AUTOMATIC), ua.VariantType.Int32))
        assert refused.value.code == ua.StatusCodes.BadInvalidState
        assert await mode.read_value() == CmcsMode.ADVISORY
        assert gateway.server.cmcs_mode == CmcsMode.ADVISORY
        # Manual is still allowed, and Advisory again
        await cmcs.call_method(f"{types_ns}:SetMode", ua.Variant(int(CmcsMode.MANUAL), ua.VariantType.Int32))
        assert await mode.read_value() == CmcsMode.MANUAL
        # a direct write of Mode = Automatic (Engineer may write the setpoint): the CMCS puts it back
        await mode.write_value(ua.DataValue(ua.Variant(int(CmcsMode.AUTOMATIC), ua.VariantType.Int32)))
        await _until(lambda: _equals(mode, int(CmcsMode.ADVISORY)), 20, "Mode written back to Advisory")
        cycles = live.cycles
        await _until(lambda: _true(live.cycles > cycles + 3), 20, "more cycles")
        assert live.mode == CmcsMode.ADVISORY and live.calls == []  # it never acted

    await _run(site, data_dir, SHIPPED_BUNDLE, body)


async def _equals(node, value) -> bool:
    return await node.read_value() == value


async def _startswith(node, prefix: str) -> bool:
    return str(await node.read_value()).startswith(prefix)


async def _risk_written(node) -> bool:
    """Written by the CMCS: a probability; calibrated risk is never exactly 0 (models.TIE_BREAK)."""
    value = (await node.read_data_value(raise_on_bad_status=False)).Value.Value
    return isinstance(value, float) and 0.0 < value <= 1.0


async def _true(value: bool) -> bool:
    return value
