"""`cmcs simulate` and `cmcs run --config` as two real processes, the way a site runs them."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time

from asyncua import Client, ua

from siteconfig.demo import demo_site, site_to_yaml

from .conftest import free_port, relocate_site


def _site_file(tmp_path):
    site = relocate_site(demo_site())
    opcua = dataclasses.replace(site.gateway.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True)
    site = dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, opcua=opcua))
    path = tmp_path / "site.yaml"
    path.write_text(site_to_yaml(site))
    return site, path


def _start(args, tmp_path, name):
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "gateway", *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}), log


async def _first_good_read(url: str, ns_uri: str, node: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            async with Client(url, timeout=5) as client:
                ns = await client.get_namespace_index(ns_uri)
                dv = await client.get_node(ua.NodeId(node, ns)).read_data_value(raise_on_bad_status=False)
                if dv.StatusCode.is_good():
                    return dv.Value.Value
        except (OSError, asyncio.TimeoutError, ua.UaError) as exc:
            last_error = exc
        await asyncio.sleep(0.5)
    raise AssertionError(f"no Good value from {url}: {last_error}")


async def test_run_against_a_separate_simulator_and_stop_cleanly(tmp_path):
    site, path = _site_file(tmp_path)
    sim, sim_log = _start(["simulate", "--config", str(path)], tmp_path, "simulate")
    gw = None
    try:
        gw, gw_log = _start(["run", "--config", str(path), "--data-dir", str(tmp_path / "data")], tmp_path, "run")
        url = f"opc.tcp://127.0.0.1:{site.gateway.opcua.port}/cmcs"
        value = await _first_good_read(url, f"urn:cmcs-gateway:site:{site.name}", "MATS-02-03.LoadPower", 60)
        assert value > 0
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=30) == 0
        output = (tmp_path / "run.log").read_text()
        assert "stopped" in output and "Traceback" not in output
    finally:
        for proc in (gw, sim):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    assert sim.returncode == 0, (tmp_path / "simulate.log").read_text()[-2000:]


def test_run_with_a_bad_site_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: {name: x, nominal_voltage_v: -1, frequency_hz: 60}\n")
    proc = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(bad), "--data-dir",
                           str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "bad.yaml:1" in proc.stderr
