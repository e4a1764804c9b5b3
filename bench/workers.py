"""Processes of `cmcs bench gateway`: the device simulators, and a gateway (ours or the naive one).

    python -m bench.workers sim SITE_FILE
    python -m bench.workers gateway SITE_FILE --mode ours|naive|server --port PORT --data-dir DIR

(`server`: the gateway's OPC UA side alone, fed by a timer instead of devices: `_server_only`.)

Each prints one JSON line when it is ready, and one when it stops (on SIGTERM); `start_worker` and
`stop_worker` run one from a benchmark (bench/gateway.py, bench/mqtt.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import sys
import time
from pathlib import Path

# The benchmark's own throw-away user, in its own temporary data directory.
BENCH_USER, BENCH_PASSWORD = "bench", "bench-only-password"


_STDERR_DRAINS: set[asyncio.Task] = set()


async def start_worker(cmd: list[str], ready_timeout_s: float = 300.0,
                       stdin: bool = False) -> tuple[asyncio.subprocess.Process, dict]:
    """Start a worker process and wait for its ready line; (process, that line's JSON). `stdin`: a
    pipe to the worker's stdin (requests), else none.

    Its stderr is read all along (the last lines kept for the error), so a chatty worker never
    blocks on a full pipe."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail: collections.deque[bytes] = collections.deque(maxlen=40)

    async def drain() -> None:
        async for line in proc.stderr:
            tail.append(line)

    task = asyncio.create_task(drain())
    _STDERR_DRAINS.add(task)
    task.add_done_callback(_STDERR_DRAINS.discard)
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=ready_timeout_s)
    if not line:
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=10)
        except asyncio.TimeoutError:
            pass
        raise RuntimeError(f"{' '.join(cmd)} failed: {b''.join(tail).decode(errors='replace')[-2000:]}")
    return proc, json.loads(line)


async def stop_worker(proc: asyncio.subprocess.Process) -> dict:
    """SIGTERM, then the worker's stopped line as JSON ({} if it had none); killed after 30 s."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        info = json.loads(line) if line.strip() else {}
    except (asyncio.TimeoutError, json.JSONDecodeError):
        info = {}
    try:
        await asyncio.wait_for(proc.wait(), timeout=30)
    except asyncio.TimeoutError:
        proc.kill()
    return info


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _sim(site_file: str) -> None:
    from simulator.endpoints import SimulatorHost
    from siteconfig.loader import load_site

    host = SimulatorHost(load_site(site_file))
    await host.start()
    wall0 = time.time() - host.plant_time_now() / host.speed
    print(json.dumps({"ready": True, "wall0": wall0, "speed": host.speed}), flush=True)
    await _until_signal()
    print(json.dumps({"stopped": True, "clock_overruns": host.overruns}), flush=True)
    await host.stop()


async def _gateway(site_file: str, mode: str, port: int, data_dir: str) -> None:
    from siteconfig.loader import load_site

    site = load_site(site_file)
    t0 = time.time()
    if mode == "ours":
        from gateway.users import set_user

        set_user(Path(data_dir), BENCH_USER, "Operator", password=BENCH_PASSWORD)
        from gateway.app import Gateway

        gw = Gateway(site, Path(data_dir), opcua_port=port, opcua_host="127.0.0.1")
        await gw.start()
        driver, stop = gw.driver, gw.stop
    elif mode == "server":
        driver, stop = await _server_only(site, port, data_dir)
    else:
        from bench.naive_server import NaiveServer

        table, driver, commands = _table_and_commands(site, data_dir)
        naive = NaiveServer(site, table, commands, "127.0.0.1", port)
        await driver.start()
        await naive.start()

        async def stop():
            await naive.stop()
            await driver.stop()
    def report(**extra) -> None:
        health = driver.health()
        print(json.dumps({**extra, "poll_overruns": sum(h.overruns for h in health),
                          "polls": sum(h.polls for h in health), "errors": sum(h.errors for h in health),
                          "max_poll_ms": max((h.poll_duration_ms for h in health), default=0.0),
                          # a driver worker's changes held back while the gateway's loop was behind
                          "worker_coalesced": getattr(driver, "coalesced", 0)}), flush=True)

    print(json.dumps({"ready": True, "build_s": time.time() - t0}), flush=True)
    # SIGUSR1: print the driver health now (the benchmark brackets its window with it)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: report(snapshot=True))
    await _until_signal()
    report(stopped=True)
    await stop()


def _table_and_commands(site, data_dir: str):
    """A point table, the site's drivers from the registry (not started) and the command service,
    with the transfer watch attached as gateway/app.py wires it: (table, drivers, commands)."""
    from drivers.base import DriverSet
    from drivers.pointtable import PointTable
    from gateway.commands import AuditLog, CommandService

    table = PointTable()
    driver = DriverSet(site, table)  # defines every device's points in the table
    commands = CommandService(site, table, driver, AuditLog(Path(data_dir) / "audit.log"))
    table.attach(commands.transfer_watch)
    return table, driver, commands


SERVER_SLICES = 20  # as bench/stress_devices.py's gateway sees its devices: staggered over the scan period


async def _server_only(site, port: int, data_dir: str):
    """The gateway's OPC UA side alone (mode "server", the stress case's server-only ceiling): its point table,
    address-space sink, server, security, limits and alarm engine, as gateway/app.py wires them, but
    no drivers, historian, CMCS or MQTT; a timer updates the point table instead, every point of
    1/SERVER_SLICES of the devices per slice of the scan period, alternating as
    bench/stress_devices.py does (floats 10 <-> 20, integers 1 <-> 2, bits). What this costs per value
    is what our OPC UA stack (asyncua and the gateway's own path into it) costs without any device."""
    from bench.stress_devices import PHASE_VALUES
    from gateway.server import GatewayServer
    from gateway.users import set_user
    from siteconfig.points import POINTS

    set_user(Path(data_dir), BENCH_USER, "Operator", password=BENCH_PASSWORD)
    table, driver, commands = _table_and_commands(site, data_dir)  # the drivers are never started
    server = GatewayServer(site, table, commands, host="127.0.0.1", port=port, health=driver.health,
                           data_dir=Path(data_dir))
    await server.build()
    table.attach(server.values)  # as gateway/app.py wires them (the historian aside)
    table.attach(server.alarms)
    kinds = {name: kind for name, kind, _ in site.devices()}

    def image(kind: str, phase: int) -> dict:  # enumerations alternate as integers, as on the devices
        return {p.name: PHASE_VALUES.get(p.kind, PHASE_VALUES["int"])[phase] for p in POINTS[kind]}

    images = {kind: (image(kind, 0), image(kind, 1)) for kind in set(kinds.values())}
    devices = list(kinds)
    for name in devices:
        table.update_device(name, images[kinds[name]][0])
    await server.serve()
    period = min(site.gateway.scan_groups_s.values(), default=1.0)

    async def feed() -> None:
        slice_n = -(-len(devices) // SERVER_SLICES)
        k, next_t = 0, time.monotonic()
        while True:
            next_t += period / SERVER_SLICES
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            phase = (k // SERVER_SLICES + 1) % 2
            start = (k % SERVER_SLICES) * slice_n
            now = time.time()
            for name in devices[start:start + slice_n]:
                table.update_device(name, images[kinds[name]][phase], now)
            k += 1

    task = asyncio.create_task(feed())

    def fed(t: asyncio.Task) -> None:  # a feed that dies must not leave a server that looks idle
        if not t.cancelled() and t.exception() is not None:
            print(f"server-only feed failed: {t.exception()!r}", file=sys.stderr, flush=True)
            os._exit(1)

    task.add_done_callback(fed)

    async def stop() -> None:
        task.cancel()
        await server.stop()

    return driver, stop


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.workers")
    p.add_argument("role", choices=["sim", "gateway"])
    p.add_argument("site")
    p.add_argument("--mode", choices=["ours", "naive", "server"], default="ours")
    p.add_argument("--port", type=int, default=4840)
    p.add_argument("--data-dir", default="/tmp/cmcs-bench")
    a = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    if a.role == "sim":
        asyncio.run(_sim(a.site))
    else:
        asyncio.run(_gateway(a.site, a.mode, a.port, a.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
