"""The stress case of `cmcs bench gateway`: every variable changing every scan, side by side with node-opcua.

For each site (1,000 and 3,000 units) and each scan period of SCAN_STEPS_S (1 s, 0.5 s, 0.25 s ...,
stopping at the first whose p99 latency passes LATENCY_LIMIT_S), two servers are measured one
after the other with the same measuring client (tests/interop/bench_client.mjs, node-opcua).
node-opcua's steps start at the scan period where ours did best (and go up through the slower ones
only if that one fails): every step restarts the server, a minute at 3,000 units, and this keeps
the whole `cmcs bench gateway` under its 20 minutes.

- ours: the gateway (bench.workers gateway) polling bench/stress_devices.py, whose every point
  alternates on every read, with every scan group of the site set to the scan period;
- server only (1,000 units): the gateway's OPC UA side without devices (bench.workers gateway
  --mode server: point table, address space, security, limits and alarms, fed by a timer in 20
  slices per period instead of drivers), the ceiling over `ours`: what our server path delivers
  and costs per value with drivers that cost nothing (stress_server_only, stress_ratio_server_only_over_node_opcua);
- node-opcua: tests/interop/bench_server.mjs publishing the same variables (same identifiers and
  types) at the same rate, updated by a timer in 20 slices per period.

offered_per_s = variables / scan period; updates_per_s = notifications the client counted per
second of the window; latency = arrival at the client - SourceTimestamp; cpu_percent = CPU of
the server over the window, every process of it (the gateway and its children; the node
process), in percent of one core. The stress devices' own CPU is not counted (they stand for
the devices). Each site's entry is the highest offered rate whose p99 stays below the limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.workers import BENCH_PASSWORD, BENCH_USER
from siteconfig.demo import free_port, relocate_site, site_to_yaml
from siteconfig.points import POINTS

INTEROP_DIR = Path(__file__).resolve().parent.parent / "tests" / "interop"
SCAN_STEPS_S = (1.0, 0.5, 0.25, 0.125)
LATENCY_LIMIT_S = 1.5
MIN_DELIVERED_PCT = 50.0  # stepping down stops below this share of the offered rate delivered
NODE_TYPES = {"float": "Double", "bool": "Boolean"}  # others (int, enum:*) are Int32, as in the model


def node_available() -> str | None:
    """Why the node-opcua side cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    for pkg in ("node-opcua-client", "node-opcua-server"):
        if not (INTEROP_DIR / "node_modules" / pkg).is_dir():
            return f"{pkg} missing: run `npm ci` in tests/interop"
    return None


def stress_site(site, scan_s: float):
    """The site on free ports, Security None allowed (the bench's loopback), every scan group at scan_s."""
    s = relocate_site(site)
    gw = s.gateway
    opcua = dataclasses.replace(gw.opcua, allow_security_none=True)
    return dataclasses.replace(s, gateway=dataclasses.replace(
        gw, opcua=opcua, scan_groups_s={group: scan_s for group in gw.scan_groups_s}))


def variables(site) -> list[tuple[str, str]]:
    """(string NodeId, node-opcua DataType) of every device variable, as the gateway names them."""
    return [(f"{name}.{p.name}", NODE_TYPES.get(p.kind, "Int32")) for name, kind, _ in site.devices()
            for p in POINTS[kind]]


def tree_cpu_s(proc: psutil.Process) -> float:
    """CPU seconds (user + system) of a process and all its live children."""
    total = 0.0
    for p in [proc] + proc.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


async def _spawn(cmd: list[str], cwd: Path | None = None, ready_timeout: float = 300) -> tuple[asyncio.subprocess.Process, dict]:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                                                cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                                limit=2**24)
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=ready_timeout)
    if not line:
        await proc.wait()
        raise RuntimeError(f"{' '.join(cmd[:3])} exited with {proc.returncode} before it was ready")
    return proc, json.loads(line)


async def _terminate(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None or proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout=30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


async def _wait_first_good(port: int, namespace: str, node_id: str, timeout_s: float = 120) -> None:
    from asyncua import Client, ua

    client = Client(f"opc.tcp://127.0.0.1:{port}/cmcs", timeout=30)
    client.set_user(BENCH_USER)
    client.set_password(BENCH_PASSWORD)
    deadline = time.time() + timeout_s
    while True:
        try:
            await client.connect()
            break
        except (OSError, asyncio.TimeoutError):
            if time.time() > deadline:
                raise
            await asyncio.sleep(0.1)
    try:
        ns = await client.get_namespace_index(namespace)
        probe = client.get_node(ua.NodeId(node_id, ns))
        while not (await probe.read_data_value(raise_on_bad_status=False)).StatusCode.is_good():
            if time.time() > deadline:
                raise TimeoutError("no Good value")
            await asyncio.sleep(0.05)
    finally:
        await client.disconnect()


async def _run_client(port: int, ids_file: Path, scan_s: float, window_s: float, server: psutil.Process,
                      user: bool, health=None) -> dict:
    """Run the measuring client; CPU and the health counters bracket its recording window."""
    cmd = ["node", str(INTEROP_DIR / "bench_client.mjs"), "--endpoint", f"opc.tcp://127.0.0.1:{port}/cmcs",
           "--ids", str(ids_file), "--publishing-ms", str(int(min(500, scan_s * 1000))), "--window-s", str(window_s),
           "--warmup-s", "3"]
    if user:
        cmd += ["--user", BENCH_USER, "--password", BENCH_PASSWORD]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                                                cwd=INTEROP_DIR, limit=2**24)
    result: dict = {}
    cpu0 = t0 = h0 = None
    peak = tree_rss(server)
    try:
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=300 + window_s)
            if not line:
                break
            msg = json.loads(line)
            if msg.get("recording"):
                cpu0, t0 = tree_cpu_s(server), time.time()
                h0 = await health() if health else None
                continue
            result = msg
            break
        if cpu0 is not None:
            result["cpu_percent"] = round(100.0 * (tree_cpu_s(server) - cpu0) / (time.time() - t0), 1)
            if health:
                h1 = await health()
                result["poll_overruns"] = h1["poll_overruns"] - h0["poll_overruns"]
                result["worker_coalesced"] = h1.get("worker_coalesced", 0) - h0.get("worker_coalesced", 0)
        peak = max(peak, tree_rss(server))
        result["peak_rss_mb"] = round(peak / 2**20, 1)
    finally:
        await _terminate(proc)
    return result


async def measure_ours(site, scan_s: float, window_s: float, mode: str = "ours") -> dict:
    """The gateway on the stress devices at this scan period. mode "server": the gateway's OPC UA
    side alone (bench.workers gateway --mode server: point table, address space, security and
    alarms, fed by a timer instead of drivers; no devices), the ceiling over "ours"."""
    py = sys.executable
    s = stress_site(site, scan_s)
    names = variables(s)
    out: dict = {"units": len(s.units), "variables": len(names), "scan_s": scan_s,
                 "offered_per_s": round(len(names) / scan_s, 1)}
    devices = gw = None
    with tempfile.TemporaryDirectory() as tmp:
        site_file, ids_file = Path(tmp) / "site.yaml", Path(tmp) / "ids.json"
        site_file.write_text(site_to_yaml(s))
        namespace = f"urn:cmcs-gateway:site:{s.name}"
        ids_file.write_text(json.dumps({"namespace": namespace, "ids": [i for i, _ in names]}))
        port = free_port()
        try:
            if mode == "ours":
                devices, _ = await _spawn([py, "-m", "bench.stress_devices", str(site_file)])
            launched = time.time()
            gw, _ = await _spawn([py, "-m", "bench.workers", "gateway", str(site_file), "--mode", mode, "--port",
                                  str(port), "--data-dir", str(Path(tmp) / "data")])
            await _wait_first_good(port, namespace, f"{s.units[0].name}.LoadPower")
            out["startup_s"] = round(time.time() - launched, 2)

            async def health() -> dict:
                gw.send_signal(signal.SIGUSR1)
                return json.loads(await asyncio.wait_for(gw.stdout.readline(), timeout=30))

            r = await _run_client(port, ids_file, scan_s, window_s, psutil.Process(gw.pid), True,
                                  health if mode == "ours" else None)
            out.update(_figures(r))
        except Exception as exc:  # noqa: BLE001 - a failed step is a result of its own
            out["error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            await _terminate(gw)
            await _terminate(devices)
    return out


async def measure_server_only(site, scan_s: float, window_s: float) -> dict:
    """Our OPC UA side alone, the ceiling over `ours` (measure_ours, mode "server")."""
    return await measure_ours(site, scan_s, window_s, mode="server")


async def measure_node_opcua(site, scan_s: float, window_s: float) -> dict:
    """node-opcua publishing the same variables at the same rate."""
    s = stress_site(site, scan_s)
    names = variables(s)
    out: dict = {"units": len(s.units), "variables": len(names), "scan_s": scan_s,
                 "offered_per_s": round(len(names) / scan_s, 1)}
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        vars_file = Path(tmp) / "vars.json"
        namespace = "urn:cmcs-bench:node-opcua"
        vars_file.write_text(json.dumps({"namespace": namespace, "vars": names}))
        port = free_port()
        try:
            launched = time.time()
            server, _ = await _spawn(["node", str(INTEROP_DIR / "bench_server.mjs"), "--port", str(port), "--vars",
                                      str(vars_file), "--scan-s", str(scan_s)], cwd=INTEROP_DIR)
            out["startup_s"] = round(time.time() - launched, 2)
            r = await _run_client(port, _ids(vars_file, namespace, names),
                                  scan_s, window_s, psutil.Process(server.pid), False)
            out.update(_figures(r))
        except Exception as exc:  # noqa: BLE001
            out["error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            await _terminate(server)
    return out


def _ids(vars_file: Path, namespace: str, names: list[tuple[str, str]]) -> Path:
    ids = vars_file.with_name("ids.json")
    ids.write_text(json.dumps({"namespace": namespace, "ids": [i for i, _ in names]}))
    return ids


def _figures(r: dict) -> dict:
    if not r.get("ok"):
        return {"error": r.get("error", "the measuring client gave no result")}
    out = {"updates_per_s": round(r["updates_per_s"], 1),
           "latency_p50_s": round(r["latency_p50_s"], 3) if r.get("latency_p50_s") is not None else None,
           "latency_p99_s": round(r["latency_p99_s"], 3) if r.get("latency_p99_s") is not None else None,
           "subscribe_s": round(r["subscribe_s"], 2)}
    for k in ("cpu_percent", "peak_rss_mb", "poll_overruns", "worker_coalesced"):
        if k in r:
            out[k] = r[k]
    return out


def holds(r: dict) -> bool:
    """A step holds when it ran, delivered, and its p99 stayed below the limit."""
    return "error" not in r and r.get("latency_p99_s") is not None and r["latency_p99_s"] < LATENCY_LIMIT_S \
        and r.get("updates_per_s", 0) > 0


def step_down(measure, site, window_s: float, steps=SCAN_STEPS_S, log=print) -> tuple[dict | None, list[dict]]:
    """Measure at each scan period until one fails; (the best step that held, every step)."""
    runs, best = [], None
    for scan_s in steps:
        r = asyncio.run(measure(site, scan_s, window_s))
        if r.get("updates_per_s") and r.get("offered_per_s"):
            r["delivered_pct"] = round(100.0 * r["updates_per_s"] / r["offered_per_s"], 1)
        runs.append(r)
        log(f"      scan {scan_s:g} s: {json.dumps(r)}")
        if not holds(r):
            break
        if best is None or r["updates_per_s"] > best["updates_per_s"]:
            best = r
        if r.get("delivered_pct", 100.0) < MIN_DELIVERED_PCT:
            break  # it no longer carries the offered rate: a faster scan only coalesces more
    return best, runs


def _node_steps(site, window_s: float, steps, ours_best: dict | None, log=print,
                measure=measure_node_opcua) -> tuple[dict | None, list[dict]]:
    """node-opcua's steps (or another server's: `measure`), from the scan period where ours did best
    (each step restarts a server: at 3,000 units a step costs a minute, and the slower steps deliver
    less anyway): down from there as step_down does; if that first step fails, up through the slower
    ones until one holds."""
    start = steps.index(ours_best["scan_s"]) if ours_best is not None and ours_best.get("scan_s") in steps else 0
    best, runs = step_down(measure, site, window_s, steps[start:], log)
    if best is None:
        for scan_s in reversed(steps[:start]):
            r = asyncio.run(measure(site, scan_s, window_s))
            runs.append(r)
            log(f"      scan {scan_s:g} s: {json.dumps(r)}")
            if holds(r):
                best = r
                break
    return best, runs


def run_into(figures: dict, quick: bool = False, log=print) -> None:
    """The stress case for `cmcs bench gateway`: fills figures["stress"], ["baseline_node_opcua"],
    ["stress_ratio_ours_over_node_opcua"] and ["stress_steps"] (docs/interface.md section 7)."""
    from siteconfig.demo import generate_site

    figures.setdefault("stress", {})
    figures.setdefault("baseline_node_opcua", {})
    why = node_available()
    sites = {"1000-units": generate_site(20, 50)} if quick else {"1000-units": generate_site(20, 50),
                                                                 "3000-units": generate_site(60, 50)}
    window = 5.0 if quick else 10.0
    steps = SCAN_STEPS_S[:2] if quick else SCAN_STEPS_S
    all_steps: dict = {}
    for name, site in sites.items():
        log(f"  stress {name} / ours ...")
        best, runs = step_down(measure_ours, site, window, steps, log)
        figures["stress"][name] = best if best is not None else {**runs[0], "holds": False}
        all_steps[name] = {"ours": runs}
        if name == "1000-units":
            # the ceiling: our OPC UA side without devices, from ours' best scan period down
            log(f"  stress {name} / server only (no devices) ...")
            fbest, fruns = _node_steps(site, window, steps, best, log, measure=measure_server_only)
            figures.setdefault("stress_server_only", {})[name] = fbest if fbest is not None else {**fruns[0], "holds": False}
            all_steps[name]["server_only"] = fruns
        if why is None:
            log(f"  stress {name} / node-opcua ...")
            nbest, nruns = _node_steps(site, window, steps, best, log)
            figures["baseline_node_opcua"][name] = nbest if nbest is not None else {**nruns[0], "holds": False}
            all_steps[name]["node_opcua"] = nruns
        else:
            figures["baseline_node_opcua"][name] = {"error": why}
    figures["stress_steps"] = all_steps
    figures["stress_ratio_ours_over_node_opcua"] = {
        name: (round(figures["stress"][name]["updates_per_s"] / figures["baseline_node_opcua"][name]["updates_per_s"], 2)
               if figures["stress"][name].get("updates_per_s") and figures["baseline_node_opcua"][name].get("updates_per_s")
               else None) for name in sites}
    alone, node = figures.get("stress_server_only", {}), figures["baseline_node_opcua"]
    figures["stress_ratio_server_only_over_node_opcua"] = {
        name: round(alone[name]["updates_per_s"] / node[name]["updates_per_s"], 2)
        for name in alone if alone[name].get("updates_per_s") and node.get(name, {}).get("updates_per_s")}
    for name in sites:
        r = figures["stress"][name]
        if r.get("peak_rss_mb") and r.get("variables"):
            r["rss_kb_per_variable"] = round(r["peak_rss_mb"] * 1024 / r["variables"], 2)


def markdown(figures: dict) -> str:
    """The stress section of the bench report."""
    from bench.report import markdown_table

    cols = ["units", "variables", "scan_s", "offered_per_s", "updates_per_s", "latency_p50_s", "latency_p99_s",
            "cpu_percent", "startup_s", "peak_rss_mb", "poll_overruns"]
    rows = []
    for name in figures.get("stress", {}):
        for label, key in (("ours", "stress"), ("server only (no devices)", "stress_server_only"),
                           ("node-opcua", "baseline_node_opcua")):
            if name not in figures.get(key, {}):
                continue
            r = figures.get(key, {}).get(name, {})
            rows.append([name, label] + [r.get(c, "-") if r.get(c) is not None else "-" for c in cols] + [r.get("error", "")])
    return ("## Stress: every variable changing every scan\n\nScan period stepped down "
            f"({', '.join(f'{s:g}' for s in SCAN_STEPS_S)} s) until p99 passes {LATENCY_LIMIT_S:g} s; each row is the "
            "highest offered rate that held. Same measuring client (node-opcua) for every server.\n\n"
            + markdown_table(["site", "server"] + cols + ["error"], rows)
            + f"\n\nRatio ours / node-opcua (updates/s): `{json.dumps(figures.get('stress_ratio_ours_over_node_opcua'))}`; "
            f"server only / node-opcua: `{json.dumps(figures.get('stress_ratio_server_only_over_node_opcua'))}`\n")
