"""`cmcs bench robustness`: hostile clients, hostile devices and unsafe commands (docs/interface.md section 7).

It starts its own device simulators and gateway (bench/workers.py processes, SecurityNone allowed on
loopback for the plain-transport depths) on free ports, and measures:

- orphans: 1,000 sessions each subscribe to up to 700 variables and close without deleting their
  subscriptions (CloseSession DeleteSubscriptions=false); the gateway's RSS before, at the peak and
  once its subscription count is back to zero (rss_growth_pct), and how long that took;
- opcua: our own OPC UA binary fuzzer at three depths (bench/fuzz_opcua.py) with a liveness probe
  (a normal client read) every PROBE_EVERY inputs;
- modbus: a hostile device in place of one aisle's endpoint (bench/fuzz_modbus.py): the gateway
  must stay up, mark the aisle Bad, and be Good again within two poll periods once it behaves;
- interlocks: unsafe commands over random plant states (tests/unit/test_interlock_properties.py
  runs the same property with hypothesis).

The JSON has the keys of docs/interface.md section 7 plus a "details" object.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
from asyncua import Client, ua

from bench.report import write_json
from siteconfig.points import POINTS

SUMMARY_KEYS = ("opcua_inputs", "modbus_frames", "crashes", "liveness_failures", "rss_growth_pct", "recovery_s_max",
                "unsafe_commands_refused_pct")


# ---- the processes ------------------------------------------------------------------------------------
class Processes:
    """The simulators and the gateway as bench/workers.py processes (`env`: e.g. another PYTHONPATH)."""

    def __init__(self, site_file: Path, port: int, data_dir: str, env: dict | None = None,
                 gateway_site_file: Path | None = None):
        self.site_file, self.port, self.data_dir = site_file, port, data_dir
        self.gateway_site_file = gateway_site_file or site_file  # e.g. with one endpoint moved to a hostile device
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.sim: asyncio.subprocess.Process | None = None
        self.gateway: asyncio.subprocess.Process | None = None

    async def _start(self, *args: str) -> asyncio.subprocess.Process:
        log_path = Path(self.data_dir).parent / f"{args[0]}.log"  # the worker's log, for the report
        with open(log_path, "ab") as log_file:
            # another checkout (env PYTHONPATH) runs from its own directory: `-m` puts the cwd first on the path
            cwd = self.env.get("PYTHONPATH", "").split(os.pathsep)[0] or None
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.workers", *args, cwd=cwd,
                                                        stdout=asyncio.subprocess.PIPE, stderr=log_file, env=self.env)
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=300)
        if not line:
            raise RuntimeError(f"bench.workers {args[0]} did not start")
        return proc

    async def start(self, with_sim: bool = True) -> None:
        if with_sim:
            self.sim = await self._start("sim", str(self.site_file))
        self.gateway = await self._start("gateway", str(self.gateway_site_file), "--port", str(self.port),
                                         "--data-dir", self.data_dir)

    def rss_mb(self) -> float:
        return psutil.Process(self.gateway.pid).memory_info().rss / 1e6

    def gateway_alive(self) -> bool:
        return self.gateway is not None and self.gateway.returncode is None

    async def stop(self) -> None:
        for proc in (self.gateway, self.sim):
            if proc is None or proc.returncode is not None:
                continue
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


def bench_site(site, path: Path):
    """`site` with its devices on free ports and SecurityNone allowed (loopback only), written to `path`."""
    from siteconfig.demo import relocate_site, site_to_yaml

    site = relocate_site(site)
    opcua = dataclasses.replace(site.gateway.opcua, host="127.0.0.1", allow_security_none=True, allow_anonymous=True)
    site = dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, opcua=opcua))
    path.write_text(site_to_yaml(site))
    return site


def variable_ids(site, ns: int) -> list[ua.NodeId]:
    return [ua.NodeId(f"{name}.{p.name}", ns) for name, kind, _ in site.devices() for p in POINTS[kind]]


async def connect(url: str, timeout: float = 10.0) -> Client:
    client = Client(url, timeout=timeout)  # anonymous (a Viewer may subscribe)
    await client.connect()
    return client


async def abandon(client: Client) -> None:
    """CloseSession with DeleteSubscriptions=false, then close the channel: the subscriptions stay behind."""
    close = client.uaclient.close_session
    client.uaclient.close_session = lambda delete_subscriptions: close(False)
    await client.disconnect()


class Probe:
    """A normal client: reads one variable (liveness) and the server's subscription count, reconnecting
    when its session is gone. A read that fails even after a reconnect is a liveness failure."""

    def __init__(self, url: str, site, timeout_s: float = 10.0):
        self.url, self.site, self.timeout_s = url, site, timeout_s
        self.client: Client | None = None
        self.node: ua.NodeId | None = None
        self.failures = 0
        self.reads = 0

    async def _ensure(self) -> Client:
        if self.client is None or self.client.uaclient.protocol is None:
            if self.client is not None:
                try:
                    await self.client.disconnect()
                except Exception:  # noqa: BLE001 - it is gone already
                    pass
            self.client = await connect(self.url, self.timeout_s)
            ns = await self.client.get_namespace_index(f"urn:cmcs-gateway:site:{self.site.name}")
            self.node = ua.NodeId("SourceA.Available", ns)
        return self.client

    async def _read(self, node_id: ua.NodeId):
        for attempt in range(2):
            try:
                client = await self._ensure()
                return await asyncio.wait_for(client.get_node(node_id).read_data_value(raise_on_bad_status=False),
                                              self.timeout_s)
            except (OSError, asyncio.TimeoutError, ConnectionError, ua.UaError):
                self.client = None if attempt == 0 else self.client
        raise ConnectionError("no answer")

    async def alive(self) -> bool:
        """One normal read; False (and counted) if the gateway does not answer it."""
        self.reads += 1
        try:
            await self._ensure()
            await self._read(self.node)
            return True
        except (OSError, asyncio.TimeoutError, ConnectionError, ua.UaError):
            self.failures += 1
            return False

    async def subscription_count(self) -> int | None:
        """ServerDiagnosticsSummary.CurrentSubscriptionCount (None: not maintained, e.g. on main before limits)."""
        try:
            dv = await self._read(ua.NodeId(ua.ObjectIds.Server_ServerDiagnostics_ServerDiagnosticsSummary_CurrentSubscriptionCount))
        except ConnectionError:
            return None
        value = dv.Value.Value if dv.Value is not None else None
        return int(value) if isinstance(value, int) else None

    async def close(self) -> None:
        if self.client is not None:
            try:
                await self.client.disconnect()
            except Exception:  # noqa: BLE001
                pass


# ---- (a) orphaned subscriptions ----------------------------------------------------------------------
async def orphans(procs: Processes, site, sessions: int, items_per_session: int, concurrency: int = 20,
                  settle_s: float = 120.0) -> dict:
    """`sessions` sessions subscribe and leave; the gateway's RSS and subscription count until they are gone."""
    url = f"opc.tcp://127.0.0.1:{procs.port}/cmcs"
    probe = Probe(url, site)
    await probe.alive()
    ns = await probe.client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
    variables = variable_ids(site, ns)[:items_per_session]
    # without gateway/limits.py (main before it) the diagnostics are not maintained: no count to wait for
    counted = (await probe._read(ua.NodeId("ResourceRefusals.Sessions", ns))).StatusCode.is_good()
    await asyncio.sleep(2.0)
    rss0 = procs.rss_mb()
    cpu0 = psutil.Process(procs.gateway.pid).cpu_times()
    refused = failed = 0
    t0 = time.monotonic()

    async def one() -> None:
        nonlocal refused, failed
        try:
            client = await connect(url)
        except ua.UaStatusCodeError:
            refused += 1
            return
        except (OSError, asyncio.TimeoutError):
            failed += 1
            return
        try:
            sub = await client.create_subscription(500, None)
            await sub.subscribe_data_change([client.get_node(n) for n in variables], queuesize=0)
        except (ua.UaStatusCodeError, asyncio.TimeoutError, OSError):
            refused += 1
        finally:
            try:
                await abandon(client)
            except Exception:  # noqa: BLE001 - the session is left behind either way
                failed += 1

    for start in range(0, sessions, concurrency):
        await asyncio.gather(*(one() for _ in range(min(concurrency, sessions - start))))
        await probe.alive()
    opened_s = time.monotonic() - t0
    peak = procs.rss_mb()
    left = await probe.subscription_count() if counted else None
    closed_at = time.monotonic()
    samples = [(0.0, left, peak)]
    while time.monotonic() - closed_at < settle_s:
        await asyncio.sleep(5.0)
        await probe.alive()
        count = await probe.subscription_count() if counted else None
        samples.append((round(time.monotonic() - closed_at, 1), count, round(procs.rss_mb(), 1)))
        if count == 0:
            break
    freed_s = time.monotonic() - closed_at if samples[-1][1] == 0 else None
    await asyncio.sleep(3.0)
    rss1 = procs.rss_mb()
    cpu1 = psutil.Process(procs.gateway.pid).cpu_times()
    await probe.close()
    return {"liveness_failures": probe.failures, "sessions": sessions, "items_per_session": len(variables), "opened_s": round(opened_s, 1),
            "refused": refused, "failed": failed, "rss_before_mb": round(rss0, 1), "rss_peak_mb": round(peak, 1),
            "rss_after_mb": round(rss1, 1), "rss_growth_pct": round(100.0 * (rss1 - rss0) / rss0, 1),
            "subscriptions_left_at_close": left, "freed_s": round(freed_s, 1) if freed_s is not None else None,
            "cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 1),
            "samples": samples}


async def orphan_experiment(sessions: int = 1000, items: int = 700, env: dict | None = None,
                            settle_s: float = 120.0) -> dict:
    """The orphan run alone on the demo site (`env` lets one run it against another checkout)."""
    from siteconfig.demo import demo_site, free_port

    with tempfile.TemporaryDirectory() as tmp:
        site = bench_site(demo_site(), Path(tmp) / "site.yaml")
        procs = Processes(Path(tmp) / "site.yaml", free_port(), str(Path(tmp) / "data"), env)
        await procs.start()
        try:
            return await orphans(procs, site, sessions, items, settle_s=settle_s)
        finally:
            await procs.stop()
            if os.environ.get("CMCS_BENCH_KEEP_LOGS"):
                import shutil
                shutil.copy(Path(tmp) / "gateway.log", os.environ["CMCS_BENCH_KEEP_LOGS"])


async def opcua_fuzz(procs: Processes, site, identity, per_depth: int, probe_every: int = 1000) -> dict:
    """The three fuzzing depths against the running gateway; a crash is the gateway process gone."""
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    from bench.fuzz_opcua import fuzz_channel, fuzz_raw, fuzz_session

    url = f"opc.tcp://127.0.0.1:{procs.port}/cmcs"
    probe = Probe(url, site)
    await probe.alive()
    ns = await probe.client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
    rss0 = procs.rss_mb()
    cert, key, uri = identity

    async def secure_client() -> Client:
        client = Client(url, timeout=10)
        client.application_uri = uri
        await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)
        await client.load_client_certificate(str(cert))
        await client.load_private_key(key)
        await client.connect()
        return client

    result: dict = {}
    t0 = time.monotonic()
    result["raw"] = await fuzz_raw("127.0.0.1", procs.port, url, per_depth, seed=1, probe=probe.alive,
                                   probe_every=probe_every)
    result["channel"] = await fuzz_channel("127.0.0.1", procs.port, url, per_depth, seed=2, probe=probe.alive,
                                           probe_every=probe_every)
    result["session"] = await fuzz_session(secure_client, ns, per_depth, seed=3, probe=probe.alive,
                                           probe_every=probe_every)
    result["seconds"] = round(time.monotonic() - t0, 1)
    await probe.alive()
    result["inputs"] = result["raw"] + result["channel"] + result["session"]["inputs"]
    result["liveness_probes"], result["liveness_failures"] = probe.reads, probe.failures
    result["rss_before_mb"], result["rss_after_mb"] = round(rss0, 1), round(procs.rss_mb(), 1)
    await probe.close()
    return result


def hostile_site(site, hostile_port: int):
    """`site` with the devices of its first aisle's endpoint moved to `hostile_port`; (site, endpoint)."""
    first = site.aisles[0].pdbs[0].device

    def move(ep):
        return dataclasses.replace(ep, port=hostile_port) if (ep.host, ep.port) == (first.host, first.port) else ep

    aisles = []
    for aisle in site.aisles:
        pdbs = tuple(dataclasses.replace(p, device=move(p.device)) for p in aisle.pdbs)
        units = tuple(dataclasses.replace(u, device=move(u.device),
                                          storage=dataclasses.replace(u.storage, device=move(u.storage.device))
                                          if u.storage else None) for u in aisle.units)
        aisles.append(dataclasses.replace(aisle, pdbs=pdbs, units=units))
    return dataclasses.replace(site, aisles=tuple(aisles)), (first.host, first.port)


async def modbus_fuzz(procs: Processes, site, device, frames_target: int, hostile_s: float = 15.0,
                      max_cycles: int = 40) -> dict:
    """Cycles of a hostile period (the aisle must go Bad, the gateway stay up) and a good one (time
    until the aisle's values are Good again: recovery_s)."""
    url = f"opc.tcp://127.0.0.1:{procs.port}/cmcs"
    probe = Probe(url, site)
    await probe.alive()
    ns = await probe.client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
    watched = ua.NodeId(f"{site.aisles[0].pdbs[0].name}.Current", ns)
    other = ua.NodeId(f"{site.aisles[-1].pdbs[0].name}.Current", ns)
    poll_s = site.gateway.scan_groups_s.get(site.aisles[0].pdbs[0].device.scan_group, 1.0)
    cycles, recoveries, not_bad, others_bad = 0, [], 0, 0
    t0 = time.monotonic()
    while device.frames < frames_target and cycles < max_cycles and procs.gateway_alive():
        cycles += 1
        device.hostile = True
        await asyncio.sleep(max(hostile_s, site.gateway.stale_time_s + 3 * poll_s))
        status = (await probe._read(watched)).StatusCode
        not_bad += not status.is_bad()
        others_bad += not (await probe._read(other)).StatusCode.is_good()  # the other aisles keep serving
        await probe.alive()
        device.hostile = False
        behaved_at = time.monotonic()
        while time.monotonic() - behaved_at < 60.0:
            if (await probe._read(watched)).StatusCode.is_good():
                break
            await asyncio.sleep(0.1)
        recoveries.append(round(time.monotonic() - behaved_at, 2))
    await probe.close()
    return {"frames": device.frames, "requests": device.requests, "connections": device.connections,
            "cycles": cycles, "seconds": round(time.monotonic() - t0, 1), "poll_period_s": poll_s,
            "recovery_s": recoveries, "recovery_s_max": max(recoveries) if recoveries else None,
            "recovered_within_two_polls": sum(r <= 2 * poll_s for r in recoveries),
            "hostile_periods_not_marked_bad": not_bad, "other_aisle_not_good": others_bad,
            "liveness_failures": probe.failures, "gateway_alive": procs.gateway_alive()}


def interlocks(examples: int) -> dict:
    """The interlock property with `examples` random plant states and targets (hypothesis)."""
    from hypothesis import HealthCheck, given, settings

    from bench.interlock_property import Bench, Tally, plant_state, targets
    from siteconfig.demo import demo_site

    site = demo_site()
    bench = Bench(site)
    tally = Tally()
    loop = asyncio.new_event_loop()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(state=plant_state(site), target=targets())
    def check(state, target):
        loop.run_until_complete(bench.switch(state, target, tally))

    check()
    loop.close()
    return {"examples": tally.unsafe + tally.safe, "unsafe": tally.unsafe, "refused_exactly": tally.refused_exactly,
            "mismatches": tally.mismatches[:5], "unsafe_commands_refused_pct": round(tally.refused_pct, 3)}


async def _phases(quick: bool) -> dict:
    from gateway.security import ensure_cmcs_client
    from siteconfig.demo import demo_site, free_port

    from bench.fuzz_modbus import HostileDevice

    details: dict = {"crashes": 0}
    with tempfile.TemporaryDirectory() as tmp:
        site = bench_site(demo_site(), Path(tmp) / "site.yaml")
        hostile_port = free_port()
        gateway_site, upstream = hostile_site(site, hostile_port)
        from siteconfig.demo import site_to_yaml

        (Path(tmp) / "gateway-site.yaml").write_text(site_to_yaml(gateway_site))
        device = HostileDevice(hostile_port, upstream)
        await device.start()  # behaves (a proxy to the simulator) until told otherwise
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        identity = ensure_cmcs_client(data_dir)  # the fuzzer's trusted certificate (Engineer)
        procs = Processes(Path(tmp) / "site.yaml", free_port(), str(data_dir),
                          gateway_site_file=Path(tmp) / "gateway-site.yaml")
        await procs.start()
        try:
            phases = os.environ.get("CMCS_BENCH_PHASES", "orphans,opcua,modbus").split(",")
            # (a) orphans: a first round brings the process to its working size; then the 1,000
            sessions = 100 if quick else 1000
            if "orphans" in phases:
                details["orphans_warmup"] = await orphans(procs, site, max(20, sessions // 10), 700, settle_s=90.0)
                details["orphans"] = await orphans(procs, site, sessions, 700, settle_s=90.0)
                details["crashes"] += not procs.gateway_alive()
            # (b) the OPC UA fuzzer
            if "opcua" in phases and procs.gateway_alive():
                details["opcua"] = await opcua_fuzz(procs, site, identity, 3000 if quick else 35_000)
                details["crashes"] += not procs.gateway_alive()
            # (c) the hostile Modbus device in place of the first aisle's endpoint
            if "modbus" in phases and procs.gateway_alive():
                details["modbus"] = await modbus_fuzz(procs, site, device, 5000 if quick else 100_000)
                details["crashes"] += not procs.gateway_alive()
        finally:
            await procs.stop()
            await device.stop()
            details["gateway_log_errors"] = _log_summary(Path(tmp) / "gateway.log")
    return details


def _log_summary(path: Path) -> dict:
    """ERROR lines of the gateway's log by logger and message start (what broke, and how often)."""
    counts: dict[str, int] = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("ERROR:"):
                key = line[:110]
                counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:15])


def run(out: Path, json_path: Path | None, quick: bool = False) -> dict:
    """The whole benchmark; `quick`: small counts (a smoke run)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    details = asyncio.run(_phases(quick))
    details["interlocks"] = interlocks(500 if quick else 5000)
    opcua = details.get("opcua", {})
    summary = {
        "opcua_inputs": opcua.get("inputs", 0),
        "modbus_frames": details.get("modbus", {}).get("frames", 0),
        "crashes": details["crashes"],
        "liveness_failures": opcua.get("liveness_failures", 0) + details.get("orphans", {}).get("liveness_failures", 0)
        + details.get("modbus", {}).get("liveness_failures", 0),
        "rss_growth_pct": round(100.0 * (details["orphans"]["rss_after_mb"] - details["orphans_warmup"]["rss_after_mb"])
                                / details["orphans_warmup"]["rss_after_mb"], 1) if "orphans" in details else None,
        "recovery_s_max": details.get("modbus", {}).get("recovery_s_max"),
        "unsafe_commands_refused_pct": details["interlocks"]["unsafe_commands_refused_pct"],
    }
    details["seconds"] = round(time.monotonic() - t0, 1)
    result = {**summary, "details": details}
    (out / "robustness.md").write_text(
        "# cmcs bench robustness\n\nrss_growth_pct: the gateway's RSS once the 1,000 sessions' orphaned subscriptions "
        "are gone, against its RSS after a first round of the same (its working size); the cold figures are in "
        "details.orphans.\n\n```json\n" + json.dumps(result, indent=1) + "\n```\n")
    write_json(json_path, result)
    print(json.dumps(summary))
    return result
